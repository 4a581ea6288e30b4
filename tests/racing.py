"""Two processes racing to promote different versions over the same champion: the registry tests run it
against a SQLite store, and the server-mode tests against an MLflow server over SQLite and PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from canaryflow.config import Config
from canaryflow.registry import ledger, models

_RACER = """
import sys, time
from pathlib import Path
from canaryflow.config import Config
from canaryflow.registry import models
from canaryflow.registry.ledger import PromotionConflict
cfg = Config.from_json(Path(sys.argv[1]).read_text())
models.alias_version(cfg, "champion")  # connect before the start line, so both start the race together
Path(sys.argv[4]).touch()
while not Path(sys.argv[5]).exists():
    time.sleep(0.01)
try:
    models.promote(cfg, sys.argv[2], sys.argv[3], "racing")
    print("won")
except PromotionConflict as exc:
    print("conflict:", exc)
"""


def race(cfg: Config, tmp_path: Path) -> str:
    """Register three versions of cfg's model (the first the champion), race two processes promoting the
    other two, assert exactly one won, the other reported a conflict and the ledger holds one move; return
    the winner."""
    from mlflow import MlflowClient

    name = cfg.registry.model_name
    experiment = models.configure(cfg)
    client = MlflowClient()
    client.create_registered_model(name)
    run = client.create_run(experiment)
    versions = [
        str(client.create_model_version(name, f"runs:/{run.info.run_id}/m", run.info.run_id).version) for _ in range(3)
    ]
    client.set_registered_model_alias(name, "champion", versions[0])
    config = tmp_path / "race-config.json"
    config.write_text(cfg.model_dump_json())
    go = tmp_path / "go"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(config), v, versions[0], str(tmp_path / f"ready-{v}"), str(go)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for v in versions[1:]
    ]
    while not all((tmp_path / f"ready-{v}").exists() for v in versions[1:]):
        assert all(r.poll() is None for r in racers), "a racer died before the start line"
        time.sleep(0.05)
    go.touch()
    outcomes = [r.communicate(timeout=180)[0].strip() for r in racers]
    assert sorted(o.split(":")[0] for o in outcomes) == ["conflict", "won"], outcomes
    winner = versions[1:][outcomes.index("won")]
    assert models.alias_version(cfg, "champion") == winner
    assert "another promotion or rollback came first; nothing was moved" in next(o for o in outcomes if o != "won")
    assert [m["to_version"] for m in ledger.history(cfg, "champion")] == [winner]  # one move, recorded once
    return winner
