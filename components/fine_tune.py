"""KFP component: fine_tune."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from canaryflow.images import TRAIN_IMAGE


@dsl.component(base_image=TRAIN_IMAGE, install_kfp_package=False)
def fine_tune(
    config_json: str,
    run_key: str,
    job_id: str,
    data: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    checkpoint_claim: str = "",
):
    """Fine-tune the configured base model on the train split; save it as safetensors.

    Args:
        config_json: The whole canaryflow config as JSON (canaryflow.config.Config).
        run_key: Key of this pipeline run in MLflow; empty means the KFP job id.
        job_id: The KFP job id, used when run_key is empty.
        data: Output of prepare_data.
        model: save_pretrained directory (model, tokenizer, train_metrics.json).
        metrics: Training loss, time and throughput.
        checkpoint_claim: The claim mounted at train.checkpoint_dir; with train.nodes > 1 the TrainJob's nodes
            mount it too. Empty: none.
    """
    from canaryflow.steps import fine_tune_step, run_key_of

    result = fine_tune_step(config_json, run_key_of(run_key, job_id), data.path, model.path, checkpoint_claim)
    for name, value in result.items():
        if isinstance(value, int | float):
            metrics.log_metric(name, value)
