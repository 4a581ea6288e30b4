"""KFP component: register_model."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model

from canaryflow.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def register_model(
    config_json: str,
    run_key: str,
    job_id: str,
    data: Input[Dataset],
    model: Input[Model],
    evaluation: Input[Artifact],
) -> str:
    """Register the candidate in the MLflow Model Registry with lineage and gate tags; return its version.

    Every candidate is registered; only one that passed the gate gets the `challenger` alias.

    Args:
        config_json: The whole canaryflow config as JSON (canaryflow.config.Config).
        run_key: Key of this pipeline run in MLflow; empty means the KFP job id.
        job_id: The KFP job id, used when run_key is empty.
        data: Output of prepare_data (its data card gives the data hash).
        model: The challenger, output of fine_tune.
        evaluation: Output of evaluate_model.
    """
    from canaryflow.steps import register_model_step, run_key_of

    return register_model_step(config_json, run_key_of(run_key, job_id), data.path, model.path, evaluation.path)
