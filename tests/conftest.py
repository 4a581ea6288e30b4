"""Shared fixtures. Everything runs offline: the hub is never touched (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# Under CI=true a skip is a failure (tests/ci_skips.py).
pytest_plugins = ["tests.ci_skips"]

REPO = Path(__file__).resolve().parents[1]

# Set before any test imports transformers/datasets/evaluate, which read these at import time.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_hf_home(tmp_path_factory):
    # evaluate copies metric modules and datasets writes caches under HF_HOME: keep them out of ~.
    home = tmp_path_factory.mktemp("hf-home")
    os.environ["HF_HOME"] = str(home)
    yield


@pytest.fixture(scope="session")
def demo_files(tmp_path_factory):
    from canaryflow.data.synthetic import write_drop

    return write_drop(tmp_path_factory.mktemp("demo"), 1, records=300, test_records=40)


def demo_config(files, *extra: str):
    from canaryflow.config import load_config

    return load_config(
        overrides=[
            f"data.train={files['train']}",
            f"data.validation={files['validation']}",
            f"data.test={files['test']}",
            *extra,
        ]
    )


@pytest.fixture(scope="session")
def prepared(demo_files, tmp_path_factory):
    from canaryflow.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("prepared")
    return out, prepare_data(demo_config(demo_files), out)


@pytest.fixture(scope="session")
def trained(prepared, demo_files, tmp_path_factory):
    """A tiny model trained briefly: enough to generate real text, not enough to be good."""
    from canaryflow.training.fine_tune import fine_tune

    out = tmp_path_factory.mktemp("model")
    cfg = demo_config(demo_files, "train.max_steps=40")
    return out, fine_tune(cfg, prepared[0], out)


# The canary policy of the end-to-end tests: the default tests on fewer, wider steps with looser margins, so a
# canary decides in a few hundred requests; `make run` and the simulations (tests/unit/test_analysis.py)
# exercise the default policy itself.
QUICK_CANARY = [
    "canary.steps=[50,100]",
    "canary.min_requests_per_step=20",
    "canary.error_floor=0.08",  # below the 10 % error drill, so only a rollback can end it
    "canary.slow_floor=0.3",
    "canary.quality_margin=0.2",
    "canary.max_error_rate=0.2",
]


def quick_canary_args() -> list[str]:
    return [arg for override in QUICK_CANARY for arg in ("--set", override)]


def cli_command(*args: str) -> list[str]:
    """`canaryflow ...` as a user runs it, with this interpreter."""
    return [sys.executable, "-m", "canaryflow.cli", *args]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `canaryflow ...` as a user would, in a fresh process."""
    return subprocess.run(
        cli_command(*args),
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ},
    )


def _lifecycle_args(workdir: Path) -> list[str]:
    # Shorter training than `make run`, so the suite stays quick; the floors asserted on it allow for that.
    return cli_command(
        "run", "--json", "--workdir", str(workdir),
        "--set", "train.max_steps=350", "--set", "demo.bootstrap_max_steps=200", *quick_canary_args(),
    )  # fmt: skip


@pytest.fixture(scope="session", autouse=True)
def _lifecycle_started(request, tmp_path_factory):
    """Start the end-to-end run when the session starts, if a selected test needs it, so its minutes overlap
    the tests that do not. Under pytest-xdist the workers share it: the first to create its folder starts it,
    in the run's common temp folder (the recipe in xdist's docs), and waits for it before its session ends,
    since the other worker may still read it."""
    if not any("lifecycle_run" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield None
        return
    root = tmp_path_factory.getbasetemp()
    home = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "lifecycle-run"
    try:
        home.mkdir()
    except FileExistsError:
        yield home
        return
    with open(home / "stdout", "w") as out, open(home / "stderr", "w") as err:
        process = subprocess.Popen(_lifecycle_args(home / "workdir"), stdout=out, stderr=err)

    def record_exit() -> None:
        code = process.wait()
        (home / "rc.tmp").write_text(str(code))
        (home / "rc.tmp").rename(home / "rc")  # whole, for a reader in the other worker

    waiter = threading.Thread(target=record_exit, daemon=True)
    waiter.start()
    yield home
    try:
        waiter.join()
    except BaseException:  # interrupted: leave no run behind
        process.kill()
        raise


@pytest.fixture(scope="session")
def lifecycle_run(_lifecycle_started):
    """One `canaryflow run --json` of the whole DAG on the demo task, shared by the end-to-end tests: the
    workdir and the run's summary."""
    home = _lifecycle_started
    deadline = time.monotonic() + 900
    while not (home / "rc").exists():
        assert time.monotonic() < deadline, "the end-to-end run took more than 15 minutes"
        time.sleep(1)
    assert (home / "rc").read_text() == "0", (home / "stderr").read_text()[-3000:]
    return home / "workdir", json.loads((home / "stdout").read_text())


def copy_workdir(workdir: Path, to: Path) -> Path:
    """A private copy of the shared lifecycle workdir, for a test that registers versions or moves aliases while
    other tests read the original (under pytest-xdist, at the same time). The SQLite registry goes through
    SQLite's backup API, so a write in flight elsewhere is never copied torn."""
    shutil.copytree(workdir, to, ignore=shutil.ignore_patterns("mlflow.db*"))
    with sqlite3.connect(workdir / "mlflow.db") as source, sqlite3.connect(to / "mlflow.db") as copy:
        source.backup(copy)
    return to


@pytest.fixture(scope="session")
def champion_workdir(prepared, tmp_path_factory):
    """A workdir whose SQLite registry has a champion trained on the demo data, without a model: enough for
    the data stage, which reads only the champion's data card. The card sits in another run than the
    version's own, so only the version's `data_card` tag leads to it."""
    import mlflow

    from canaryflow.config import load_config
    from canaryflow.registry.models import CHAMPION, DATA_CARD_TAG
    from canaryflow.registry.tracking import DATA_CARD, configure
    from canaryflow.runner import with_workdir

    workdir = tmp_path_factory.mktemp("champion-workdir")
    cfg = with_workdir(load_config(), workdir)
    experiment_id = configure(cfg)
    client = mlflow.MlflowClient()
    data_run = client.create_run(experiment_id)
    client.log_dict(data_run.info.run_id, prepared[1], DATA_CARD)
    model_run = client.create_run(experiment_id)
    for run in (data_run, model_run):
        client.set_terminated(run.info.run_id)
    client.create_registered_model(cfg.registry.model_name)
    version = client.create_model_version(
        cfg.registry.model_name,
        source=f"runs:/{model_run.info.run_id}/model",
        run_id=model_run.info.run_id,
        tags={DATA_CARD_TAG: f"runs:/{data_run.info.run_id}/{DATA_CARD}"},
    )
    client.set_registered_model_alias(cfg.registry.model_name, CHAMPION, version.version)
    return workdir


# Server mode: real `mlflow server`s on loopback, started once collection shows a selected test needs one.
_SERVER_FIXTURES = ("sqlite_server", "postgres_server", "auth_server")
LOCK_ROLE = "canaryflow_lock"
_servers: dict[str, object] = {}


def _start_server(kind: str):
    import tempfile

    from tests.servers import MlflowServer, Postgres, basic_auth_server

    workdir = Path(tempfile.mkdtemp(prefix=f"canaryflow-{kind}-server-"))
    if kind == "auth":
        server = basic_auth_server(workdir, REPO / "manifests" / "base")
        server.lock, server.cluster = None, None
    elif kind == "sqlite":
        server = MlflowServer(None, workdir)
        # The server's clients share this machine, so a lock file serializes their promotions.
        server.lock, server.cluster = f"file:{workdir / 'promotion.lock'}", None
    else:
        cluster = Postgres()
        cluster.start()
        backend = cluster.create_database("mlflow") if cluster.started else None
        server = MlflowServer(backend, workdir)
        # Clients of a PostgreSQL-backed server take the advisory lock in the server's own database, as a role
        # that may log in and nothing more (the canaryflow-mlflow-lock Secret on a cluster).
        if cluster.started:
            cluster.create_role(LOCK_ROLE)
        server.lock, server.cluster = cluster.uri("mlflow", LOCK_ROLE) if cluster.started else None, cluster
    if server.cluster is None or server.cluster.started:
        server.start()
    _servers[kind] = server
    return server


# Measured under `make test` (2 workers, 2 cores): 1-2 minutes each, apart from the end-to-end run's readers.
LONGEST_FIRST = (
    "tests.pipelines.test_pretrained",
    "tests.components.test_components",
    "tests.pipelines.test_registry_auth",
    "tests.pipelines.test_registry_server",
    "tests.faults.test_mlflow_unavailable",
    "tests.unit.test_analysis",
    "tests.unit.test_training",
    "tests.training.test_data_parallel",
)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs 2 workers, `--dist loadgroup`), each module goes to one worker
    whole, so its module-scoped fixtures are built once; and the modules that use the MLflow servers go
    together, since each worker would start its own (20-60 s each on 2 cores). The end-to-end run is shared
    through a folder instead (`_lifecycle_started`). Elsewhere the markers do nothing.

    The longest modules go first (`--no-loadscope-reorder` keeps this order), so neither worker is left alone
    with a two-minute test at the end; the end-to-end run's readers come after them, by when it has finished."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: a module keeps its order
    modules: dict[str, set[str]] = {}
    for item in items:
        modules.setdefault(item.module.__name__, set()).update(getattr(item, "fixturenames", ()))
    for item in items:
        used = modules[item.module.__name__]
        group = "mlflow-servers" if used & set(_SERVER_FIXTURES) else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_finish(session):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return  # a worker runs only some modules: each server starts when a test first asks for it
    used = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    wanted = set(_SERVER_FIXTURES) if "server" in used else used & set(_SERVER_FIXTURES)
    for name in sorted(wanted):
        _start_server(name.removesuffix("_server"))


def pytest_sessionfinish(session, exitstatus):
    for server in _servers.values():
        server.stop()
        if server.cluster is not None:
            server.cluster.stop()


def _server(kind: str):
    from tests.servers import Unavailable

    server = _servers.get(kind) or _start_server(kind)
    if kind == "postgres" and not server.cluster.started:
        pytest.skip(f"no throwaway PostgreSQL cluster on this machine: {server.cluster.error}")
    try:
        server.wait()
    except Unavailable as exc:
        pytest.fail(f"mlflow server over {kind}: {exc} (log: {server.log})")
    return server


@pytest.fixture(scope="session")
def sqlite_server():
    """A real `mlflow server` over SQLite, with proxied artifacts: `.url` to talk to, `.lock` for registry.lock."""
    return _server("sqlite")


@pytest.fixture(scope="session")
def postgres_server():
    """A real `mlflow server` over a throwaway PostgreSQL 15 cluster; skipped, with the reason, where no
    cluster can start."""
    return _server("postgres")


@pytest.fixture(scope="session")
def auth_server():
    """A real `mlflow server --app-name basic-auth`, started as manifests/base/mlflow.yaml starts it."""
    return _server("auth")


@pytest.fixture(params=["sqlite", "postgres"])
def server(request):
    return request.getfixturevalue(f"{request.param}_server")
