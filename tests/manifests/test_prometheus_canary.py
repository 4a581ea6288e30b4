"""The KServe canary's read path against a real Prometheus.

Real canaryflow model servers on loopback (the lifecycle run's champion, served on both sides; the challenger with
a drill fault) are scraped by a real Prometheus with the relabelling the shipped PodMonitor asks for. The KServe
backend reads them with the PromQL the config ships, through the controller, while the Kubernetes API stays the
fake at the edge (tests/manifests/test_kserve_backend.py): its traffic split decides how the router in front of
the servers weighs each request. The verdicts must be the ones the local backend reaches on the same servers.

A second test serves a recorded /metrics of each Knative generation's queue-proxy from a small exporter, and
evaluates KNATIVE_QUERIES against it in the same kind of Prometheus.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from canaryflow.config import load_config
from canaryflow.rollout.kserve import KNATIVE_QUERIES, POLL_S, KServeBackend, NoSeries, prometheus_query
from tests.conftest import QUICK_CANARY
from tests.manifests.test_kserve_backend import CHAMPION_URI, NAME, NS, FakeKServe, isvc_schema  # noqa: F401
from tests.prometheus import Prometheus, binary

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "knative"
PODMONITOR = Path(__file__).resolve().parents[2] / "manifests" / "observability" / "podmonitor.yaml"
SCRAPE_S = 1
LOOK_S = 1.0  # canary.kserve.look_interval_s; a look sends traffic and waits for it to be scraped, at least that long
PER_LOOK = 20
# 1 s of latency, as in the drills (tests/faults/test_drills.py): gross beside the suite's other worker.
FAULTS = {"2": "none", "3": "errors=0.1", "4": "latency_ms=1000"}
STORAGE = {"1": CHAMPION_URI, **{v: f"s3://models/1/v{v}/artifacts/model" for v in FAULTS}}


def _relabel_configs(endpoint: dict) -> list[dict]:
    """The scrape config's relabel_configs the Prometheus Operator generates for a PodMonitor endpoint: the ones it
    always adds (namespace, pod; prometheus-operator v0.93.0 pkg/prometheus/promcfg.go), then the endpoint's own,
    with the CRD's camelCase field names in Prometheus' snake_case."""
    generated = [
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ]
    names = {"sourceLabels": "source_labels", "targetLabel": "target_label", "action": "action", "regex": "regex",
             "replacement": "replacement", "separator": "separator"}  # fmt: skip
    return generated + [{names[k]: v for k, v in r.items()} for r in endpoint.get("relabelings", [])]


def _endpoints() -> tuple[dict, dict]:
    own, queue_proxy = yaml.safe_load(PODMONITOR.read_text())["spec"]["podMetricsEndpoints"]
    return own, queue_proxy


def _pod(address: str, name: str, revision: str = "") -> dict:
    """A static target with the service-discovery labels a predictor pod of the InferenceService would have."""
    labels = {
        "__meta_kubernetes_namespace": NS,
        "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_label_serving_kserve_io_inferenceservice": NAME,
    }
    if revision:
        labels["__meta_kubernetes_pod_label_serving_knative_dev_revision"] = revision
    return {"targets": [address], "labels": labels}


# --- the canary through PromQL ---


@pytest.fixture(scope="module")
def predictors(lifecycle_run, prepared, tmp_path_factory):
    """The champion's server and one challenger server per fault, each with its own version label, scraped by a
    real Prometheus as the PodMonitor would have it scrape them."""
    from canaryflow.data.prepare import read_pairs
    from canaryflow.registry import models
    from canaryflow.rollout.local import ModelServerProcess
    from canaryflow.runner import with_workdir

    binary("prometheus")
    workdir, _ = lifecycle_run
    cfg = with_workdir(load_config(), workdir)
    model_dir = models.download_model_dir(cfg, models.model_uri(cfg, models.alias_version(cfg, models.CHAMPION)),
                                          tmp_path_factory.mktemp("champion"))  # fmt: skip
    servers = {}
    for version, fault in {"1": "none", **FAULTS}.items():
        variant = "champion" if version == "1" else "challenger"
        # A folder per server: the challengers' logs share one name (server-challenger.log).
        logs = tmp_path_factory.mktemp(f"logs-v{version}")
        servers[version] = ModelServerProcess(str(model_dir), variant, version, 1, logs, {}, fault)
    try:
        deadline = time.monotonic() + 180
        urls = {version: server.wait_ready(deadline) for version, server in servers.items()}
        own, _ = _endpoints()
        pods = [_pod(url.split("//")[1], f"{NAME}-predictor-v{v}") for v, url in urls.items()]
        prometheus = Prometheus({"predictors": {"targets": pods, "relabel_configs": _relabel_configs(own)}},
                                scrape_interval=f"{SCRAPE_S}s", root=tmp_path_factory.mktemp("prometheus"))  # fmt: skip
        with prometheus:
            prometheus.wait_scraped()
            test = read_pairs(prepared[0], "test")
            yield urls, prometheus, list(zip(test["input"], [list(r) for r in test["references"]]))
    finally:
        for server in servers.values():
            server.stop()


class _Traffic:
    """Live traffic: replayed test inputs through a router whose weights follow the fake InferenceService's split,
    `PER_LOOK` requests at a time, then a wait until Prometheus has scraped what they did to the servers."""

    def __init__(self, urls: dict[str, str], version: str, prometheus: Prometheus, items, fake: FakeKServe | None):
        from canaryflow.rollout.local import Router

        self.version, self.prometheus, self.fake = version, prometheus, fake
        self.router = Router({"champion": urls["1"], "challenger": urls[version]}, 15.0,
                             versions={"champion": "1", "challenger": version})  # fmt: skip
        self.urls = {"1": urls["1"], version: urls[version]}
        self.items = itertools.cycle(items)
        self.pool = ThreadPoolExecutor(2)

    def send(self, count: int) -> None:
        from canaryflow.rollout.controller import send_one

        batch = [next(self.items) for _ in range(count)]
        list(self.pool.map(lambda item: send_one(self.router.url, item[0], item[1], 15.0), batch))

    def look(self, seconds: float) -> None:
        """The controller's sleep: a look's worth of live traffic, for at least `seconds` (a wait for a revision
        is no look)."""
        if seconds == POLL_S:
            return
        until = time.monotonic() + seconds
        if self.fake is not None:
            served = self.fake.served()
            self.router.set_weights({"champion": served.get(STORAGE["1"], 0),
                                     "challenger": served.get(STORAGE[self.version], 0)})  # fmt: skip
        self.send(PER_LOOK)
        self.scraped()
        time.sleep(max(0.0, until - time.monotonic()))

    def scraped(self) -> None:
        for version, url in self.urls.items():
            text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
            total = sum(float(v) for v in re.findall(r"^canaryflow_server_requests_total\{.*\} (\S+)$", text, re.M))
            self.prometheus.wait_for(
                f'sum(canaryflow_server_requests_total{{model_version="{version}"}})',
                lambda data, total=total: data["result"] and float(data["result"][0]["value"][1]) >= total,
            )

    def close(self) -> None:
        self.pool.shutdown()
        self.router.stop()


def _registry(tmp_path):
    from mlflow import MlflowClient

    from canaryflow.registry.tracking import configure, sqlite_uri

    cfg = load_config(overrides=[
        *QUICK_CANARY, f"mlflow.tracking_uri={sqlite_uri(tmp_path)}", f"registry.model_name={NAME}",
        f"canary.kserve.namespace={NS}", "canary.server_start_timeout_s=30", "canary.kserve.knative_metrics=off",
        f"canary.kserve.scrape_interval_s={SCRAPE_S}", f"canary.kserve.look_interval_s={LOOK_S}",
    ])  # fmt: skip
    experiment = configure(cfg)
    client = MlflowClient()
    run = client.create_run(experiment)
    client.create_registered_model(NAME)
    for version in sorted(STORAGE):
        client.create_model_version(NAME, STORAGE[version], run.info.run_id)
    return cfg


@pytest.fixture(scope="module")
def verdicts(predictors, tmp_path_factory, isvc_schema):  # noqa: F811
    """Each fault's canary twice on the same servers: through the KServe backend and PromQL, and through the local
    backend's replayed requests."""
    from canaryflow.rollout.controller import ReplayedTraffic, drive, run_kserve_canary, save_timeline

    urls, prometheus, items = predictors
    cfg = _registry(tmp_path_factory.mktemp("registry"))
    out = {}
    for version, fault in FAULTS.items():
        # Production traffic before the canary: the champion's p95 over it is what "slow" is measured against.
        warm = _Traffic(urls, version, prometheus, items, None)
        warm.router.set_weights({"champion": 100, "challenger": 0})
        warm.send(60)
        warm.scraped()
        warm.close()
        fake = FakeKServe(isvc_schema)
        fake.seed(CHAMPION_URI)
        live = _Traffic(urls, version, prometheus, items, fake)
        try:
            kserve = run_kserve_canary(cfg, version, "1", holder=f"test {fault}", sleep=live.look, api=fake,
                                       leases=fake, prometheus=prometheus_query(prometheus.url))  # fmt: skip
        finally:
            live.close()
        replay = _Traffic(urls, version, prometheus, items, None)
        replayed = ReplayedTraffic(replay, [i for i, _ in items], [r for _, r in items], cfg.canary)
        try:
            local = drive(cfg.canary, replayed, True)
        finally:
            replayed.close()
            replay.close()
        plots = tmp_path_factory.mktemp(f"timeline-{version}")
        out[fault] = {"kserve": kserve, "local": local, "fake": fake, "plot": save_timeline(kserve, plots)}
    return out


@pytest.mark.parametrize(("fault", "expected"), [("none", "promoted"), ("errors=0.1", "rolled_back"),
                                                  ("latency_ms=1000", "rolled_back")])  # fmt: skip
def test_the_kserve_backend_reaches_the_local_verdict_through_promql(verdicts, fault, expected):
    found = verdicts[fault]
    kserve, local = found["kserve"], found["local"]
    assert local["verdict"] == expected, local["reason"]
    assert kserve["verdict"] == expected, kserve["reason"]
    served = {storage for storage, share in found["fake"].served().items() if share}
    assert served == ({STORAGE[v] for v, f in FAULTS.items() if f == fault} if expected == "promoted" else
                      {CHAMPION_URI})  # fmt: skip
    if expected == "rolled_back":
        # Rolled back for the reason the fault gives, read from the servers' own metrics.
        assert ("error rate" if fault.startswith("errors") else "slow share") in kserve["reason"], kserve["reason"]
    # Counted from Prometheus, every look: the challenger's requests were seen, not assumed. A rollback on events
    # may come before a step's minimum (a fault's events are evidence on their own), never before any request.
    challenger = sum(step["challenger"]["requests"] for step in kserve["steps"])
    assert challenger >= (cfg_min_requests() if expected == "promoted" else 1), kserve["steps"]
    assert kserve["slow_threshold_ms"]["from"] == "baseline"
    assert found["plot"].stat().st_size > 10_000


def cfg_min_requests() -> int:
    return load_config(overrides=QUICK_CANARY).canary.min_requests_per_step


# --- Knative's queue-proxy, by generation ---


class _Exporter(ThreadingHTTPServer):
    """One queue-proxy's /metrics, recorded from a Knative generation (tests/fixtures/knative), with the counts
    the test sets."""

    daemon_threads = True

    def __init__(self, template: str):
        self.template = template
        self.values: dict[str, object] = {}

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(inner) -> None:  # noqa: N805 - the server's state is on `self`
                body = self.template.format(**self.values).encode()
                inner.send_response(200)
                inner.send_header("Content-Type", "text/plain; version=0.0.4")
                inner.send_header("Content-Length", str(len(body)))
                inner.end_headers()
                inner.wfile.write(body)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()

    def set(self, bounds: tuple[float, ...], ok: list[float], errors: list[float], revision: str) -> None:
        """Histogram samples for `ok` (200) and `errors` (500) latencies, in the generation's unit."""
        values: dict[str, object] = {
            "namespace": NS, "revision": revision, "service": NAME, "configuration": f"{NAME}-predictor",
            "pod": f"{revision}-deployment-0",
        }  # fmt: skip
        for prefix, latencies in (("b", ok), ("e", errors)):
            for i, bound in enumerate([*bounds, float("inf")]):
                values[f"{prefix}{i}"] = sum(x <= bound for x in latencies)
        values.update(ok=len(ok), errors=len(errors), ok_sum=sum(ok), errors_sum=sum(errors))
        self.values = values


GENERATIONS = {"legacy.prom": "legacy", "otel-queueproxy.prom": "otel", "otel-invocation.prom": "otel"}


@pytest.fixture(scope="module")
def queue_proxies(tmp_path_factory):
    binary("prometheus")
    exporters = {name: _Exporter((FIXTURES / name).read_text()) for name in GENERATIONS}
    for name, exporter in exporters.items():
        exporter.set(KNATIVE_QUERIES[GENERATIONS[name]]["bounds"], [], [], f"rev-{name.split('.')[0]}")
    _, endpoint = _endpoints()
    pods = [_pod(f"127.0.0.1:{e.server_address[1]}", f"pod-{n}", f"rev-{n.split('.')[0]}") for n, e in
            exporters.items()]  # fmt: skip
    with Prometheus(
        {"queue-proxy": {"targets": pods, "relabel_configs": _relabel_configs(endpoint)}},
        scrape_interval=f"{SCRAPE_S}s",
        root=tmp_path_factory.mktemp("prometheus-knative"),
    ) as prometheus:
        prometheus.wait_scraped(scrapes=3)  # zeros first, as a fresh revision's queue-proxy starts
        yield exporters, prometheus
    for exporter in exporters.values():
        exporter.shutdown()


@pytest.mark.parametrize("fixture", list(GENERATIONS))
def test_each_knative_generation_is_read_by_its_queries(queue_proxies, fixture):
    exporters, prometheus = queue_proxies
    generation = GENERATIONS[fixture]
    spec = KNATIVE_QUERIES[generation]
    unit_s = spec["unit_ms"] / 1000
    revision = f"rev-{fixture.split('.')[0]}"
    # 90 answered (72 fast, 18 at 0.9 s) and 10 failed (at 0.02 s); "slow" is over 0.3 s, rounded up to a
    # bucket bound of the generation's histogram (0.3 s in ms, 0.5 s in seconds).
    ok = [0.02 / unit_s] * 72 + [0.9 / unit_s] * 18
    exporters[fixture].set(spec["bounds"], ok, [0.02 / unit_s] * 10, revision)
    prometheus.wait_for(f'count(up{{revision_name="{revision}"}})', lambda d: d["result"])
    time.sleep(3 * SCRAPE_S)  # a few scrapes of the new counts
    cfg = load_config(overrides=[f"canary.kserve.namespace={NS}", f"canary.kserve.knative_metrics={generation}",
                                 f"canary.kserve.scrape_interval_s={SCRAPE_S}"])  # fmt: skip
    backend = KServeBackend(cfg, api=object(), prometheus=prometheus_query(prometheus.url))
    counts = backend.queue_proxy("challenger", revision, seconds=20, threshold_ms=300)
    # increase() extrapolates to the window's ends: counts come back a little over what happened.
    assert 100 <= counts.requests <= 125, counts
    assert 10 <= counts.errors <= 13 and 18 <= counts.slow <= 23, counts
    assert 500 < counts.p95_ms <= 1000, counts
    # On auto, the generation whose series exist is found; the other one's queries find none.
    auto = KServeBackend(load_config(overrides=[f"canary.kserve.namespace={NS}"]), api=object(),
                         prometheus=prometheus_query(prometheus.url))  # fmt: skip
    # (A moment later: extrapolated to another instant, the count may differ by a few.)
    assert 100 <= auto.queue_proxy("challenger", revision, seconds=20, threshold_ms=300).requests <= 125
    other = "legacy" if generation == "otel" else "otel"
    wrong_cfg = load_config(overrides=[f"canary.kserve.namespace={NS}", f"canary.kserve.knative_metrics={other}"])
    wrong = KServeBackend(wrong_cfg, api=object(), prometheus=prometheus_query(prometheus.url))
    with pytest.raises(NoSeries, match=f"Knative {other} requests"):
        wrong.queue_proxy("challenger", revision, seconds=20, threshold_ms=300)
