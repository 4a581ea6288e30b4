"""`canaryflow data check`: the data stage alone, as a user runs it, with a champion in the registry."""

import hashlib
import json
import sys

import pytest

from canaryflow import cli
from tests.bad_data import CASES
from tests.conftest import run_cli


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI's own entry point in this process: the cases are many, a fresh process each is slow."""
    monkeypatch.setattr(sys, "argv", ["canaryflow", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def _sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_data_is_exit_2_one_line_and_no_registry_write(
    tmp_path, demo_files, champion_workdir, case, monkeypatch, capsys
):
    registry = champion_workdir / "mlflow.db"
    before = hashlib.sha256(registry.read_bytes()).hexdigest()
    overrides = case.write(tmp_path, demo_files)
    code, out, err = _cli(monkeypatch, capsys, "data", "check", "--workdir", str(champion_workdir), *_sets(overrides))
    assert code == 2
    assert err.startswith(f"error: {case.message}") and len(err.strip().splitlines()) == 1, err
    assert out == ""
    assert hashlib.sha256(registry.read_bytes()).hexdigest() == before  # not a byte of the registry changed
    assert not (champion_workdir / "data-check").exists()


def test_drift_over_the_threshold_fails_against_the_champion(
    tmp_path, demo_files, champion_workdir, monkeypatch, capsys
):
    shifted = tmp_path / "train.jsonl"
    shifted.write_text(
        "".join(
            json.dumps({"input": f"refund request {i} for order {i * 7}", "target": "ok"}) + "\n" for i in range(100)
        )
    )
    files = [f"data.train={shifted}", f"data.validation={demo_files['validation']}", f"data.test={demo_files['test']}"]
    registry = champion_workdir / "mlflow.db"
    before = hashlib.sha256(registry.read_bytes()).hexdigest()
    code, out, err = _cli(
        monkeypatch,
        capsys,
        "data",
        "check",
        "--workdir",
        str(champion_workdir),
        *_sets([*files, "data.drift_threshold=0.3"]),
    )
    assert code == 2 and out == ""
    assert err.startswith("error: data: ") and "against champion version 1's training data" in err
    assert hashlib.sha256(registry.read_bytes()).hexdigest() == before
    # Without a threshold, drift is measured and reported, and the check passes.
    code, out, err = _cli(
        monkeypatch, capsys, "data", "check", "--json", "--workdir", str(champion_workdir), *_sets(files)
    )
    assert code == 0, err
    card = json.loads(out)
    assert card["drift"]["champion_version"] == "1" and card["drift"]["distance"]["vocabulary"] > 0.5


def test_data_check_prints_the_data_card(tmp_path):
    result = run_cli(
        "data", "check", "--json", "--workdir", str(tmp_path), "--set", "demo.records_per_drop=100", timeout=300
    )
    assert result.returncode == 0, result.stderr
    card = json.loads(result.stdout)
    assert card["counts"]["train"] == 90 and card["test_inputs"] == 160
    assert len(card["content_hash"]) == 64
    assert not (tmp_path / "mlflow.db").exists()  # checking data creates no registry


def test_data_check_in_a_fresh_process_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "train.jsonl"
    bad.write_bytes(b"\xff\xfe\x00\x01")
    result = run_cli("data", "check", "--workdir", str(tmp_path / "wd"), "--set", f"data.train={bad}", timeout=300)
    assert result.returncode == 2
    assert result.stderr == "error: data.train: train.jsonl is not UTF-8 text (byte 0xff at offset 0)\n"
    assert result.stdout == "" and not (tmp_path / "wd" / "mlflow.db").exists()


def test_data_check_for_a_person_prints_the_card_and_plots_input_lengths(tmp_path, monkeypatch, capsys):
    workdir = tmp_path / "wd"
    code, out, err = _cli(monkeypatch, capsys, "data", "check", "--workdir", str(workdir))
    assert code == 0, err
    assert "Data card" in err and "Content hash" in err
    assert (workdir / "data-check" / "input_lengths.png").read_bytes()[:4] == b"\x89PNG"
