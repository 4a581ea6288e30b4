"""`canaryflow compile` writes KFP IR YAML that kfp loads back, with the cluster settings from config."""

import json

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
        "train.retries=3",
    )
    container = spec["deploymentSpec"]["executors"]["exec-fine-tune"]["container"]
    assert container["resources"]["resourceCpuRequest"] == "8"
    assert container["resources"]["resourceMemoryRequest"] == "32Gi"
    assert container["resources"]["accelerator"]["resourceCount"] == "2"
    platform = _kubernetes(path)
    # Only fine_tune goes to a GPU node; the other steps carry only the Secrets every step gets.
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
    executors = spec["deploymentSpec"]["executors"]
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
    steps = [name for name in spec["deploymentSpec"]["executors"]]
    assert sorted(executors) == sorted(steps)
    for name in steps:
        wired = {s["secretName"]: s for s in executors[name]["secretAsEnv"]}
        assert set(wired) == {
            "canaryflow-mlflow",
            "canaryflow-mlflow-auth",
            "canaryflow-s3",
            "canaryflow-hf",
            "canaryflow-mlflow-db",
        }, name
        envs = {k["envVar"] for k in wired["canaryflow-mlflow"]["keyToEnv"]}
        assert "MLFLOW_TRACKING_URI" in envs
        assert {k["envVar"] for k in wired["canaryflow-hf"]["keyToEnv"]} == {"HF_TOKEN"}
        assert wired["canaryflow-hf"].get("optional") is True
    # The canary runs on KServe, and promotions lock the MLflow server's database, named by a Secret.
    assert baked["canary"]["backend"] == "kserve"
    assert baked["registry"]["lock"] == "env:CANARYFLOW_PROMOTION_LOCK"
