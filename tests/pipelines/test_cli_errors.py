"""Bad input on the command line: one clear line, exit code 2, no traceback, nothing started."""

import pytest

from tests.conftest import run_cli


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--set", "train.max_stepz=3"], "error: config: train.max_stepz: Extra inputs are not permitted"),
        (["run", "--set", "train.batch_size=-1"], "error: config: train.batch_size"),
        (["run", "--config", "/nonexistent.yaml"], "error: config file not found: /nonexistent.yaml"),
        (["run", "--set", "data.train=/nonexistent/train.jsonl"], "error: data.train: file not found"),
        (["run", "--set", "data.train=/tmp/*.nothing-matches"], "error: data.train: no file matches"),
        (["run", "--set", "model.task=classification"], "error: model.task classification needs your data"),
        (
            [
                "run",
                "--set",
                "model.task=classification",
                "--set",
                "gate.floors={bleu: 10}",
                "--set",
                "data.train=/etc/hostname",
            ],  # fmt: skip
            "error: gate names 'bleu', which a classification model is not scored on",
        ),
        (["run", "--bogus-flag"], "error: No such option: --bogus-flag"),
        (["registry", "list"], "error: no registry in "),
        (["rollback", "--reason", "bad canary"], "error: no registry in "),
        (["canary", "drill", "--fault", "errors=2"], "error: fault 'errors=2': the error fraction P must be in (0, 1]"),
        (["canary", "drill", "--fault", "none"], "error: no registry in "),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    result = run_cli(*args, "--workdir", str(tmp_path / "wd"), timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # exactly one line
    assert result.stderr.startswith(message)
    assert result.stdout == ""
    assert not (tmp_path / "wd" / "pipeline_root").exists()


def test_help_lists_the_commands():
    result = run_cli("--help", timeout=60)
    assert result.returncode == 0
    for command in ("run", "compile", "data", "serve"):
        assert command in result.stdout
