"""KFP component: record_outcome (the pipeline's exit handler)."""

from kfp import dsl
from kfp.dsl import Artifact, Output

from canaryflow.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def record_outcome(config_json: str, run_key: str, job_id: str, summary: Output[Artifact]):
    """Record how the run ended, even when a step failed: a summary in MLflow and as an artifact.

    Args:
        config_json: The whole canaryflow config as JSON (canaryflow.config.Config).
        run_key: Key of this pipeline run in MLflow; empty means the KFP job id.
        job_id: The KFP job id, used when run_key is empty.
        summary: summary.json: data, training, metrics, gate, canary verdict and aliases.
    """
    from canaryflow.steps import record_outcome_step, run_key_of

    result = record_outcome_step(config_json, run_key_of(run_key, job_id), summary.path)
    summary.metadata["status"] = result["status"]
