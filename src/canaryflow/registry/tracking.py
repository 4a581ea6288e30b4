"""MLflow set-up, and the one MLflow run that collects everything one pipeline run logs.

Every step of a pipeline run logs into the same MLflow run, found by the `canaryflow.run_key` tag, so a
reviewer sees data card, training, evaluation, registration and canary in one place.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from canaryflow.config import Config
from canaryflow.errors import BadInputError, CanaryflowError

RUN_KEY_TAG = "canaryflow.run_key"
# How every step's process starts, under kfp.local and in a pod (kfp/dsl/component_factory.py, EXECUTOR_MODULE).
EXECUTOR_MODULE = "kfp.dsl.executor_main"
DATA_CARD = "data/data_card.json"  # where prepare_data logs the data card in the pipeline run's MLflow run


class MlflowUnavailableError(CanaryflowError):
    """The MLflow store did not answer, after MLflow's own retries with backoff."""


class MlflowRefusedError(BadInputError):
    """An MLflow server behind basic-auth refused the caller: no login, a wrong one, or too few rights."""


# What MLflow's messages say when the store itself did not answer (as opposed to answering "no").
_DOWN = re.compile(
    r"Max retries exceeded|Connection refused|Connection aborted|RemoteDisconnected|Read timed out|"
    r"could not connect to server|server closed the connection|database is locked"
)
_CAUSES = (
    ("Connection refused", "connection refused"),
    ("too many 5", "it kept answering with server errors"),
    ("timed out", "requests timed out"),
    ("database is locked", "the database stayed locked"),
)


def sqlite_uri(workdir: str | Path) -> str:
    return f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"


def store_uri(cfg: Config) -> str:
    """The tracking store's URI, or "" where none is set. On a cluster it comes from a Kubernetes Secret as
    MLFLOW_TRACKING_URI, never from the compiled config."""
    return cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")


def sqlite_file(uri: str) -> Path | None:
    """A SQLite store's database file; None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def unborn_store(cfg: Config) -> bool:
    """Whether the store is a SQLite file not made yet, which holds nothing: known without MLflow, whose import
    and first schema migration cost seconds before a fresh workdir's first step could start."""
    database = sqlite_file(store_uri(cfg))
    return database is not None and not database.exists()


def _artifact_root(tracking_uri: str) -> str | None:
    # With a SQLite store the artifacts live beside the database, so one workdir holds the whole registry.
    database = sqlite_file(tracking_uri)
    return (database.parent / "mlartifacts").as_uri() if database else None  # else a tracking server decides


def configure(cfg: Config, experiment: str | None = None) -> str:
    """Point mlflow at the configured store and return the id of the experiment (default: the pipeline
    runs'; the ledger and the drills have their own), created on first use with its artifacts beside a
    SQLite store, never in the current directory."""
    import mlflow

    uri = store_uri(cfg)
    if not uri:
        raise CanaryflowError(
            "mlflow.tracking_uri is not set (the CLI sets it from --workdir; a cluster step reads MLFLOW_TRACKING_URI "
            "from the canaryflow-mlflow Secret)"
        )
    # MLflow reads these on every request, so the config's retry policy holds for the whole process.
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(cfg.mlflow.retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = str(cfg.mlflow.backoff_s)
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(cfg.mlflow.timeout_s)
    # Against a server MLflow prints every ended run's URL to stdout, which would corrupt `--json` output.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = experiment or cfg.mlflow.experiment
    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=_artifact_root(uri))
    except mlflow.exceptions.MlflowException:
        # A concurrent step created it first.
        return mlflow.get_experiment_by_name(name).experiment_id


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
    except MlflowException as exc:
        if unavailable(exc) is not None:  # "the store is down" must not read as "there is no such artifact"
            raise
        return None
    except (OSError, ValueError):
        return None


# What MLflow answers for a model, version or alias that does not exist (SQL stores and the server differ).
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def not_found(exc, model: str | None = None) -> bool:
    """True when MLflow answered that the thing asked for does not exist; a store that did not answer is not
    that, and must not read as "there is none".

    With `model`, the registered model asked about: a basic-auth server answers a read of a version or an alias
    of a model that does not exist with PERMISSION_DENIED, not with NOT_FOUND (mlflow/server/auth/__init__.py in
    MLflow 3.17.2: _registered_model_or_prompt_target finds no model, and the validator denies), which would
    fail a first run on an empty registry. Reading the model itself says which it is.
    """
    code = getattr(exc, "error_code", None)
    if code in _NOT_FOUND:
        return True
    if code != "PERMISSION_DENIED" or model is None:
        return False
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient().get_registered_model(model)
    except MlflowException as missing:
        return getattr(missing, "error_code", None) in _NOT_FOUND
    return False


def unavailable(exc: BaseException) -> str | None:
    """Why the store did not answer, in a few words, when `exc` says so; None when it answered (with an error)."""
    text = str(exc)
    if not _DOWN.search(text):
        return None
    return next((why for marker, why in _CAUSES if marker in text), text.splitlines()[0][:160])


def _store() -> str:
    """The tracking URI in use: configure() sets it on mlflow, which only a step that ran it has imported."""
    mlflow = sys.modules.get("mlflow")
    return mlflow.get_tracking_uri() if mlflow else os.environ.get("MLFLOW_TRACKING_URI", "the configured store")


def unavailable_error(exc: BaseException, doing: str) -> MlflowUnavailableError | None:
    """One line for a store that did not answer while `doing`, naming where it was looked for; None when
    `exc` is some other error."""
    why = unavailable(exc)
    if why is None:
        return None
    found = re.search(r"API request to (\S+?)/api/", str(exc))
    where = found.group(1) if found else _store()
    # Only the HTTP client retries; a database store answers or fails at once.
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "its default")
    tried = f", after {retries} {'retry' if retries == '1' else 'retries'} with backoff" if found else ""
    return MlflowUnavailableError(f"MLflow at {where} did not answer while {doing}: {why}{tried}")


def refused_error(exc: BaseException, doing: str) -> MlflowRefusedError | None:
    """One line for a server that refused this caller while `doing`, naming the login and the fix; None when
    `exc` is some other error. Basic-auth answers 401 UNAUTHENTICATED and 403 PERMISSION_DENIED (mlflow/server/
    auth/__init__.py in MLflow 3.17.2), which MLflow's client raises with those error codes."""
    code = getattr(exc, "error_code", None)
    if code not in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return None
    where = _store()  # the server's answer names the endpoint, not the host
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if code == "PERMISSION_DENIED":
        why = f"user {user!r} may not; an MLflow admin grants it MANAGE on the registered model and experiments"
    else:
        login = f"the login of {user!r} was not accepted" if user else "no login was given"
        why = (
            f"{login}; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (a cluster step reads them from "
            "the canaryflow-mlflow-auth Secret)"
        )
    return MlflowRefusedError(f"MLflow at {where} refused {doing}: {why}")


def mlflow_step(doing: str) -> Callable:
    """Decorate a step that talks to MLflow: a store that stays down, or a server that refuses its login, fails it
    with one line saying so.

    Every write a step makes is either one request (a model version is created with its tags and
    description at once) or idempotent on rerun, so a failed step leaves nothing half-written.
    """

    def wrap(step: Callable) -> Callable:
        @functools.wraps(step)
        def guarded(*args, **kwargs):
            from mlflow.exceptions import MlflowException

            try:
                return step(*args, **kwargs)
            except MlflowException as exc:
                error = unavailable_error(exc, doing) or refused_error(exc, doing)
                if error is None:
                    raise
                raise error from None
            finally:
                _exit_lightly()

        return guarded

    return wrap


def _exit_lightly() -> None:
    """In a step's own process (KFP's executor, under kfp.local or in a pod), which exits once the step returns:
    freeze what it holds, so that the interpreter's last collections at exit do not walk torch's, transformers'
    and MLflow's objects. That walk took 1.5 to 2 s of every step on 2 cores (0.3 s frozen; BENCHMARKS.md,
    `make run`), twelve times a `make run`. Not in any other process: a frozen object is never collected."""
    main = sys.modules.get("__main__")
    if getattr(getattr(main, "__spec__", None), "name", None) == EXECUTOR_MODULE:
        import gc

        gc.freeze()
