"""The smaller commands, run as a user runs them."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.request

from tests.conftest import run_cli


def test_serve_answers_predict_over_http(trained):
    process = subprocess.Popen(
        [sys.executable, "-m", "canaryflow.cli", "serve", "--model-uri", str(trained[0]), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        deadline = time.monotonic() + 120
        line = ""
        while time.monotonic() < deadline and "serving" not in line:
            line = process.stderr.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+", line).group(0)
        request = urllib.request.Request(
            url + "/predict",
            data=b'{"inputs": ["name: Ada | job: baker"]}',
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert len(json.loads(resp.read())["predictions"]) == 1
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_serve_with_an_unknown_model_is_one_line(tmp_path):
    result = run_cli("serve", "--model-uri", "models:/nothing/1", "--workdir", str(tmp_path), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: cannot load model models:/nothing/1")
    assert len(result.stderr.strip().splitlines()) == 1
