"""KFP component: prepare_data."""

from kfp import dsl
from kfp.dsl import Dataset, Markdown, Output

from canaryflow.images import BASE_IMAGE


@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)
def prepare_data(config_json: str, run_key: str, job_id: str, data: Output[Dataset], data_card: Output[Markdown]):
    """Load, validate, clean and split the data; write parquet splits and a data card.

    Args:
        config_json: The whole canaryflow config as JSON (canaryflow.config.Config).
        run_key: Key of this pipeline run in MLflow; empty means the KFP job id.
        job_id: The KFP job id, used when run_key is empty.
        data: Directory with train/validation/test parquet files, data_card.json and data_card.md.
        data_card: The data card in Markdown, shown in the KFP UI: counts, drops, lengths, drift.
    """
    import shutil

    from canaryflow.steps import prepare_data_step, run_key_of

    card = prepare_data_step(config_json, run_key_of(run_key, job_id), data.path)
    data.metadata.update({f"{split}_rows": n for split, n in card["counts"].items()})
    data.metadata["content_hash"] = card["content_hash"]
    shutil.copyfile(f"{data.path}/data_card.md", data_card.path)
