"""KFP component: canary_rollout."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from canaryflow.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def canary_rollout(
    config_json: str, run_key: str, job_id: str, data: Input[Dataset], model_version: str, canary: Output[Artifact]
) -> str:
    """Roll the registered challenger out as a canary; promote it or roll it back. Returns the verdict.

    Anytime-valid sequential tests on its SLIs decide after every batch of requests (canary.backend: local
    replays the test inputs through a router on loopback; kserve steps up the InferenceService's canary on
    live traffic). With no champion yet, the challenger serves alone for a smoke check against the SLOs.

    Args:
        config_json: The whole canaryflow config as JSON (canaryflow.config.Config).
        run_key: Key of this pipeline run in MLflow; empty means the KFP job id.
        job_id: The KFP job id, used when run_key is empty.
        data: Output of prepare_data: its test inputs are the replayed traffic.
        model_version: The registered version to roll out.
        canary: Directory with canary.json (every phase, every look), timeline.png and the servers' logs.
    """
    from canaryflow.steps import canary_rollout_step, run_key_of

    result = canary_rollout_step(config_json, run_key_of(run_key, job_id), data.path, model_version, canary.path)
    canary.metadata["verdict"] = result["verdict"]
    return result["verdict"]
