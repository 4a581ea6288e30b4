"""`canaryflow compile` writes KFP IR YAML that kfp loads back, with the cluster settings from config."""

import json

import pytest
import yaml
from kfp import components

from tests.conftest import run_cli


def _compile(tmp_path, *sets):
    path = tmp_path / "pipeline.yaml"
    args = ["compile", "-o", str(path)]
    for item in sets:
        args += ["--set", item]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return path, next(yaml.safe_load_all(path.read_text()))


def _kubernetes(path) -> dict:
    """The kfp-kubernetes platform spec: the document after the pipeline spec."""
    documents = list(yaml.safe_load_all(path.read_text()))
    return documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


# kfp-kubernetes' CreatePVC / DeletePVC: the KFP driver does their work, and no container of theirs runs.
CLAIM_EXECUTORS = {"exec-createpvc", "exec-deletepvc"}


def _step_executors(spec) -> list[str]:
    return [name for name in spec["deploymentSpec"]["executors"] if name not in CLAIM_EXECUTORS]


def _secrets_by_executor(path) -> dict[str, set[str]]:
    return {name: {s["secretName"] for s in e.get("secretAsEnv", [])} for name, e in _kubernetes(path).items()}


def _inner_tasks(spec) -> dict:
    return spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]


def _compile_fails(*sets) -> str:
    args = ["compile", "-o", "/dev/null"]
    for item in sets:
        args += ["--set", item]
    result = run_cli(*args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_compiled_yaml_loads_back_in_kfp(tmp_path):
    path, _ = _compile(tmp_path)
    pipeline = components.load_component_from_file(str(path))
    assert pipeline.name == "canaryflow-lifecycle"
    assert {"config_json", "run_key"} <= set(pipeline.component_spec.inputs)


def test_fine_tune_asks_for_the_configured_accelerators(tmp_path):
    _, spec = _compile(tmp_path, "train.accelerator_limit=4", "train.accelerator_type=nvidia.com/gpu")
    resources = spec["deploymentSpec"]["executors"]["exec-fine-tune"]["container"]["resources"]
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["accelerator"]["resourceCount"] == "4"
    others = [k for k, v in spec["deploymentSpec"]["executors"].items() if "resources" in v["container"]]
    assert others == ["exec-fine-tune"]


def test_fine_tune_carries_the_gpu_and_scheduling_settings_from_config(tmp_path):
    path, spec = _compile(
        tmp_path,
        "train.accelerator_limit=2",
        "train.accelerator_type=nvidia.com/gpu",
        "train.cpu_request=8",
        "train.memory_request=32Gi",
        "train.node_selector={cloud.google.com/gke-accelerator: nvidia-tesla-a100}",
        "train.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
        "train.checkpoint_pvc=ckpt-claim",
        "train.checkpoint_claim=shared",
        "train.retries=3",
    )
    container = spec["deploymentSpec"]["executors"]["exec-fine-tune"]["container"]
    assert container["resources"]["resourceCpuRequest"] == "8"
    assert container["resources"]["resourceMemoryRequest"] == "32Gi"
    assert container["resources"]["accelerator"]["resourceCount"] == "2"
    platform = _kubernetes(path)
    # Only fine_tune goes to a GPU node; the other steps carry only their Secrets.
    assert [name for name, executor in platform.items() if set(executor) - {"secretAsEnv"}] == ["exec-fine-tune"]
    fine_tune = platform["exec-fine-tune"]
    assert fine_tune["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}
    assert fine_tune["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert fine_tune["pvcMount"][0]["constant"] == "ckpt-claim"
    mount = fine_tune["pvcMount"][0]["mountPath"]
    baked = json.loads(spec["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"])
    assert baked["train"]["checkpoint_dir"] == mount  # checkpoints land on the claim, where a retry finds them
    retry = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]["fine-tune"]["retryPolicy"]
    assert retry["maxRetryCount"] == 3


def test_cpu_only_config_asks_for_no_accelerator(tmp_path):
    _, spec = _compile(tmp_path, "train.accelerator_limit=0")
    assert "resources" not in spec["deploymentSpec"]["executors"]["exec-fine-tune"]["container"]


def test_the_gate_guards_the_canary_and_an_exit_handler_records_the_outcome(tmp_path):
    _, spec = _compile(tmp_path)
    root = spec["root"]["dag"]["tasks"]
    assert root["record-outcome"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    condition = next(task for name, task in inner.items() if name.startswith("condition"))
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--evaluate-model-Output'] == true"
    )
    branch = spec["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert list(branch) == ["canary-rollout"]


def test_retries_and_caching(tmp_path):
    _, spec = _compile(tmp_path)
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert inner["prepare-data"].get("cachingOptions") == {}  # caching off: the data source changes
    assert inner["fine-tune"]["cachingOptions"] == {"enableCache": True}
    for task in ("evaluate-model", "register-model"):
        assert inner[task]["retryPolicy"]["maxRetryCount"] >= 1


def test_images_come_from_the_one_constant_and_skip_installing_kfp(tmp_path):
    from canaryflow.images import BASE_IMAGE, TRAIN_IMAGE

    _, spec = _compile(tmp_path)
    executors = {name: spec["deploymentSpec"]["executors"][name] for name in _step_executors(spec)}
    assert {e["container"]["image"] for e in executors.values()} == {BASE_IMAGE, TRAIN_IMAGE}
    for executor in executors.values():
        assert "pip install" not in " ".join(executor["container"]["command"])


def test_secrets_reach_every_step_from_kubernetes_and_never_the_yaml(tmp_path):
    secret = "pa55-w0rd-never-compiled"
    path, spec = _compile(tmp_path, f"mlflow.tracking_uri=http://ops:{secret}@mlflow.canaryflow.svc:5000")
    text = path.read_text()
    assert secret not in text and "mlflow.canaryflow.svc" not in text
    baked = json.loads(spec["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"])
    assert baked["mlflow"]["tracking_uri"] is None  # each step reads MLFLOW_TRACKING_URI from the Secret
    executors = _kubernetes(path)
    steps = _step_executors(spec)
    assert sorted(executors) == sorted(steps)
    for name in steps:
        wired = {s["secretName"]: s for s in executors[name]["secretAsEnv"]}
        assert set(wired) - {"canaryflow-mlflow-lock"} == {
            "canaryflow-mlflow",
            "canaryflow-mlflow-auth",
            "canaryflow-s3",
            "canaryflow-hf",
        }, name
        envs = {k["envVar"] for k in wired["canaryflow-mlflow"]["keyToEnv"]}
        assert "MLFLOW_TRACKING_URI" in envs
        assert {k["envVar"] for k in wired["canaryflow-hf"]["keyToEnv"]} == {"HF_TOKEN"}
        assert wired["canaryflow-hf"].get("optional") is True
    # The canary runs on KServe, and promotions lock the MLflow server's database, named by a Secret.
    assert baked["canary"]["backend"] == "kserve"
    assert baked["registry"]["lock"] == "env:CANARYFLOW_PROMOTION_LOCK"


def test_the_lock_secret_reaches_only_the_step_that_moves_champion(tmp_path):
    # Its URI holds a database password; only canary_rollout takes the promotion lock with it
    # (controller -> models.promote / reject -> ledger.move_aliases -> promotion_lock).
    path, spec = _compile(tmp_path)
    secrets = _secrets_by_executor(path)
    assert [name for name, wired in secrets.items() if "canaryflow-mlflow-lock" in wired] == ["exec-canary-rollout"]
    lock = next(s for s in _kubernetes(path)["exec-canary-rollout"]["secretAsEnv"] if s["secretName"].endswith("-lock"))
    assert [k["envVar"] for k in lock["keyToEnv"]] == ["CANARYFLOW_PROMOTION_LOCK"]
    assert {"canaryflow-mlflow", "canaryflow-s3"} <= secrets["exec-fine-tune"]  # the others still reach every step
    assert set(secrets) == set(_step_executors(spec))


def test_a_secret_goes_to_the_steps_its_config_lists(tmp_path):
    path, _ = _compile(
        tmp_path,
        "cluster.secrets=[{secret: canaryflow-mlflow, keys: {tracking-uri: MLFLOW_TRACKING_URI}},"
        " {secret: gpu-registry, keys: {token: REGISTRY_TOKEN}, steps: [fine_tune, evaluate_model]}]",
    )
    secrets = _secrets_by_executor(path)
    assert sorted(name for name, wired in secrets.items() if "gpu-registry" in wired) == [
        "exec-evaluate-model",
        "exec-fine-tune",
    ]
    assert all("canaryflow-mlflow" in wired for wired in secrets.values())


def test_a_secret_for_an_unknown_step_is_refused_in_one_line():
    line = _compile_fails("cluster.secrets=[{secret: x, keys: {k: K}, steps: [finetune]}]")
    assert line.startswith("error: config: cluster.secrets.0.steps.0:"), line


def test_each_run_clones_its_own_checkpoint_claim_and_fine_tune_mounts_it(tmp_path):
    path, spec = _compile(tmp_path, "train.checkpoint_pvc=ckpt-template", "train.checkpoint_size=50Gi")
    tasks = _inner_tasks(spec)
    create = tasks["createpvc"]["inputs"]["parameters"]
    constant = {name: value["runtimeValue"]["constant"] for name, value in create.items()}
    # No fixed name: the driver makes <uuid><suffix> per run, so concurrent runs never share the RWO claim.
    assert "pvc_name" not in constant and constant["pvc_name_suffix"].endswith("checkpoints")
    assert constant["access_modes"] == ["ReadWriteOnce"] and constant["size"] == "50Gi"
    assert constant["data_source"] == {"kind": "PersistentVolumeClaim", "name": "ckpt-template"}
    assert tasks["createpvc"].get("cachingOptions") == {}  # a cached name would be another run's claim
    # Every retry of fine_tune mounts the claim the run's create task made, where its checkpoints are.
    mount = _kubernetes(path)["exec-fine-tune"]["pvcMount"]
    assert [m["pvcNameParameter"]["taskOutputParameter"] for m in mount] == [
        {"outputParameterKey": "name", "producerTask": "createpvc"}
    ]
    assert "createpvc" in tasks["fine-tune"]["dependentTasks"]
    delete = tasks["deletepvc"]
    assert "fine-tune" in delete["dependentTasks"]
    assert delete["inputs"]["parameters"]["pvc_name"]["taskOutputParameter"]["producerTask"] == "createpvc"
    baked = json.loads(spec["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"])
    assert baked["train"]["checkpoint_dir"] == mount[0]["mountPath"]


def test_a_claim_cloned_from_a_snapshot_names_the_snapshot_api(tmp_path):
    _, spec = _compile(tmp_path, "train.checkpoint_source_kind=VolumeSnapshot")
    source = _inner_tasks(spec)["createpvc"]["inputs"]["parameters"]["data_source"]["runtimeValue"]["constant"]
    assert source == {
        "apiGroup": "snapshot.storage.k8s.io",
        "kind": "VolumeSnapshot",
        "name": "canaryflow-checkpoints",
    }


def test_no_checkpoint_claim_means_no_claim_tasks(tmp_path):
    path, spec = _compile(tmp_path, "train.checkpoint_pvc=null")
    assert not set(spec["deploymentSpec"]["executors"]) & CLAIM_EXECUTORS
    assert "pvcMount" not in _kubernetes(path)["exec-fine-tune"]


def test_optional_secrets_are_refused_below_kfp_backend_2_15():
    line = _compile_fails("cluster.kfp_backend_version=2.14")
    assert "canaryflow-mlflow-auth" in line and "kubeflow/pipelines#12216" in line and "2.14" in line


def test_per_run_claims_are_refused_below_kfp_backend_2_17_and_a_shared_claim_compiles(tmp_path):
    line = _compile_fails("cluster.kfp_backend_version=2.16")
    assert "train.checkpoint_claim" in line and "kubeflow/pipelines#12696" in line
    path, spec = _compile(tmp_path, "cluster.kfp_backend_version=2.16", "train.checkpoint_claim=shared")
    assert [m["constant"] for m in _kubernetes(path)["exec-fine-tune"]["pvcMount"]] == ["canaryflow-checkpoints"]
    assert not set(spec["deploymentSpec"]["executors"]) & CLAIM_EXECUTORS


def test_an_old_backend_compiles_without_optional_secrets(tmp_path):
    path, _ = _compile(
        tmp_path,
        "cluster.kfp_backend_version=2.14",
        "train.checkpoint_claim=shared",
        "cluster.secrets=[{secret: canaryflow-mlflow, keys: {tracking-uri: MLFLOW_TRACKING_URI}}]",
    )
    assert _secrets_by_executor(path)["exec-fine-tune"] == {"canaryflow-mlflow"}


@pytest.mark.slow
def test_fine_tune_on_several_accelerators_gets_a_memory_backed_dev_shm(tmp_path):
    path, _ = _compile(tmp_path, "train.accelerator_limit=2")
    assert _kubernetes(path)["exec-fine-tune"]["emptyDirMounts"] == [
        {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "4Gi"}
    ]
    path, _ = _compile(tmp_path, "train.accelerator_limit=8", "train.shm_size=32Gi")
    assert _kubernetes(path)["exec-fine-tune"]["emptyDirMounts"][0]["sizeLimit"] == "32Gi"
    for limit in (1, 0):
        path, _ = _compile(tmp_path, f"train.accelerator_limit={limit}")
        assert all("emptyDirMounts" not in executor for executor in _kubernetes(path).values()), limit


def test_on_several_nodes_fine_tune_carries_the_trainjob_settings_and_waits_without_a_gpu(tmp_path):
    path, spec = _compile(
        tmp_path,
        "train.nodes=4",
        "train.accelerator_limit=2",
        "train.max_wall_seconds=7200",
        "train.runtime=torch-a100",
        "train.node_selector={gpu-type: a100}",
        "train.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
    )
    baked = json.loads(spec["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"])
    train = baked["train"]
    assert (train["nodes"], train["max_wall_seconds"], train["runtime"]) == (4, 7200, "torch-a100")
    assert train["runtime_kind"] == "ClusterTrainingRuntime" and train["accelerator_limit"] == 2
    assert train["node_selector"] == {"gpu-type": "a100"} and train["tolerations"][0]["key"] == "nvidia.com/gpu"
    # The TrainJob asks for the GPUs and the placement; the step that waits for it asks for none of them.
    assert "resources" not in spec["deploymentSpec"]["executors"]["exec-fine-tune"]["container"]
    fine_tune = _kubernetes(path)["exec-fine-tune"]
    assert not {"nodeSelector", "tolerations", "emptyDirMounts"} & set(fine_tune)
    # Every node mounts the run's claim, so it is ReadWriteMany, and the step is told its name to give them.
    tasks = _inner_tasks(spec)
    create = tasks["createpvc"]["inputs"]["parameters"]
    assert create["access_modes"]["runtimeValue"]["constant"] == ["ReadWriteMany"]
    claim = tasks["fine-tune"]["inputs"]["parameters"]["checkpoint_claim"]["taskOutputParameter"]
    assert claim == {"outputParameterKey": "name", "producerTask": "createpvc"}
    assert fine_tune["pvcMount"][0]["mountPath"] == train["checkpoint_dir"]
    # One node: the step trains itself, on a claim of its own, and is given no claim name.
    _, spec = _compile(tmp_path)
    assert "checkpoint_claim" not in _inner_tasks(spec)["fine-tune"]["inputs"]["parameters"]


def test_several_nodes_without_a_claim_they_share_are_refused_in_one_line():
    line = _compile_fails("train.nodes=2", "train.checkpoint_pvc=null")
    assert "train.nodes=2 needs train.checkpoint_pvc" in line
    line = _compile_fails("train.nodes=2", "train.checkpoint_dir=/tmp/elsewhere")
    assert "train.checkpoint_dir must be unset" in line
