"""The model server and the weighted router, as real HTTP servers on loopback."""

import json
import urllib.request
from collections import Counter

import pytest

from canaryflow.evaluation.generate import Seq2SeqGenerator
from canaryflow.rollout.local import Router, post_json
from canaryflow.serving.http import MAX_BODY_BYTES, serve_in_thread
from canaryflow.serving.server import MAX_INPUT_CHARS, make_handler


@pytest.fixture(scope="module")
def servers(trained):
    generator = Seq2SeqGenerator(trained[0])
    started = {
        name: serve_in_thread(make_handler(generator, name, version))
        for name, version in (("champion", "1"), ("challenger", "2"))
    }
    urls = {name: f"http://127.0.0.1:{srv.server_address[1]}" for name, srv in started.items()}
    yield urls
    for srv in started.values():
        srv.shutdown()


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read().decode()


def test_health_and_predict(servers):
    status, body = _get(servers["champion"] + "/health")
    assert status == 200 and json.loads(body)["model_version"] == "1"
    status, raw, headers = post_json(servers["champion"] + "/predict", b'{"inputs": ["name: Ada", "name: Bo"]}', 30)
    assert status == 200 and len(json.loads(raw)["predictions"]) == 2
    assert headers["X-Model-Version"] == "1"


@pytest.mark.parametrize(
    "body, status",
    [
        (b"{not json", 400),
        (b'{"inputs": "just a string"}', 400),
        (b'{"inputs": []}', 400),
        (b"[1, 2]", 400),
        (json.dumps({"inputs": ["x" * (MAX_INPUT_CHARS + 1)]}).encode(), 413),
        (json.dumps({"inputs": ["x"] * 65}).encode(), 413),
        (b"x" * (MAX_BODY_BYTES + 1), 413),
    ],
)
def test_bad_requests_get_clear_4xx(servers, body, status):
    got, raw, _ = post_json(servers["challenger"] + "/predict", body, 30)
    assert got == status
    assert json.loads(raw)["error"]


def test_metrics_count_requests_by_variant_and_code(servers):
    post_json(servers["challenger"] + "/predict", b"{bad", 10)
    _, text = _get(servers["challenger"] + "/metrics")
    assert 'canaryflow_server_requests_total{code="400",model_version="2",variant="challenger"}' in text
    assert "canaryflow_server_latency_seconds_bucket" in text


def test_router_splits_by_weight_and_changes_at_run_time(servers):
    router = Router(servers, timeout=30, seed=7)
    try:
        router.set_weights({"champion": 75, "challenger": 25})
        picks = Counter(router.pick() for _ in range(4000))
        assert 0.22 < picks["challenger"] / 4000 < 0.28
        router.set_weights({"challenger": 100, "champion": 0})
        status, raw, headers = post_json(router.url + "/predict", b'{"inputs": ["name: Ada"]}', 30)
        assert status == 200 and headers["X-Canary-Variant"] == "challenger"
        assert json.loads(raw)["model_version"] == "2"
        _, text = _get(router.url + "/metrics")
        assert 'canaryflow_router_requests_total{code="200",variant="challenger"} 1.0' in text
        assert 'canaryflow_router_weight_percent{variant="challenger"} 100.0' in text
        with pytest.raises(ValueError):
            router.set_weights({"challenger": 60})
    finally:
        router.stop()


def test_router_answers_502_when_a_backend_is_down(servers):
    router = Router({"champion": servers["champion"], "challenger": "http://127.0.0.1:9"}, timeout=5)
    try:
        router.set_weights({"challenger": 100, "champion": 0})
        status, _, headers = post_json(router.url + "/predict", b'{"inputs": ["a"]}', 10)
        assert status == 502 and headers["X-Canary-Variant"] == "challenger"
    finally:
        router.stop()
