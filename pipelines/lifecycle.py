"""The canaryflow DAG: prepare -> fine-tune -> evaluate -> register -> (gate passed) canary, with an
exit handler that records the outcome whatever happened.

`build_pipeline(cfg)` bakes the config in as the default of the `config_json` parameter and takes the
cluster settings (accelerators, placement, checkpoint PVC, retries) from it, so the compiled YAML and a
local run are one DAG; only fine_tune's retries are left out locally, where nothing preempts it.
"""

from kfp import dsl, kubernetes

from canaryflow.components.canary_rollout import canary_rollout
from canaryflow.components.evaluate_model import evaluate_model
from canaryflow.components.fine_tune import fine_tune
from canaryflow.components.prepare_data import prepare_data
from canaryflow.components.record_outcome import record_outcome
from canaryflow.components.register_model import register_model
from canaryflow.config import Config
from canaryflow.errors import BadInputError

PIPELINE_NAME = "canaryflow-lifecycle"
MLFLOW_RETRIES = 2
CHECKPOINT_MOUNT = "/mnt/canaryflow-checkpoints"
# The KFP driver names a CreatePVC claim <uuid><suffix>, once per run (kubeflow/pipelines 2.17.0,
# backend/src/v2/driver/k8s.go, createPVC; not <workflow>-<suffix> as kfp-kubernetes' docstring says): no two runs
# share it, and fine_tune's retries, which mount the create task's output, all find the same one.
CHECKPOINT_CLAIM_SUFFIX = "-canaryflow-checkpoints"
SHM_VOLUME = "dshm"
PROMOTION_LOCK_ENV = "CANARYFLOW_PROMOTION_LOCK"  # set from the canaryflow-mlflow-lock Secret (config.cluster)
# Below these KFP backend versions a feature is dropped without a word, so compile refuses it instead:
# `optional` on a Secret env arrived with kubeflow/pipelines#12216 (2.15.0); before, a missing optional Secret
# stops every pod at CreateContainerConfigError. CreatePVC's data_source arrived with #12696 (2.17.0); before,
# the driver ignores it and the claim comes up empty and root-owned.
OPTIONAL_SECRETS_SINCE = (2, 15)
CLONED_CLAIMS_SINCE = (2, 17)


def _checkpoint_claim(cfg: Config):
    """The claim fine_tune's checkpoints live on, or None.

    Why a per-run clone of a prepared claim, not the alternatives: the KFP backend sets no fsGroup and its
    pods must run as non-root since 2.16 (backend/src/v2/compiler/argocompiler/argo.go and security_context.go,
    kubeflow/pipelines 2.17.0), so neither the kubelet nor a step can make a fresh block volume's root-owned
    0755 root writable for uid 1000. A one-off Job can (manifests/base/pvc-checkpoints.yaml), once, on the
    template; a clone keeps its ownership. A shared claim would make concurrent runs fight over one
    ReadWriteOnce volume, and a generic ephemeral volume dies with its pod, so a retried fine_tune (a new pod)
    could not resume. A retry of fine_tune, or of the whole run (Argo reruns only the failed nodes), mounts the
    claim the run's create task made."""
    t = cfg.train
    if not t.checkpoint_pvc:
        return None
    if t.checkpoint_claim == "shared":
        return t.checkpoint_pvc
    source = {"kind": t.checkpoint_source_kind, "name": t.checkpoint_pvc}
    if t.checkpoint_source_kind == "VolumeSnapshot":  # a claim is core, which takes no apiGroup
        source["apiGroup"] = "snapshot.storage.k8s.io"
    create_task = kubernetes.CreatePVC(
        pvc_name_suffix=CHECKPOINT_CLAIM_SUFFIX,
        # A TrainJob's nodes all mount it: its storage class must offer ReadWriteMany (README).
        access_modes=["ReadWriteMany" if t.nodes > 1 else "ReadWriteOnce"],
        size=t.checkpoint_size,
        storage_class_name=t.checkpoint_storage_class,
        data_source=source,
    ).set_display_name("checkpoint claim")
    create_task.set_caching_options(False)  # a cached name would be an earlier run's claim
    return create_task


def _claim_name(claim):
    """A shared claim's name, or a per-run claim's as its create task outputs it."""
    return claim if isinstance(claim, str) else claim.outputs["name"]


def _place_training(task, t) -> None:
    """What the pod that trains asks for: accelerators, CPU and memory, placement, and /dev/shm for NCCL."""
    if t.accelerator_limit > 0:
        task.set_accelerator_type(t.accelerator_type).set_accelerator_limit(t.accelerator_limit)
    if t.cpu_request:
        task.set_cpu_request(t.cpu_request)
    if t.memory_request:
        task.set_memory_request(t.memory_request)
    for key, value in t.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in t.tolerations:
        kubernetes.add_toleration(task, **toleration.model_dump(exclude_none=True))
    if t.accelerator_limit > 1:  # torchrun's ranks talk through /dev/shm, 64Mi by default in a container
        kubernetes.empty_dir_mount(
            task, volume_name=SHM_VOLUME, mount_path="/dev/shm", medium="Memory", size_limit=t.shm
        )


def _schedule_training(task, cfg: Config, local: bool, claim) -> None:
    """fine_tune's resources and placement on a cluster, all from config: accelerators, CPU and memory
    requests, node selector, tolerations, /dev/shm for NCCL, and the claim its checkpoints outlive a
    preempted pod on. With train.nodes > 1 the step only waits for its TrainJob, which gets the accelerators and
    placement instead (canaryflow.training.trainjob): the waiting pod asks for none of them."""
    t = cfg.train
    if t.nodes == 1:
        _place_training(task, t)
    if claim is not None:
        kubernetes.mount_pvc(task, pvc_name=_claim_name(claim), mount_path=CHECKPOINT_MOUNT)
    # Each retry resumes from the last checkpoint, so a preemption costs minutes, not the whole run. Locally
    # nothing preempts the process: a failure is the training's own, and a retry would only repeat it.
    if not local:
        task.set_retry(num_retries=t.retries, backoff_duration="30s")


def build_pipeline(cfg: Config, local: bool = False):
    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Fine-tune, evaluate against the champion, register, and canary a transformers model.",
    )
    def lifecycle(config_json: str = cfg.to_json(), run_key: str = ""):
        ids = {"config_json": config_json, "run_key": run_key, "job_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        record_task = record_outcome(**ids).set_display_name("record outcome")
        with dsl.ExitHandler(record_task, name="lifecycle"):
            prepare_task = prepare_data(**ids).set_display_name("prepare data")
            claim = None if local else _checkpoint_claim(cfg)
            # A TrainJob's nodes mount the claim by its name, which the step is told; one pod needs no name.
            named = {} if claim is None or cfg.train.nodes == 1 else {"checkpoint_claim": _claim_name(claim)}
            train_task = fine_tune(data=prepare_task.outputs["data"], **ids, **named).set_display_name("fine-tune")
            _schedule_training(train_task, cfg, local, claim)
            if claim is not None and not isinstance(claim, str):
                # Once the model is saved its checkpoints are spent. A fine_tune that failed every retry keeps
                # its claim, so that retrying the run resumes; delete those by hand (README).
                delete_task = kubernetes.DeletePVC(pvc_name=claim.outputs["name"]).after(train_task)
                delete_task.set_display_name("delete checkpoint claim").set_caching_options(False)
            eval_task = evaluate_model(
                data=prepare_task.outputs["data"], model=train_task.outputs["model"], **ids
            ).set_display_name("evaluate challenger vs champion")
            register_task = register_model(
                data=prepare_task.outputs["data"],
                model=train_task.outputs["model"],
                evaluation=eval_task.outputs["evaluation"],
                **ids,
            ).set_display_name("register model")
            with dsl.If(eval_task.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 - a KFP condition
                canary_task = canary_rollout(
                    data=prepare_task.outputs["data"], model_version=register_task.output, **ids
                ).set_display_name("canary rollout")
        # Only fine_tune is a pure function of its inputs. The data source changes under the same path,
        # and evaluation, registration, canary and outcome depend on the registry's live state, so a
        # cached result would be a wrong one.
        for task in (prepare_task, eval_task, register_task, canary_task, record_task):
            task.set_caching_options(False)
        for task in (eval_task, register_task, canary_task, record_task):
            task.set_retry(num_retries=MLFLOW_RETRIES, backoff_duration="5s")
        if not local:
            steps = {
                "prepare_data": prepare_task,
                "fine_tune": train_task,
                "evaluate_model": eval_task,
                "register_model": register_task,
                "canary_rollout": canary_task,
                "record_outcome": record_task,
            }
            for env in cfg.cluster.secrets:
                for step in env.steps or steps:
                    kubernetes.use_secret_as_env(steps[step], env.secret, env.keys, optional=env.optional)

    return lifecycle


def for_cluster(cfg: Config) -> Config:
    """The config a cluster run gets: checkpoints on the mounted PVC unless the config names a folder, and
    the canary on KServe (live traffic, Prometheus SLIs) instead of replayed requests on loopback."""
    if cfg.train.checkpoint_pvc and not cfg.train.checkpoint_dir:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"checkpoint_dir": CHECKPOINT_MOUNT})})
    if not cfg.canary.shadow_requests:  # the shadow phase mirrors requests, which only the local router does
        cfg = cfg.model_copy(update={"canary": cfg.canary.model_copy(update={"backend": "kserve"})})
    if cfg.registry.lock == "auto":  # behind the MLflow server: its database's advisory lock, from a Secret
        cfg = cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"lock": "env:" + PROMOTION_LOCK_ENV})})
    # The tracking URI may carry credentials: on a cluster it comes from the canaryflow-mlflow Secret instead.
    return cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": None})})


def check_backend(cfg: Config) -> None:
    """Refuse, in one line, what the configured KFP backend would drop without a word."""
    version = cfg.cluster.kfp_backend_version
    if cfg.cluster.kfp_backend < OPTIONAL_SECRETS_SINCE:
        for env in cfg.cluster.secrets:
            if env.optional:
                raise BadInputError(
                    f"cluster.secrets: {env.secret} is optional, a flag KFP backend {version} drops (kubeflow/"
                    "pipelines#12216, in 2.15), so were it missing every pod would stop; create the Secret and set "
                    "optional: false, or upgrade the backend"
                )
    if (
        cfg.train.checkpoint_pvc
        and cfg.train.checkpoint_claim == "per-run"
        and cfg.cluster.kfp_backend < CLONED_CLAIMS_SINCE
    ):
        raise BadInputError(
            f"train.checkpoint_claim: per-run claims are cloned from {cfg.train.checkpoint_pvc}, which KFP backend "
            f"{version} cannot do (CreatePVC data_source, kubeflow/pipelines#12696, in 2.17): set "
            "train.checkpoint_claim=shared (one run at a time), or upgrade the backend"
        )


def check_nodes(cfg: Config) -> None:
    """A TrainJob's nodes share the run's checkpoint claim, mounted where the step mounts it: refuse in one line a
    config that gives them none, or a folder outside it."""
    t = cfg.train
    if t.nodes == 1:
        return
    if not t.checkpoint_pvc:
        raise BadInputError(
            f"train.nodes={t.nodes} needs train.checkpoint_pvc: the TrainJob's nodes read the data and write the "
            "model and checkpoints on that claim (ReadWriteMany)"
        )
    if t.checkpoint_dir not in (None, CHECKPOINT_MOUNT):
        raise BadInputError(
            f"train.nodes={t.nodes}: train.checkpoint_dir must be unset (the claim's mount, {CHECKPOINT_MOUNT}), "
            f"not {t.checkpoint_dir}, which the TrainJob's nodes would not share"
        )


def compile_pipeline(cfg: Config, package_path: str) -> str:
    from kfp import compiler

    check_backend(cfg)
    check_nodes(cfg)
    compiler.Compiler().compile(build_pipeline(for_cluster(cfg)), package_path=package_path)
    return package_path
