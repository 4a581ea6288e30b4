"""The whole DAG run locally through kfp.local, as `canaryflow run` runs it, on the tiny model."""

import contextlib
import json
import queue
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from canaryflow.config import load_config
from canaryflow.registry import models
from canaryflow.registry.tracking import sqlite_uri
from tests.conftest import cli_command, copy_workdir, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def own_lifecycle(lifecycle_run, tmp_path_factory):
    """The lifecycle's workdir copied for this module's tests that register a version and move the champion:
    the drills and notebooks read the shared one, under pytest-xdist at the same time."""
    workdir, summary = lifecycle_run
    return copy_workdir(workdir, tmp_path_factory.mktemp("own-lifecycle") / "workdir"), summary


def _registry(workdir):
    cfg = load_config(overrides=[f"mlflow.tracking_uri={sqlite_uri(workdir)}"])
    models.configure(cfg)
    versions = MlflowClient().search_model_versions(f"name='{cfg.registry.model_name}'")
    return cfg, {str(v.version): v for v in versions}


def test_summary_has_the_documented_keys(lifecycle_run):
    _, summary = lifecycle_run
    for key in ("data", "train", "metrics", "gate", "canary", "registry", "duration_s"):
        assert key in summary, key
    assert set(summary["metrics"]) == {"challenger", "champion"}
    assert {"passed", "reasons"} <= set(summary["gate"])
    assert "verdict" in summary["canary"] and "aliases" in summary["registry"]


def test_metric_floors_on_held_out_entities(lifecycle_run):
    _, summary = lifecycle_run
    challenger, champion = summary["metrics"]["challenger"], summary["metrics"]["champion"]
    assert challenger["bleu"] >= 20.0
    assert challenger["chrf"] >= 35.0
    assert challenger["rougeL"] >= 45.0
    assert champion is not None and champion["bleu"] >= 10.0  # the bootstrap champion, scored on the same test set
    assert summary["train"]["final_loss"] < summary["train"]["first_loss"]


def test_every_step_of_both_runs_forked_from_one_warm_process(lifecycle_run):
    workdir, _ = lifecycle_run
    log = (workdir / "logs" / "warm-steps.log").read_text()
    assert log.count(" listening on ") == 1 and "warm: ready" in log
    ran = re.findall(r"^warm: (\d+) runs canaryflow\.(steps\.\w+|serving\.server\.main)$", log, re.MULTILINE)
    steps = ["prepare_data", "fine_tune", "evaluate_model", "register_model", "canary_rollout", "record_outcome"]
    run = [f"steps.{step}_step" for step in steps]
    # The bootstrap's smoke check serves the challenger alone; the challenger's canary serves both versions.
    bootstrap, challenger = [*run[:5], "serving.server.main", run[5]], [*run[:5], *["serving.server.main"] * 2, run[5]]
    assert [what for _, what in ran] == bootstrap + challenger
    assert len({pid for pid, _ in ran}) == len(ran)  # a fresh fork each


def test_bootstrap_then_canary_between_two_registered_versions(lifecycle_run):
    workdir, summary = lifecycle_run
    assert summary["bootstrap"]["version"] == "1"
    assert summary["bootstrap"]["canary"]["verdict"] == "promoted"
    assert summary["bootstrap"]["canary"]["mode"] == "smoke"
    assert summary["version"] == "2"
    assert summary["gate"]["passed"] is True
    assert summary["canary"]["mode"] == "canary"
    assert summary["canary"]["champion_version"] == "1" and summary["canary"]["challenger_version"] == "2"
    # Version 2 trained longer on more data (BLEU and chrF well above version 1's): the canary promotes it.
    assert summary["canary"]["verdict"] == "promoted", summary["canary"]["reason"]
    aliases = summary["registry"]["aliases"]
    assert aliases == {"champion": "2", "challenger": None, "previous-champion": "1"}
    cfg, versions = _registry(workdir)
    assert set(versions) == {"1", "2"}
    assert models.aliases(cfg) == aliases
    assert versions["2"].tags["gate.passed"] == "true"
    assert versions["2"].tags["canary.verdict"] == summary["canary"]["verdict"]
    assert versions["2"].tags["data_hash"] == summary["data"]["content_hash"]
    drift = summary["data"]["drift"]  # measured against the data the bootstrap champion was trained on
    assert drift["champion_version"] == "1" and 0 <= drift["distance"]["vocabulary"] < 0.5


def test_a_genuinely_worse_model_is_rolled_back_on_quality_by_real_servers(lifecycle_run, trained, prepared, tmp_path):
    """The weak model (40 training steps) against the lifecycle's champion (350 steps), both served by real
    model server processes behind the router, the gate left out as if forced open: the canary rolls the
    weak one back on online quality, and the champion keeps the traffic."""
    from canaryflow.data.prepare import read_pairs
    from canaryflow.rollout.controller import run_canary
    from tests.conftest import QUICK_CANARY

    workdir, _ = lifecycle_run
    # The weak model is slower too (it rarely stops before the token limit); with slow requests tolerated,
    # quality alone must end the canary.
    tolerant = [*QUICK_CANARY, "canary.slow_tolerance=50"]
    cfg = load_config(overrides=[f"mlflow.tracking_uri={sqlite_uri(workdir)}", *tolerant])
    champion = models.alias_version(cfg, models.CHAMPION)
    test = read_pairs(prepared[0], "test")
    result = run_canary(
        cfg,
        (str(trained[0]), "weak"),
        (models.model_uri(cfg, champion), champion),
        list(test["input"]),
        [list(refs) for refs in test["references"]],
        tmp_path / "logs",
    )
    assert result["verdict"] == "rolled_back", result["reason"]
    assert "FAIL online chrF loss" in result["reason"]
    assert result["router_weights"] == {"champion": 100, "challenger": 0}
    step = result["steps"][-1]
    assert step["challenger"]["mean_chrf"] < step["champion"]["mean_chrf"] - 5


# Nothing like the demo's "name: ... | job: ..." records: other words, other lengths, e-mail addresses to mask.
SHIFTED = [
    f"Customer {i} writes: my parcel {i:05d} never arrived, please refund it to me at buyer{i}@mail.example soon"
    for i in range(200)
]


@contextlib.contextmanager
def _serving(workdir, *overrides):
    """`canaryflow serve` of the champion on a free port, as an operator runs it; its URL."""
    args = ["--model-uri", "models:/canaryflow-demo@champion", "--port", "0", "--workdir", str(workdir)]
    process = subprocess.Popen(
        cli_command("serve", *args, *(a for o in overrides for a in ("--set", o))),
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    # A reader thread: the server never closes stderr, so a blocking read here could wait for ever.
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        seen, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                assert process.poll() is None, "".join(seen)[-2000:]
                continue
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", seen[-1])  # printed once the model is loaded
            if found:
                yield found.group(1)
                return
        raise AssertionError("canaryflow serve did not come up: " + "".join(seen)[-2000:])
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_shifted_stream_triggers_one_retraining_and_the_cool_down_holds(own_lifecycle):
    """Drift end to end: served inputs are logged (masked), `drift check` sees the shift against the champion's
    training data, `drift watch --submit --local` runs the retraining pipeline once, and the next check within
    the cool-down starts nothing."""
    from canaryflow.rollout.local import post_json

    workdir, first = own_lifecycle
    champion_before = first["registry"]["aliases"]["champion"]
    with _serving(workdir, "serving.input_log.sample_rate=1") as url:
        for start in range(0, len(SHIFTED), 50):
            body = json.dumps({"inputs": SHIFTED[start : start + 50]}).encode()
            assert post_json(url + "/predict", body, 120)[0] == 200
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            scraped = resp.read().decode()
    # The server saw the shift too, against the profile its model carries, before any check was run.
    gauge = re.search(r'canaryflow_server_input_drift\{[^}]*feature="vocabulary"[^}]*\} ([0-9.]+)', scraped)
    assert gauge and float(gauge.group(1)) > 0.5, scraped[-2000:]
    window = ["--set", "drift.window=200", "--set", "drift.min_inputs=100"]

    checked = run_cli("drift", "check", "--json", "--workdir", str(workdir), *window)
    assert checked.returncode == 0, checked.stderr[-2000:]
    result = json.loads(checked.stdout)
    assert result["status"] == "drifted" and result["inputs"] == 200
    assert result["champion_version"] == champion_before
    assert result["distance"]["vocabulary"] > 0.5
    assert Path(result["plot"]).stat().st_size > 10_000
    logged = (workdir / "input-log" / f"inputs-primary-v{champion_before}.jsonl").read_text()
    assert "buyer7@mail.example" not in logged and "<email>" in logged  # masked before it was written

    # Far too little training: the gate must reject the retrained model, and nothing may move.
    retrain = ["--set", "train.max_steps=15"]
    watched = run_cli(
        "drift", "watch", "--submit", "--local", "--checks", "1", "--json", "--workdir", str(workdir), *window, *retrain
    )
    assert watched.returncode == 0, watched.stderr[-2000:]
    triggered = json.loads(watched.stdout)
    assert triggered["action"] == "triggered" and triggered["status"] == "drifted"
    assert triggered["run"] == {
        "where": "local",
        "version": "3",
        "status": triggered["run"]["status"],
        "gate_passed": False,
        "canary": "not_run",
    }

    again = run_cli(
        "drift", "watch", "--submit", "--local", "--checks", "1", "--json", "--workdir", str(workdir), *window, *retrain
    )
    assert again.returncode == 0, again.stderr[-2000:]
    cooling = json.loads(again.stdout)
    assert cooling["action"] == "cooling_down" and cooling["last_trigger"]["run"]["version"] == "3"

    cfg, versions = _registry(workdir)
    assert set(versions) == {"1", "2", "3"}  # one retraining, not two
    assert models.aliases(cfg)["champion"] == champion_before
    assert versions["3"].tags["gate.passed"] == "false"
    assert float(versions["3"].tags["gate.bleu.p_value"]) > 0.025  # the statistics behind the verdict
    assert versions["3"].tags["gate.bleu.ci"].endswith("at 95%")
    assert "canary.verdict" not in versions["3"].tags


def test_a_failing_step_is_one_line_and_registers_nothing(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"input": "a", "label": "b"}\n' * 30)
    result = run_cli(
        "run",
        "--workdir",
        str(tmp_path / "wd"),
        "--set",
        f"data.train={data}",
        "--set",
        f"data.validation={data}",
        "--set",
        f"data.test={data}",
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: step prepare_data failed: data.train: missing column 'target'")
    assert "Traceback" not in result.stderr
    _, versions = _registry(tmp_path / "wd")
    assert versions == {}


def test_nan_losses_fail_the_run_with_the_guards_error_and_register_nothing(tmp_path):
    result = run_cli(
        "run",
        "--workdir",
        str(tmp_path / "wd"),
        "--set",
        "train.fault_nan_after_step=3",
        "--set",
        "demo.bootstrap_max_steps=40",
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: step fine_tune failed: training stopped: ")
    assert "non-finite losses" in lines[-1] and "Traceback" not in result.stderr
    _, versions = _registry(tmp_path / "wd")
    assert versions == {}


def test_summary_renders_for_a_person(lifecycle_run):
    import io

    from rich.console import Console

    from canaryflow.cli import render_summary

    _, summary = lifecycle_run
    assert [step["weight"] for step in summary["canary"]["steps"]][0] == 50  # QUICK_CANARY's first step
    out = io.StringIO()
    render_summary(summary, Console(file=out, width=160))
    text = out.getvalue()
    for expected in ("challenger vs champion", "canary steps", "Gate:", "previous-champion", "50%", "vs champion v1"):
        assert expected in text, expected
    assert f"{summary['data']['test_inputs']} inputs" in text


def test_registry_commands_and_rollback_read_and_write_the_ledger(own_lifecycle):
    # Last in this module: it moves the champion the shifted-stream test reads.
    workdir, summary = own_lifecycle
    where = ["--workdir", str(workdir), "--json"]
    listed = json.loads(run_cli("registry", "list", *where).stdout)
    assert [row["version"] for row in listed][:2] == [1, 2] and listed[1]["gate"] == "passed"
    elsewhere = workdir / "elsewhere"
    elsewhere.mkdir()
    result = run_cli("registry", "show", "2", *where, cwd=elsewhere)
    shown = {row["tag"]: row["value"] for row in json.loads(result.stdout)}
    assert not list(elsewhere.iterdir())  # reading the registry wrote no store where the command ran
    assert shown["gate.passed"] == "true" and "gate.bleu.p_value" in shown and "data_card" in shown
    champion = summary["registry"]["aliases"]["champion"]
    previous = summary["registry"]["aliases"]["previous-champion"]
    result = run_cli("rollback", "--reason", "p99 page", *where)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"champion": previous, "challenger": None, "previous-champion": champion}
    moves = json.loads(run_cli("registry", "history", *where).stdout)
    champion_moves = [m for m in moves if m["alias"] == "champion"]
    assert [m["to_version"] for m in champion_moves] == ["1", champion, previous]
    assert champion_moves[-1]["reason"] == "p99 page" and champion_moves[0]["pipeline_run"] != "manual"
