"""MLflow set-up, and the one MLflow run that collects everything one pipeline run logs.

Every step of a pipeline run logs into the same MLflow run, found by the `canaryflow.run_key` tag, so a
reviewer sees data card, training, evaluation, registration and canary in one place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from canaryflow.config import Config
from canaryflow.errors import CanaryflowError

RUN_KEY_TAG = "canaryflow.run_key"
DATA_CARD = "data/data_card.json"  # where prepare_data logs the data card in the pipeline run's MLflow run


def sqlite_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def _artifact_root(tracking_uri: str) -> str | None:
    # With a SQLite store the artifacts live beside the database, so one workdir holds the whole registry.
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None  # a tracking server decides where its artifacts go


def configure(cfg: Config) -> str:
    """Point mlflow at the configured store and return the experiment id (created on first use)."""
    import mlflow

    uri = cfg.mlflow.tracking_uri
    if not uri:
        raise CanaryflowError("mlflow.tracking_uri is not set (the CLI sets it from --workdir)")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(cfg.mlflow.experiment, artifact_location=_artifact_root(uri))
    except mlflow.exceptions.MlflowException:
        # A concurrent step created it first.
        return mlflow.get_experiment_by_name(cfg.mlflow.experiment).experiment_id


def find_run(cfg: Config, run_key: str):
    """The MLflow run of pipeline run `run_key`, or None."""
    import mlflow

    experiment_id = configure(cfg)
    runs = mlflow.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'", output_format="list", max_results=1
    )
    return runs[0] if runs else None


@contextlib.contextmanager
def pipeline_run(cfg: Config, run_key: str) -> Iterator[object]:
    """Resume (or start) the MLflow run of this pipeline run; a retried step lands in the same run."""
    import mlflow

    existing = find_run(cfg, run_key)
    if existing is not None:
        with mlflow.start_run(run_id=existing.info.run_id) as run:
            yield run
        return
    with mlflow.start_run(
        experiment_id=configure(cfg), run_name=f"canaryflow-{run_key[:12]}", tags={RUN_KEY_TAG: run_key}
    ) as run:
        yield run


def load_logged_dict(run_id: str, path: str) -> dict | None:
    """A JSON artifact a step logged into run `run_id`, or None where that step never logged it."""
    return load_artifact_dict(f"runs:/{run_id}/{path}")


def load_artifact_dict(uri: str) -> dict | None:
    """A JSON artifact by URI (runs:/..., or any artifact URI MLflow reads), or None where there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.load_dict(uri)
    except (MlflowException, OSError, ValueError):
        return None
