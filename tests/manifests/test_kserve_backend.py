"""The KServe backend without a cluster: a fake Kubernetes API at the edge plays KServe and Knative (a revision
per change of predictor, traffic split by canaryTrafficPercent over the last revision rolled out at 100%, the status
fields the backend reads, resourceVersion and generation as the API server keeps them) and the coordination API's
Leases. It validates every object it is sent or left with against KServe's CRD, and records the calls for the RBAC
check. A real HTTP server on loopback plays Prometheus' query API; tests/manifests/test_prometheus_canary.py runs
the same read path against a real Prometheus.

What the fake does, and where upstream does it:
- traffic: kserve/kserve pkg/controller/v1beta1/inferenceservice/reconcilers/knative/ksvc_reconciler.go (v0.15):
  canaryTrafficPercent goes to the latest ready revision (latestRevision: true), the rest to
  latestRolledoutRevision (tag prev); with no percentage the latest ready revision takes 100%. A revision that
  took 100% becomes latestRolledoutRevision; a rolled-out latest revision set below 100% falls back to
  previousRolledoutRevision.
- resourceVersion: every write, status included, changes it; a write that names a stale one gets 409 Conflict
  ("the object has been modified; please apply your changes to the latest version and try again",
  k8s.io/apiserver pkg/registry/generic/registry/store.go, kubernetes v1.32). metadata.generation changes only
  with the spec, since the CRD has a status subresource (apiextensions-apiserver pkg/registry/customresource
  strategy.go PrepareForUpdate).
- deployment mode: the serving.kserve.io/deploymentMode annotation, else the cluster's default, reported in
  status.deploymentMode (kserve pkg/controller/v1beta1/inferenceservice/controller.go, v0.15).
- Leases: create answers 409 AlreadyExists for an existing name; update and delete honour resourceVersion as
  above; get of a missing one is 404.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import threading
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from canaryflow.config import load_config
from canaryflow.errors import BadInputError, CanaryflowError
from canaryflow.rollout.kserve import (
    GROUP,
    LEASE_GROUP,
    MODE_ANNOTATION,
    PLURAL,
    POLL_S,
    SERVING_ENV,
    VERSION,
    VERSION_ENV,
    CanaryLease,
    Interrupted,
    KServeBackend,
    LeaseLost,
    VariantCounts,
    bucket_bound,
    inference_service,
    predictor_env,
    prometheus_query,
    rollback_on_signals,
    storage_uri,
)
from canaryflow.serving.http import LATENCY_BUCKETS
from tests.manifests.test_manifests import MANIFESTS, _base_isvc, _docs, _merge, isvc_schema  # noqa: F401
from tests.manifests.test_rbac import TRAINJOB_CALLS, compiled_pipeline, kfp_backend_calls, role_grants
from tests.servers import free_port

NS, NAME = "canary-ns", "canaryflow-demo"
CHAMPION_URI, CHALLENGER_URI = "s3://models/1/aaa/artifacts/model", "s3://models/1/bbb/artifacts/model"
OTHER_URI = "s3://models/1/zzz/artifacts/model"
R1, R2, R3 = (f"{NAME}-predictor-0000{i}" for i in (1, 2, 3))
STORAGE_PATH = ("spec", "predictor", "model", "storageUri")
VERSION_PATH = ("spec", "predictor", "model", "env", 0, "value")
VERSIONS = {CHAMPION_URI: "1", CHALLENGER_URI: "2", OTHER_URI: "9"}
PERCENT_PATH = ("spec", "predictor", "canaryTrafficPercent")

CALLED: set[tuple[str, str, str]] = set()  # (apiGroup, resource, verb) the backend used, over this module
_SERIALIZER = k8s.ApiClient()


def _api_error(status: int, message: str, reason: str | None = None) -> ApiException:
    exc = ApiException(status=status, reason={403: "Forbidden", 404: "Not Found", 409: "Conflict"}.get(status))
    exc.body = json.dumps({"kind": "Status", "status": "Failure", "message": message, "reason": reason, "code": status})
    return exc


def _conflict(kind: str, name: str) -> ApiException:
    return _api_error(
        409,
        f'Operation cannot be fulfilled on {kind} "{name}": the object has been modified; please apply your changes '
        "to the latest version and try again",
        "Conflict",
    )


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
    """kubernetes.client.CustomObjectsApi and CoordinationV1Api for one namespace, with KServe's controller behind
    it: see the module docstring. A revision is ready after `ready_after` reads; revisions of `failing` storages
    fail. `history` holds the traffic after every reconcile, to check what ever served."""

    def __init__(
        self, validator, ready_after: int = 1, failing=(), refuse: dict[str, int] | None = None, mode="Serverless"
    ):
        self.validator, self.ready_after, self.failing = validator, ready_after, set(failing)
        self.refuse = refuse or {}  # verb -> HTTP status to answer it with
        self.default_mode = mode
        self.objects: dict[str, dict] = {}
        self.revisions: dict[str, list[Revision]] = {}
        self.patches: list[tuple[dict, set]] = []  # each merge patch, and the paths of the spec it changed
        self.created: list[dict] = []
        self.history: list[dict[str, int]] = []
        self.leases: dict[str, dict] = {}
        self.on_patch = None  # called before a patch is applied: another writer getting in first, in tests
        self._version = 0

    def _bump(self, obj: dict) -> None:
        self._version += 1
        obj["metadata"]["resourceVersion"] = str(self._version)

    def seed(self, storage: str, annotations: dict | None = None) -> None:
        """An InferenceService already serving `storage`, put there without the backend's calls (as a run with
        the default config left it)."""
        obj = inference_service(NAME, storage, NS, VERSIONS.get(storage), env=predictor_env(_config()))
        obj["metadata"]["annotations"] = annotations if annotations is not None else obj["metadata"]["annotations"]
        obj["metadata"]["generation"] = 1
        self.objects[NAME] = obj
        self.revisions[NAME] = []
        self._new_revision(NAME)
        self.revisions[NAME][0].polls_left = 0
        self._reconcile(NAME)

    def edit(self, patch: dict) -> None:
        """A change by someone else (a person, another tool), as the API server would apply it."""
        self._apply(NAME, patch)

    def served(self, name: str = NAME) -> dict[str, int]:
        return self._shares(name, self.objects[name]["status"]["components"]["predictor"].get("traffic", []))

    def _shares(self, name: str, traffic: list[dict]) -> dict[str, int]:
        storage = {r.name: r.storage for r in self.revisions[name]}
        shares: Counter = Counter()
        for target in traffic:
            shares[storage[target["revisionName"]]] += target["percent"]
        return dict(shares)

    def revision(self, name: str) -> Revision:
        return next(r for rs in self.revisions.values() for r in rs if r.name == name)

    # --- CustomObjectsApi ---

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
            raise _api_error(409, f'{PLURAL}.{GROUP} "{name}" already exists', "AlreadyExists")
        self.objects[name], self.revisions[name] = copy.deepcopy(body), []
        self.objects[name]["metadata"]["generation"] = 1
        self._new_revision(name)
        self._reconcile(name)
        return copy.deepcopy(self.objects[name])

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self._enter("patch", group, version, namespace, plural)
        self._require(name)
        if self.on_patch is not None:
            self.on_patch(body)
        sent = (body.get("metadata") or {}).get("resourceVersion")
        if sent is not None and sent != self.objects[name]["metadata"]["resourceVersion"]:
            raise _conflict(f"{PLURAL}.{GROUP}", name)
        self.patches.append((copy.deepcopy(body), self._apply(name, body)))
        return copy.deepcopy(self.objects[name])

    def _apply(self, name: str, body: dict) -> set:
        before = self.objects[name]
        after = _merge(before, body)
        self.validator.validate(after)
        changed = _changed(before["spec"], after["spec"], ("spec",))
        if changed:
            after["metadata"]["generation"] = before["metadata"]["generation"] + 1
        self.objects[name] = after
        if _template(after) != _template(before):
            self._new_revision(name)
        self._bump(after)
        self._reconcile(name)
        return changed

    # --- CoordinationV1Api ---

    def create_namespaced_lease(self, namespace, body):
        self._enter("create", LEASE_GROUP, "v1", namespace, "leases")
        lease = _SERIALIZER.sanitize_for_serialization(body)
        name = lease["metadata"]["name"]
        if name in self.leases:
            raise _api_error(409, f'leases.coordination.k8s.io "{name}" already exists', "AlreadyExists")
        lease["metadata"].pop("resourceVersion", None)
        self.leases[name] = lease
        self._bump(lease)
        return self._lease(name)

    def read_namespaced_lease(self, name, namespace):
        self._enter("get", LEASE_GROUP, "v1", namespace, "leases")
        if name not in self.leases:
            raise _api_error(404, f'leases.coordination.k8s.io "{name}" not found', "NotFound")
        return self._lease(name)

    def replace_namespaced_lease(self, name, namespace, body):
        self._enter("update", LEASE_GROUP, "v1", namespace, "leases")
        lease = _SERIALIZER.sanitize_for_serialization(body)
        current = self.leases.get(name)
        if current is None:
            raise _api_error(404, f'leases.coordination.k8s.io "{name}" not found', "NotFound")
        if lease["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise _conflict("leases.coordination.k8s.io", name)
        self.leases[name] = lease
        self._bump(lease)
        return self._lease(name)

    def delete_namespaced_lease(self, name, namespace, body=None):
        self._enter("delete", LEASE_GROUP, "v1", namespace, "leases")
        if name not in self.leases:
            raise _api_error(404, f'leases.coordination.k8s.io "{name}" not found', "NotFound")
        want = ((_SERIALIZER.sanitize_for_serialization(body) or {}).get("preconditions") or {}).get("resourceVersion")
        if want is not None and want != self.leases[name]["metadata"]["resourceVersion"]:
            raise _conflict("leases.coordination.k8s.io", name)
        del self.leases[name]

    def _lease(self, name: str):
        return _SERIALIZER._ApiClient__deserialize(copy.deepcopy(self.leases[name]), "V1Lease")

    # --- KServe's side ---

    def _enter(self, verb, group, version, namespace, plural) -> None:
        CALLED.add((group, plural, verb))
        assert namespace == NS and version in (VERSION, "v1")
        if verb in self.refuse and plural == PLURAL:
            raise _api_error(self.refuse[verb], f'{plural}.{group} is forbidden: cannot {verb} in "{namespace}"')

    def _require(self, name: str) -> None:
        if name not in self.objects:
            raise _api_error(404, f'{PLURAL}.{GROUP} "{name}" not found')

    def _new_revision(self, name: str) -> None:
        revisions = self.revisions[name]
        storage = self.objects[name]["spec"]["predictor"]["model"]["storageUri"]
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
        status = copy.deepcopy(obj.get("status") or {})
        predictor = status.setdefault("components", {}).setdefault("predictor", {})
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
        status["conditions"] = [configured, {"type": "Ready", "status": ready_status}]
        status["observedGeneration"] = obj["metadata"]["generation"]
        status["deploymentMode"] = (obj["metadata"].get("annotations") or {}).get(MODE_ANNOTATION, self.default_mode)
        if status != obj.get("status"):
            obj["status"] = status
            self._bump(obj)
            self.history.append(self._shares(name, traffic))
        self.validator.validate(obj)


def _template(obj: dict) -> dict:
    return {k: v for k, v in obj["spec"]["predictor"].items() if k != "canaryTrafficPercent"}


def _no_prometheus(query: str) -> list:
    raise AssertionError(f"unexpected query {query}")


def _lease(fake, holder: str = "pipeline run test", cfg=None, slept=None) -> CanaryLease:
    kserve = (cfg or load_config()).canary.kserve
    sleep = slept.append if slept is not None else (lambda s: None)
    return CanaryLease(
        fake, NS, f"canaryflow-canary-{NAME}", holder, kserve.lease_duration_s, kserve.lease_wait_s, sleep
    )


def _config(*overrides: str):
    return load_config(overrides=[f"canary.kserve.namespace={NS}", "canary.server_start_timeout_s=10", *overrides])


@pytest.fixture
def kserve(isvc_schema):  # noqa: F811
    """make(overrides, **fake options) -> (backend, fake, sleeps)"""

    def make(overrides=(), prometheus=_no_prometheus, seed: str | None = CHAMPION_URI, **options):
        fake = FakeKServe(isvc_schema, **options)
        if seed:
            fake.seed(seed)
        cfg = _config(*overrides)
        slept: list[float] = []
        backend = KServeBackend(cfg, api=fake, prometheus=prometheus, sleep=slept.append, versions=VERSIONS)
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

    def answer(self, status: int, payload: dict | None) -> None:
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
    storage = base["spec"]["predictor"]["model"]["storageUri"]
    labels = _docs(MANIFESTS / "base" / "kustomization.yaml")[0]["labels"][0]["pairs"]
    assert inference_service(base["metadata"]["name"], storage) == _merge(base, {"metadata": {"labels": labels}})
    assert storage_uri(storage) == storage


def test_the_runtime_runs_canaryflows_server_on_what_kserve_downloads():
    from canaryflow.rollout import kserve

    (runtime,) = _docs(MANIFESTS / "runtime" / "servingruntime.yaml")
    assert runtime["kind"] == "ClusterServingRuntime" and runtime["metadata"]["name"] == kserve.RUNTIME
    assert {"name": kserve.MODEL_FORMAT, "version": "1", "autoSelect": True} in runtime["spec"]["supportedModelFormats"]
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == kserve.CONTAINER and container["command"] == ["canaryflow", "serve"]
    args = container["args"]
    assert args[args.index("--model-uri") + 1] == kserve.MODEL_DIR
    assert args[args.index("--port") + 1] == str(kserve.PORT)
    assert args[args.index("--model-name") + 1] == "{{.Name}}"  # the InferenceService's name, from KServe
    assert runtime["spec"]["protocolVersions"] == ["v1", "v2"]
    assert {p["containerPort"] for p in container["ports"]} == {kserve.PORT}
    # Without the canary step's serving section (an InferenceService applied by hand): defaults, no input log.
    assert container["env"] == [{"name": kserve.SERVING_ENV, "value": "{}"}]
    assert _base_isvc()["spec"]["predictor"]["model"]["runtime"] == kserve.RUNTIME


def test_the_predictor_gets_the_runs_serving_section_and_upload_secrets_only_to_ship_the_log(kserve):
    backend, fake, _ = kserve(["serving.max_inputs_per_request=5", "serving.input_log.sample_rate=0.5"])
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    env = {e["name"]: e for e in fake.objects[NAME]["spec"]["predictor"]["model"]["env"]}
    assert json.loads(env[SERVING_ENV]["value"]) == {**_config().serving.model_dump(), "max_inputs_per_request": 5,
        "input_log": {**_config().serving.input_log.model_dump(), "sample_rate": 0.5}}  # fmt: skip
    assert set(env) == {VERSION_ENV, SERVING_ENV}  # nothing to ship: no credentials in the pod

    def refs(uri):
        shipped = predictor_env(_config(f"serving.input_log.upload_uri={uri}"))
        return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in shipped if "valueFrom" in e}

    # Each gets what shipping there needs: never the HF token or the promotion lock.
    assert refs("s3://canaryflow-logs/input-log") == {
        "AWS_ACCESS_KEY_ID": {"name": "canaryflow-s3", "key": "access-key-id"},
        "AWS_SECRET_ACCESS_KEY": {"name": "canaryflow-s3", "key": "secret-access-key"},
        "MLFLOW_S3_ENDPOINT_URL": {"name": "canaryflow-s3", "key": "endpoint-url"},
    }
    assert refs("mlflow-artifacts:/input-log") == {
        "MLFLOW_TRACKING_URI": {"name": "canaryflow-mlflow", "key": "tracking-uri"},
        "MLFLOW_TRACKING_USERNAME": {"name": "canaryflow-mlflow-auth", "key": "username", "optional": True},
        "MLFLOW_TRACKING_PASSWORD": {"name": "canaryflow-mlflow-auth", "key": "password", "optional": True},
    }
    off = _config("serving.input_log.upload_uri=s3://logs/x", "serving.input_log.enabled=false")
    assert [e["name"] for e in predictor_env(off)] == [SERVING_ENV]


def test_a_rollout_replaces_the_serving_env_a_previous_run_left(kserve):
    backend, fake, _ = kserve(["serving.max_inputs_per_request=5"])
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    env = fake.objects[NAME]["spec"]["predictor"]["model"]["env"]
    assert [json.loads(e["value"])["max_inputs_per_request"] for e in env if e["name"] == SERVING_ENV] == [5]


@pytest.mark.parametrize(
    ("threshold", "bound"), [(0, 0.005), (0.005, 0.005), (0.0051, 0.01), (0.3, 0.5), (1, 1), (1e6, 10)]
)
def test_latency_threshold_rounds_up_to_a_bucket_bound_of_the_servers_histogram(threshold, bound):
    assert bucket_bound(threshold, LATENCY_BUCKETS) == bound


def test_the_inferenceservice_pins_serverless_mode():
    # In RawDeployment/Standard mode KServe ignores canaryTrafficPercent: every step would send all or nothing.
    assert _base_isvc()["metadata"]["annotations"][MODE_ANNOTATION] == "Serverless"
    assert inference_service(NAME, CHAMPION_URI)["metadata"]["annotations"][MODE_ANNOTATION] == "Serverless"


# --- the rollout against the fake cluster ---


def test_deploy_creates_the_missing_service_for_the_champion_then_starts_the_challenger_at_0(kserve):
    backend, fake, _ = kserve(seed=None)
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    assert fake.created == [inference_service(NAME, CHAMPION_URI, NS, version="1", env=predictor_env(_config()))]
    assert fake.served() == {CHAMPION_URI: 100, CHALLENGER_URI: 0}
    assert fake.revision(R2).ready and fake.revision(R2).storage == CHALLENGER_URI


def test_challenger_patch_touches_only_the_storage_its_version_and_the_percentage(kserve):
    backend, fake, _ = kserve()
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    (body, changed), *rest = fake.patches
    assert rest == []
    assert changed == {STORAGE_PATH, VERSION_PATH, PERCENT_PATH}
    assert body["spec"]["predictor"]["model"]["env"] == [
        {"name": VERSION_ENV, "value": "2"},
        {"name": SERVING_ENV, "value": _config().serving.model_dump_json()},
    ]
    assert body["spec"]["predictor"]["canaryTrafficPercent"] == 0
    assert set(body) == {"spec", "metadata"}
    assert set(body["spec"]["predictor"]) == {"canaryTrafficPercent", "model"}
    assert set(body["spec"]["predictor"]["model"]) == {"storageUri", "env"}  # the runtime and format stay


def test_every_patch_names_the_resource_version_it_was_computed_from(kserve):
    backend, fake, _ = kserve()
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    backend.set_weight(25)
    backend.rollback()
    assert len(fake.patches) >= 4
    assert all(set(body["metadata"]) == {"resourceVersion"} for body, _ in fake.patches)


def test_a_status_update_between_read_and_patch_is_retried_against_the_fresh_object(kserve):
    backend, fake, _ = kserve()
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    conflicts = []

    def status_write(body):  # KServe's controller writes status: resourceVersion moves, generation does not
        obj = fake.objects[NAME]
        obj["status"]["url"] = f"http://{NAME}.{NS}"
        fake._bump(obj)
        conflicts.append(obj["metadata"]["resourceVersion"])
        fake.on_patch = None

    fake.on_patch = status_write
    patches = len(fake.patches)
    backend.set_weight(10)
    assert len(conflicts) == 1 and len(fake.patches) == patches + 1  # refused once, then sent again and applied
    assert fake.served() == {CHAMPION_URI: 90, CHALLENGER_URI: 10}


def test_a_spec_edited_by_someone_else_stops_the_canary(kserve):
    backend, fake, _ = kserve()
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    fake.on_patch = lambda body: (
        fake.edit({"spec": {"predictor": {"maxReplicas": 5}}}) or setattr(fake, "on_patch", None)
    )
    with pytest.raises(CanaryflowError, match=r"changed by someone else during the canary \(generation") as caught:
        backend.set_weight(10)
    assert "\n" not in str(caught.value)
    assert fake.served() == {CHAMPION_URI: 100, CHALLENGER_URI: 0}  # the stale patch was refused


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
def test_rollback_gives_the_champion_all_the_traffic_and_leaves_no_percentage(kserve, last):
    backend, fake, _ = kserve()
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    backend.set_weight(100 if last == "at 100%" else 25)
    if last == "after promote":
        backend.promote()
    start = len(fake.history)
    seen = []  # (whether a patch changes the storage, the split when it was sent)
    fake.on_patch = lambda body: seen.append(("model" in body["spec"]["predictor"], fake.served()))
    backend.rollback()
    fake.on_patch = None
    # The champion's storage went out only once the challenger had no traffic left.
    assert [served.get(CHALLENGER_URI, 0) for storage, served in seen if storage] == [0]
    # From the rollback on, the challenger never gains: it only ever loses traffic.
    shares = [h.get(CHALLENGER_URI, 0) for h in fake.history[start:]]
    assert shares == sorted(shares, reverse=True) and shares[-1] == 0
    for _ in range(3):  # it stays so while KServe goes on reconciling
        fake.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, NAME)
        assert fake.served() == {CHAMPION_URI: 100}
    predictor = fake.objects[NAME]["spec"]["predictor"]
    assert "canaryTrafficPercent" not in predictor  # a later edit of the spec is not started at 0%
    assert predictor["model"]["storageUri"] == CHAMPION_URI
    # The champion's revision labels its metrics with its own version.
    assert predictor["model"]["env"][0] == {"name": VERSION_ENV, "value": "1"}
    # The spec names the champion, and a later edit rolls the champion out, with all the traffic.
    fake.edit({"spec": {"predictor": {"maxReplicas": 4}}})
    for _ in range(2):
        fake.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, NAME)
    assert fake.served() == {CHAMPION_URI: 100}


def test_deploy_recovers_from_a_canary_cut_short_without_serving_the_leftover_challenger(kserve):
    """The pod of the last canary was killed at 50 %: the spec still names that challenger, at 50 %."""
    backend, fake, _ = kserve(ready_after=3)
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    backend.set_weight(50)
    start = len(fake.history)
    fresh = KServeBackend(_config(), api=fake, prometheus=_no_prometheus, sleep=lambda s: None, versions=VERSIONS)
    fresh.deploy(CHAMPION_URI, OTHER_URI)
    leftover = [h.get(CHALLENGER_URI, 0) for h in fake.history[start:]]
    assert max(leftover) <= 50 and leftover[-1] == 0, leftover
    assert fake.served() == {CHAMPION_URI: 100, OTHER_URI: 0}
    # 0% went alone first, before the storage changed
    assert fake.patches[2][1] == {PERCENT_PATH} and fake.patches[2][0]["spec"]["predictor"]["canaryTrafficPercent"] == 0


def test_deploy_first_rolls_the_champion_out_when_something_else_serves(kserve):
    backend, fake, _ = kserve(seed=OTHER_URI)
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    assert fake.served() == {CHAMPION_URI: 100, CHALLENGER_URI: 0}
    assert [h.get(OTHER_URI, 0) for h in fake.history][-1] == 0
    assert [r.storage for r in fake.revisions[NAME]] == [OTHER_URI, CHAMPION_URI, CHALLENGER_URI]


@pytest.mark.parametrize("mode", ["RawDeployment", "Standard"])
def test_deploy_refuses_a_service_that_is_not_serverless(kserve, mode):
    backend, fake, _ = kserve(seed=None, mode=mode)
    fake.seed(CHAMPION_URI, annotations={})  # applied without the pinned annotation, on a cluster whose default is raw
    with pytest.raises(BadInputError, match=f"runs in {mode} deployment mode, where KServe ignores") as caught:
        backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    assert "\n" not in str(caught.value)
    assert fake.patches == []  # no challenger was started


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
    assert "canaryTrafficPercent" not in fake.objects[NAME]["spec"]["predictor"]
    assert fake.served() == {CHAMPION_URI: 100}


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
    api = k8s.CustomObjectsApi(k8s.ApiClient(k8s.Configuration(host=f"http://127.0.0.1:{free_port()}")))
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


# --- one canary per InferenceService: the Lease ---


def test_a_second_run_waits_for_the_lease_then_fails_in_one_line(kserve):
    _, fake, _ = kserve()
    first = _lease(fake, "pipeline run A")
    first.acquire()
    slept: list[float] = []
    second = _lease(fake, "pipeline run B", _config("canary.kserve.lease_wait_s=20"), slept)
    says = r"held by pipeline run A .*waited 20 s \(canary.kserve.lease_wait_s\)"
    with pytest.raises(CanaryflowError, match=says) as e:
        second.acquire()
    assert "\n" not in str(e.value) and sum(slept) == 20
    first.release()
    second.acquire()  # released: the next run goes ahead
    assert fake.leases[second.name]["spec"]["holderIdentity"] == "pipeline run B"


def test_an_expired_lease_is_taken_over_and_its_old_holder_stops(kserve):
    backend, fake, _ = kserve()
    old = _lease(fake, "pipeline run A")
    old.acquire()
    fake.leases[old.name]["spec"]["renewTime"] = "2020-01-01T00:00:00.000000Z"  # A stopped renewing long ago
    new = _lease(fake, "pipeline run B")
    new.acquire()
    assert fake.leases[new.name]["spec"]["holderIdentity"] == "pipeline run B"
    old.renew()
    backend.lease = old
    with pytest.raises(LeaseLost, match="now held by pipeline run B"):
        backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    assert fake.patches == []
    new.release()
    assert new.name not in fake.leases


def test_the_lease_is_renewed_and_released(kserve):
    _, fake, _ = kserve()
    lease = _lease(fake)
    with lease.held():
        first = fake.leases[lease.name]["spec"]["renewTime"]
        lease.renew()
        assert fake.leases[lease.name]["spec"]["renewTime"] >= first
        assert fake.leases[lease.name]["spec"]["leaseDurationSeconds"] == 60
    assert lease.name not in fake.leases and lease.lost is None


# --- SLIs from Prometheus ---


@pytest.fixture
def prometheus():
    """Prometheus' query API on loopback: `values[(query kind, model_version)]` answers (None: no series),
    `queries` records."""

    class Handler(_Handler):
        def do_GET(self) -> None:
            url = urlparse(self.path)
            query = parse_qs(url.query)["query"][0]
            server.queries.append(query)
            if server.refuse:
                self.answer(400, {"status": "error", "errorType": "bad_data", "error": "parse error: unexpected }"})
                return
            version = re.search(r'model_version="([^"]+)"', query)  # none in Knative's queries: no series
            value = server.values.get((_kind(query), version.group(1))) if version else None
            if _kind(query) == "quality":
                series = [{"metric": {"le": le}, "value": [1.7e9, v]} for le, v in (value or {}).items()]
            else:
                series = [] if value is None else [{"metric": {}, "value": [1.7e9, value]}] * server.series
            self.answer(200, {"status": "success", "data": {"resultType": "vector", "result": series}})

    server = _Server(Handler)
    server.queries, server.values, server.refuse, server.series = [], {}, False, 1
    yield server
    server.shutdown()


def _kind(query: str) -> str:
    if "quality_chrf" in query:
        return "quality"
    if "histogram_quantile" in query:
        return "p95_ms"
    return "slow" if "le=~" in query else "errors" if "5.." in query else "requests"


def _values(champion: dict, challenger: dict) -> dict:
    return {**{(k, "1"): v for k, v in champion.items()}, **{(k, "2"): v for k, v in challenger.items()}}


def test_read_renders_the_configured_promql_per_version_and_counts(kserve, prometheus):
    backend, _, _ = kserve(["canary.kserve.knative_metrics=off"], prometheus=prometheus_query(prometheus.url))
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    prometheus.values = _values(
        {"requests": "80.4", "errors": "1", "slow": "-0.3", "p95_ms": "212.5",
         "quality": {"10.0": "0", "20.0": "0", "30.0": "2", "100.0": "5", "+Inf": "5"}},
        {"requests": "19.6", "errors": "21.4", "slow": "0", "p95_ms": "NaN"},
    )  # fmt: skip
    counts = backend.read(threshold_ms=251)
    assert counts == {
        "champion": VariantCounts(80, 1, 0, 212.5, (0, 0, 2, 0, 0, 0, 0, 0, 0, 3)),
        "challenger": VariantCounts(20, 20, 0, None, (0,) * 10),
    }
    assert len(prometheus.queries) == 10
    window = "[120s]"  # four scrape intervals: the canary began a moment ago
    selector = f'namespace="{NS}",inferenceservice="{NAME}",model_version="1"'
    assert (
        f"sum(increase(canaryflow_server_latency_seconds_count{{{selector}}}{window}))"
        f' - sum(increase(canaryflow_server_latency_seconds_bucket{{{selector},le=~"0[.]5([.]0)?"}}{window}))'
    ) in prometheus.queries


def test_on_auto_a_queue_proxy_that_is_not_scraped_is_looked_for_once(kserve, prometheus):
    backend, _, _ = kserve(prometheus=prometheus_query(prometheus.url))
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    prometheus.values = _values(*[{"requests": "5", "errors": "0", "slow": "0", "p95_ms": "1"}] * 2)
    for look in range(3):
        prometheus.queries.clear()
        counts = backend.read(250)
        knative = [q for q in prometheus.queries if "revision_name=" in q]
        # Looked for (both generations) at the first look only; our own metrics at every look.
        assert len(knative) == (2 if look == 0 else 0), knative
        assert counts["challenger"].requests == 5


def test_counts_are_read_since_the_canary_began_and_never_over_less_than_four_scrapes(kserve, prometheus):
    backend, _, _ = kserve(
        ["canary.kserve.knative_metrics=off", "canary.kserve.scrape_interval_s=15"],
        prometheus=prometheus_query(prometheus.url),
    )
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    prometheus.values = _values(*[{"requests": "1", "errors": "0", "slow": "0", "p95_ms": "1"}] * 2)
    backend.read(250)
    assert all("[60s]" in q for q in prometheus.queries)
    backend._canary.started -= 3600  # an hour into the canary: the window covers all of it
    prometheus.queries.clear()
    backend.read(250)
    assert all(re.search(r"\[36\d\ds\]", q) for q in prometheus.queries), prometheus.queries


@pytest.mark.parametrize(
    ("trouble", "error", "match"),
    [
        ("down", CanaryflowError, r"canary\.kserve\.queries\.requests \(champion\).*did not answer"),
        ("refuse", BadInputError, r"canary\.kserve\.queries\.requests \(champion\).*400 parse error"),
        ("series", BadInputError, r"returned 2 series; a canary query must return one number"),
        ("none", CanaryflowError, r"canary\.kserve\.queries\.requests \(champion\): no series for sum\(increase\("),
    ],
)
def test_prometheus_trouble_is_one_line(kserve, prometheus, trouble, error, match):
    url = f"http://127.0.0.1:{free_port()}" if trouble == "down" else prometheus.url
    prometheus.refuse, prometheus.series = trouble == "refuse", 2 if trouble == "series" else 1
    prometheus.values = {} if trouble == "none" else {("requests", "1"): "3"}
    backend, _, _ = kserve(["canary.kserve.knative_metrics=off"], prometheus=prometheus_query(url))
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    with pytest.raises(error, match=match) as caught:
        backend.read(250)
    assert "\n" not in str(caught.value)


# --- the real client, and the RBAC the backend needs ---


_CUSTOM = re.compile(r"/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/([^/?]+)(?:/([^/?]+))?")
_LEASES = re.compile(r"/apis/coordination\.k8s\.io/v1/namespaces/([^/]+)/leases(?:/([^/?]+))?")


def api_server(fake) -> _Server:
    """The fake behind HTTP, as an API server serves it: what the real kubernetes client talks to."""

    class Handler(_Handler):
        def do_GET(self) -> None:
            self.route("read")

        def do_POST(self) -> None:
            self.route("create")

        def do_PATCH(self) -> None:
            self.server.content_types.append(self.headers["Content-Type"])
            self.route("patch")

        def do_PUT(self) -> None:
            self.route("replace")

        def do_DELETE(self) -> None:
            self.route("delete")

        def route(self, verb: str) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or "null")
            try:
                lease = _LEASES.fullmatch(self.path.split("?")[0])
                if lease:
                    ns, name = lease.groups()
                    call = {
                        "read": lambda: fake.read_namespaced_lease(name, ns),
                        "create": lambda: fake.create_namespaced_lease(ns, body),
                        "replace": lambda: fake.replace_namespaced_lease(name, ns, body),
                        "delete": lambda: fake.delete_namespaced_lease(name, ns, body),
                    }[verb]
                    self.answer(200, _SERIALIZER.sanitize_for_serialization(call()))
                    return
                g, v, ns, p, name = _CUSTOM.fullmatch(self.path.split("?")[0]).groups()
                call = {
                    "read": lambda: fake.get_namespaced_custom_object(g, v, ns, p, name),
                    "create": lambda: fake.create_namespaced_custom_object(g, v, ns, p, body),
                    "patch": lambda: fake.patch_namespaced_custom_object(g, v, ns, p, name, body),
                }[verb]
                self.answer(200, call())
            except ApiException as exc:
                self.answer(exc.status, json.loads(exc.body))

    server = _Server(Handler)
    server.content_types = []
    return server


def kubeconfig(tmp_path, url: str):
    path = tmp_path / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": url}}],
                "users": [{"name": "fake", "user": {"token": "t"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "current-context": "fake",
            }
        )
    )
    return path


@pytest.fixture
def through_kubeconfig(tmp_path, monkeypatch):
    """Point the kubernetes client's default kubeconfig at a loopback API server in front of `fake`."""
    from kubernetes.config import kube_config

    servers = []

    def use(fake) -> _Server:
        server = api_server(fake)
        servers.append(server)
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        path = str(kubeconfig(tmp_path, server.url))
        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", path)
        monkeypatch.setenv("KUBECONFIG", path)  # for a `canaryflow` started from the test
        monkeypatch.setattr(k8s.Configuration, "_default", None)  # load_kube_config sets a process-wide default
        return server

    yield use
    for server in servers:
        server.shutdown()


def test_the_real_client_from_a_kubeconfig_sends_merge_patches(kserve, through_kubeconfig):
    _, fake, _ = kserve()
    server = through_kubeconfig(fake)
    backend = KServeBackend(_config(), prometheus=_no_prometheus, sleep=lambda s: None, versions=VERSIONS)
    backend.deploy(CHAMPION_URI, CHALLENGER_URI)
    backend.set_weight(10)
    backend.promote()
    assert server.content_types == ["application/merge-patch+json"] * 3
    assert fake.served() == {CHALLENGER_URI: 100}
    assert "canaryTrafficPercent" not in fake.objects[NAME]["spec"]["predictor"]


def test_no_cluster_and_no_kubeconfig_is_one_line(tmp_path, monkeypatch):
    from kubernetes.config import kube_config

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(tmp_path / "missing"))
    monkeypatch.setattr(k8s.Configuration, "_default", None)
    with pytest.raises(CanaryflowError, match="no Kubernetes credentials") as caught:
        KServeBackend(load_config(), prometheus=_no_prometheus)
    assert "\n" not in str(caught.value)


def test_role_grants_exactly_what_the_runs_pods_call(kserve):
    # A whole canary of its own, so that the comparison holds when this test runs alone.
    backend, fake, _ = kserve(seed=None)
    backend.lease = _lease(fake)
    with backend.lease.held():
        backend.lease.renew()
        backend.deploy(CHAMPION_URI, CHALLENGER_URI)
        backend.set_weight(50)
        backend.promote()
        backend.rollback()
    docs = {d["kind"]: d for d in _docs(MANIFESTS / "base" / "rbac.yaml")}
    # The canary step's calls, on any name (they come from config), what KFP and Argo call in every pod, and
    # fine_tune's TrainJob calls (tests/manifests/test_trainjob.py holds those equal to the step's own).
    canary = {(group, plural, verb, None) for group, plural, verb in CALLED}
    assert role_grants(docs["Role"]) == canary | kfp_backend_calls(compiled_pipeline()) | set(TRAINJOB_CALLS)
    account = load_config().cluster.service_account
    assert docs["ServiceAccount"]["metadata"]["name"] == docs["Role"]["metadata"]["name"] == account
    binding = docs["RoleBinding"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account}]
    assert "rbac.yaml" in _docs(MANIFESTS / "base" / "kustomization.yaml")[0]["resources"]


# --- the controller driving a whole canary on the InferenceService ---


@pytest.fixture
def registry(tmp_path):
    """A SQLite registry holding version 1 (the champion's storage) and 2 (the challenger's)."""
    from mlflow import MlflowClient

    from canaryflow.registry.models import CHAMPION, PREVIOUS
    from canaryflow.registry.tracking import configure, sqlite_uri

    overrides = [f"mlflow.tracking_uri={sqlite_uri(tmp_path)}", f"registry.model_name={NAME}"]
    cfg = _config(*overrides, "canary.kserve.knative_metrics=off")
    experiment = configure(cfg)  # before the client, which binds the store it finds then
    client = MlflowClient()
    run = client.create_run(experiment)
    client.create_registered_model(NAME)
    for source in (CHAMPION_URI, CHALLENGER_URI):
        client.create_model_version(NAME, source, run.info.run_id)
    client.set_registered_model_alias(NAME, CHAMPION, "1")
    return cfg, overrides, (CHAMPION, PREVIOUS)


# Every look sees one more minute of traffic: 900 requests to the champion, 100 to the challenger.
def _growing(prometheus, challenger_errors: int):
    per_look = {
        "1": {"requests": 900, "errors": 9, "slow": 45},
        "2": {"requests": 100, "errors": challenger_errors, "slow": 5},
    }
    looks = Counter()

    def sleep(seconds: float) -> None:
        looks["n"] += 1
        prometheus.values = {
            **{(k, v): str(n * looks["n"]) for v, counts in per_look.items() for k, n in counts.items()},
            ("p95_ms", "1"): "180", ("p95_ms", "2"): "185",
        }  # fmt: skip

    return sleep


@pytest.mark.slow
@pytest.mark.parametrize(
    ("challenger_errors", "verdict", "serving"), [(1, "promoted", CHALLENGER_URI), (25, "rolled_back", CHAMPION_URI)]
)
def test_the_controller_runs_a_kserve_canary_on_prometheus_counts(
    kserve, prometheus, registry, challenger_errors, verdict, serving
):
    from canaryflow.rollout.controller import run_kserve_canary

    cfg, overrides, _ = registry
    _, fake, _ = kserve(overrides)
    sleep = _growing(prometheus, challenger_errors)
    spec_at_commit = []
    result = run_kserve_canary(
        cfg, "2", "1", commit=lambda r: spec_at_commit.append(copy.deepcopy(fake.objects[NAME]["spec"])),
        holder="pipeline run t", sleep=sleep, api=fake, leases=fake, prometheus=prometheus_query(prometheus.url),
    )  # fmt: skip
    assert result["verdict"] == verdict, result["reason"]
    assert {storage: share for storage, share in fake.served().items() if share} == {serving: 100}
    assert fake.objects[NAME]["spec"]["predictor"]["model"]["storageUri"] == serving
    assert "canaryTrafficPercent" not in fake.objects[NAME]["spec"]["predictor"]
    weights = [p["spec"]["predictor"].get("canaryTrafficPercent", "-") for p, _ in fake.patches]
    assert weights[:2] == [0, 10]  # the challenger starts at 0 %, then the first step
    if verdict == "promoted":
        # The registry's compare-and-set came while the canary percentage was still in the spec.
        assert [s["predictor"]["canaryTrafficPercent"] for s in spec_at_commit] == [100]
    else:
        assert spec_at_commit == []
    assert fake.leases == {}  # released
    # No look read fewer than four scrape intervals, and "slow" is the champion's bucket before the canary.
    assert all(re.search(r"\[(\d+)s\]", q) and int(re.search(r"\[(\d+)s\]", q).group(1)) >= 120
               for q in prometheus.queries if "600s" not in q)  # fmt: skip


def test_a_failed_compare_and_set_rolls_serving_back(kserve, prometheus, registry):
    from canaryflow.registry.ledger import PromotionConflict
    from canaryflow.rollout.controller import run_kserve_canary

    cfg, overrides, _ = registry
    _, fake, _ = kserve(overrides)

    def commit(result):
        raise PromotionConflict("champion is version 3, not 1 as the decision saw")

    with pytest.raises(PromotionConflict):
        run_kserve_canary(cfg, "2", "1", commit=commit, sleep=_growing(prometheus, 1), api=fake, leases=fake,
                          prometheus=prometheus_query(prometheus.url))  # fmt: skip
    assert fake.served() == {CHAMPION_URI: 100}
    assert "canaryTrafficPercent" not in fake.objects[NAME]["spec"]["predictor"]
    assert fake.leases == {}


def test_a_canary_whose_metrics_never_appear_fails_after_a_few_looks_and_rolls_back(kserve, prometheus, registry):
    from canaryflow.rollout.controller import run_kserve_canary

    cfg, overrides, _ = registry
    _, fake, _ = kserve(overrides)
    slept = []
    says = r"no series for .* at 3 looks in a row \(canary.kserve.max_empty_looks\)"
    with pytest.raises(CanaryflowError, match=says):
        run_kserve_canary(cfg, "2", "1", sleep=slept.append, api=fake, leases=fake,
                          prometheus=prometheus_query(prometheus.url))  # fmt: skip
    looks = [s for s in slept if s != POLL_S]
    assert len(looks) == 3
    # The first look waits for four scrapes after the canary began (less the moment deploy() took).
    assert 4 * cfg.canary.kserve.scrape_interval_s - 5 < looks[0] <= 4 * cfg.canary.kserve.scrape_interval_s
    assert fake.served() == {CHAMPION_URI: 100}


def test_sigterm_during_the_canary_rolls_back_before_the_step_exits(kserve, prometheus, registry):
    from canaryflow.rollout.controller import run_kserve_canary

    cfg, overrides, _ = registry
    _, fake, _ = kserve(overrides)
    grow = _growing(prometheus, 1)

    def sleep(seconds):
        grow(seconds)
        if fake.objects[NAME]["spec"]["predictor"].get("canaryTrafficPercent") == 25:
            os.kill(os.getpid(), signal.SIGTERM)  # what the kubelet sends when the run is terminated

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted, match="stopped by SIGTERM during the canary"):
        run_kserve_canary(cfg, "2", "1", sleep=sleep, api=fake, leases=fake,
                          prometheus=prometheus_query(prometheus.url))  # fmt: skip
    assert fake.served() == {CHAMPION_URI: 100}
    assert "canaryTrafficPercent" not in fake.objects[NAME]["spec"]["predictor"]
    assert signal.getsignal(signal.SIGTERM) is before  # the step's own handler is back


def test_signals_are_left_alone_outside_the_main_thread():
    seen = []
    thread = threading.Thread(target=lambda: seen.append(rollback_on_signals().__enter__() is None))
    thread.start()
    thread.join()
    assert seen == [True]


@pytest.mark.slow
def test_rollback_and_the_first_champion_are_served_on_the_cluster(kserve, registry, through_kubeconfig):
    """`canaryflow rollback` with the kserve backend, as a user runs it: the registry moves, then the
    InferenceService serves the new champion, through the kubeconfig and under the canary's Lease."""
    from canaryflow.rollout.controller import serve_champion
    from tests.conftest import run_cli

    cfg, overrides, (champion, previous) = registry
    _, fake, _ = kserve(seed=None)
    serve_champion(cfg, "1", holder="pipeline run first", sleep=lambda s: None, api=fake, leases=fake)
    assert fake.served() == {CHAMPION_URI: 100}  # the first champion is served by the cluster, not only smoke-checked
    from mlflow import MlflowClient

    MlflowClient().set_registered_model_alias(NAME, champion, "2")
    MlflowClient().set_registered_model_alias(NAME, previous, "1")
    serve_champion(cfg, "2", holder="pipeline run second", sleep=lambda s: None, api=fake, leases=fake)
    assert fake.served() == {CHALLENGER_URI: 100}
    through_kubeconfig(fake)
    args = [arg for o in [*overrides, f"canary.kserve.namespace={NS}", "canary.backend=kserve"] for arg in ("--set", o)]
    done = run_cli("rollback", "--reason", "bad answers", "--json", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["champion"] == "1"
    assert fake.served() == {CHAMPION_URI: 100}
    assert "canaryTrafficPercent" not in fake.objects[NAME]["spec"]["predictor"]
    assert fake.leases == {}
