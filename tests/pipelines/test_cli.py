"""The smaller commands, run as a user runs them."""

import contextlib
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import cli_command, run_cli


@contextlib.contextmanager
def _serving(args: list[str], env: dict | None = None, cwd=None):
    """`canaryflow serve` as a process; yields its URL once it serves."""
    process = subprocess.Popen(
        cli_command("serve", *args, "--port", "0"),
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and "serving" not in line and process.poll() is None:
            line = process.stderr.readline()
        yield re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
    finally:
        process.terminate()
        process.wait(timeout=20)


def _predict(url: str, inputs: list[str]) -> tuple[int, dict]:
    request = urllib.request.Request(
        url + "/predict", data=json.dumps({"inputs": inputs}).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_serve_answers_predict_over_http(trained):
    with _serving(["--model-uri", str(trained[0])]) as url:
        status, body = _predict(url, ["name: Ada | job: baker"])
    assert status == 200 and len(body["predictions"]) == 1


@pytest.mark.slow
def test_a_predictor_serves_as_its_serving_config_says_and_logs_no_input_unless_told_where(trained, tmp_path):
    # As the KServe runtime starts it: a bare working directory, the serving section from the environment the
    # canary step renders (rollout/kserve.py predictor_env), every input sampled, but no dir or upload_uri.
    from canaryflow.rollout.kserve import SERVING_ENV

    pod = tmp_path / "home"
    scratch = tmp_path / "tmp"
    pod.mkdir()
    scratch.mkdir()
    serving = {"max_inputs_per_request": 2, "input_log": {"sample_rate": 1.0}}
    env = {SERVING_ENV: json.dumps(serving), "TMPDIR": str(scratch), "HOME": str(pod)}
    with _serving(["--model-uri", str(trained[0])], env, cwd=pod) as url:
        refused, body = _predict(url, ["name: Ada | job: baker"] * 3)
        answered, _ = _predict(url, ["name: Ada | job: baker"] * 2)
        with urllib.request.urlopen(url + "/metrics", timeout=30) as resp:
            metrics = resp.read().decode()
    assert refused == 413 and "2" in body["error"]  # the config's limit, not the default 64
    assert answered == 200
    assert re.search(r"^canaryflow_server_input_log_records_total\S* [1-9]", metrics, re.M) is None
    assert list(pod.rglob("*")) == [] and list(scratch.rglob("*.jsonl")) == []


@pytest.mark.slow
def test_serve_with_an_unknown_model_is_one_line(tmp_path):
    result = run_cli("serve", "--model-uri", "models:/nothing/1", "--workdir", str(tmp_path), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: cannot load model models:/nothing/1")
    assert len(result.stderr.strip().splitlines()) == 1
