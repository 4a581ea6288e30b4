"""Multi-node fine-tuning without a cluster: the TrainJob that src/canaryflow/training/trainjob.py builds, validated
against Kubeflow Trainer's own CRD (vendored under tests/schemas/kubeflow-trainer), and the step's wait loop against
a fake Kubernetes API at the edge that plays the Trainer's controller and the nodes' rank 0.

What the fake does, and where upstream does it:
- the API server: create answers 409 AlreadyExists for a name it holds, get and delete of a missing one 404
  (k8s.io/apiserver pkg/registry/generic/registry/store.go); every write changes metadata.resourceVersion; a watch
  (GET on the collection with watch=true) streams one JSON event per line, {"type": ADDED | MODIFIED | DELETED,
  "object": ...}, for changes after the resourceVersion given, and ends after timeoutSeconds; a resourceVersion
  too old to watch from is an ERROR event with a Status of code 410 (k8s.io/apiserver pkg/storage/cacher).
- the Trainer: a TrainJob's status reports its JobSet's replicated jobs (jobsStatus) once they run, and on the
  end the JobSet's Completed or Failed condition copied under the type Complete or Failed (kubeflow/trainer
  8c0f5059bd51, pkg/runtime/framework/plugins/jobset/jobset.go Status), with JobSet's reasons and messages
  (kubernetes-sigs/jobset pkg/constants/constants.go: AllJobsCompleted "jobset completed successfully",
  FailedJobs "jobset failed due to one or more job failures").
- rank 0 (launch.main under torchrun): appends one JSON line per logged step to <out>/train_log.jsonl, and at the
  end saves the model and train_metrics.json in <out>; the fake reads <out> from the TrainJob's own command.
Every object the fake is sent or holds is validated against the CRD's schema.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from canaryflow.config import load_config
from canaryflow.errors import BadInputError, CanaryflowError
from canaryflow.images import TRAIN_IMAGE
from canaryflow.training import trainjob
from canaryflow.training.trainjob import GROUP, PLURAL, VERSION, TrainJobRun, job_name
from tests.conftest import REPO
from tests.manifests.test_rbac import TRAINJOB_CALLS

CRD = REPO / "tests" / "schemas" / "kubeflow-trainer" / "trainer.kubeflow.org_trainjobs.yaml"
NS, RUN_KEY = "team-ml", "run-7f3a"
CALLED: set[tuple[str, str, str]] = set()  # (apiGroup, resource, verb) the step used, over this module


def _closed(schema):
    """The schema as the API server applies it: a structural schema prunes fields it does not list, so a field the
    CRD does not know would be dropped without a word; here it fails validation instead."""
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _closed(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        if not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def schema():
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == VERSION)
    return jsonschema.Draft7Validator(_closed(version["schema"]["openAPIV3Schema"]))


def _name_rules(obj: dict) -> None:
    # The CRD's own CEL rules on the name, which jsonschema does not run.
    name = obj["metadata"]["name"]
    assert len(name) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name


def _api_error(status: int, message: str, reason: str) -> ApiException:
    exc = ApiException(status=status, reason={404: "Not Found", 409: "Conflict"}.get(status))
    exc.body = json.dumps({"kind": "Status", "status": "Failure", "message": message, "reason": reason, "code": status})
    return exc


class _Stream:
    """A watch response as urllib3 hands it to kubernetes.watch (_preload_content=False): its body in chunks."""

    def __init__(self, lines: list[str]):
        self.body = "".join(line + "\n" for line in lines).encode()

    def stream(self, amt=None, decode_content=False):
        # Split mid-line, as a chunked HTTP body may be.
        yield from (self.body[i : i + 7] for i in range(0, len(self.body), 7))

    def close(self):
        pass

    def release_conn(self):
        pass


class FakeTrainer:
    """kubernetes.client.CustomObjectsApi for TrainJobs in one namespace, with the Trainer and rank 0 behind it (see
    the module docstring). Each watch is `tick_s` seconds of the job's life: rank 0 logs a step, and after
    `steps` of them the job ends as `outcome`. `clock` is the time those watches have taken."""

    def __init__(self, validator, steps: int = 3, outcome: str = "Complete", tick_s: float = 5.0, on_watch=None):
        self.validator, self.steps, self.outcome, self.tick_s = validator, steps, outcome, tick_s
        self.on_watch = on_watch  # called at the start of each watch: a signal arriving mid-wait, in tests
        self.objects: dict[str, dict] = {}
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.events: list[tuple[int, str, dict]] = []  # (resourceVersion, type, object)
        self.compacted = 0  # watches from a resourceVersion below this get 410 Gone
        self.now = 0.0
        self.logged: dict[str, int] = {}
        self._version = 0

    def clock(self) -> float:
        return self.now

    def _enter(self, verb, group, version, namespace, plural) -> None:
        CALLED.add((group, plural, verb))
        assert (group, version, namespace, plural) == (GROUP, VERSION, NS, PLURAL)

    def _write(self, name: str, obj: dict | None, kind: str) -> None:
        self._version += 1
        if obj is not None:
            obj["metadata"]["resourceVersion"] = str(self._version)
            self.validator.validate(obj)
            self.objects[name] = obj
        self.events.append((self._version, kind, copy.deepcopy(obj or {"metadata": {"name": name}})))

    def _missing(self, name: str) -> ApiException:
        return _api_error(404, f'{PLURAL}.{GROUP} "{name}" not found', "NotFound")

    # --- CustomObjectsApi ---

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self._enter("create", group, version, namespace, plural)
        self.validator.validate(body)
        _name_rules(body)
        name = body["metadata"]["name"]
        if name in self.objects:
            raise _api_error(409, f'{PLURAL}.{GROUP} "{name}" already exists', "AlreadyExists")
        self.created.append(copy.deepcopy(body))
        obj = copy.deepcopy(body)
        obj["metadata"]["generation"] = 1
        self.logged[name] = 0
        self._write(name, obj, "ADDED")
        return copy.deepcopy(obj)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self._enter("get", group, version, namespace, plural)
        if name not in self.objects:
            raise self._missing(name)
        return copy.deepcopy(self.objects[name])

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, body=None):
        self._enter("delete", group, version, namespace, plural)
        if name not in self.objects:
            raise self._missing(name)
        del self.objects[name]
        self.deleted.append(name)
        self._write(name, None, "DELETED")

    def list_namespaced_custom_object(
        self, group, version, namespace, plural, watch=False, _preload_content=True, **options
    ):
        self._enter("watch" if watch else "list", group, version, namespace, plural)
        assert watch and not _preload_content
        if self.on_watch is not None:
            self.on_watch()
        name = options["field_selector"].removeprefix("metadata.name=")
        since = int(options.get("resource_version") or 0)
        if since and since < self.compacted:
            gone = {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old resource version"}
            return _Stream([json.dumps({"type": "ERROR", "object": gone})])
        if name in self.objects:
            self._run(name)
        lines = [
            json.dumps({"type": kind, "object": obj})
            for version_, kind, obj in self.events
            if version_ > since and obj["metadata"]["name"] == name
        ]
        self.now += self.tick_s if lines else options["timeout_seconds"]
        return _Stream(lines)

    # --- the Trainer and rank 0 ---

    def _out(self, name: str) -> Path:
        command = self.objects[name]["spec"]["trainer"]["command"]
        return Path(command[command.index("--out") + 1])

    def _run(self, name: str) -> None:
        """`tick_s` of the job's life."""
        obj = copy.deepcopy(self.objects[name])
        if trainjob.finished(obj):
            return
        status = obj.setdefault("status", {})
        nodes = obj["spec"]["trainer"]["numNodes"]
        if self.logged[name] == 0:
            status["jobsStatus"] = [{"name": "node", "ready": nodes, "succeeded": 0, "failed": 0, "active": nodes,
                                     "suspended": 0}]  # fmt: skip
            self._write(name, obj, "MODIFIED")
            obj = copy.deepcopy(obj)
        out = self._out(name)
        if self.logged[name] < self.steps:
            self.logged[name] += 1
            step = self.logged[name] * 10
            with open(out / "train_log.jsonl", "a", encoding="utf-8") as log:
                log.write(json.dumps({"step": step, "loss": round(4.0 / step, 4), "learning_rate": 0.001}) + "\n")
            return
        if self.outcome == "running":
            return
        if self.outcome == "Complete":
            (out / "model.safetensors").write_bytes(b"weights")
            metrics = {"steps": self.steps * 10, "final_loss": 0.4, "nodes": nodes}
            (out / "train_metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
            reason, message = "AllJobsCompleted", "jobset completed successfully"
            counts = {"active": 0, "succeeded": nodes}
        else:
            reason, message = (
                "FailedJobs",
                f"jobset failed due to one or more job failures (first failed job: {name}-node-0)",
            )
            counts = {"active": 0, "failed": 1}
        status["jobsStatus"][0].update(counts)
        condition = {"type": self.outcome, "status": "True", "reason": reason, "message": message,
                     "lastTransitionTime": "2026-12-02T04:00:00Z"}  # fmt: skip
        status["conditions"] = [condition]
        self._write(name, obj, "MODIFIED")


def _step(tmp_path, fake, *overrides: str):
    """A TrainJobRun of the default config on the fake, its claim mounted at tmp_path/claim."""
    cfg = load_config(overrides=[f"train.checkpoint_dir={tmp_path / 'claim'}", "train.nodes=3", *overrides])
    logged: list[tuple[int, dict]] = []
    run = TrainJobRun(cfg, RUN_KEY, "run-claim", fake, NS, lambda step, m: logged.append((step, m)), fake.clock)
    data = tmp_path / "data"
    if not data.is_dir():
        data.mkdir()
        (data / "train.parquet").write_bytes(b"rows")
    return run, data, logged


# --- the TrainJob itself ---


def test_the_trainjob_validates_against_the_trainer_crd_and_carries_the_training_settings(schema):
    cfg = load_config(
        overrides=[
            "train.checkpoint_dir=/mnt/canaryflow-checkpoints",
            "train.nodes=4",
            "train.accelerator_limit=2",
            "train.cpu_request=8",
            "train.memory_request=64Gi",
            "train.node_selector={gpu-type: a100}",
            "train.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
            "train.max_wall_seconds=7200",
        ]
    )
    job = trainjob.trainjob(cfg, job_name(RUN_KEY), NS, "run-claim", RUN_KEY)
    schema.validate(job)
    _name_rules(job)
    spec = job["spec"]
    assert spec["runtimeRef"] == {"apiGroup": GROUP, "kind": "ClusterTrainingRuntime", "name": "torch-distributed"}
    assert spec["activeDeadlineSeconds"] == 7200
    trainer = spec["trainer"]
    assert trainer["image"] == TRAIN_IMAGE and trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 2
    assert trainer["resourcesPerNode"] == {"limits": {"nvidia.com/gpu": 2}, "requests": {"cpu": "8", "memory": "64Gi"}}
    # torchrun, which reads the runtime's PET_* variables, runs launch.main's rank wrapper on the shared claim; the
    # checkpoints are the single-pod step's own folder, checkpoint_dir/<run key>, so a retry resumes from them.
    work = f"/mnt/canaryflow-checkpoints/{RUN_KEY}.trainjob"
    assert trainer["command"] == [
        "python", "-m", "torch.distributed.run", "-m", "canaryflow.training.trainjob",
        "--config", f"{work}/config.json", "--data", f"{work}/data", "--out", f"{work}/model",
        "--checkpoints", f"/mnt/canaryflow-checkpoints/{RUN_KEY}",
    ]  # fmt: skip
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in trainer["env"]}
    assert secrets["HF_TOKEN"] == {"name": "canaryflow-hf", "key": "token", "optional": True}
    assert "CANARYFLOW_PROMOTION_LOCK" not in secrets  # canary_rollout's alone
    (patch,) = spec["runtimePatches"]
    (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert replicated["name"] == "node"  # the torch-distributed runtime's replicated job
    pod = replicated["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"gpu-type": "a100"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert {v["name"]: v for v in pod["volumes"]}["checkpoints"]["persistentVolumeClaim"] == {"claimName": "run-claim"}
    (container,) = pod["containers"]
    assert container["name"] == "node"
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/mnt/canaryflow-checkpoints", "/dev/shm"}


def test_the_schema_refuses_what_the_api_server_would(schema):
    cfg = load_config(overrides=["train.checkpoint_dir=/mnt/c", "train.nodes=2"])
    job = trainjob.trainjob(cfg, job_name(RUN_KEY), NS, "claim", RUN_KEY)
    bad_nodes = copy.deepcopy(job)
    bad_nodes["spec"]["trainer"]["numNodes"] = -1
    unknown = copy.deepcopy(job)
    unknown["spec"]["trainer"]["nodeSelector"] = {"a": "b"}  # not a Trainer field: the API server would drop it
    for bad in (bad_nodes, unknown):
        with pytest.raises(jsonschema.ValidationError):
            schema.validate(bad)


def test_job_names_are_dns_labels_one_per_run_key():
    names = {job_name(key) for key in ("run-1", "run-2", "A run key with spaces and UPPER case " * 5)}
    assert len(names) == 3
    for name in names:
        _name_rules({"metadata": {"name": name}})
    assert job_name("run-1") == job_name("run-1")


# --- the wait loop ---


def test_a_completed_trainjob_hands_on_rank_0s_model_and_metrics(tmp_path, schema):
    fake = FakeTrainer(schema, steps=4)
    run, data, logged = _step(tmp_path, fake)
    out = tmp_path / "out"
    metrics = run.run(str(data), str(out))
    assert metrics == {"steps": 40, "final_loss": 0.4, "nodes": 3}
    # Every step rank 0 logged reached MLflow's callback, once, in order, though watches cut lines in chunks.
    assert [step for step, _ in logged] == [10, 20, 30, 40]
    assert logged[0][1] == {"loss": 0.4, "learning_rate": 0.001}
    assert (out / "model.safetensors").read_bytes() == b"weights"
    assert not (out / "train_log.jsonl").exists()
    assert (run.work / "data" / "train.parquet").read_bytes() == b"rows"  # staged on the claim for every node
    assert json.loads((run.work / "config.json").read_text())["train"]["nodes"] == 3
    assert [job["metadata"]["name"] for job in fake.created] == [job_name(RUN_KEY)]
    assert fake.deleted == []  # a finished job holds no GPUs; it stays for `kubectl describe`


def test_a_failed_trainjob_is_one_error_line_with_the_trainers_reason(tmp_path, schema):
    fake = FakeTrainer(schema, outcome="Failed")
    run, data, _ = _step(tmp_path, fake)
    with pytest.raises(CanaryflowError) as failed:
        run.run(str(data), str(tmp_path / "out"))
    line = str(failed.value)
    assert "\n" not in line
    assert line.startswith(f"TrainJob {NS}/{job_name(RUN_KEY)} failed: FailedJobs: jobset failed")
    assert not (tmp_path / "out").exists()


def test_a_failed_rank_0_is_the_steps_error(tmp_path, schema, monkeypatch):
    fake = FakeTrainer(schema, outcome="Failed")
    run, data, _ = _step(tmp_path, fake)
    job = run.start(str(data))
    # Rank 0 as torchrun starts it, on a config the claim does not hold: its error goes on the claim.
    monkeypatch.setenv("RANK", "0")
    argv = [
        "--config",
        str(run.work / "missing.json"),
        "--data",
        str(run.work / "data"),
        "--out",
        str(run.work / "model"),
    ]
    with pytest.raises(FileNotFoundError):
        trainjob.main(argv)
    with pytest.raises(CanaryflowError) as failed:
        run.wait(job)
    assert str(failed.value).startswith(f"TrainJob {NS}/{job_name(RUN_KEY)} failed: rank 0: FileNotFoundError:")
    assert "missing.json" in str(failed.value) and "\n" not in str(failed.value)


def test_a_trainjob_over_max_wall_seconds_is_deleted_and_the_step_fails(tmp_path, schema):
    fake = FakeTrainer(schema, steps=1000, outcome="running")
    run, data, logged = _step(tmp_path, fake, "train.max_wall_seconds=100")
    with pytest.raises(CanaryflowError, match=r"ran over 100 s \(train.max_wall_seconds\); it was deleted"):
        run.run(str(data), str(tmp_path / "out"))
    assert fake.deleted == [job_name(RUN_KEY)] and not fake.objects
    assert 100 <= fake.now <= 100 + trainjob.WATCH_S  # the bound held on the watches' own time
    assert logged  # what rank 0 logged before the end still reached MLflow


@pytest.mark.parametrize("stop", ["SIGTERM", "KeyboardInterrupt"])
def test_a_stopped_step_deletes_its_trainjob(tmp_path, schema, stop):
    watches = []

    def arrive():
        watches.append(1)
        if len(watches) == 3:
            if stop == "SIGTERM":  # what Kubernetes sends when the run is terminated or the pod evicted
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                raise KeyboardInterrupt

    fake = FakeTrainer(schema, steps=1000, outcome="running", on_watch=arrive)
    run, data, _ = _step(tmp_path, fake)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(trainjob.Cancelled, match="was deleted: the step was stopped"):
        run.run(str(data), str(tmp_path / "out"))
    assert fake.deleted == [job_name(RUN_KEY)] and not fake.objects
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_retried_step_takes_over_its_running_trainjob_and_replaces_a_failed_one(tmp_path, schema):
    fake = FakeTrainer(schema, steps=2)
    first, data, _ = _step(tmp_path, fake)
    first.start(str(data))  # the first attempt's pod is lost here, without deleting its TrainJob
    second, _, _ = _step(tmp_path, fake)
    assert second.run(str(data), str(tmp_path / "out"))["steps"] == 20
    assert len(fake.created) == 1 and fake.deleted == []

    # An earlier attempt whose TrainJob failed: the retry deletes it and starts one that resumes.
    fake = FakeTrainer(schema, steps=2, outcome="Failed")
    failed, _, _ = _step(tmp_path, fake)
    with pytest.raises(CanaryflowError):
        failed.wait(failed.start(str(data)))
    fake.outcome = "Complete"
    retried, _, _ = _step(tmp_path, fake)
    assert retried.run(str(data), str(tmp_path / "out"))["steps"] == 20
    assert fake.deleted == [job_name(RUN_KEY)] and len(fake.created) == 2


def test_a_watch_from_a_compacted_version_reads_the_trainjob_again(tmp_path, schema):
    fake = FakeTrainer(schema, steps=2)
    run, data, _ = _step(tmp_path, fake)
    job = run.start(str(data))
    fake._run(job["metadata"]["name"])  # the job changes before the step's first watch...
    fake.compacted = fake._version  # ...and the API server no longer holds the history the step would watch from
    assert run.wait(job)["steps"] == 20


def test_without_a_shared_claim_the_step_refuses_in_one_line(tmp_path):
    cfg = load_config(overrides=["train.nodes=2"])
    with pytest.raises(BadInputError, match="train.nodes > 1 .* train.checkpoint_pvc"):
        trainjob.train_on_nodes(cfg, RUN_KEY, str(tmp_path), str(tmp_path / "out"), "", lambda s, m: None)


def test_the_role_grants_exactly_the_trainjob_calls_the_step_makes(tmp_path, schema):
    # A success and a timeout of their own, so that the comparison holds when this test runs alone.
    fake = FakeTrainer(schema, steps=1)
    run, data, _ = _step(tmp_path, fake)
    run.run(str(data), str(tmp_path / "out"))
    fake = FakeTrainer(schema, steps=1000, outcome="running")
    run, data, _ = _step(tmp_path, fake, "train.max_wall_seconds=30")
    with pytest.raises(CanaryflowError):
        run.run(str(data), str(tmp_path / "out"))
    assert {(group, plural, verb, None) for group, plural, verb in CALLED} == set(TRAINJOB_CALLS)


def test_fine_tune_step_on_several_nodes_waits_for_a_trainjob_instead_of_training(tmp_path, monkeypatch):
    from kfp.dsl import Dataset, Metrics, Model

    from canaryflow.components.fine_tune import fine_tune
    from canaryflow.registry.tracking import sqlite_uri

    # No cluster here: the TrainJob path stops at the Kubernetes credentials, before any training could start.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    cfg = load_config(
        overrides=[
            f"mlflow.tracking_uri={sqlite_uri(tmp_path / 'workdir')}",
            f"train.checkpoint_dir={tmp_path / 'claim'}",
            "train.nodes=2",
        ]
    )
    ids = {"config_json": cfg.model_dump_json(), "run_key": RUN_KEY, "job_id": ""}
    data = tmp_path / "data"
    data.mkdir()
    artifacts = {
        "data": Dataset(name="data", uri=str(data), metadata={}),
        "model": Model(name="model", uri=str(tmp_path / "model"), metadata={}),
        "metrics": Metrics(name="metrics", uri=str(tmp_path / "metrics"), metadata={}),
    }
    with pytest.raises(CanaryflowError, match="no Kubernetes credentials"):
        fine_tune.python_func(**artifacts, **ids, checkpoint_claim="run-claim")
    with pytest.raises(BadInputError, match="train.nodes > 1 trains in a Kubeflow Trainer TrainJob"):
        fine_tune.python_func(**artifacts, **ids)  # kfp.local: no claim to share
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_the_trainjobs_own_command_trains_under_torchrun_as_the_torch_runtime_starts_it(tmp_path, prepared, demo_files):
    """Not the fake: the TrainJob's command, run as one node of one process with the PET_* variables the torch
    runtime sets (torch.go EnforceMLPolicy; PET_MASTER_ADDR is <job>-node-0-0.<job> there, loopback here). Stopped
    after a checkpoint, as the kubelet stops a deleted pod (SIGTERM to the container's torchrun, which takes its
    workers down with it), then run again as a retried step's new TrainJob, it resumes from the run's checkpoints
    and leaves rank 0's log, metrics and model where the waiting step collects them."""
    import subprocess
    import sys
    import time

    from tests.conftest import demo_config
    from tests.servers import free_port

    cfg = demo_config(
        demo_files,
        f"train.checkpoint_dir={tmp_path / 'claim'}",
        "train.nodes=2",
        "train.accelerator_limit=0",
        "train.max_steps=30",
        "train.checkpoint_steps=2",
        "train.min_loss_ratio=null",
    )
    checkpoints = tmp_path / "claim" / RUN_KEY
    command = trainjob.trainjob(cfg, job_name(RUN_KEY), NS, "claim", RUN_KEY)["spec"]["trainer"]["command"]
    assert command[:3] == ["python", "-m", "torch.distributed.run"]
    argv = [sys.executable, *command[1:]]

    def env() -> dict:
        pet = {"PET_NNODES": "1", "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "127.0.0.1"}
        return {**os.environ, **pet, "PET_MASTER_PORT": str(free_port())}

    first = TrainJobRun(cfg, RUN_KEY, "claim", None, NS, lambda step, m: None)
    first.stage(str(prepared[0]))
    lost = subprocess.Popen(argv, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (checkpoints / "checkpoint-2" / "trainer_state.json").is_file():
        assert lost.poll() is None and time.monotonic() < deadline, lost.stderr.read()[-2000:] if lost.poll() else ""
        time.sleep(0.05)
    lost.send_signal(signal.SIGTERM)
    lost.communicate(timeout=120)
    saved = max(
        int(c.name.split("-")[1]) for c in checkpoints.glob("checkpoint-*") if (c / "trainer_state.json").is_file()
    )
    assert saved < 30

    logged: list[int] = []
    retried = TrainJobRun(cfg, RUN_KEY, "claim", None, NS, lambda step, m: logged.append(step))
    retried.stage(str(prepared[0]))
    done = subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    retried.read_log()
    metrics = retried.collect()
    assert (metrics["steps"], metrics["resumed_from_step"]) == (30, saved)
    # Rank 0's log holds only the resumed steps, each once, in order, up to the last.
    assert logged and min(logged) > saved and logged == sorted(set(logged)) and logged[-1] == 30
    assert (retried.work / "model" / "model.safetensors").is_file()
