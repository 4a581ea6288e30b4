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

PIPELINE_NAME = "canaryflow-lifecycle"
MLFLOW_RETRIES = 2
CHECKPOINT_MOUNT = "/mnt/canaryflow-checkpoints"
PROMOTION_LOCK_ENV = "CANARYFLOW_PROMOTION_LOCK"  # set from the canaryflow-mlflow-db Secret (config.cluster)


def _schedule_training(task, cfg: Config, local: bool) -> None:
    """fine_tune's resources and placement on a cluster, all from config: accelerators, CPU and memory
    requests, node selector, tolerations, and the PVC its checkpoints outlive a preempted pod on."""
    t = cfg.train
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
    if t.checkpoint_pvc:
        kubernetes.mount_pvc(task, pvc_name=t.checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
    # Each retry resumes from the last checkpoint, so a preemption costs minutes, not the whole run. Locally
    # nothing preempts the process: a failure is the training's own, and a retry would only repeat it.
    if not local:
        task.set_retry(num_retries=t.retries, backoff_duration="30s")


def build_pipeline(cfg: Config, local: bool = False):
    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="Fine-tune, evaluate against the champion, register, and canary a transformers model.",
    )
    def lifecycle(config_json: str = cfg.model_dump_json(), run_key: str = ""):
        ids = {"config_json": config_json, "run_key": run_key, "job_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER}
        record_task = record_outcome(**ids).set_display_name("record outcome")
        with dsl.ExitHandler(record_task, name="lifecycle"):
            prepare_task = prepare_data(**ids).set_display_name("prepare data")
            train_task = fine_tune(data=prepare_task.outputs["data"], **ids).set_display_name("fine-tune")
            _schedule_training(train_task, cfg, local)
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
            for task in (prepare_task, train_task, eval_task, register_task, canary_task, record_task):
                for env in cfg.cluster.secrets:
                    kubernetes.use_secret_as_env(task, env.secret, env.keys, optional=env.optional)

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


def compile_pipeline(cfg: Config, package_path: str) -> str:
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(for_cluster(cfg)), package_path=package_path)
    return package_path
