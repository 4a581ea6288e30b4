"""Fine-tuning across several nodes as a Kubeflow Trainer TrainJob (docs/design/multi-node-training.md).

With train.nodes > 1 the fine_tune step does not train: it stages the prepared data on the checkpoint claim, creates
a TrainJob (trainer.kubeflow.org/v1alpha1) that runs `launch.main` on every node under torchrun, and waits for it,
logging rank 0's per-step metrics to MLflow as they are written. Rank 0's model, saved on the claim, becomes the
step's Model output. Rendezvous, gang scheduling and restarts are the Trainer's (on JobSet); canaryflow only builds
the object and watches it.

What the Trainer does, and where (kubeflow/trainer at 8c0f5059bd51, the commit the vendored CRD comes from):
- The torch runtime only sets PET_NNODES, PET_NPROC_PER_NODE, PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT in
  the container named `node` (pkg/runtime/framework/plugins/torch/torch.go EnforceMLPolicy; names in
  pkg/constants/constants.go). They are torchrun's environment defaults, so the command must start torchrun itself;
  the runtime starts nothing (charts/kubeflow-trainer/files/runtimes/torch-distributed.yaml has no command).
- numProcPerNode defaults to `auto`, which on a node without GPUs means one process per CPU of resourcesPerNode
  (torch.go getNumCPUPerNode): it is always set here.
- Volumes, mounts, node selector and tolerations reach the pods only through spec.runtimePatches (manager-keyed
  patches of the runtime's JobSet template; pkg/apis/trainer/v1alpha1/trainjob_types.go PodSpecPatch); this version
  has no podSpecOverrides.
- A finished TrainJob says so in status.conditions: type Complete or Failed with status "True", copied from its
  JobSet's Completed / Failed conditions with their reason and message (pkg/runtime/framework/plugins/jobset/
  jobset.go Status), or Failed with reason DeadlineExceeded once activeDeadlineSeconds pass (pkg/controller/
  trainjob_controller.go, trainjob_types.go TrainJobDeadlineExceededReason).
- metadata.name is an RFC 1035 label of at most 63 characters (the CRD's x-kubernetes-validations).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from canaryflow.config import Config
from canaryflow.errors import BadInputError, CanaryflowError, first_line
from canaryflow.images import TRAIN_IMAGE
from canaryflow.training.launch import METRICS_LOG

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
CONTAINER = "node"  # the runtime's trainer container, the one the torch plugin gives the PET_* variables
REPLICATED_JOB = "node"  # the runtime's replicated job that runs it (torch-distributed.yaml)
MANAGER = "canaryflow"  # runtimePatches are keyed by who wrote them
CLAIM_VOLUME = "checkpoints"
SHM_VOLUME = "dshm"
WATCH_S = 30  # longest one watch waits for a change before the metrics log is read again
DELETE_WAIT_S = 300.0  # longest a retried step waits for its earlier, failed TrainJob to be gone
ERRORS = "errors"  # <workspace>/errors/rank-<RANK>.txt: each failed rank's one-line error
HINTS = {
    403: "; fine_tune's service account needs trainjobs in the Role in manifests/base/rbac.yaml",
    404: "; is Kubeflow Trainer installed (README, 'Several nodes')?",
}


NEEDS_CLAIM = (
    "train.nodes > 1 trains in a Kubeflow Trainer TrainJob whose nodes share the checkpoint claim: set "
    "train.checkpoint_pvc and submit to a cluster (canaryflow submit), or train on one node (train.nodes=1)"
)


class Cancelled(CanaryflowError):
    """The step was stopped while its TrainJob ran: the TrainJob was deleted with it."""


def job_name(run_key: str) -> str:
    """One TrainJob per pipeline run, so a retried step finds its own: a DNS label derived from the run key (run
    keys are free text, and the JobSet's pod names add about 20 characters to this)."""
    return "canaryflow-train-" + hashlib.sha256(run_key.encode("utf-8")).hexdigest()[:12]


def workspace(cfg: Config, run_key: str) -> Path:
    """The run's folder on the claim beside its checkpoints (checkpoint_dir/<run key>, the resume key), which every
    node mounts: the staged data, the config, rank 0's output, the ranks' errors."""
    if not cfg.train.checkpoint_dir:
        raise BadInputError(NEEDS_CLAIM)
    return Path(cfg.train.checkpoint_dir) / f"{run_key}.trainjob"


def _command(work: Path, checkpoints: Path) -> list[str]:
    # torchrun takes nnodes, nproc_per_node, node_rank and the master from the PET_* variables the runtime sets.
    return [
        "python", "-m", "torch.distributed.run", "-m", "canaryflow.training.trainjob",
        "--config", str(work / "config.json"), "--data", str(work / "data"), "--out", str(work / "model"),
        "--checkpoints", str(checkpoints),
    ]  # fmt: skip


def _secret_env(cfg: Config) -> list[dict]:
    """The Secrets the fine_tune step gets (cluster.secrets), for the ranks: a hub model needs HF_TOKEN, a models:/
    base the MLflow server."""
    return [
        e for source in cfg.cluster.secrets if source.steps is None or "fine_tune" in source.steps for e in source.env()
    ]


def trainjob(cfg: Config, name: str, namespace: str, claim: str, run_key: str) -> dict:
    """The TrainJob that fine-tunes on train.nodes nodes: the training image running launch.main under torchrun,
    the run's claim mounted where the step mounts it (train.checkpoint_dir), so every path is the same on every
    node and in the waiting step."""
    t = cfg.train
    work, checkpoints = workspace(cfg, run_key), Path(t.checkpoint_dir or "") / run_key
    resources: dict[str, dict[str, Any]] = {}
    if t.accelerator_limit > 0:
        resources["limits"] = {t.accelerator_type: t.accelerator_limit}
    requests = {k: v for k, v in (("cpu", t.cpu_request), ("memory", t.memory_request)) if v}
    if requests:
        resources["requests"] = requests
    volumes: list[dict] = [{"name": CLAIM_VOLUME, "persistentVolumeClaim": {"claimName": claim}}]
    mounts: list[dict] = [{"name": CLAIM_VOLUME, "mountPath": t.checkpoint_dir}]
    if t.accelerator_limit > 1:  # NCCL between the ranks of a node passes through /dev/shm, 64Mi by default
        volumes.append({"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": t.shm}})
        mounts.append({"name": SHM_VOLUME, "mountPath": "/dev/shm"})
    pod: dict[str, Any] = {"volumes": volumes, "containers": [{"name": CONTAINER, "volumeMounts": mounts}]}
    if t.node_selector:
        pod["nodeSelector"] = dict(t.node_selector)
    if t.tolerations:
        pod["tolerations"] = [toleration.model_dump(exclude_none=True) for toleration in t.tolerations]
    trainer: dict[str, Any] = {
        "image": TRAIN_IMAGE,
        "command": _command(work, checkpoints),
        "numNodes": t.nodes,
        "numProcPerNode": max(1, t.accelerator_limit),
    }
    if resources:
        trainer["resourcesPerNode"] = resources
    env = _secret_env(cfg)
    if env:
        trainer["env"] = env
    template = {"spec": {"template": {"spec": pod}}}
    patch = {"template": {"spec": {"replicatedJobs": [{"name": REPLICATED_JOB, "template": template}]}}}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "canaryflow"},
            "annotations": {"canaryflow/run-key": run_key},
        },
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": t.runtime_kind, "name": t.runtime},
            "trainer": trainer,
            "runtimePatches": [{"manager": MANAGER, "trainingRuntimeSpec": patch}],
            # Bounds the nodes' time even when the waiting step is gone without deleting it (a SIGKILL).
            "activeDeadlineSeconds": t.max_wall_seconds,
        },
    }


def finished(job: dict) -> tuple[str, dict] | None:
    """("Complete" | "Failed", the condition) once the TrainJob has finished, else None."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Complete", "Failed") and condition.get("status") == "True":
            return condition["type"], condition
    return None


def own_namespace() -> str:
    """The namespace the step's pod runs in (its Role is there, and so is the claim), else the kubeconfig's."""
    mounted = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    if mounted.is_file():
        return mounted.read_text(encoding="utf-8").strip()
    from kubernetes import config

    try:
        _, current = config.list_kube_config_contexts()
    except (config.ConfigException, OSError):
        return "default"
    return current.get("context", {}).get("namespace") or "default"


class TrainJobRun:
    """Create the run's TrainJob and wait for it through `api` (a kubernetes CustomObjectsApi): watched, with the
    metrics log read between events; deleted on timeout or when the step is stopped."""

    def __init__(
        self,
        cfg: Config,
        run_key: str,
        claim: str,
        api: Any,
        namespace: str,
        on_metrics: Callable[[int, dict], None],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.cfg, self.run_key, self.claim, self.api, self.namespace = cfg, run_key, claim, api, namespace
        self.on_metrics, self.clock = on_metrics, clock
        self.name = job_name(run_key)
        self.work = workspace(cfg, run_key)
        self.where = f"TrainJob {namespace}/{self.name}"
        self._log_offset = 0

    # --- the calls ---

    def _call(self, verb: str, method: Callable, *args: Any, missing_ok: bool = False, **kwargs: Any) -> Any:
        from canaryflow.rollout.kserve import _call

        return _call(self.where, verb, method, *args, missing_ok=missing_ok, hints=HINTS, **kwargs)

    def _get(self, missing_ok: bool = False) -> dict | None:
        return self._call("get", self.api.get_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
                          self.name, missing_ok=missing_ok)  # fmt: skip

    def _delete(self) -> None:
        from kubernetes import client

        # Foreground: the TrainJob stays until its JobSet and pods are gone, so "deleted" means the GPUs are free.
        options = client.V1DeleteOptions(propagation_policy="Foreground")
        self._call("delete", self.api.delete_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL,
                   self.name, body=options, missing_ok=True)  # fmt: skip

    def _watch(self, resource_version: str | None, seconds: int) -> dict | None:
        """The TrainJob as its watch events leave it after `resource_version`: at the first that finishes it, or
        after `seconds`; None when nothing changed. A GET with watch=true on the collection, narrowed to the name."""
        from kubernetes import watch

        kwargs: dict[str, Any] = {"field_selector": f"metadata.name={self.name}", "timeout_seconds": seconds}
        if resource_version:
            kwargs["resource_version"] = resource_version
        latest = None
        for event in watch.Watch().stream(
            self.api.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURAL, **kwargs
        ):
            if event["type"] == "DELETED":
                raise CanaryflowError(f"{self.where} was deleted while the step waited for it")
            if event["type"] in ("ADDED", "MODIFIED"):
                latest = event["raw_object"]
                if finished(latest):
                    break
        return latest

    # --- the run ---

    def stage(self, data_dir: str) -> None:
        """Put what every rank reads on the claim, and clear what an earlier attempt's ranks left: only before a
        TrainJob is created, never under one that runs."""
        from canaryflow.training.checkpoints import ensure_writable

        ensure_writable(self.work, self.cfg)
        shutil.copytree(data_dir, self.work / "data", dirs_exist_ok=True)
        (self.work / "config.json").write_text(self.cfg.model_dump_json(), encoding="utf-8")
        for stale in (self.work / "model", self.work / ERRORS):
            shutil.rmtree(stale, ignore_errors=True)
        (self.work / "model").mkdir()

    def start(self, data_dir: str) -> dict:
        """Create the TrainJob, or take over the one an earlier attempt of this step left running (its pod lost
        without a chance to delete it); an earlier one that failed is deleted first, and the new one resumes from
        the run's checkpoints."""
        from canaryflow.rollout.kserve import ApiError

        body = trainjob(self.cfg, self.name, self.namespace, self.claim, self.run_key)
        earlier = self._get(missing_ok=True)
        state = finished(earlier) if earlier else None
        if earlier is not None and (state is None or state[0] == "Complete"):
            print(f"trainjob: {self.where} already exists; waiting for it", file=sys.stderr, flush=True)
            return earlier
        print(f"trainjob: creating {self.where} on {self.cfg.train.nodes} nodes", file=sys.stderr, flush=True)
        if earlier is not None:
            self._delete()
            waited = 0.0
            while self._get(missing_ok=True) is not None:
                if waited >= DELETE_WAIT_S:
                    raise CanaryflowError(f"{self.where}: the earlier, failed TrainJob was not gone after {waited:g} s")
                waited += self._pause(5.0)
        self.stage(data_dir)
        try:
            return self._call("create", self.api.create_namespaced_custom_object, GROUP, VERSION, self.namespace,
                              PLURAL, body)  # fmt: skip
        except ApiError as exc:
            if exc.status != 409:
                raise
        # Created since the read above (another attempt of this step, still alive): follow that one.
        return self._get()

    def _pause(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds

    def wait(self, job: dict) -> dict:
        """Follow the TrainJob until it finishes or train.max_wall_seconds pass; return rank 0's metrics."""
        limit = self.cfg.train.max_wall_seconds
        deadline = self.clock() + limit
        while True:
            self.read_log()
            state = finished(job)
            if state is not None:
                kind, condition = state
                if kind == "Failed":
                    raise CanaryflowError(f"{self.where} failed: {self._failure(condition)}")
                return self.collect()
            remaining = deadline - self.clock()
            if remaining <= 0:
                self._delete()
                raise CanaryflowError(
                    f"{self.where} ran over {limit} s (train.max_wall_seconds); it was deleted, and a retry resumes "
                    f"from the checkpoints in {Path(self.cfg.train.checkpoint_dir or '') / self.run_key}"
                )
            job = self._next(job, min(WATCH_S, math.ceil(remaining)))

    def _next(self, job: dict, seconds: int) -> dict:
        """The TrainJob after the next changes, or as it is after `seconds` without one."""
        from canaryflow.rollout.kserve import ApiError

        version = (job.get("metadata") or {}).get("resourceVersion")
        try:
            changed = self._call("watch", self._watch, version, seconds)
        except ApiError as exc:
            if exc.status != 410:  # 410 Gone: the version is too old to watch from; read the object afresh
                raise
            changed = None
        if changed is not None:
            return changed
        current = self._get(missing_ok=True)
        if current is None:
            raise CanaryflowError(f"{self.where} was deleted while the step waited for it")
        return current

    def _failure(self, condition: dict) -> str:
        """Rank 0's own error where it wrote one, else the first rank's that did, else the Trainer's reason."""
        errors = sorted((self.work / ERRORS).glob("rank-*.txt"), key=lambda p: int(p.stem.split("-")[1]))
        if errors:
            return f"{errors[0].stem.replace('-', ' ')}: {errors[0].read_text(encoding='utf-8').strip()}"
        reason = condition.get("reason") or "no reason given"
        message = " ".join(str(condition.get("message") or "").split())
        return f"{reason}: {message}" if message else reason

    def read_log(self) -> None:
        """Hand rank 0's metrics lines written since the last read to on_metrics (a partial last line waits)."""
        log = self.work / "model" / METRICS_LOG
        if not log.is_file():
            return
        with open(log, "rb") as handle:
            handle.seek(self._log_offset)
            chunk = handle.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._log_offset += len(complete)
        for line in complete.decode("utf-8").splitlines():
            entry = json.loads(line)
            step = entry.pop("step")
            self.on_metrics(int(step), entry)

    def collect(self) -> dict:
        """Rank 0's metrics, and the model it saved."""
        metrics_file = self.work / "model" / "train_metrics.json"
        if not metrics_file.is_file():
            raise CanaryflowError(f"{self.where} completed, but rank 0 wrote no {metrics_file}")
        return json.loads(metrics_file.read_text(encoding="utf-8"))

    def run(self, data_dir: str, out_dir: str) -> dict:
        """Stage, create, wait, and copy rank 0's model to `out_dir`. A stopped step (SIGTERM when the pipeline run
        is terminated or the pod evicted, Ctrl-C) deletes the TrainJob before it exits."""
        from canaryflow.rollout.kserve import Interrupted, rollback_on_signals

        with rollback_on_signals(during="the TrainJob"):
            try:
                metrics = self.wait(self.start(data_dir))
            except (Interrupted, KeyboardInterrupt) as exc:
                self._delete()
                raise Cancelled(f"{self.where} was deleted: the step was stopped ({first_line(exc)})") from None
        ignore = shutil.ignore_patterns(METRICS_LOG)
        shutil.copytree(self.work / "model", out_dir, dirs_exist_ok=True, ignore=ignore)
        return metrics


def train_on_nodes(
    cfg: Config, run_key: str, data_dir: str, out_dir: str, claim: str, on_metrics: Callable[[int, dict], None]
) -> dict:
    """fine_tune_step with train.nodes > 1: the TrainJob on the cluster the step runs in."""
    from kubernetes import client

    from canaryflow.rollout.kserve import kubernetes_client

    if not claim:
        raise BadInputError(NEEDS_CLAIM)
    api = client.CustomObjectsApi(kubernetes_client())
    return TrainJobRun(cfg, run_key, claim, api, own_namespace(), on_metrics).run(data_dir, out_dir)


def main(argv: list[str] | None = None) -> None:
    """One rank, as torchrun starts it on each node: launch.main, and where it fails, the error in one line on
    the claim (<workspace>/errors/rank-<RANK>.txt), so the waiting step reports rank 0's error rather than the
    JobSet's "failed" alone."""
    from canaryflow.training import launch

    args = sys.argv[1:] if argv is None else argv
    try:
        launch.main(args)
    except BaseException as exc:
        if isinstance(exc, SystemExit) and not exc.code:
            raise
        out = Path(args[args.index("--out") + 1]) if "--out" in args else None
        if out is not None:
            errors = out.parent / ERRORS
            errors.mkdir(parents=True, exist_ok=True)
            (errors / f"rank-{os.environ.get('RANK', '0')}.txt").write_text(
                f"{type(exc).__name__}: {first_line(exc)}\n", encoding="utf-8"
            )
        raise


if __name__ == "__main__":
    main()
