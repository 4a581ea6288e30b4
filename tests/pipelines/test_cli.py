"""The smaller commands, run as a user runs them."""

import gzip
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import run_cli


def test_data_check_prints_the_data_card(tmp_path):
    result = run_cli(
        "data", "check", "--json", "--workdir", str(tmp_path), "--set", "demo.records_per_drop=100", timeout=300
    )
    assert result.returncode == 0, result.stderr
    card = json.loads(result.stdout)
    assert card["counts"]["train"] == 90 and card["test_inputs"] == 160
    assert len(card["content_hash"]) == 64


@pytest.mark.parametrize(
    "name, content, message",
    [
        (
            "train.csv",
            b"text,label\nhello,1\n",
            "error: data.train: missing column 'input'; the columns are text, label",
        ),
        ("train.jsonl", b"", "error: data.train: file is empty: train.jsonl"),
        ("train.csv", b"input,target\n", "error: data.train: no rows in train.csv"),
        ("train.jsonl", gzip.compress(b'{"input": "a"}\n'), "error: data.train: train.jsonl is gzip-compressed"),
        ("train.jsonl", b"\xff\xfe\x00\x01", "error: data.train: train.jsonl is not UTF-8 text"),
        (
            "train.jsonl",
            "".join(f'{{"input": "q{i}", "target": "a"}}\n' for i in range(20)).encode(),
            "error: data.validation: 2 rows after cleaning and deduplication, fewer than data.min_split_rows 3",
        ),
    ],
)
def test_data_check_rejects_bad_data_in_one_line(tmp_path, name, content, message):
    bad = tmp_path / name
    bad.write_bytes(content)
    workdir = tmp_path / "wd"
    result = run_cli(
        "data",
        "check",
        "--workdir",
        str(workdir),
        "--set",
        f"data.train={bad}",
        "--set",
        "data.min_split_rows=3",
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message) and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
    assert not (workdir / "mlflow.db").exists()  # no registry was created, let alone written


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
