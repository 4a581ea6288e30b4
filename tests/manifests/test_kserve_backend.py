"""The KServe backend without a cluster: a fake CustomObjectsApi at the edge plays KServe and Knative (a
revision per change of predictor, traffic split by canaryTrafficPercent over the last revision rolled out at
100%, the status fields the backend reads), validates every object it is sent or left with against KServe's
CRD, and records the calls for the RBAC check; a real HTTP server on loopback plays Prometheus."""

from __future__ import annotations

import copy
import json
import re
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes.client.exceptions import ApiException

from canaryflow.config import load_config
from canaryflow.errors import BadInputError, CanaryflowError
from canaryflow.rollout.kserve import (
    GROUP,
    PLURAL,
    STORAGE_ENV,
    VERSION,
    VERSION_ENV,
    KServeBackend,
    VariantCounts,
    inference_service,
    latency_bucket,
    prometheus_query,
    storage_uri,
)
from tests.manifests.test_manifests import MANIFESTS, _base_isvc, _docs, _merge, isvc_schema  # noqa: F401
from tests.servers import free_port

NS, NAME = "canary-ns", "canaryflow-demo"
CHAMPION_URI, CHALLENGER_URI = "s3://models/1/aaa/artifacts/model", "s3://models/1/bbb/artifacts/model"
OTHER_URI = "s3://models/1/zzz/artifacts/model"
R1, R2, R3 = (f"{NAME}-predictor-0000{i}" for i in (1, 2, 3))
STORAGE_PATH = ("spec", "predictor", "containers", 0, "env", 0, "value")
VERSION_PATH = ("spec", "predictor", "containers", 0, "env", 1, "value")
VERSIONS = {CHAMPION_URI: "1", CHALLENGER_URI: "2", OTHER_URI: "9"}
PERCENT_PATH = ("spec", "predictor", "canaryTrafficPercent")

CALLED: set[tuple[str, str, str]] = set()  # (apiGroup, resource, verb) the backend used, over this module


def _api_error(status: int, message: str) -> ApiException:
    exc = ApiException(status=status, reason={403: "Forbidden", 404: "Not Found", 409: "Conflict"}.get(status))
    exc.body = json.dumps({"kind": "Status", "status": "Failure", "message": message, "code": status})
    return exc


_MISSING = object()


def _changed(a, b, path=()) -> set[tuple]:
    """The paths at which two JSON values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = a.keys() | b.keys()
        return set().union(*(_changed(a.get(k, _MISSING), b.get(k, _MISSING), (*path, k)) for k in keys))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return set().union(*(_changed(x, y, (*path, i)) for i, (x, y) in enumerate(zip(a, b))))
    return set() if a == b else {path}


@dataclass
class Revision:
    name: str
    storage: str
    polls_left: int
    fails: bool

    @property
    def ready(self) -> bool:
        return self.polls_left <= 0 and not self.fails


class FakeKServe:
    """kubernetes.client.CustomObjectsApi for one namespace, with KServe's controller behind it: see the
    module docstring. A revision is ready after `ready_after` reads; revisions of `failing` storages fail."""

    def __init__(self, validator, ready_after: int = 1, failing=(), refuse: dict[str, int] | None = None):
        self.validator, self.ready_after, self.failing = validator, ready_after, set(failing)
        self.refuse = refuse or {}  # verb -> HTTP status to answer it with
        self.objects: dict[str, dict] = {}
        self.revisions: dict[str, list[Revision]] = {}
        self.patches: list[tuple[dict, set]] = []  # each merge patch, and the paths of the spec it changed
        self.created: list[dict] = []

    def seed(self, storage: str) -> None:
        """An InferenceService already serving `storage`, put there without the backend's calls."""
        self.objects[NAME] = inference_service(NAME, storage, NS)
        self.revisions[NAME] = []
        self._new_revision(NAME)
        self.revisions[NAME][0].polls_left = 0
        self._reconcile(NAME)

    def served(self, name: str = NAME) -> dict[str, int]:
        """Share of the traffic per storage URI, as routed now."""
        storage = {r.name: r.storage for r in self.revisions[name]}
        shares: Counter = Counter()
        for target in self.objects[name]["status"]["components"]["predictor"].get("traffic", []):
            shares[storage[target["revisionName"]]] += target["percent"]
        return dict(shares)

    def revision(self, name: str) -> Revision:
        return next(r for rs in self.revisions.values() for r in rs if r.name == name)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self._enter("get", group, version, namespace, plural)
        self._require(name)
        self._reconcile(name, tick=True)
        return copy.deepcopy(self.objects[name])

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self._enter("create", group, version, namespace, plural)
        self.created.append(copy.deepcopy(body))
        self.validator.validate(body)
        assert body["metadata"].get("namespace", namespace) == namespace
        name = body["metadata"]["name"]
        if name in self.objects:
            raise _api_error(409, f'{PLURAL}.{GROUP} "{name}" already exists')
        self.objects[name], self.revisions[name] = copy.deepcopy(body), []
        self._new_revision(name)
        self._reconcile(name)
        return copy.deepcopy(self.objects[name])

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self._enter("patch", group, version, namespace, plural)
        self._require(name)
        before = self.objects[name]
        after = _merge(before, body)
        self.validator.validate(after)
        self.patches.append((copy.deepcopy(body), _changed(before["spec"], after["spec"], ("spec",))))
        self.objects[name] = after
        if _template(after) != _template(before):
            self._new_revision(name)
        self._reconcile(name)
        return copy.deepcopy(after)

    def _enter(self, verb, group, version, namespace, plural) -> None:
        CALLED.add((group, plural, verb))
        assert (version, namespace) == (VERSION, NS)
        if verb in self.refuse:
            raise _api_error(self.refuse[verb], f'{plural}.{group} is forbidden: cannot {verb} in "{namespace}"')

    def _require(self, name: str) -> None:
        if name not in self.objects:
            raise _api_error(404, f'{PLURAL}.{GROUP} "{name}" not found')

    def _new_revision(self, name: str) -> None:
        revisions = self.revisions[name]
        env = self.objects[name]["spec"]["predictor"]["containers"][0]["env"]
        storage = next(e["value"] for e in env if e["name"] == STORAGE_ENV)
        number = f"{name}-predictor-{len(revisions) + 1:05d}"
        revisions.append(Revision(number, storage, self.ready_after, storage in self.failing))

    def _reconcile(self, name: str, tick: bool = False) -> None:
        """One pass of KServe's reconciler: route as ksvc_reconciler.go does, then PropagateStatus."""
        obj, revisions = self.objects[name], self.revisions[name]
        for revision in revisions if tick else ():
            revision.polls_left -= 1
        latest = revisions[-1]
        ready = [r.name for r in revisions if r.ready]
        latest_ready = ready[-1] if ready else None
        predictor = obj.setdefault("status", {}).setdefault("components", {}).setdefault("predictor", {})
        rolled, previous = predictor.get("latestRolledoutRevision"), predictor.get("previousRolledoutRevision")
        percent = obj["spec"]["predictor"].get("canaryTrafficPercent")
        traffic = []
        if latest_ready and percent is not None and rolled:
            traffic.append({"revisionName": latest_ready, "latestRevision": True, "percent": percent})
            if percent < 100:
                traffic.append(
                    {"revisionName": rolled, "latestRevision": False, "percent": 100 - percent, "tag": "prev"}
                )
        elif latest_ready:
            traffic.append({"revisionName": latest_ready, "latestRevision": True, "percent": 100})
        shares = Counter()
        for target in traffic:
            shares[target["revisionName"]] += target["percent"]
        for target in traffic:
            if target["revisionName"] != latest_ready or not target["latestRevision"]:
                continue
            if rolled != latest_ready:
                if target["percent"] == 100:
                    previous, rolled = rolled, latest_ready
            elif latest_ready == latest.name and target["percent"] < 100 and shares[latest_ready] == 100 and previous:
                rolled = previous  # KServe's fall back after a rolled-out revision is set to less than 100%
        fields = {
            "latestCreatedRevision": latest.name,
            "latestReadyRevision": latest_ready,
            "latestRolledoutRevision": rolled,
            "previousRolledoutRevision": previous,
            "traffic": traffic,
        }
        predictor.clear()
        predictor.update({k: v for k, v in fields.items() if v})
        configured = {"type": "PredictorConfigurationReady", "status": "True" if latest.ready else "Unknown"}
        if latest.fails:
            configured = {**configured, "status": "False", "reason": "RevisionFailed", "message": "storage-initializer"}
        ready_status = "True" if latest.ready and traffic else "False" if latest.fails else "Unknown"
        obj["status"]["conditions"] = [configured, {"type": "Ready", "status": ready_status}]
        self.validator.validate(obj)


def _template(obj: dict) -> dict:
    return {k: v for k, v in obj["spec"]["predictor"].items() if k != "canaryTrafficPercent"}


def _no_prometheus(query: str) -> float:
    raise AssertionError(f"unexpected query {query}")


@pytest.fixture
def kserve(isvc_schema):  # noqa: F811
    """make(overrides, **fake options) -> (backend, fake, sleeps)"""

    def make(overrides=(), prometheus=_no_prometheus, seed: str | None = CHAMPION_URI, **options):
        fake = FakeKServe(isvc_schema, **options)
        if seed:
            fake.seed(seed)
        cfg = load_config(overrides=[f"canary.kserve.namespace={NS}", "canary.server_start_timeout_s=10", *overrides])
        slept: list[float] = []
        backend = KServeBackend(cfg, api=fake, prometheus=prometheus, sleep=slept.append)
        backend.versions = dict(VERSIONS)
        return backend, fake, slept

    return make


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        # A short poll interval: shutdown() waits for it, at the end of every test.
        threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True).start()


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def answer(self, status: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _kind(query: str) -> str:
    if "histogram_quantile" in query:
        return "p95_ms"
    return "slow" if "le=~" in query else "errors" if "5xx" in query else "requests"


@pytest.fixture
def prometheus():
    """Prometheus on loopback: `values[(query kind, revision)]` answers (None: an empty vector), `queries` records."""

    class Handler(_Handler):
        def do_GET(self) -> None:
            url = urlparse(self.path)
            query = parse_qs(url.query)["query"][0]
            server.queries.append(query)
            if server.refuse:
                self.answer(400, {"status": "error", "errorType": "bad_data", "error": "parse error: unexpected }"})
                return
            value = server.values.get((_kind(query), re.search(r'revision_name="([^"]+)"', query).group(1)))
            series = [] if value is None else [{"metric": {}, "value": [1.7e9, value]}] * server.series
            self.answer(200, {"status": "success", "data": {"resultType": "vector", "result": series}})

    server = _Server(Handler)
    server.queries, server.values, server.refuse, server.series = [], {}, False, 1
    yield server
    server.shutdown()


# --- storage URIs and the manifest's shape ---


@pytest.mark.parametrize(
    ("source", "destination", "expected"),
    [
        ("s3://models/1/aaa/artifacts/model", None, "s3://models/1/aaa/artifacts/model"),
        ("gs://bucket/m", "s3://ignored", "gs://bucket/m"),
        (
            "mlflow-artifacts:/1/aaa/artifacts/model",
            "s3://mlflow/artifacts/",
            "s3://mlflow/artifacts/1/aaa/artifacts/model",
        ),
        ("mlflow-artifacts://mlflow:5000/2/models/m-1/artifacts", "gs://b", "gs://b/2/models/m-1/artifacts"),
    ],
)
def test_storage_uri_is_what_the_storage_initializer_can_download(source, destination, expected):
    assert storage_uri(source, destination) == expected


@pytest.mark.parametrize(
    ("source", "destination", "says"),
    [
        ("mlflow-artifacts:/1/aaa/artifacts/model", None, "artifacts_destination"),
        ("mlflow-artifacts:/1/aaa/artifacts/model", "/srv/mlartifacts", "a path on the MLflow host"),
        ("/home/me/.canaryflow/mlartifacts/1/aaa/artifacts/model", None, "a path on the MLflow host"),
        ("file:///tmp/model", None, "a path on the MLflow host"),
        ("models:/canaryflow-demo/3", None, "MLflow reference"),
        ("runs:/abc/model", None, "MLflow reference"),
    ],
)
def test_storage_uri_refuses_what_no_pod_can_reach(source, destination, says):
    with pytest.raises(BadInputError, match=says) as caught:
        storage_uri(source, destination)
    assert "\n" not in str(caught.value)


def test_base_manifest_is_the_object_the_backend_creates():
    base = _base_isvc()
    container = base["spec"]["predictor"]["containers"][0]
    storage = next(e["value"] for e in container["env"] if e["name"] == STORAGE_ENV)
    labels = _docs(MANIFESTS / "base" / "kustomization.yaml")[0]["labels"][0]["pairs"]
    assert inference_service(base["metadata"]["name"], storage) == _merge(base, {"metadata": {"labels": labels}})
    assert container["args"][:2] == ["--model-uri", "/mnt/models"]
    assert storage_uri(storage) == storage


@pytest.mark.parametrize(("threshold", "bound"), [(0, 5), (5, 5), (5.1, 10), (251, 300), (1000, 1000), (1e6, 100000)])
def test_latency_threshold_rounds_up_to_a_knative_bucket_bound(threshold, bound):
    assert latency_bucket(threshold) == bound


# --- the rollout against the fake cluster ---


def test_deploy_creates_the_missing_service_for_the_champion_then_starts_the_challenger_at_0(kserve):
    backend, fake, _ = kserve(seed=None)
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    assert fake.created == [inference_service(NAME, CHAMPION_URI, NS, version="1")]
    assert fake.served() == {CHAMPION_URI: 100, CHALLENGER_URI: 0}
    assert fake.revision(R2).ready and fake.revision(R2).storage == CHALLENGER_URI


def test_challenger_patch_touches_only_the_storage_its_version_and_the_percentage(kserve):
    backend, fake, _ = kserve()
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    (body, changed), *rest = fake.patches
    assert rest == []
    assert changed == {STORAGE_PATH, VERSION_PATH, PERCENT_PATH}
    assert body["spec"]["predictor"]["containers"][0]["env"][1] == {"name": VERSION_ENV, "value": "2"}
    assert body["spec"]["predictor"]["canaryTrafficPercent"] == 0
    assert set(body) == {"spec"} and set(body["spec"]["predictor"]) == {"canaryTrafficPercent", "containers"}


def test_weights_move_the_traffic_and_promote_hands_it_all_to_the_challenger(kserve):
    backend, fake, _ = kserve()
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    for weight in (10, 50):
        backend.set_weight(weight)
        assert fake.served() == {CHAMPION_URI: 100 - weight, CHALLENGER_URI: weight}
    backend.promote()
    assert fake.served() == {CHALLENGER_URI: 100}
    assert "canaryTrafficPercent" not in fake.objects[NAME]["spec"]["predictor"]
    assert [changed for _, changed in fake.patches[1:]] == [{PERCENT_PATH}] * 3


@pytest.mark.parametrize("last", ["at 25%", "at 100%", "after promote"])
def test_rollback_gives_the_champion_all_the_traffic_and_its_storage(kserve, last):
    backend, fake, _ = kserve()
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    backend.set_weight(100 if last == "at 100%" else 25)
    if last == "after promote":
        backend.promote()
    backend.rollback()
    for _ in range(3):  # it stays so while KServe goes on reconciling, and once the new revision is ready
        fake.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, NAME)
        assert fake.served()[CHAMPION_URI] == 100 and fake.served().get(CHALLENGER_URI, 0) == 0
    predictor = fake.objects[NAME]["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 0
    assert predictor["containers"][0]["env"] == [
        {"name": STORAGE_ENV, "value": CHAMPION_URI},
        {"name": VERSION_ENV, "value": "1"},  # the champion's revision labels its metrics with its own version
    ]
    assert fake.patches[-1][1] == {STORAGE_PATH, VERSION_PATH}


def test_deploy_first_rolls_the_champion_out_when_something_else_serves(kserve):
    backend, fake, _ = kserve(seed=OTHER_URI)
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    assert fake.served() == {CHAMPION_URI: 100, CHALLENGER_URI: 0}
    assert fake.patches[0][0]["spec"]["predictor"]["canaryTrafficPercent"] is None
    assert [r.storage for r in fake.revisions[NAME]] == [OTHER_URI, CHAMPION_URI, CHALLENGER_URI]


def test_deploy_waits_for_the_challenger_to_be_ready(kserve):
    backend, fake, slept = kserve(ready_after=3)
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    assert fake.revision(R2).ready
    assert len(slept) == 2


def test_deploy_times_out_with_one_line(kserve):
    backend, _, slept = kserve(ready_after=1000)
    with pytest.raises(CanaryflowError, match=r"challenger's revision to be ready took over 10 s") as caught:
        backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    assert sum(slept) == 10 and "\n" not in str(caught.value)


def test_a_failed_challenger_fails_deploy_at_once_and_rollback_restores_the_spec(kserve):
    backend, fake, slept = kserve(failing={CHALLENGER_URI})
    with pytest.raises(CanaryflowError, match=f"revision {R2} failed: storage-initializer"):
        backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    assert slept == [] and fake.served() == {CHAMPION_URI: 100}
    backend.rollback()
    assert fake.revisions[NAME][-1].storage == CHAMPION_URI
    assert fake.objects[NAME]["spec"]["predictor"]["canaryTrafficPercent"] == 0


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"refuse": {"patch": 403}}, r"cannot patch InferenceService canary-ns/canaryflow-demo: 403 .*rbac\.yaml"),
        ({"refuse": {"create": 404}, "seed": None}, r"cannot create .*: 404 .*is KServe installed"),
    ],
)
def test_api_refusals_are_one_line(kserve, options, match):
    backend, _, _ = kserve(**options)
    with pytest.raises(CanaryflowError, match=match) as caught:
        backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    assert "\n" not in str(caught.value)


def test_an_unreachable_api_server_is_one_line():
    from kubernetes import client

    api = client.CustomObjectsApi(client.ApiClient(client.Configuration(host=f"http://127.0.0.1:{free_port()}")))
    backend = KServeBackend(load_config(), api=api, prometheus=_no_prometheus)
    with pytest.raises(CanaryflowError, match=r"the Kubernetes API did not answer \(get InferenceService") as caught:
        backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    assert "\n" not in str(caught.value)


def test_bad_requests_are_bad_input(kserve):
    backend, _, _ = kserve()
    with pytest.raises(BadInputError, match="nothing to canary"):
        backend.deploy(CHAMPION_URI, CHAMPION_URI)
    with pytest.raises(CanaryflowError, match=r"deploy\(\) first"):
        backend.set_weight(10)
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    for weight in (101, -1, True, 12.5):
        with pytest.raises(BadInputError, match="whole percentage"):
            backend.set_weight(weight)
    with pytest.raises(BadInputError, match="set canary.kserve.service"):
        kserve(["registry.model_name=My_Model"])
    assert kserve(["registry.model_name=My_Model", "canary.kserve.service=my-model"])[0].name == "my-model"


# --- SLIs from Prometheus ---


def test_read_renders_the_configured_promql_per_revision_and_counts(kserve, prometheus):
    backend, _, _ = kserve(prometheus=prometheus_query(prometheus.url))
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    prometheus.values = {
        ("requests", R1): "80.4", ("errors", R1): "1", ("slow", R1): "-0.3", ("p95_ms", R1): "212.5",
        ("requests", R2): "19.6", ("errors", R2): "21.4", ("p95_ms", R2): "NaN",
    }  # fmt: skip
    counts = backend.read(window_s=29.2, threshold_ms=251)
    assert counts == {"champion": VariantCounts(80, 1, 0, 212.5), "challenger": VariantCounts(20, 20, 0, None)}
    assert len(prometheus.queries) == 8
    assert sum(f'revision_name="{R2}"' in q for q in prometheus.queries) == 4
    assert (
        f'sum(increase(revision_app_request_latencies_count{{namespace="{NS}",revision_name="{R1}"}}[30s]))'
        f' - sum(increase(revision_app_request_latencies_bucket{{namespace="{NS}",revision_name="{R1}",'
        'le=~"300([.]0)?"}[30s]))'
    ) in prometheus.queries


@pytest.mark.parametrize(
    ("trouble", "error", "match"),
    [
        ("down", CanaryflowError, r"canary\.kserve\.queries\.requests \(champion.*did not answer"),
        ("refuse", BadInputError, r"canary\.kserve\.queries\.requests \(champion.*400 parse error"),
        ("series", BadInputError, r"returned 2 series; a canary query must return one number"),
    ],
)
def test_prometheus_trouble_is_one_line(kserve, prometheus, trouble, error, match):
    url = f"http://127.0.0.1:{free_port()}" if trouble == "down" else prometheus.url
    prometheus.refuse, prometheus.series = trouble == "refuse", 2 if trouble == "series" else 1
    prometheus.values = {("requests", R1): "3"}
    backend, _, _ = kserve(prometheus=prometheus_query(url))
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    with pytest.raises(error, match=match) as caught:
        backend.read(30, 250)
    assert "\n" not in str(caught.value)


# --- the real client, and the RBAC the backend needs ---


def test_the_real_client_from_a_kubeconfig_sends_merge_patches(kserve, tmp_path, monkeypatch):
    from kubernetes import client
    from kubernetes.config import kube_config

    _, fake, _ = kserve()
    content_types = []

    class Handler(_Handler):
        def do_GET(self) -> None:
            self.relay(lambda g, v, ns, p, name, body: fake.get_namespaced_custom_object(g, v, ns, p, name))

        def do_POST(self) -> None:
            self.relay(lambda g, v, ns, p, name, body: fake.create_namespaced_custom_object(g, v, ns, p, body))

        def do_PATCH(self) -> None:
            content_types.append(self.headers["Content-Type"])
            self.relay(fake.patch_namespaced_custom_object)

        def relay(self, call) -> None:
            path = re.fullmatch(r"/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/([^/?]+)(?:/([^/?]+))?", self.path)
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                self.answer(200, call(*path.groups(), json.loads(body or "null")))
            except ApiException as exc:
                self.answer(exc.status, json.loads(exc.body))

    server = _Server(Handler)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server.url}}],
                "users": [{"name": "fake", "user": {"token": "t"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "current-context": "fake",
            }
        )
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
    monkeypatch.setattr(client.Configuration, "_default", None)  # load_kube_config sets a process-wide default
    cfg = load_config(overrides=[f"canary.kserve.namespace={NS}", "canary.server_start_timeout_s=10"])
    try:
        backend = KServeBackend(cfg, prometheus=_no_prometheus, sleep=lambda s: None)
        backend.deploy(CHAMPION_URI, CHALLENGER_URI)
        backend.set_weight(10)
        backend.promote()
    finally:
        server.shutdown()
    assert content_types == ["application/merge-patch+json"] * 3
    assert fake.served() == {CHALLENGER_URI: 100}
    assert "canaryTrafficPercent" not in fake.objects[NAME]["spec"]["predictor"]


def test_no_cluster_and_no_kubeconfig_is_one_line(tmp_path, monkeypatch):
    from kubernetes import client
    from kubernetes.config import kube_config

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "missing"))
    monkeypatch.setattr(client.Configuration, "_default", None)
    with pytest.raises(CanaryflowError, match="no Kubernetes credentials") as caught:
        KServeBackend(load_config(), prometheus=_no_prometheus)
    assert "\n" not in str(caught.value)


def test_role_grants_exactly_what_the_backend_calls(kserve):
    # A whole canary of its own, so that the comparison holds when this test runs alone.
    backend, _, _ = kserve(seed=None)
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    backend.set_weight(50)
    backend.promote()
    backend.rollback()
    docs = {d["kind"]: d for d in _docs(MANIFESTS / "base" / "rbac.yaml")}
    rules = docs["Role"]["rules"]
    granted = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert granted == CALLED
    assert all(set(rule) == {"apiGroups", "resources", "verbs"} for rule in rules)
    binding = docs["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "canaryflow-canary"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": docs["ServiceAccount"]["metadata"]["name"]}]
    assert docs["Role"]["metadata"]["name"] == "canaryflow-canary"
    assert "rbac.yaml" in _docs(MANIFESTS / "base" / "kustomization.yaml")[0]["resources"]


# --- the controller driving a whole canary on the InferenceService ---


@pytest.mark.parametrize(
    ("challenger_errors", "verdict", "serving"), [(1, "promoted", CHALLENGER_URI), (25, "rolled_back", CHAMPION_URI)]
)
def test_the_controller_runs_a_kserve_canary_on_prometheus_counts(
    kserve, prometheus, tmp_path, challenger_errors, verdict, serving
):
    from mlflow import MlflowClient

    from canaryflow.registry.tracking import configure, sqlite_uri
    from canaryflow.rollout.controller import run_kserve_canary

    overrides = [f"mlflow.tracking_uri={sqlite_uri(tmp_path)}", f"registry.model_name={NAME}"]
    backend, fake, _ = kserve(overrides)
    cfg = load_config(overrides=[*overrides, f"canary.kserve.namespace={NS}", "canary.server_start_timeout_s=10"])
    experiment = configure(cfg)  # before the client, which binds the store it finds then
    client = MlflowClient()
    run = client.create_run(experiment)
    client.create_registered_model(NAME)
    for source in (CHAMPION_URI, CHALLENGER_URI):
        client.create_model_version(NAME, source, run.info.run_id)
    # Every look sees the same minute of traffic: 900 requests to the champion, 100 to the challenger.
    prometheus.values = {
        ("requests", R1): "900", ("errors", R1): "9", ("slow", R1): "45", ("p95_ms", R1): "180",
        ("requests", R2): "100", ("errors", R2): str(challenger_errors), ("slow", R2): "5", ("p95_ms", R2): "185",
    }  # fmt: skip
    slept: list[float] = []
    result = run_kserve_canary(cfg, "2", "1", sleep=slept.append, api=fake, prometheus=prometheus_query(prometheus.url))
    assert result["verdict"] == verdict, result["reason"]
    assert {storage: share for storage, share in fake.served().items() if share} == {serving: 100}
    assert fake.objects[NAME]["spec"]["predictor"]["containers"][0]["env"][0]["value"] == serving
    assert set(slept) >= {cfg.canary.kserve.look_interval_s}  # one look per interval of live traffic
    weights = [p.get("spec", {}).get("predictor", {}).get("canaryTrafficPercent") for p, _ in fake.patches]
    assert weights[:2] == [0, 10]  # the challenger starts at 0 %, then the first step
    # Every look's PromQL names the revision it reads, and judges "slow" against the champion's p95 bucket.
    assert any('le=~"200([.]0)?"' in q for q in prometheus.queries)
