"""The protocols KServe users call models with, through the plain HTTP client a user would use: canaryflow's own
/predict, KServe's V1 and the Open Inference Protocol v2 over REST, for a generator and a classifier. Each
answers with its protocol's shape, errors included, with the status code KServe documents (kserve/kserve
python/kserve/kserve/errors.py: 400 invalid input, 404 model not found, 500 inference error; 413 and 503 are
the server's own limits). Then what a server under load must do: batch concurrent requests, bound the
requests in flight, and drain them on SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from canaryflow.config import BatchConfig, ServingConfig
from canaryflow.inference.predictor import load_predictor
from canaryflow.rollout.local import post_json
from canaryflow.serving.faults import parse_fault
from tests.servers import model_server

NAME = "demo"
INPUTS = ["name: Ada | job: baker | city: Oslo", "name: Bo | job: pilot | city: Rome"]
LONG = "word " * 200


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A small classifier trained briefly on the reviews the training tests use: it answers label names."""
    from canaryflow.config import load_config
    from canaryflow.data.prepare import prepare_data
    from canaryflow.training.fine_tune import fine_tune
    from tests.unit.test_training import _reviews

    root = tmp_path_factory.mktemp("classifier")
    for split, (count, offset) in {"train": (120, 0), "validation": (30, 1000), "test": (30, 2000)}.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _reviews(count, offset)))
    cfg = load_config(
        overrides=[
            *(f"data.{s}={root / f'{s}.jsonl'}" for s in ("train", "validation", "test")),
            "data.input_column=text", "data.target_column=label", "model.task=classification",
            "train.max_steps=10", "data.min_split_rows=10",
        ]
    )  # fmt: skip
    prepare_data(cfg, root / "data")
    fine_tune(cfg, root / "data", root / "model")
    return root / "model"


@pytest.fixture(scope="module")
def served(trained, classifier_dir):
    limits = ServingConfig(max_input_tokens=40)
    servers = {
        "seq2seq": model_server(load_predictor(trained[0]), "primary", "3", serving=limits),
        "classification": model_server(load_predictor(classifier_dir), "primary", "4", serving=limits),
    }
    yield {task: f"http://127.0.0.1:{srv.server_address[1]}" for task, srv in servers.items()}
    for srv in servers.values():
        srv.shutdown()


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _post(url: str, body) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer, _ = post_json(url, raw, 60)
    return status, json.loads(answer)


def _v2(texts: list[str], datatype: str = "BYTES", **extra) -> dict:
    return {"id": "r-1", "inputs": [{"name": "text", "datatype": datatype, "shape": [len(texts)], "data": texts}],
            **extra}  # fmt: skip


# (path, body of a batch of INPUTS, how to read the answers)
PROTOCOLS = {
    "predict": ("/predict", {"inputs": INPUTS}, lambda a: a["predictions"]),
    "v1": (f"/v1/models/{NAME}:predict", {"instances": INPUTS}, lambda a: a["predictions"]),
    "v2": (f"/v2/models/{NAME}/infer", _v2(INPUTS), lambda a: a["outputs"][0]["data"]),
}


@pytest.mark.parametrize("task", ["seq2seq", "classification"])
@pytest.mark.parametrize("protocol", list(PROTOCOLS))
def test_a_batch_is_answered_in_the_protocols_shape(served, task, protocol):
    path, body, answers = PROTOCOLS[protocol]
    status, answer = _post(served[task] + path, body)
    assert status == 200, answer
    got = answers(answer)
    assert len(got) == len(INPUTS) and all(isinstance(x, str) for x in got)
    if task == "classification":
        assert set(got) <= {"positive", "negative"}
    if protocol == "v2":
        assert answer["model_name"] == NAME and answer["id"] == "r-1"
        assert answer["model_version"] == ("3" if task == "seq2seq" else "4")
        assert answer["outputs"][0]["datatype"] == "BYTES" and answer["outputs"][0]["shape"] == [len(INPUTS)]


BAD = {
    # (protocol, what): (path, body, status)
    ("predict", "over-long input"): ("/predict", {"inputs": ["hi", LONG]}, 413),
    ("v1", "over-long input"): (f"/v1/models/{NAME}:predict", {"instances": [LONG]}, 413),
    ("v2", "over-long input"): (f"/v2/models/{NAME}/infer", _v2([LONG]), 413),
    ("predict", "malformed JSON"): ("/predict", b'{"inputs": [', 400),
    ("v1", "malformed JSON"): (f"/v1/models/{NAME}:predict", b"{instances", 400),
    ("v2", "malformed JSON"): (f"/v2/models/{NAME}/infer", b"not json", 400),
    ("v1", "wrong model name"): ("/v1/models/other:predict", {"instances": INPUTS}, 404),
    ("v2", "wrong model name"): ("/v2/models/other/infer", _v2(INPUTS), 404),
    ("v2", "wrong tensor datatype"): (f"/v2/models/{NAME}/infer", _v2(INPUTS, "FP32"), 400),
    ("v2", "shape and data disagree"): (
        f"/v2/models/{NAME}/infer",
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": INPUTS}]},
        400,
    ),
    ("v1", "no instances"): (f"/v1/models/{NAME}:predict", {"instances": []}, 400),
}


@pytest.mark.parametrize(("protocol", "what"), list(BAD))
def test_bad_requests_get_the_protocols_error_shape(served, protocol, what):
    path, body, expected = BAD[(protocol, what)]
    status, answer = _post(served["seq2seq"] + path, body)
    assert status == expected, answer
    assert set(answer) == {"error"} and answer["error"] and "\n" not in answer["error"]
    if what == "over-long input":
        assert "tokens long; this model takes at most 40" in answer["error"]
    if what == "wrong tensor datatype":
        assert "FP32" in answer["error"] and "BYTES" in answer["error"]


def test_health_readiness_and_metadata(served):
    url = served["seq2seq"]
    assert _get(f"{url}/v1/models/{NAME}") == (200, {"name": NAME, "ready": True})
    assert _get(f"{url}/v1/models/other")[0] == 404
    assert _get(f"{url}/v2/health/live") == (200, {"live": True})
    assert _get(f"{url}/v2/health/ready") == (200, {"ready": True})
    assert _get(f"{url}/v2/models/{NAME}/ready") == (200, {"name": NAME, "ready": True})
    status, meta = _get(f"{url}/v2/models/{NAME}")
    assert status == 200 and meta["name"] == NAME and meta["versions"] == ["3"]
    assert meta["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [-1]}
    assert _get(f"{url}/health")[1]["model_version"] == "3"
    assert _get(f"{url}/nothing")[0] == 404


def test_references_bring_online_quality_under_every_protocol(served):
    url = served["seq2seq"]
    refs = ["Ada is a baker in Oslo.", "Bo is a pilot in Rome."]
    for path, body in (
        ("/predict", {"inputs": INPUTS, "references": refs}),
        (f"/v1/models/{NAME}:predict", {"instances": INPUTS, "references": refs}),
        (
            f"/v2/models/{NAME}/infer",
            _v2(INPUTS)
            | {
                "inputs": _v2(INPUTS)["inputs"]
                + [{"name": "references", "datatype": "BYTES", "shape": [2], "data": refs}]
            },
        ),  # fmt: skip
    ):
        before = _quality_count(url)
        assert _post(url + path, body)[0] == 200
        assert _quality_count(url) == before + 2, path


def _metric(url: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def _quality_count(url: str) -> float:
    return _metric(url, "canaryflow_server_quality_chrf_count")


# --- under load ---


def test_concurrent_requests_are_generated_as_one_batch(trained):
    serving = ServingConfig(batch=BatchConfig(max_size=8, max_latency_ms=300))
    srv = model_server(load_predictor(trained[0]), "primary", "1", serving=serving)
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    # Inputs of many lengths, many at once: a batch pads them, while other requests' tokens are being counted.
    texts = [f"name: {'Ada ' * (i % 7 + 1)}| job: baker | city: Oslo" for i in range(48)]
    try:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda text: _post(url + "/predict", {"inputs": [text]}), texts))
        assert [status for status, _ in answers] == [200] * len(texts), [a for s, a in answers if s != 200][:1]
        batches = _metric(url, "canaryflow_server_batch_size_count")
        inputs = _metric(url, "canaryflow_server_batch_size_sum")
        assert inputs == len(texts) and batches < len(texts), (batches, inputs)  # requests shared batches
        assert _metric(url, "canaryflow_server_queue_wait_seconds_count") == len(texts)
    finally:
        srv.shutdown()


def test_the_batcher_generates_in_its_callers_threads_one_batch_at_a_time():
    """A lone request generates in its own thread; concurrent ones share batches, never two at once; a failed
    batch fails its own requests only."""
    from canaryflow.serving.server import Batcher

    threads, running, overlaps, sizes = [], [0], [], []
    lock = threading.Lock()

    def generate(inputs):
        with lock:
            running[0] += 1
            overlaps.append(running[0])
        threads.append(threading.current_thread())
        time.sleep(0.02)
        with lock:
            running[0] -= 1
        if "boom" in inputs:
            raise RuntimeError("boom")
        return [text.upper() for text in inputs]

    batcher = Batcher(generate, max_size=4, max_latency_ms=50, on_batch=lambda size, waits: sizes.append(size))
    assert batcher.submit(["a"]) == ["A"] and threads == [threading.current_thread()]

    def call(text):
        with batcher.arriving() as ticket:
            time.sleep(0.005)
            try:
                return batcher.submit([text, text], ticket)
            except RuntimeError as exc:
                return str(exc)

    texts = [f"t{i}" for i in range(12)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(call, texts))
    assert answers == [[t.upper(), t.upper()] for t in texts]
    assert max(overlaps) == 1 and max(sizes) == 4 and sum(sizes) == 1 + 24 and len(sizes) < 13
    with ThreadPoolExecutor(2) as pool:
        failed, fine = pool.map(lambda x: call(x), ["boom", "ok"])
    assert failed == "boom" and fine in ("boom", ["OK", "OK"])  # batched with the failure, or after it
    assert batcher.submit(["after"]) == ["AFTER"]


def test_past_the_bound_in_flight_the_answer_is_503_with_retry_after(trained):
    srv = model_server(load_predictor(trained[0]), "primary", "1", parse_fault("latency_ms=800"),
                       serving=ServingConfig(max_in_flight=1))  # fmt: skip
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        slow = threading.Thread(target=_post, args=(url + "/predict", {"inputs": INPUTS[:1]}))
        slow.start()
        time.sleep(0.3)
        status, body, headers = post_json(
            url + "/v1/models/demo:predict", json.dumps({"instances": ["x"]}).encode(), 10
        )
        slow.join()
        assert status == 503 and headers["Retry-After"] == "1"
        assert "serving.max_in_flight" in json.loads(body)["error"]
        assert _metric(url, "canaryflow_server_requests_total", code="503") == 1
    finally:
        srv.shutdown()


@pytest.mark.slow
def test_sigterm_drains_the_requests_in_flight(trained, tmp_path):
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [sys.executable, "-m", "canaryflow.serving.server", "--model-uri", str(trained[0]), "--port-file",
         str(port_file), "--fault", "latency_ms=1500", "--model-name", NAME],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port_file.read_text()}"
        answered = []
        inflight = threading.Thread(target=lambda: answered.append(_post(url + "/predict", {"inputs": INPUTS})))
        inflight.start()
        time.sleep(0.5)  # the request is in the server, sleeping in its injected latency
        os.kill(process.pid, signal.SIGTERM)
        inflight.join(timeout=30)
        assert answered and answered[0][0] == 200, answered
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_the_readmes_curl_commands_answer(trained):
    """Every command of the README's "Calling a served model", against a server answering as it says."""
    import re
    import shlex
    import shutil

    from tests.conftest import REPO

    if shutil.which("curl") is None:
        pytest.skip("no curl on PATH: the README's commands are curl's")
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- calling-a-model -->\n```sh\n(.*?)```", text, re.S).group(1).replace("\\\n", " ")
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    assert lines[0].startswith("canaryflow serve --model-uri models:/canaryflow-demo@champion --port 8080")
    srv = model_server(load_predictor(trained[0]), "primary", "1", name="canaryflow-demo")
    port = srv.server_address[1]
    try:
        answers = []
        for line in lines[1:]:
            argv = [arg.replace("localhost:8080", f"127.0.0.1:{port}") for arg in shlex.split(line)]
            assert argv[0] == "curl", line
            done = subprocess.run([*argv, "--fail-with-body"], capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, (line, done.stdout, done.stderr)
            answers.append(json.loads(done.stdout))
    finally:
        srv.shutdown()
    assert len(answers[0]["predictions"]) == 1
    assert answers[1] == {"name": "canaryflow-demo", "ready": True}
    assert len(answers[2]["predictions"]) == 2
    assert answers[3] == {"ready": True} and answers[4]["ready"] is True
    assert answers[5]["outputs"][0]["datatype"] == "BYTES" and len(answers[5]["outputs"][0]["data"]) == 1
