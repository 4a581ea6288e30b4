"""The runbooks' local commands, taken from the Markdown itself and run as an on-call engineer runs them: in a
folder whose `.canaryflow` holds a real registry (the lifecycle's: champion 2, previous-champion 1), with `$CF`
dropped, as docs/runbooks/README.md says to do locally. A runbook whose command drifts from the CLI fails here."""

import json
import re
import shlex

import pytest

from canaryflow.config import load_config
from canaryflow.registry import models
from canaryflow.registry.tracking import sqlite_uri
from tests.conftest import REPO, copy_workdir, run_cli

pytestmark = pytest.mark.slow  # the registry is the lifecycle's: one whole DAG run, shared with the other slow tests

RUNBOOKS = REPO / "docs" / "runbooks"
# What runs without a cluster: the registry, a rollback, a drift check of a log on disk.
LOCAL = re.compile(r"^canaryflow (registry \w+|rollback|drift check)\b")


def runbook_commands() -> dict[str, tuple[str, list[str]]]:
    """Each distinct local command, by its shape (quoted text elided) -> its first line (`$CF` dropped) and the
    runbooks that give it. A command that reads the log from a store (mlflow-artifacts:/) needs the cluster's
    tracking server."""
    found: dict[str, tuple[str, list[str]]] = {}
    for path in sorted(RUNBOOKS.glob("*.md")):
        for block in re.findall(r"^ *```sh\n(.*?)^ *```", path.read_text(), flags=re.M | re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = " ".join(line.split("  #", 1)[0].replace("$CF", "").split())
                if LOCAL.match(line) and "mlflow-artifacts:" not in line:
                    found.setdefault(re.sub(r'"[^"]*"', '"..."', line), (line, []))[1].append(path.name)
    return found


def test_the_runbooks_local_commands_run_against_a_real_registry(lifecycle_run, tmp_path):
    workdir, _ = lifecycle_run
    copy_workdir(workdir, tmp_path / ".canaryflow")  # the rollback below must not move the shared champion
    (tmp_path / "input-log").symlink_to(tmp_path / ".canaryflow" / "input-log")  # what `kubectl cp` brings
    cfg = load_config(overrides=[f"mlflow.tracking_uri={sqlite_uri(tmp_path / '.canaryflow')}"])
    champion = models.alias_version(cfg, models.CHAMPION)
    previous = models.alias_version(cfg, models.PREVIOUS)
    assert champion and previous and champion != previous

    commands = runbook_commands()
    assert {shape.split()[1] for shape in commands} == {"registry", "rollback", "drift"}, commands
    # The rollback last: the commands before it read the registry as the alert found it.
    for shape in sorted(commands, key=lambda c: c.startswith("canaryflow rollback")):
        line, places = commands[shape]
        words = [champion if w == "N" else w for w in shlex.split(line)][1:]
        done = run_cli(*words, cwd=tmp_path, timeout=300)
        where = f"{', '.join(places)}: {line}"
        assert done.returncode == 0, f"{where}\n{done.stderr[-2000:]}"
        assert "Traceback" not in done.stderr, where
        if "--json" in words:
            assert json.loads(done.stdout), where
        if words[0] == "drift":
            assert json.loads(done.stdout)["status"] in ("drifted", "within_threshold", "too_few_inputs")
    # The rollback the runbook gives did what it says: the previous champion serves again.
    assert models.alias_version(cfg, models.CHAMPION) == previous
