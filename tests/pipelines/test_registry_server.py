"""Server mode: the registry against a real `mlflow server` on loopback, over SQLite and over PostgreSQL
(skipped, with the reason, where no throwaway PostgreSQL cluster can start). Artifacts go through the
server's proxy (`--default-artifact-root mlflow-artifacts:/`), as on a cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
import uuid

import mlflow
import pytest
from mlflow import MlflowClient

from canaryflow.config import load_config
from canaryflow.data import drift
from canaryflow.data.prepare import read_pairs
from canaryflow.errors import CanaryflowError
from canaryflow.registry import ledger, models
from canaryflow.rollout.local import post_json
from tests.conftest import cli_command, run_cli
from tests.racing import race
from tests.servers import free_port

pytestmark = pytest.mark.slow  # real MLflow servers over SQLite and PostgreSQL


def _server_config(server, name: str):
    return load_config(
        overrides=[f"mlflow.tracking_uri={server.url}", f"registry.model_name={name}", f"registry.lock={server.lock}"]
    )


def _evaluation(passed: bool) -> dict:
    return {
        "metrics": {"challenger": {"bleu": 30.0, "chrf": 44.0}, "champion": None},
        "champion_version": None,
        "gate": {"passed": passed, "reasons": ["ok bleu floor: 30.00 >= floor 15.00"]},
    }


def test_registering_over_http_carries_lineage_and_a_rerun_registers_nothing(server, trained, tmp_path):
    name = f"srv-{uuid.uuid4().hex[:6]}"
    cfg = _server_config(server, name)
    lineage = {"data_hash": "d" * 64, "config_hash": "c" * 16, "base_model": "tiny-t5", "train.steps": "40"}
    version = models.register_candidate(cfg, "srv-run", trained[0], _evaluation(True), lineage)
    assert models.register_candidate(cfg, "srv-run", trained[0], _evaluation(True), lineage) == version
    client = MlflowClient()
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == [version]
    mv = client.get_model_version(name, version)
    for key in ("canaryflow.run_key", "git_commit", "data_hash", "config_hash", "base_model", "train.steps"):
        assert mv.tags[key], key
    assert mv.tags["gate.passed"] == "true" and mv.tags["canaryflow.idempotency_key"] == "srv-run"
    assert "Gate: passed." in mv.description
    assert models.aliases(cfg)["challenger"] == version
    # The model's files went through the server's artifact proxy and come back whole.
    model_dir = models.download_model_dir(cfg, models.model_uri(cfg, version), tmp_path / "dl")
    assert (model_dir / "model.safetensors").stat().st_size == (trained[0] / "model.safetensors").stat().st_size


def test_two_processes_racing_through_the_server_exactly_one_wins(server, tmp_path):
    race(_server_config(server, f"race-{uuid.uuid4().hex[:6]}"), tmp_path)


def test_the_lock_role_holds_the_promotion_lock_and_cannot_touch_the_registry(postgres_server):
    """On a cluster the steps that move champion get the lock's URI, not the server's: a role that may log in
    and take advisory locks, but reads and writes no table, so a step cannot move an alias around the server's
    login. Two holders exclude each other through it."""
    import sqlalchemy

    cfg = load_config(overrides=["registry.model_name=lock-role", f"registry.lock={postgres_server.lock}"])
    engine = sqlalchemy.create_engine(postgres_server.lock)
    with engine.connect() as connection, pytest.raises(sqlalchemy.exc.ProgrammingError, match="permission denied"):
        connection.execute(sqlalchemy.text("SELECT name FROM registered_models"))
    engine.dispose()
    with ledger.promotion_lock(cfg, timeout=5):
        with pytest.raises(CanaryflowError, match="held the advisory lock"):
            with ledger.promotion_lock(cfg, timeout=0.3):
                pass


def test_rollback_and_history_from_the_cli_against_the_server(server, tmp_path):
    name = f"cli-{uuid.uuid4().hex[:6]}"
    cfg = _server_config(server, name)
    winner = race(cfg, tmp_path)  # leaves a champion with a previous champion
    before = models.aliases(cfg)
    common = [
        "--tracking-uri",
        server.url,
        "--set",
        f"registry.model_name={name}",
        "--set",
        f"registry.lock={server.lock}",
    ]
    done = run_cli("rollback", "--reason", "pager: p99 over budget", "--json", *common)
    assert done.returncode == 0, done.stderr
    after = json.loads(done.stdout)
    assert after["champion"] == before["previous-champion"] and after["previous-champion"] == winner
    shown = run_cli("registry", "history", "--json", *common)
    assert shown.returncode == 0, shown.stderr
    moves = [m for m in json.loads(shown.stdout) if m["alias"] == "champion"]
    assert [(m["from_version"], m["to_version"]) for m in moves] == [
        (before["previous-champion"], winner),
        (winner, before["previous-champion"]),
    ]
    assert moves[-1]["reason"] == "pager: p99 over budget"
    assert ledger.history(cfg, "champion")[-1]["to_version"] == after["champion"]


def test_a_servers_input_log_outlives_it_in_the_trackings_artifact_store(sqlite_server, trained, prepared, tmp_path):
    """As on a cluster: `canaryflow serve` ships its input log through the tracking server's proxied artifacts
    (no cloud credentials in the pod); once it is gone, with its disk, drift is checked from the store."""
    store = f"mlflow-artifacts:/input-log/{uuid.uuid4().hex[:8]}"
    port = free_port()
    process = subprocess.Popen(
        cli_command("serve", "--model-uri", str(trained[0]), "--port", str(port),
         "--tracking-uri", sqlite_server.url, "--workdir", str(tmp_path / "pod"),
         "--set", "serving.input_log.sample_rate=1.0", "--set", f"serving.input_log.upload_uri={store}"),
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    inputs = read_pairs(prepared[0], "test")["input"].tolist()[:30]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        for start in range(0, len(inputs), 3):
            body = json.dumps({"inputs": inputs[start : start + 3]}).encode()
            assert post_json(f"http://127.0.0.1:{port}/predict", body, 60)[0] == 200
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    mlflow.set_tracking_uri(sqlite_server.url)
    result = drift.check(load_config(overrides=["drift.min_inputs=10"]), store, reference=lambda: ("1", prepared[1]))
    assert result["inputs"] == len(inputs) and result["status"] == "within_threshold", result
    assert result["log_dir"] == store
