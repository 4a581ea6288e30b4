"""Safe alias moves and their ledger.

MLflow has no compare-and-set for aliases: two processes that read, check and write can both believe
they won (probed). So every move of `champion` and `previous-champion` goes through `move_aliases`, which
- takes a lock that serializes movers (`registry.lock`): by default a file lock beside a SQLite store and a
  PostgreSQL advisory lock on a PostgreSQL store. An MLflow server behind HTTP offers a client no lock, so
  there `registry.lock` names one (a shared lock file, or the server's PostgreSQL database); left at auto,
  the re-read below is the only guard;
- re-reads the aliases and moves them only if they still point where the decision saw them;
- reads them back; and
- appends one ledger entry per moved alias: an MLflow run in the `<experiment>-ledger` experiment whose
  tags say who, when, which alias, from which version to which, why, and from which pipeline run.

The ledger is append-only (entries are never edited), so "what served on date X" is answered by the
last champion entry before X.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from canaryflow.config import Config
from canaryflow.errors import CanaryflowError
from canaryflow.registry.tracking import sqlite_file, store_uri

LOCK_TIMEOUT_S = 60.0
_ENTRY = "canaryflow.ledger"  # tag marking a ledger entry


class PromotionConflict(CanaryflowError):
    """The aliases moved between the decision and the move: someone else promoted or rolled back first."""


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CanaryflowError(f"another promotion held {path} for over {timeout:.0f} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _advisory_lock(uri: str, name: str, timeout: float) -> Iterator[None]:
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(f"canaryflow-promotion:{name}".encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.connect() as connection:
            # An advisory lock wait is an ordinary lock wait, so lock_timeout bounds it.
            connection.execute(sqlalchemy.text(f"SET lock_timeout = '{int(timeout * 1000)}ms'"))
            try:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            except sqlalchemy.exc.OperationalError:
                raise CanaryflowError(f"another promotion held the advisory lock for over {timeout:.0f} s") from None
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()


@contextlib.contextmanager
def promotion_lock(cfg: Config, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """Serialize alias moves on this registry: with the lock `registry.lock` names, or on auto the
    strongest one the store itself offers."""
    lock = cfg.registry.lock
    if lock.startswith("env:"):
        lock = os.environ.get(lock.removeprefix("env:")) or "none"
        if lock == "none":
            logging.getLogger(__name__).warning(
                "%s is not set: promotions rely on the re-read alone", cfg.registry.lock.removeprefix("env:")
            )
    if lock == "auto":
        uri = store_uri(cfg)
        database = sqlite_file(uri)
        lock = f"file:{database}.promotion.lock" if database else uri
    if lock.startswith("file:"):
        with _file_lock(Path(lock.removeprefix("file:")), timeout):
            yield
    elif lock.startswith("postgresql"):
        with _advisory_lock(lock, cfg.registry.model_name, timeout):
            yield
    else:
        yield


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def _ledger_experiment(cfg: Config) -> str:
    from canaryflow.registry.tracking import configure

    return configure(cfg, f"{cfg.mlflow.experiment}-ledger")


def _record(cfg: Config, alias: str, old: str | None, new: str | None, reason: str, run_key: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    tags = {
        _ENTRY: "1",
        "model": cfg.registry.model_name,
        "alias": alias,
        "from_version": old or "none",
        "to_version": new or "none",
        "reason": reason[:5000],
        "who": _who(),
        "pipeline_run": run_key or "manual",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    run = client.create_run(_ledger_experiment(cfg), tags=tags, run_name=f"{alias}: {old or 'none'} -> {new or 'none'}")
    client.set_terminated(run.info.run_id)


def move_aliases(
    cfg: Config, moves: dict[str, str | None], expected: dict[str, str | None], reason: str, run_key: str = ""
) -> dict[str, str | None]:
    """Under the promotion lock: check every alias in `expected` still points there, set (or, with None,
    delete) every alias in `moves`, read them back, and write one ledger entry per alias that moved.
    Raises PromotionConflict, moving nothing, when the registry changed since the decision."""
    from mlflow import MlflowClient

    from canaryflow.registry.models import alias_version, aliases, configure

    configure(cfg)
    client = MlflowClient()
    name = cfg.registry.model_name
    with promotion_lock(cfg):
        now = {alias: alias_version(cfg, alias) for alias in {*expected, *moves}}
        changed = {alias: now[alias] for alias, want in expected.items() if now[alias] != want}
        if changed:
            alias, actual = next(iter(sorted(changed.items())))
            raise PromotionConflict(
                f"{alias} is version {actual or 'none'}, not {expected[alias] or 'none'} as the decision saw: "
                "another promotion or rollback came first; nothing was moved"
            )
        for alias, version in moves.items():
            if version is None:
                if now[alias] is not None:
                    client.delete_registered_model_alias(name, alias)
            else:
                client.set_registered_model_alias(name, alias, version)
        after = aliases(cfg)
        wrong = {a: v for a, v in moves.items() if after[a] != v}
        if wrong:
            raise CanaryflowError(f"aliases read back differently from what was set: {wrong} vs {after}")
        for alias, version in moves.items():
            if now[alias] != version:
                _record(cfg, alias, now[alias], version, reason, run_key)
    return after


def history(cfg: Config, alias: str | None = None) -> list[dict[str, str]]:
    """Every recorded alias move of the configured model, oldest first."""
    from mlflow import MlflowClient

    from canaryflow.registry.models import configure

    configure(cfg)
    client = MlflowClient()
    filters = [f"tags.`{_ENTRY}` = '1'", f"tags.model = '{cfg.registry.model_name}'"]
    if alias:
        filters.append(f"tags.alias = '{alias}'")
    runs = client.search_runs(
        [_ledger_experiment(cfg)], " and ".join(filters), order_by=["attributes.start_time ASC"], max_results=10000
    )
    keys = ("when", "alias", "from_version", "to_version", "reason", "who", "pipeline_run")
    return [{key: run.data.tags.get(key, "") for key in keys} for run in runs]


def serving_at(cfg: Config, when: datetime) -> str | None:
    """The champion version at a moment, from the ledger: the last champion move at or before it."""
    moment = when.astimezone(UTC).isoformat(timespec="seconds")
    moves = [entry for entry in history(cfg, "champion") if entry["when"] <= moment]
    return None if not moves or moves[-1]["to_version"] == "none" else moves[-1]["to_version"]
