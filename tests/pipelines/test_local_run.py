"""The whole DAG run locally through kfp.local, as `canaryflow run` runs it, on the tiny model."""

import json

import pytest
from mlflow import MlflowClient

from canaryflow.config import load_config
from canaryflow.registry import models
from canaryflow.registry.tracking import sqlite_uri
from tests.conftest import REPO, quick_canary_args, run_cli

pytestmark = pytest.mark.slow


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


def test_bootstrap_then_canary_between_two_registered_versions(lifecycle_run):
    workdir, summary = lifecycle_run
    assert summary["bootstrap"]["version"] == "1"
    assert summary["bootstrap"]["canary"]["verdict"] == "promoted"
    assert summary["bootstrap"]["canary"]["mode"] == "smoke"
    assert summary["version"] == "2"
    assert summary["gate"]["passed"] is True
    assert summary["canary"]["mode"] == "canary"
    assert summary["canary"]["champion_version"] == "1" and summary["canary"]["challenger_version"] == "2"
    aliases = summary["registry"]["aliases"]
    if summary["canary"]["verdict"] == "promoted":
        assert aliases == {"champion": "2", "challenger": None, "previous-champion": "1"}
    else:
        assert aliases == {"champion": "1", "challenger": None, "previous-champion": None}
    cfg, versions = _registry(workdir)
    assert set(versions) == {"1", "2"}
    assert models.aliases(cfg) == aliases
    assert versions["2"].tags["gate.passed"] == "true"
    assert versions["2"].tags["canary.verdict"] == summary["canary"]["verdict"]
    assert versions["2"].tags["data_hash"] == summary["data"]["content_hash"]
    drift = summary["data"]["drift"]  # measured against the data the bootstrap champion was trained on
    assert drift["champion_version"] == "1" and 0 <= drift["distance"]["vocabulary"] < 0.5


def test_a_second_run_trains_a_new_challenger_against_the_champion(lifecycle_run):
    workdir, first = lifecycle_run
    champion_before = first["registry"]["aliases"]["champion"]
    # Far too little training: the gate must reject it, and nothing may move.
    result = run_cli("run", "--json", "--workdir", str(workdir), "--set", "train.max_steps=15")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert summary["demo_drop"] == 3 and "bootstrap" not in summary
    assert summary["version"] == "3"
    assert summary["gate"]["passed"] is False
    assert any(reason.startswith("FAIL") for reason in summary["gate"]["reasons"])
    assert summary["canary"]["verdict"] == "not_run"
    assert summary["registry"]["aliases"]["champion"] == champion_before
    _, versions = _registry(workdir)
    assert versions["3"].tags["gate.passed"] == "false"
    assert float(versions["3"].tags["gate.bleu.p_value"]) > 0.0125  # the statistics behind the verdict
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


def test_a_classifier_runs_the_whole_lifecycle(tmp_path):
    from tests.unit.test_training import _reviews

    files = {}
    for split, (count, offset) in {"train": (400, 0), "validation": (60, 1000), "test": (80, 2000)}.items():
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in _reviews(count, offset)))
    args = ["run", "--json", "--config", "configs/classification.yaml", "--workdir", str(tmp_path / "wd")]
    for split, path in files.items():
        args += ["--set", f"data.{split}={path}"]
    args += ["--set", "train.max_steps=80", *quick_canary_args()]
    first = run_cli(*args, cwd=REPO)
    assert first.returncode == 0, first.stderr[-2000:]
    summary = json.loads(first.stdout)
    assert summary["metrics"]["challenger"]["macro_f1"] >= 90 and summary["gate"]["passed"] is True
    assert summary["canary"]["verdict"] == "promoted"  # served by the model server, scored on labels
    # A second run is judged against the classifier now serving, on macro-F1 and accuracy. It is asked for
    # an improvement no retraining can make, so the gate fails and no second canary runs (the first showed
    # a classifier's canary; this keeps the suite's time).
    impossible = ["--set", "gate.non_inferiority={accuracy: 1.0}", "--set", "gate.improvement={macro_f1: 50.0}"]
    second = run_cli(*args, *impossible, cwd=REPO)
    assert second.returncode == 0, second.stderr[-2000:]
    again = json.loads(second.stdout)
    assert again["version"] == "2" and summary["registry"]["aliases"]["champion"] == "1"
    reasons = again["gate"]["reasons"]
    assert any(r.startswith("FAIL macro_f1 vs champion") for r in reasons), reasons
    assert any(r.startswith(("ok accuracy vs champion", "FAIL accuracy vs champion")) for r in reasons), reasons
    assert again["canary"]["verdict"] == "not_run" and again["registry"]["aliases"]["champion"] == "1"
    _, versions = _registry(tmp_path / "wd")
    assert "gate.macro_f1.p_value" in versions["2"].tags


def test_registry_commands_and_rollback_read_and_write_the_ledger(lifecycle_run):
    # Last in this module: it moves the champion the tests above read.
    workdir, summary = lifecycle_run
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
