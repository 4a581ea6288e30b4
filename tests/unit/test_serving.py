"""The model server and the weighted router, as real HTTP servers on loopback."""

import json
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import sacrebleu

from canaryflow.config import CanaryConfig, InputLogConfig, ServingConfig
from canaryflow.errors import BadInputError
from canaryflow.inference.predictor import Seq2SeqGenerator
from canaryflow.rollout.local import LocalBackend, MirrorResult, Router, post_json
from canaryflow.serving.faults import CRASH_EXIT_CODE, parse_fault
from canaryflow.serving.http import MAX_BODY_BYTES, ConnectionPool, JsonHandler, serve_in_thread
from canaryflow.serving.inputlog import InputLog
from canaryflow.serving.server import MAX_INPUT_CHARS, load_generator, main
from tests.servers import model_server

INPUTS = ["name: Ada | job: baker | city: Oslo", "name: Bo | job: pilot | city: Rome"]


@pytest.fixture(scope="module")
def servers(trained):
    generator = Seq2SeqGenerator(trained[0])
    started = {
        name: model_server(generator, name, version) for name, version in (("champion", "1"), ("challenger", "2"))
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


# --- operating metrics: token lengths, length limit, online quality, drift, the input log ----------------------


@pytest.fixture(scope="module")
def metered(trained, prepared, tmp_path_factory):
    """A server as `serve` runs one: a token limit, a drift gauge over its model's training profile, and an
    input log that keeps every request."""
    generator = Seq2SeqGenerator(trained[0])
    log_dir = tmp_path_factory.mktemp("input-log")
    serving = ServingConfig(max_input_tokens=40, drift_window=40, input_log=InputLogConfig(sample_rate=1.0))
    input_log = InputLog.open(serving.input_log, log_dir, "challenger", "7")
    srv = model_server(
        generator, "challenger", "7", serving=serving, profile=prepared[1]["profile"], input_log=input_log
    )
    yield f"http://127.0.0.1:{srv.server_address[1]}", log_dir
    srv.shutdown()
    input_log.close()


def _samples(url: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    _, text = _get(url + "/metrics")
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return found


def _value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, *sorted({"variant": "challenger", "model_version": "7", **labels}.items())), 0.0)


def test_an_input_over_the_token_limit_is_refused_with_413_naming_it(metered):
    url, _ = metered
    before = _value(_samples(url), "canaryflow_server_refused_total", reason="input_too_long")
    status, raw, _ = post_json(url + "/predict", json.dumps({"inputs": ["name: Ada", "word " * 60]}).encode(), 30)
    assert status == 413
    error = json.loads(raw)["error"]
    assert error.startswith("input 2 of 2 is ") and "at most 40 (serving.max_input_tokens)" in error
    after = _samples(url)
    assert _value(after, "canaryflow_server_refused_total", reason="input_too_long") == before + 1
    assert _value(after, "canaryflow_server_max_input_tokens") == 40
    too_many = json.dumps({"inputs": ["x"] * 65}).encode()
    assert post_json(url + "/predict", too_many, 30)[0] == 413
    assert _value(_samples(url), "canaryflow_server_refused_total", reason="too_many_inputs") == 1


def test_metrics_carry_token_lengths_and_online_quality_per_version(metered, trained):
    url, _ = metered
    before = _samples(url)
    body = {"inputs": INPUTS, "references": [["Ada bakes in Oslo."], "Bo flies from Rome."]}
    status, raw, _ = post_json(url + "/predict", json.dumps(body).encode(), 30)
    assert status == 200
    predictions = json.loads(raw)["predictions"]
    after = _samples(url)

    def added(name: str) -> float:
        return _value(after, name) - _value(before, name)

    tokenizer = Seq2SeqGenerator(trained[0]).tokenizer
    assert added("canaryflow_server_input_tokens_count") == 2
    assert added("canaryflow_server_input_tokens_sum") == sum(len(tokenizer(x)["input_ids"]) for x in INPUTS)
    assert added("canaryflow_server_output_tokens_count") == 2
    assert added("canaryflow_server_quality_chrf_count") == 2
    expected = sum(
        sacrebleu.sentence_chrf(p, [r]).score
        for p, r in zip(predictions, ["Ada bakes in Oslo.", "Bo flies from Rome."])
    )
    assert added("canaryflow_server_quality_chrf_sum") == pytest.approx(expected)
    bad = {"inputs": INPUTS, "references": [["only one"]]}
    assert post_json(url + "/predict", json.dumps(bad).encode(), 30)[0] == 400


def test_drift_gauge_rises_on_shifted_inputs_and_the_log_keeps_them_masked(metered, prepared):
    from canaryflow.data.card import drift, profile_against
    from canaryflow.serving.inputlog import read_inputs

    url, log_dir = metered
    familiar = [f"name: Ada | job: baker | city: Oslo {i}" for i in range(40)]
    shifted = [f"Mail ops{i}@example.com about invoice {i} overdue now" for i in range(40)]
    for batch in (familiar[:20], familiar[20:]):
        assert post_json(url + "/predict", json.dumps({"inputs": batch}).encode(), 60)[0] == 200
    calm = _value(_samples(url), "canaryflow_server_input_drift", feature="vocabulary")
    for batch in (shifted[:20], shifted[20:]):
        assert post_json(url + "/predict", json.dumps({"inputs": batch}).encode(), 60)[0] == 200
    samples = _samples(url)
    drifted = _value(samples, "canaryflow_server_input_drift", feature="vocabulary")
    assert _value(samples, "canaryflow_server_drift_window_inputs") == 40  # the window holds the shifted ones only
    expected = drift(profile_against(shifted, prepared[1]["profile"]), prepared[1]["profile"])
    assert drifted == pytest.approx(expected["vocabulary"])
    assert drifted > calm + 0.3
    logged = read_inputs(log_dir, limit=40)
    assert logged[-1] == "Mail <email> about invoice <num> overdue now"
    assert not any("@" in text for text in logged)
    assert _value(samples, "canaryflow_server_input_log_records_total") >= 4


def test_router_splits_by_weight_and_changes_at_run_time(servers):
    router = Router(servers, timeout=30, seed=7, versions={"champion": "1", "challenger": "2"})
    try:
        router.set_weights({"champion": 75, "challenger": 25})
        picks = Counter(router.pick() for _ in range(4000))
        assert 0.22 < picks["challenger"] / 4000 < 0.28
        router.set_weights({"challenger": 100, "champion": 0})
        status, raw, headers = post_json(router.url + "/predict", b'{"inputs": ["name: Ada"]}', 30)
        assert status == 200 and headers["X-Canary-Variant"] == "challenger"
        assert json.loads(raw)["model_version"] == "2"
        _, text = _get(router.url + "/metrics")
        assert 'canaryflow_router_requests_total{code="200",model_version="2",variant="challenger"} 1.0' in text
        assert 'canaryflow_router_weight_percent{model_version="2",variant="challenger"} 100.0' in text
        assert 'canaryflow_router_weight_percent{model_version="1",variant="champion"} 0.0' in text
        router.set_canary_state("canary", "2")
        router.set_canary_state("promoted", "2")
        text = _get(router.url + "/metrics")[1]
        assert 'canaryflow_canary_state{model_version="2",state="promoted"} 1.0' in text
        assert 'canaryflow_canary_state{model_version="2",state="canary"} 0.0' in text
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


# --- fault injection -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, kind, value",
    [
        ("none", "none", 0),
        ("errors=0.1", "errors", 0.1),
        ("errors=1", "errors", 1),
        (" errors = 0.5 ", "errors", 0.5),
        ("latency_ms=250", "latency_ms", 250),
        ("latency_ms=0", "latency_ms", 0),
        ("quality=garbage", "quality", 0),
        ("crash-after=0", "crash-after", 0),
        ("crash-after=3", "crash-after", 3),
    ],
)
def test_fault_specs_parse(spec, kind, value):
    fault = parse_fault(spec)
    assert (fault.kind, fault.value) == (kind, value)
    assert parse_fault(str(fault)).kind == kind  # str() gives back a spec


@pytest.mark.parametrize(
    "spec, message",
    [
        ("explode=1", "unknown kind 'explode'; expected one of errors=P"),
        ("", "unknown kind ''"),
        ("none=1", "unknown kind"),
        ("errors", "errors needs a value, e.g. errors=P"),
        ("errors=", "needs a value"),
        ("errors=0", r"P must be in \(0, 1\]"),
        ("errors=1.5", r"P must be in \(0, 1\]"),
        ("errors=-0.1", r"P must be in \(0, 1\]"),
        ("errors=nan", "not a finite number"),
        ("errors=lots", "'lots' is not a number"),
        ("latency_ms=-5", "N must not be negative"),
        ("crash-after=-1", "N must not be negative"),
        ("crash-after=2.5", "not a whole number"),
        ("quality=poor", "quality takes only 'garbage'"),
    ],
)
def test_bad_fault_specs_get_one_clear_line(spec, message):
    with pytest.raises(BadInputError, match=message) as caught:
        parse_fault(spec)
    assert "\n" not in str(caught.value) and repr(spec) in str(caught.value)


def test_error_fault_is_seeded():
    def pattern(seed):
        fault = parse_fault("errors=0.5", seed=seed)
        return [fault.before_predict() for _ in range(200)]

    assert pattern(3) == pattern(3) != pattern(4)
    assert 70 < sum(pattern(3)) < 130


def test_server_rejects_a_bad_fault_before_loading_anything(capsys):
    assert main(["--model-uri", "/nowhere", "--fault", "errors=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: fault 'errors=2'") and "\n" not in err


class Echo:
    """A model that answers at once, so a test of timing sees only the fault's own delay."""

    def generate(self, inputs):
        return list(inputs)


@pytest.fixture(scope="module")
def faulty(trained):
    model = Seq2SeqGenerator(trained[0])
    started = {
        spec: model_server(generator, "challenger", "2", parse_fault(spec, seed=1))
        for spec, generator in (
            ("none", model),
            ("quality=garbage", model),
            ("errors=0.5", Echo()),
            ("latency_ms=300", Echo()),
        )
    }
    yield {spec: f"http://127.0.0.1:{srv.server_address[1]}" for spec, srv in started.items()}
    for srv in started.values():
        srv.shutdown()


def _predict(url, inputs=INPUTS):
    return post_json(url + "/predict", json.dumps({"inputs": inputs}).encode(), 30)


def test_error_fault_fails_a_fraction_with_500(faulty):
    answers = [_predict(faulty["errors=0.5"], INPUTS[:1]) for _ in range(20)]
    statuses = [status for status, _, _ in answers]
    assert set(statuses) == {200, 500} and 4 <= statuses.count(500) <= 16
    failed = next(raw for status, raw, _ in answers if status == 500)
    assert "injected fault errors=0.5" in json.loads(failed)["error"]
    assert _predict(faulty["errors=0.5"], [])[0] == 400  # bad input stays a 4xx, whatever the fault


def test_latency_fault_adds_its_delay(faulty):
    for expected in (0.3, 0.3, 0.3):
        started = time.perf_counter()
        status, raw, _ = _predict(faulty["latency_ms=300"])
        assert status == 200 and json.loads(raw)["predictions"] == INPUTS
        assert expected <= time.perf_counter() - started < expected + 1


def test_garbage_fault_answers_200_with_unrelated_text(faulty):
    _, good, _ = _predict(faulty["none"])
    status, bad, _ = _predict(faulty["quality=garbage"])
    good, bad = json.loads(good)["predictions"], json.loads(bad)["predictions"]
    assert status == 200 and len(bad) == len(good) == len(INPUTS)
    for real, garbage in zip(good, bad):
        assert sacrebleu.sentence_chrf(garbage, [real]).score < 20 < sacrebleu.sentence_chrf(real, [real]).score


# --- an MLflow model directory, and faults through LocalBackend -----------------------------------------------


@pytest.fixture
def registry_cfg(tmp_path):
    from canaryflow.config import load_config
    from canaryflow.registry.tracking import sqlite_uri

    def make(*overrides: str):
        return load_config(
            overrides=[f"mlflow.tracking_uri={sqlite_uri(tmp_path / 'wd')}", "registry.model_name=gen", *overrides]
        )

    return make


@pytest.fixture(scope="module")
def mlflow_model_dir(trained, prepared, tmp_path_factory):
    """What KServe's storage initializer leaves in /mnt/models for a version canaryflow registered."""
    import mlflow.pyfunc

    from canaryflow.registry.models import PYFUNC_ENTRY

    base = tmp_path_factory.mktemp("mlmodel")
    profile = base / "input_profile.json"
    profile.write_text(json.dumps(prepared[1]["profile"]))
    path = base / "model"
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=str(PYFUNC_ENTRY),
        artifacts={"model_dir": str(trained[0]), "input_profile": str(profile)},
        model_config={"max_source_length": 128},
        pip_requirements=["canaryflow"],
    )
    return path


def test_load_generator_reads_an_mlflow_model_directory(mlflow_model_dir, trained, prepared):
    import torch

    threads = torch.get_num_threads()
    try:
        generator, profile = load_generator(str(mlflow_model_dir), num_threads=1)
    finally:
        torch.set_num_threads(threads)  # the server's setting must not slow the rest of the session
    assert generator.generate(INPUTS) == Seq2SeqGenerator(trained[0]).generate(INPUTS)
    assert profile == prepared[1]["profile"]  # the training data's profile travels inside the model


def test_a_registered_version_is_served_with_the_generation_it_was_evaluated_with(trained, registry_cfg, tmp_path):
    """eval.max_new_tokens travels with the registered version, and the model server, which loads it as KServe's
    predictor does, generates no more tokens than that: a config change reaches serving through a new version."""
    import mlflow
    import torch

    from canaryflow.registry import models
    from tests.unit.test_registry import _evaluation

    cfg = registry_cfg("eval.max_new_tokens=3")
    version = models.register_candidate(cfg, "short", trained[0], _evaluation(True), {"data_hash": "abc"})
    # What KServe's storage initializer puts in /mnt/models: the version's whole MLflow model directory.
    where = mlflow.artifacts.download_artifacts(artifact_uri=models.model_uri(cfg, version), dst_path=str(tmp_path))
    threads = torch.get_num_threads()
    try:
        generator, _ = load_generator(where, num_threads=1)
    finally:
        torch.set_num_threads(threads)
    assert generator.generation == {"num_beams": 1, "max_new_tokens": 3}
    unbounded = Seq2SeqGenerator(trained[0]).generate(INPUTS)  # the default, 64 new tokens
    served = generator.generate(INPUTS)
    tokens = [len(generator.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in served]
    assert max(tokens) <= 3 and served != unbounded
    assert models.load_generator(cfg, version).generation["max_new_tokens"] == 3  # in-process loaders too


@pytest.mark.slow
def test_local_backend_serves_an_mlflow_model_dir_and_crashes_as_told(mlflow_model_dir, tmp_path):
    with LocalBackend(
        {"challenger": (str(mlflow_model_dir), "7")},
        num_threads=1,
        start_timeout=120,
        request_timeout=30,
        log_dir=tmp_path,
        faults={"challenger": "crash-after=2"},
    ) as backend:
        backend.router.set_weights({"challenger": 100})
        answers = [_predict(backend.router.url, INPUTS[:1]) for _ in range(3)]
        assert [a[0] for a in answers] == [200, 200, 502]
        assert json.loads(answers[0][1])["model_version"] == "7"
        assert backend.servers["challenger"].process.wait(timeout=10) == CRASH_EXIT_CODE
    assert "injected fault crash-after=2" in (tmp_path / "server-challenger.log").read_text()


@pytest.mark.parametrize(
    "faults, message",
    [({"challenger": "errors=2"}, r"P must be in"), ({"champion": "errors=0.1"}, "faults name no server")],
)
def test_local_backend_refuses_bad_faults_before_starting(tmp_path, faults, message):
    with pytest.raises(BadInputError, match=message):
        LocalBackend({"challenger": ("/nowhere", "1")}, 1, 5, 5, tmp_path, faults=faults)
    assert not list(tmp_path.iterdir())  # no server was started, so no log either


# --- the router against tiny stdlib upstreams ---------------------------------------------------------------------


class Stub:
    """An upstream that records what it gets, can be held on `gate`, and can close connections without saying so."""

    def __init__(self, name: str, silent_close: bool = False):
        self.name, self.silent_close = name, silent_close
        self.bodies: list[bytes] = []
        self.peers: set[int] = set()
        self.gate = threading.Event()
        self.gate.set()
        stub = self

        class Handler(JsonHandler):
            def do_POST(self):
                body = self.read_body()
                stub.bodies.append(body)
                stub.peers.add(self.client_address[1])
                stub.gate.wait(10)
                self.send_json(200, {"predictions": [stub.name], "model_version": stub.name})
                self.close_connection = stub.silent_close  # closes after the answer, which said keep-alive

        self.server = serve_in_thread(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self):
        self.gate.set()
        self.server.shutdown()


@pytest.fixture
def stubs():
    made = {name: Stub(name) for name in ("champion", "challenger")}
    yield made
    for stub in made.values():
        stub.stop()


@pytest.fixture
def make_router(stubs):
    routers = []

    def make(**kwargs):
        router = Router({name: stub.url for name, stub in stubs.items()}, timeout=10, **kwargs)
        router.set_weights({"champion": 100, "challenger": 0})
        routers.append(router)
        return router

    yield make
    for router in routers:
        router.stop()


def _wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _slot_free(router) -> bool:
    """Whether a request sent now is routed, not shed: the router frees a slot just after writing the answer,
    so a client can be answered and send again before its slot is back."""
    if not router._slots.acquire(blocking=False):
        return False
    router._slots.release()
    return True


def _metrics(url):
    return _get(url + "/metrics")[1]


def test_router_forwards_the_original_bytes_over_kept_alive_connections(make_router, stubs):
    router = make_router()
    body = b'{ "inputs" :\t["name: Ada"] ,"extra": 1 }'
    answers = [post_json(router.url + "/predict", body, 10) for _ in range(3)]
    assert stubs["champion"].bodies == [body] * 3
    ids = [headers["X-Request-Id"] for _, _, headers in answers]
    assert len(set(ids)) == 3 and all(len(i) == 32 for i in ids)
    assert len(stubs["champion"].peers) == 1  # one upstream connection for all three
    text = _metrics(router.url)
    assert 'canaryflow_router_requests_total{code="200",model_version="unknown",variant="champion"} 3.0' in text
    assert 'canaryflow_router_latency_seconds_count{model_version="unknown",variant="champion"} 3.0' in text
    assert "canaryflow_router_in_flight 0.0" in text


def test_connection_pool_resends_on_a_connection_the_server_closed():
    stub = Stub("x", silent_close=True)
    pool = ConnectionPool(stub.url, timeout=5)
    try:
        for _ in range(3):
            time.sleep(0.05)  # lets the server's close arrive before the pooled connection is reused
            assert pool.request("POST", "/predict", b"{}")[0] == 200
        assert len(stub.bodies) == 3 and len(stub.peers) == 3  # each resent once, never twice to the server
    finally:
        pool.close()
        stub.stop()


@pytest.mark.parametrize(
    "body, status, reason",
    [
        (b"{not json", 400, "malformed"),
        (b"[1, 2]", 400, "malformed"),
        (b"\xff\xfe", 400, "malformed"),
        (b"x" * (MAX_BODY_BYTES + 1), 413, "too_large"),
    ],
)
def test_router_refuses_bad_bodies_without_forwarding(make_router, stubs, body, status, reason):
    router = make_router()
    got, raw, headers = post_json(router.url + "/predict", body, 10)
    assert got == status and json.loads(raw)["error"] and headers["X-Request-Id"]
    assert stubs["champion"].bodies == []
    assert f'canaryflow_router_rejected_requests_total{{reason="{reason}"}} 1.0' in _metrics(router.url)


def test_router_sheds_load_beyond_max_in_flight(make_router, stubs):
    router = make_router(max_in_flight=2)
    stubs["champion"].gate.clear()
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(post_json, router.url + "/predict", b'{"inputs": ["a"]}', 10) for _ in range(2)]
        _wait_for(lambda: len(stubs["champion"].bodies) == 2)
        assert "canaryflow_router_in_flight 2.0" in _metrics(router.url)
        started = time.perf_counter()
        status, raw, _ = post_json(router.url + "/predict", b'{"inputs": ["a"]}', 10)
        assert status == 503 and "in flight" in json.loads(raw)["error"]
        assert time.perf_counter() - started < 1
        stubs["champion"].gate.set()
        assert [f.result()[0] for f in held] == [200, 200]
    _wait_for(lambda: _slot_free(router))
    assert post_json(router.url + "/predict", b'{"inputs": ["a"]}', 10)[0] == 200  # the slots came back
    text = _metrics(router.url)
    assert 'canaryflow_router_rejected_requests_total{reason="overloaded"} 1.0' in text
    # The router frees a slot just after it writes the answer, so a client can read the metrics first: on a
    # loaded machine (two test workers on 2 cores) this read once came before the last decrement.
    _wait_for(lambda: "canaryflow_router_in_flight 0.0" in _metrics(router.url))


def test_mirror_answers_from_primary_at_once_and_pairs_the_shadow_by_request_id(make_router, stubs):
    router = make_router()
    router.set_mirror("champion", "challenger")
    stubs["challenger"].gate.clear()  # a shadow that hangs must not hold the client
    started = time.perf_counter()
    status, raw, headers = post_json(router.url + "/predict", b'{"inputs": ["a"]}', 10)
    assert time.perf_counter() - started < 1
    assert status == 200 and headers["X-Canary-Variant"] == "champion"
    assert json.loads(raw)["model_version"] == "champion"
    request_id = headers["X-Request-Id"]
    assert router.mirrored(request_id, timeout=0.1) is None  # not back yet
    time.sleep(0.2)
    stubs["challenger"].gate.set()
    result = router.mirrored(request_id, timeout=5)
    assert isinstance(result, MirrorResult) and result.status == 200 and result.latency_ms >= 200
    assert json.loads(result.body)["model_version"] == "challenger"
    assert stubs["challenger"].bodies == [b'{"inputs": ["a"]}']
    assert router.mirrored(request_id, timeout=0.1) is None  # claimed once
    assert (
        'canaryflow_router_mirrored_requests_total{code="200",model_version="unknown",variant="challenger"} 1.0'
        in _metrics(router.url)
    )

    router.set_mirror(None, None)
    _, _, headers = post_json(router.url + "/predict", b'{"inputs": ["a"]}', 10)
    assert router.mirrored(headers["X-Request-Id"], timeout=5) is None  # weights again: no copy, no wait
    assert len(stubs["challenger"].bodies) == 1
    for bad in (("champion", "champion"), ("champion", "nobody"), ("champion", None)):
        with pytest.raises(ValueError):
            router.set_mirror(*bad)


def test_the_replay_keeps_its_clients_sending_between_looks_and_settles_before_a_shift(make_router, stubs):
    """The local canary's traffic: while the controller looks, `concurrency` requests stay on their way, never
    more; settle() collects them and stops the clients, and a shift settles first."""
    from canaryflow.rollout.controller import ReplayedTraffic

    router = make_router()
    backend = type("Backend", (), {"router": router})
    traffic = ReplayedTraffic(backend, ["a", "b", "c"], [["champion"]] * 3, CanaryConfig(concurrency=4))
    try:
        first = traffic.send(6)
        assert [o.variant for o in first] == ["champion"] * 6 and all(o.ok for o in first)
        _wait_for(lambda: len(stubs["champion"].bodies) == 10)  # six answered, four more sent without a look
        time.sleep(0.3)
        assert len(stubs["champion"].bodies) == 10  # and no more than those four
        assert [o.chrf for o in traffic.settle()] == [100.0] * 4  # the answers still owed, scored
        time.sleep(0.3)
        assert len(stubs["champion"].bodies) == 10  # settled: nothing is sent until the next look asks
        traffic.send(2)
        traffic.shift({"challenger": 100, "champion": 0})  # the four on their way were routed at the old weights
        assert len(stubs["champion"].bodies) == 16
        assert {o.variant for o in traffic.send(5)} == {"challenger"}
        traffic.shift({"champion": 100, "challenger": 0}, mirror=True)
        pairs = traffic.send_mirrored(3)
        assert [(b.variant, c.variant) for b, c in pairs] == [("champion", "challenger")] * 3
        assert all(b.chrf == 100.0 and c.ok and c.chrf < 100.0 for b, c in pairs)  # the shadow's own answer
    finally:
        traffic.close()
    assert not any(client.is_alive() for client in traffic._clients)


def test_a_replay_client_that_fails_hands_its_error_to_the_look(make_router, monkeypatch):
    from canaryflow.rollout import controller

    def broken(*args):
        raise RuntimeError("the client broke")

    monkeypatch.setattr(controller, "send_one", broken)
    traffic = controller.ReplayedTraffic(
        type("Backend", (), {"router": make_router()}), ["a"], [["a"]], CanaryConfig(concurrency=2)
    )
    try:
        with pytest.raises(RuntimeError, match="the client broke"):
            traffic.send(3)
    finally:
        traffic.close()


def test_mirror_drops_copies_a_stuck_shadow_cannot_take(make_router, stubs):
    router = make_router(max_in_flight=1)
    router.set_mirror("champion", "challenger")
    stubs["challenger"].gate.clear()
    ids = []
    for _ in range(3):
        _wait_for(lambda: _slot_free(router))
        status, _, headers = post_json(router.url + "/predict", b"{}", 10)
        assert status == 200
        ids.append(headers["X-Request-Id"])
    started = time.perf_counter()
    assert router.mirrored(ids[1], timeout=5) is None and time.perf_counter() - started < 1
    dropped = 'canaryflow_router_mirrored_requests_total{code="dropped",model_version="unknown",variant="challenger"}'
    mirrored = [line for line in _metrics(router.url).splitlines() if line.startswith(dropped)]
    assert mirrored == [f"{dropped} 2.0"], _metrics(router.url)
    stubs["challenger"].gate.set()
    assert router.mirrored(ids[0], timeout=5).status == 200


def test_unclaimed_mirror_results_are_capped_oldest_first(make_router):
    router = make_router(mirror_cap=2)
    router.set_mirror("champion", "challenger")
    ids = []
    for _ in range(4):
        ids.append(post_json(router.url + "/predict", b"{}", 10)[2]["X-Request-Id"])
        # One copy settled at a time: shadows run in parallel, and "oldest" means the first to come back.
        _wait_for(lambda: not router._mirror_pending)
    assert [router.mirrored(i, timeout=0.1) is not None for i in ids] == [False, False, True, True]


def test_an_unwritable_input_log_costs_the_log_not_the_serving(tmp_path, capsys):
    from canaryflow.serving.server import _open_input_log

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    serving = ServingConfig(input_log=InputLogConfig(sample_rate=1.0))
    assert _open_input_log(serving, str(blocker / "logs"), "primary", "1") is None
    assert capsys.readouterr().err.startswith("warning: serving without an input log: ")
    assert _open_input_log(serving, str(tmp_path / "logs"), "primary", "1").path.parent == tmp_path / "logs"
    leaky = ServingConfig(input_log=InputLogConfig(drop_fields=["inputs"]))
    with pytest.raises(BadInputError, match="inputs"):  # a filter that cannot work is the operator's to fix
        _open_input_log(leaky, str(tmp_path / "logs"), "primary", "1")


def test_a_log_that_is_only_shipped_is_staged_in_the_pods_temp_and_no_place_means_no_log(tmp_path, monkeypatch):
    import tempfile

    from canaryflow.serving.server import _open_input_log

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shipped = ServingConfig(input_log=InputLogConfig(sample_rate=1.0, upload_uri=str(tmp_path / "store")))
    log = _open_input_log(shipped, None, "primary", "1")
    try:
        assert log.path.parent == tmp_path / "canaryflow-input-log" and log.upload_uri == str(tmp_path / "store")
    finally:
        log.close()
    assert _open_input_log(ServingConfig(input_log=InputLogConfig(sample_rate=1.0)), None, "primary", "1") is None
