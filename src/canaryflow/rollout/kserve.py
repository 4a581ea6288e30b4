"""The KServe canary backend: one InferenceService per registered model, its predictor's
canaryTrafficPercent as the challenger's weight, the predictors' own metrics in Prometheus as evidence.

KServe sends canaryTrafficPercent to the predictor's latest revision and the rest to the last revision that
served 100% (status.components.predictor.latestRolledoutRevision). So a canary points the predictor at the
challenger with 0% in one patch, raises the percentage, then removes it (promote: the latest revision takes
all) or returns to 0% and rolls the champion's storage out again (rollback). Every change is a JSON merge patch
(RFC 7386) that carries the resourceVersion it was computed from, and the whole canary holds a Lease, so two
pipeline runs never steer one InferenceService at once. Only Serverless mode (Knative) splits traffic: in
RawDeployment/Standard mode KServe ignores canaryTrafficPercent, so deploy() refuses to start there.

The predictor is canaryflow's own server, as the ClusterServingRuntime `canaryflow` that the InferenceService's
predictor.model names. KServe's storage initializer downloads the model's storageUri into /mnt/models before the
server starts, so a revision is pinned to one model's files and the server needs no access to MLflow. The server
labels its metrics with CANARYFLOW_MODEL_VERSION, which is how the SLI queries tell the two variants apart,
whatever Knative version runs underneath; Knative's queue-proxy metrics are a second signal, for failures that
never reach the server (see KNATIVE_QUERIES).
"""

from __future__ import annotations

import bisect
import copy
import datetime as dt
import http.client
import json
import math
import re
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from canaryflow.config import Config
from canaryflow.errors import BadInputError, CanaryflowError
from canaryflow.serving.http import LATENCY_BUCKETS
from canaryflow.serving.server import CHRF_BUCKETS

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
# manifests/runtime/servingruntime.yaml: the ClusterServingRuntime that runs canaryflow's server, and the model format
# an InferenceService names to get it.
RUNTIME = MODEL_FORMAT = "canaryflow"
CONTAINER = "kserve-container"  # the runtime's container, which KServe gives the downloaded model
# The registered version the storage holds, for the server's model_version label: /mnt/models does not say.
VERSION_ENV = "CANARYFLOW_MODEL_VERSION"
# The config's serving section (limits, batching, the input log) for the predictor's `canaryflow serve`. The
# runtime's own default is "{}", so a predictor that was not rolled out by the canary step logs no input.
SERVING_ENV = "CANARYFLOW_SERVING_CONFIG"
# What MLflow's artifact clients read to ship the input log: mlflow-artifacts:/ goes through the tracking server
# with its login (which manifests/base/networkpolicy.yaml does not admit predictors to), s3:// and the like go
# to the bucket with the S3 keys and endpoint. Those Secrets' variables reach the predictor only to ship the log.
_UPLOAD_ENV = {"mlflow-artifacts": ("MLFLOW_TRACKING_",), "": ("AWS_", "MLFLOW_S3_")}
MODEL_DIR = "/mnt/models"
PORT = 8080
POLL_S = 2.0
PROMETHEUS_TIMEOUT_S = 10.0
# Only Knative splits traffic by canaryTrafficPercent (read in ksvc_reconciler.go alone). KServe takes the mode
# from status.deploymentMode if set, else this annotation, else the inferenceservice-config default, and reports it
# in status.deploymentMode (kserve pkg/constants/constants.go, pkg/utils/utils.go GetDeploymentMode). Up to v0.15
# the modes are Serverless, RawDeployment and ModelMesh; from v0.16 on Knative, Standard and ModelMesh, with the
# old names still accepted in the annotation and mapped to the new ones. "Serverless" is what both understand.
MODE_ANNOTATION = "serving.kserve.io/deploymentMode"
SERVERLESS = "Serverless"
KNATIVE_MODES = (SERVERLESS, "Knative")
LEASE_GROUP = "coordination.k8s.io"
_ISVC_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
CHAMPION, CHALLENGER = "champion", "challenger"


def storage_uri(artifact_uri: str, artifacts_destination: str | None = None) -> str:
    """The URI KServe's storage initializer downloads a registered version's model directory from.

    `artifact_uri` is where MLflow keeps the version's files (`ModelVersion.source` resolved, e.g. by
    `MlflowClient().get_model_version_download_uri`). Object-store URIs (s3://, gs://, ...) pass through.
    An mlflow-artifacts:/ URI names a file behind an MLflow server's artifact proxy, which the initializer
    cannot call, so it is mapped onto `artifacts_destination`, the store the server proxies
    (canary.kserve.artifacts_destination). A path on the MLflow host, or a runs:/ or models:/ URI, is
    nothing a pod can download: BadInputError.
    """
    parsed = urlparse(artifact_uri)
    scheme = parsed.scheme.lower()
    if scheme == "mlflow-artifacts":
        if not artifacts_destination:
            raise BadInputError(
                f"{artifact_uri} lives behind the MLflow server's artifact proxy; set "
                "canary.kserve.artifacts_destination to the server's --artifacts-destination so KServe can fetch it"
            )
        return storage_uri(artifacts_destination.rstrip("/") + "/" + parsed.path.lstrip("/"))
    if scheme in ("runs", "models"):
        raise BadInputError(f"{artifact_uri} is an MLflow reference; pass the version's artifact location instead")
    if scheme in ("", "file") or len(scheme) == 1:  # one letter: a Windows drive
        raise BadInputError(
            f"{artifact_uri} is a path on the MLflow host, which no pod can download; "
            "serve from a tracking server whose artifacts are in an object store (s3://, gs://, ...)"
        )
    return artifact_uri


def inference_service(
    name: str, storage: str, namespace: str | None = None, version: str | None = None, env: list[dict] | None = None
) -> dict:
    """The InferenceService that serves `storage` on canaryflow's runtime: manifests/serving/base/
    inferenceservice.yaml in Python (a test holds the two equal), for the canary step to create when it was never
    created (the ClusterServingRuntime must have been applied: it is cluster-scoped, beyond the step's Role).
    `env`: more of the predictor's environment (predictor_env)."""
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {"app.kubernetes.io/part-of": "canaryflow"},
        "annotations": {"serving.kserve.io/enable-prometheus-scraping": "true", MODE_ANNOTATION: SERVERLESS},
    }
    if namespace:
        metadata["namespace"] = namespace
    model = {
        "modelFormat": {"name": MODEL_FORMAT},
        "runtime": RUNTIME,
        "storageUri": storage,
        "env": [{"name": VERSION_ENV, "value": version or "unknown"}, *(env or [])],
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {"predictor": {"minReplicas": 1, "maxReplicas": 3, "model": model}},
    }


def predictor_env(cfg: Config) -> list[dict]:
    """What the predictor takes from the config: its serving section, and where the input log is shipped, the
    Secrets that shipping needs (by reference: nothing secret is written into the InferenceService)."""
    env: list[dict[str, Any]] = [{"name": SERVING_ENV, "value": cfg.serving.model_dump_json()}]
    if not cfg.serving.input_log.enabled or not cfg.serving.input_log.upload_uri:
        return env
    needs = _UPLOAD_ENV.get(urlparse(cfg.serving.input_log.upload_uri).scheme, _UPLOAD_ENV[""])
    return env + [e for source in cfg.cluster.secrets for e in source.env() if e["name"].startswith(needs)]


def bucket_bound(threshold: float, bounds: tuple[float, ...]) -> float:
    """The smallest bound of a latency histogram at or above `threshold`: a histogram counts requests only per
    bucket. Past the last finite bound, that bound (+Inf would count nothing as slow, and a p95 beyond the last
    bound is an outage either way)."""
    index = bisect.bisect_left(bounds, threshold)
    return bounds[min(index, len(bounds) - 1)]


def _le(bound: float) -> str:
    """A bucket bound as a regex on `le`: exporters write 1 as "1" or "1.0", and Prometheus 3 stores "1.0". The
    dot goes in brackets: a PromQL string takes Go's escapes only, and backslash-dot is not one."""
    return f"{bound:g}".replace(".", "[.]") + "([.]0)?"


# --- Knative's queue-proxy, the second signal ---
# What the queue-proxy exports on port 9091 (http-usermetric) at /metrics, by generation, from knative/serving:
# - legacy, up to knative-v1.18.2 (OpenCensus; pkg/queue/request_metric.go, pkg/metrics/key.go): the counter
#   revision_app_request_count and the histogram revision_app_request_latencies in ms (bounds below, upper
#   bound exclusive), with namespace_name, revision_name and response_code_class ("5xx") on every series.
# - otel, knative-v1.19.0 on (OpenTelemetry; pkg/queue/request_metric.go, pkg/queue/sharedmain/otel.go): one
#   histogram in seconds, kn_queueproxy_app_duration_seconds up to v1.19.7 and v1.20.0, then
#   kn_serving_invocation_duration_seconds (renamed in ce76741c2d, knative-v1.21.0, backported to v1.19.8 and
#   v1.20.1), labelled http_response_status_code. Namespace and revision are resource attributes, which reach
#   Prometheus only on target_info, so manifests/observability/podmonitor.yaml copies the pod's
#   serving.knative.dev/revision label into revision_name (the Prometheus Operator adds namespace itself). From
#   1.19 on these metrics are off unless config-observability sets request-metrics-protocol: prometheus, and up
#   to v1.19.8 / v1.20.1 every latency is truncated to whole seconds, so "slow" and p95 read 0 below 1 s there.
def _knative(name: str, selector: str, errors: str, unit_ms: float, bounds: tuple[float, ...]) -> dict[str, Any]:
    count, bucket = (f'{{{{__name__=~"({name})_{suffix}",{selector}' for suffix in ("count", "bucket"))
    return {
        "unit_ms": unit_ms,
        "bounds": bounds,
        "queries": {
            "requests": f"sum(increase({count}}}}}[{{window}}]))",
            "errors": f"sum(increase({count},{errors}}}}}[{{window}}]) or 0 * increase({count}}}}}[{{window}}]))",
            "slow": (
                f'sum(increase({count}}}}}[{{window}}])) - sum(increase({bucket},le=~"{{threshold}}"}}}}[{{window}}]))'
            ),
            "p95_ms": f"{unit_ms:g} * histogram_quantile(0.95, sum by (le) (rate({bucket}}}}}[{{window}}])))",
        },
    }


NONE_FOUND = "none found"  # knative_metrics: auto, and no generation's series exist
KNATIVE_QUERIES: dict[str, dict[str, Any]] = {
    "otel": _knative(
        "kn_serving_invocation_duration_seconds|kn_queueproxy_app_duration_seconds",
        'namespace="{namespace}",revision_name="{revision}"',
        'http_response_status_code=~"5.."',
        1000,
        (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10),
    ),
    "legacy": _knative(
        "revision_app_request_latencies",
        'namespace_name="{namespace}",revision_name="{revision}"',
        'response_code_class="5xx"',
        1,
        (5, 10, 20, 40, 60, 80, 100, 150, 200, 250, 300, 350, 400, 450, 500, 600, 700, 800, 900, 1000, 2000,
         5000, 10000, 20000, 50000, 100000),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class VariantCounts:
    """One variant's counts since the canary began (cumulative), and its p95 over that time."""

    requests: int
    errors: int
    slow: int  # requests slower than the threshold
    p95_ms: float | None
    # Answers per chrF bucket (CHRF_BUCKETS), from requests that brought references: zeros where none did.
    quality: tuple[int, ...] = (0,) * len(CHRF_BUCKETS)


class NoSeries(CanaryflowError):
    """A query that matched no series: nothing scrapes what it reads, or the variant serves nothing yet."""


def _json_field(body: bytes | str | None, name: str) -> str | None:
    try:
        value = json.loads(body or "").get(name)
    except (ValueError, AttributeError):
        return None
    return " ".join(str(value).split()) if value else None


def prometheus_query(url: str, timeout: float = PROMETHEUS_TIMEOUT_S) -> Callable[[str], list[tuple[dict, float]]]:
    """`query -> [(labels, value), ...]` over Prometheus' HTTP API (GET /api/v1/query): every series of a vector
    result, or one unlabelled value for a scalar."""
    endpoint = url.rstrip("/") + "/api/v1/query"

    def query(promql: str) -> list[tuple[dict, float]]:
        try:
            with urllib.request.urlopen(
                f"{endpoint}?{urllib.parse.urlencode({'query': promql})}", timeout=timeout
            ) as r:
                body = r.read()
        except urllib.error.HTTPError as exc:
            # A query Prometheus cannot parse (400) or run (422) comes back with the reason in JSON.
            detail = _json_field(exc.read(), "error") or exc.reason
            kind = BadInputError if exc.code in (400, 422) else CanaryflowError
            raise kind(f"Prometheus at {url} refused the query: {exc.code} {detail}") from None
        except (OSError, http.client.HTTPException) as exc:
            raise CanaryflowError(f"Prometheus at {url} did not answer: {getattr(exc, 'reason', exc)}") from None
        try:
            data = json.loads(body)["data"]
            kind, result = data["resultType"], data["result"]
            if kind == "scalar":
                return [({}, float(result[1]))]
            if kind == "vector":
                return [(series.get("metric") or {}, float(series["value"][1])) for series in result]
        except (ValueError, KeyError, IndexError, TypeError):
            pass
        raise CanaryflowError(f"Prometheus at {url} sent something that is not an instant vector or scalar")

    return query


def _one(series: list[tuple[dict, float]], promql: str) -> float:
    if not series:
        raise NoSeries(f"no series for {promql}")
    if len(series) > 1:
        raise BadInputError(f"the query returned {len(series)} series; a canary query must return one number")
    return series[0][1]


def kubernetes_client() -> Any:
    """An ApiClient as the pod's service account inside a cluster, else the kubeconfig's context."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as exc:
            raise CanaryflowError(
                f"no Kubernetes credentials: not running in a cluster, and no usable kubeconfig ({exc})"
            ) from None
    return client.ApiClient()


CANARY_HINTS = {
    403: "; the canary step's service account needs the Role in manifests/base/rbac.yaml",
    404: "; is KServe installed, and canary.kserve.namespace right?",
}


def _api_failure(
    exc: Exception, verb: str, what: str, missing_ok: bool = False, hints: dict[int, str] = CANARY_HINTS
) -> Exception | None:
    """The one-line error for a failed Kubernetes call (None: a 404 the caller expects); `hints` say, per HTTP
    status, what the caller's operator should check."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        if exc.status == 404 and missing_ok:
            return None
        detail = _json_field(exc.body, "message") or exc.reason or "no reason given"
        hint = hints.get(exc.status, "")
        return ApiError(exc.status, f"cannot {verb} {what}: {exc.status} {detail}{hint}")
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return CanaryflowError(f"the Kubernetes API did not answer ({verb} {what}): {first}")


class ApiError(CanaryflowError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _call(
    what: str,
    verb: str,
    method: Callable,
    *args: Any,
    missing_ok: bool = False,
    hints: dict[int, str] = CANARY_HINTS,
    **kwargs: Any,
) -> Any:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError as TransportError

    try:
        return method(*args, **kwargs)
    except (ApiException, OSError, TransportError) as exc:
        failure = _api_failure(exc, verb, what, missing_ok, hints)
        if failure is None:
            return None
        raise failure from None


def _predictor(isvc: dict) -> dict:
    return ((isvc.get("status") or {}).get("components") or {}).get("predictor") or {}


def _traffic(isvc: dict) -> dict[str, int]:
    shares: dict[str, int] = {}
    for target in _predictor(isvc).get("traffic") or []:
        revision = target.get("revisionName")
        if revision:
            shares[revision] = shares.get(revision, 0) + (target.get("percent") or 0)
    return shares


def _condition(isvc: dict, kind: str) -> dict:
    return next((c for c in (isvc.get("status") or {}).get("conditions") or [] if c.get("type") == kind), {})


def _model(isvc: dict) -> dict:
    return (isvc.get("spec", {}).get("predictor") or {}).get("model") or {}


def _served(isvc: dict) -> tuple[str | None, str | None]:
    """The storage URI the predictor's model names, and the version its server labels metrics with."""
    model = _model(isvc)
    env = model.get("env") or []
    return model.get("storageUri"), next((e.get("value") for e in env if e.get("name") == VERSION_ENV), None)


def _percent(isvc: dict) -> int | None:
    return (isvc.get("spec", {}).get("predictor") or {}).get("canaryTrafficPercent")


def _rolled_out_serves_all(isvc: dict) -> bool:
    rolled_out = _predictor(isvc).get("latestRolledoutRevision")
    return bool(rolled_out) and _traffic(isvc).get(rolled_out) == 100


def _latest_serves_all(before: str | None) -> Callable[[dict], bool]:
    """Whether a revision newer than `before` is ready, rolled out, and takes all the traffic."""

    def check(isvc: dict) -> bool:
        status = _predictor(isvc)
        latest = status.get("latestCreatedRevision")
        return (
            latest not in (None, before)
            and status.get("latestReadyRevision") == latest
            and status.get("latestRolledoutRevision") == latest
            and _traffic(isvc).get(latest) == 100
        )

    return check


def _replaced_and_ready(before: str | None) -> Callable[[dict], bool]:
    """Whether the latest revision is newer than `before`, and ready."""

    def check(isvc: dict) -> bool:
        status = _predictor(isvc)
        latest = status.get("latestCreatedRevision")
        return latest not in (None, before) and status.get("latestReadyRevision") == latest

    return check


def _now() -> str:
    # MicroTime: RFC 3339 with microseconds (k8s.io/apimachinery/pkg/apis/meta/v1/micro_time.go, RFC3339Micro).
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(value: Any) -> float | None:
    if isinstance(value, dt.datetime):
        return value.timestamp()
    try:
        return dt.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class LeaseLost(CanaryflowError):
    """Another holder took the Lease: this run no longer owns the InferenceService and must not touch it."""


class CanaryLease:
    """A coordination.k8s.io/v1 Lease that says which pipeline run steers the InferenceService now.

    Acquired by create (409 AlreadyExists when held), or by replacing an expired or own lease with the
    resourceVersion read, so that of two runs racing for an expired lease exactly one wins (the other gets 409
    Conflict). Renewed from a background thread every third of its duration; a renewal that finds the lease
    gone or taken marks it lost, and the backend checks that before every change it makes.
    """

    def __init__(
        self,
        api: Any,
        namespace: str,
        name: str,
        holder: str,
        duration_s: int,
        wait_s: float,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.api, self.namespace, self.name, self.holder = api, namespace, name, holder
        self.duration_s, self.wait_s, self._sleep = duration_s, wait_s, sleep
        self.lost: str | None = None
        self._resource_version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"Lease {self.namespace}/{self.name}"

    def _body(self, resource_version: str | None, acquired: str | None = None) -> Any:
        from kubernetes import client

        now = _now()
        return client.V1Lease(
            metadata=client.V1ObjectMeta(
                name=self.name,
                namespace=self.namespace,
                resource_version=resource_version,
                labels={"app.kubernetes.io/part-of": "canaryflow"},
            ),
            spec=client.V1LeaseSpec(
                holder_identity=self.holder,
                lease_duration_seconds=self.duration_s,
                acquire_time=acquired or now,
                renew_time=now,
            ),
        )

    def _read(self) -> Any:
        return _call(self.where, "get", self.api.read_namespaced_lease, self.name, self.namespace, missing_ok=True)

    def acquire(self) -> None:
        """Take the lease, waiting up to `wait_s` for another holder's to be released or to expire."""
        print(f"kserve: taking {self.where} for {self.holder}", file=sys.stderr, flush=True)
        waited = 0.0
        while True:
            try:
                created = _call(
                    self.where, "create", self.api.create_namespaced_lease, self.namespace, self._body(None)
                )
                self._resource_version = created.metadata.resource_version
                return
            except ApiError as exc:
                if exc.status != 409:
                    raise
            current = self._read()
            if current is not None:
                spec = current.spec
                renewed = _parse_time(spec.renew_time or spec.acquire_time)
                expired = renewed is None or renewed + (spec.lease_duration_seconds or 0) < time.time()
                if spec.holder_identity in (None, "", self.holder) or expired:
                    try:
                        replaced = _call(
                            self.where,
                            "update",
                            self.api.replace_namespaced_lease,
                            self.name,
                            self.namespace,
                            self._body(current.metadata.resource_version),
                        )
                        self._resource_version = replaced.metadata.resource_version
                        return
                    except ApiError as exc:
                        if exc.status != 409:  # 409: another run took it between our read and our write
                            raise
                elif waited >= self.wait_s:
                    raise CanaryflowError(
                        f"another canary holds the InferenceService: {self.where} is held by {spec.holder_identity} "
                        f"(renewed {spec.renew_time}); waited {self.wait_s:g} s (canary.kserve.lease_wait_s)"
                    )
            self._sleep(POLL_S)
            waited += POLL_S

    def renew(self) -> None:
        """Push renewTime forward; a lease found gone or held by another marks this one lost."""
        with self._lock:
            if self.lost:
                return
            current = self._read()
            if current is None or current.spec.holder_identity != self.holder:
                holder = "nobody" if current is None else current.spec.holder_identity
                self.lost = f"{self.where} is now held by {holder}"
                return
            body = self._body(current.metadata.resource_version, current.spec.acquire_time)
            try:
                replaced = _call(
                    self.where, "update", self.api.replace_namespaced_lease, self.name, self.namespace, body
                )
                self._resource_version = replaced.metadata.resource_version
            except ApiError as exc:
                if exc.status == 409:
                    self.lost = f"{self.where} changed under this run while renewing it"
                else:
                    print(f"kserve: could not renew {self.where}: {exc}", file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"{self.lost}: this run stopped steering the InferenceService")

    def release(self) -> None:
        """Delete the lease if this run still holds it, with its resourceVersion as a precondition."""
        from kubernetes import client

        if self.lost or self._resource_version is None:
            return
        options = client.V1DeleteOptions(preconditions=client.V1Preconditions(resource_version=self._resource_version))
        try:
            _call(self.where, "delete", self.api.delete_namespaced_lease, self.name, self.namespace, body=options)
        except CanaryflowError as exc:  # it expires by itself: a failed release delays the next run, nothing more
            print(f"kserve: could not release {self.where}: {exc}", file=sys.stderr, flush=True)

    @contextmanager
    def held(self) -> Iterator[CanaryLease]:
        self.acquire()
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join()
            self.release()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.duration_s / 3):
            try:
                self.renew()
            except CanaryflowError as exc:  # the API server is briefly away: try again at the next tick
                print(f"kserve: could not renew {self.where}: {exc}", file=sys.stderr, flush=True)


class Interrupted(CanaryflowError):
    """The step was told to stop (SIGTERM from Kubernetes, or Ctrl-C) in the middle of a canary."""


@contextmanager
def rollback_on_signals(during: str = "the canary") -> Iterator[None]:
    """Turn SIGTERM and SIGINT into an exception while a canary runs, so its cleanup (give the champion all the
    traffic back) runs before the process exits. Kubernetes sends SIGTERM, then SIGKILL after the pod's grace
    period (30 s by default), when a run is terminated or its pod evicted."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread; elsewhere nothing would deliver them
        return

    def stop(signum: int, frame: Any) -> None:
        raise Interrupted(f"stopped by {signal.Signals(signum).name} during {during}")

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class _Canary:
    champion_storage: str
    champion_revision: str
    challenger_storage: str | None = None
    challenger_revision: str | None = None
    started: float = field(default_factory=time.time)


class KServeBackend:
    """A canary on the InferenceService `canary.kserve.service` (default: `registry.model_name`) in
    `canary.kserve.namespace`, through `api` (a kubernetes CustomObjectsApi) and `prometheus` (query -> series).
    `versions` maps each storage URI to its registered version: the label its server's metrics carry.
    deploy() comes first; it records the two revisions that read(), set_weight(), promote() and rollback() use.
    With a `lease`, every change first checks that this run still holds it."""

    def __init__(
        self,
        cfg: Config,
        api: Any = None,
        prometheus: Callable[[str], list[tuple[dict, float]]] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        versions: dict[str, str] | None = None,
        lease: CanaryLease | None = None,
    ):
        kserve = cfg.canary.kserve
        self.name = kserve.service or cfg.registry.model_name
        if len(self.name) > 63 or not _ISVC_NAME.fullmatch(self.name):
            raise BadInputError(
                f"{self.name!r} cannot name an InferenceService (lowercase letters, digits and '-', starting with "
                "a letter, at most 63); set canary.kserve.service"
            )
        self.namespace = kserve.namespace
        self.settings = kserve
        self.timeout_s = cfg.canary.server_start_timeout_s
        self.env = predictor_env(cfg)
        if api is None:
            from kubernetes import client

            api = client.CustomObjectsApi(kubernetes_client())
        self._api = api
        self._prometheus = prometheus if prometheus is not None else prometheus_query(kserve.prometheus_url)
        self._sleep = sleep
        self._canary: _Canary | None = None
        self.versions = dict(versions or {})
        self.lease = lease
        self._knative: str | None = None if kserve.knative_metrics == "auto" else kserve.knative_metrics

    @property
    def where(self) -> str:
        return f"InferenceService {self.namespace}/{self.name}"

    def serve(self, storage: str) -> dict:
        """Make `storage` serve all the traffic with no canary percentage left in the spec, creating the
        InferenceService if it is missing, and never letting a revision of anything else take over meanwhile:
        a percentage left by a canary cut short goes to 0 alone first (the revision rolled out before it takes
        all), the storage follows at 0%, and only once its revision is ready is the percentage removed."""
        isvc = self._get(missing_ok=True)
        if isvc is None:
            self._check_lease()
            body = inference_service(self.name, storage, self.namespace, self.versions.get(storage), self.env)
            _call(self.where, "create", self._api.create_namespaced_custom_object, GROUP, VERSION, self.namespace,
                  PLURAL, body)  # fmt: skip
            return self._wait("the new InferenceService to serve", _latest_serves_all(None), before=None)
        differs = _served(isvc) != (storage, self.versions.get(storage, "unknown"))
        # With no percentage, 0% makes KServe fall back to the revision rolled out before the one serving (after a
        # promotion: the champion's); a storage changed in the same patch would leave all the traffic where it is
        # until the new revision is ready.
        if _percent(isvc) != 0 and (differs or _percent(isvc) is not None):
            isvc = self._patch(isvc, {"spec": {"predictor": {"canaryTrafficPercent": 0}}})
            isvc = self._wait("the rolled-out revision to take all the traffic back", _rolled_out_serves_all)
        if differs:
            before = _predictor(isvc).get("latestCreatedRevision")
            isvc = self._patch(isvc, self._storage_patch(isvc, storage, percent=0))
            isvc = self._wait(f"a revision of {storage} to be ready", _replaced_and_ready(before), before=before)
        if _percent(isvc) is not None:
            before = _predictor(isvc).get("latestRolledoutRevision")
            isvc = self._patch(isvc, {"spec": {"predictor": {"canaryTrafficPercent": None}}})
            latest = _predictor(isvc).get("latestCreatedRevision")
            if latest != before:
                return self._wait(f"{storage} to serve all the traffic", _latest_serves_all(before))
        return self._wait(f"{storage} to serve all the traffic", _rolled_out_serves_all)

    def deploy(self, champion_storage: str, challenger_storage: str) -> None:
        """Make sure the champion serves all the traffic (see serve()), check that KServe runs the service in
        Serverless mode, then start the challenger's revision at 0% and wait until it is ready. On failure the
        champion keeps all the traffic, and rollback() puts its storage back in the spec."""
        if champion_storage == challenger_storage:
            raise BadInputError(f"champion and challenger are both {champion_storage}: there is nothing to canary")
        isvc = self.serve(champion_storage)
        mode = (isvc.get("status") or {}).get("deploymentMode")
        if mode not in KNATIVE_MODES:
            raise BadInputError(
                f"{self.where} runs in {mode or 'an unreported'} deployment mode, where KServe ignores "
                f"canaryTrafficPercent; the canary needs {SERVERLESS} mode (Knative installed, and the annotation "
                f"{MODE_ANNOTATION}: {SERVERLESS})"
            )
        status = _predictor(isvc)
        self._canary = _Canary(champion_storage, status["latestRolledoutRevision"])
        # Storage and 0% in one patch: a revision of the challenger must never run under another percentage.
        isvc = self._patch(isvc, self._storage_patch(isvc, challenger_storage, percent=0))
        before = status.get("latestCreatedRevision")
        isvc = self._wait("the challenger's revision to be ready", _replaced_and_ready(before), before=before)
        self._canary.challenger_storage = challenger_storage
        self._canary.challenger_revision = _predictor(isvc)["latestReadyRevision"]
        self._canary.started = time.time()

    def set_weight(self, percent: int) -> None:
        """Send `percent` of the traffic to the challenger and the rest to the champion."""
        canary = self._require(challenger=True)
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
            raise BadInputError(f"a canary weight is a whole percentage from 0 to 100, not {percent!r}")
        self._patch(self._get(), {"spec": {"predictor": {"canaryTrafficPercent": percent}}})
        self._wait(
            f"{percent}% of the traffic to reach the challenger",
            lambda isvc: _traffic(isvc).get(canary.challenger_revision) == percent,
        )

    def promote(self) -> None:
        """Give the challenger all the traffic for good: without canaryTrafficPercent the latest revision serves."""
        canary = self._require(challenger=True)
        self._patch(self._get(), {"spec": {"predictor": {"canaryTrafficPercent": None}}})
        self._wait(
            "the challenger to be rolled out",
            lambda isvc: (
                _predictor(isvc).get("latestRolledoutRevision") == canary.challenger_revision
                and _traffic(isvc).get(canary.challenger_revision) == 100
            ),
        )

    def rollback(self) -> None:
        """Give the champion all the traffic back, then roll its storage out again, leaving no percentage behind.

        0% goes alone first: once the challenger has served 100% (the last step, or after promote) KServe counts
        it as rolled out, and only an unchanged spec at 0% makes KServe fall back to the revision before it; a
        new storage in the same patch would start a revision and leave the challenger with the rest of the
        traffic. The percentage is removed last, once the champion's new revision is ready, so that a later
        edit of the spec is not started at 0%.
        """
        canary = self._require()
        self.serve(canary.champion_storage)

    # --- reading the SLIs ---

    def baseline_p95_ms(self, champion_storage: str) -> float | None:
        """The champion's p95 over `canary.kserve.baseline_s` before the canary: what "slow" is measured against
        for the whole canary (one threshold, so that counts read at different looks add up)."""
        values = self._values(self.versions.get(champion_storage, "unknown"), None, self.settings.baseline_s, 0.0)
        try:
            p95 = _one(self._query("p95_ms", self.settings.queries["p95_ms"], values), "p95_ms")
        except NoSeries:
            return None
        return p95 if math.isfinite(p95) and p95 > 0 else None

    def since_start(self) -> float:
        """Seconds since the challenger's revision became ready: the canary's counts start there."""
        return time.time() - self._require(challenger=True).started

    def read(self, threshold_ms: float) -> dict[str, VariantCounts]:
        """Each variant's requests, errors, requests slower than `threshold_ms` (rounded up to a bucket bound of
        the histogram read) and answers per chrF bucket, counted since the canary began, and its p95 over that
        time. The window is never shorter than four scrape intervals, so that it holds at least two samples of
        every series even when a scrape is missed. A query that finds no series raises NoSeries."""
        canary = self._require(challenger=True)
        seconds = max(self.since_start(), 4 * self.settings.scrape_interval_s)
        out = {}
        for variant, storage, revision in (
            (CHAMPION, canary.champion_storage, canary.champion_revision),
            (CHALLENGER, canary.challenger_storage, canary.challenger_revision),
        ):
            version = self.versions.get(storage, "unknown")
            own = self._counts(variant, self.settings.queries, self._values(version, revision, seconds, threshold_ms))
            queue = self.queue_proxy(variant, revision, seconds, threshold_ms)
            if queue is not None:
                # The queue-proxy sees every request the server sees, and also those that never reached it.
                own = VariantCounts(
                    max(own.requests, queue.requests),
                    max(own.errors, queue.errors),
                    max(own.slow, queue.slow),
                    own.p95_ms if own.p95_ms is not None else queue.p95_ms,
                    own.quality,
                )
            out[variant] = own
        return out

    def _values(
        self,
        version: str,
        revision: str | None,
        seconds: float,
        threshold_ms: float,
        bounds: tuple[float, ...] = LATENCY_BUCKETS,
        unit_ms: float = 1000,
    ) -> dict:
        """What a query template is filled in with; `bounds` in units of `unit_ms` are the latency histogram's."""
        return {
            "namespace": self.namespace,
            "service": self.name,
            "version": version,
            "revision": revision or "",
            "window": f"{max(1, math.ceil(seconds))}s",
            "threshold": _le(bucket_bound(threshold_ms / unit_ms, bounds)),
        }

    def queue_proxy(self, variant: str, revision: str, seconds: float, threshold_ms: float) -> VariantCounts | None:
        """Knative's counts for the variant's revision, by the configured generation; on `auto`, the first
        generation whose series exist, remembered once found. None: off, or nothing found on `auto`, which is
        remembered too: the first look comes four scrapes into the canary, when a scraped queue-proxy has series."""
        if self.settings.knative_metrics == "off" or self._knative == NONE_FOUND:
            return None
        for generation in [self._knative] if self._knative else list(KNATIVE_QUERIES):
            spec = KNATIVE_QUERIES[generation]
            values = self._values("", revision, seconds, threshold_ms, spec["bounds"], spec["unit_ms"])
            try:
                counts = self._counts(variant, spec["queries"], values, f"Knative {generation}")
            except NoSeries:
                if self._knative:
                    raise
                continue
            self._knative = generation
            return counts
        self._knative = NONE_FOUND
        return None

    def _query(self, name: str, template: str, values: dict) -> list[tuple[dict, float]]:
        return self._prometheus(template.format(**values))

    def _counts(self, variant: str, queries: dict[str, str], values: dict, source: str = "") -> VariantCounts:
        found: dict[str, Any] = {}
        for name in ("requests", "errors", "slow", "p95_ms", "quality"):
            if name not in queries:
                continue
            label = f"{source + ' ' if source else 'canary.kserve.queries.'}{name} ({variant})"
            try:
                series = self._query(name, queries[name], values)
                found[name] = series if name == "quality" else _one(series, "")
            except NoSeries:
                raise NoSeries(f"{label}: no series for {queries[name].format(**values)}") from None
            except CanaryflowError as exc:
                raise type(exc)(f"{label}: {exc}") from None
        # increase() extrapolates each series on its own: counts come back fractional, a part may top its whole.
        requests = _count(found["requests"])
        p95 = found["p95_ms"]
        has_p95 = requests > 0 and not math.isnan(p95) and p95 > 0
        return VariantCounts(
            requests,
            min(requests, _count(found["errors"])),
            min(requests, _count(found["slow"])),
            p95 if has_p95 else None,
            _per_bucket(found.get("quality") or []),
        )

    # --- the API calls ---

    def _require(self, challenger: bool = False) -> _Canary:
        if self._canary is None or (challenger and self._canary.challenger_revision is None):
            raise CanaryflowError(f"{self.where}: no challenger revision is running; deploy() first")
        return self._canary

    def _check_lease(self) -> None:
        if self.lease is not None:
            self.lease.check()

    def _storage_patch(self, isvc: dict, storage: str, percent: int | None) -> dict:
        """A merge patch that points the predictor's model at `storage`, labels it with its version and sets
        canaryTrafficPercent (None drops it), with the config's serving section beside it: the revision a
        version rolls out is served as this run's config says. A merge patch replaces a list whole, so the env goes
        back complete, with only what the canary step owns replaced."""
        model = _model(isvc)
        if not model:
            raise CanaryflowError(
                f"{self.where} has no predictor.model (an older canaryflow manifest gave predictor.containers): "
                f"apply manifests/ again, whose InferenceService names the {RUNTIME} runtime"
            )
        owned = {VERSION_ENV, *(e["name"] for e in self.env)}
        # A valueFrom must not survive beside the value: each owned entry is replaced whole.
        env = [e for e in copy.deepcopy(model.get("env") or []) if e.get("name") not in owned]
        env += [{"name": VERSION_ENV, "value": self.versions.get(storage, "unknown")}, *copy.deepcopy(self.env)]
        return {"spec": {"predictor": {"canaryTrafficPercent": percent, "model": {"storageUri": storage, "env": env}}}}

    def _patch(self, isvc: dict, body: dict, retries: int = 5) -> dict:
        """Apply a merge patch computed from `isvc`, with its resourceVersion as a precondition (the API server
        answers 409 Conflict when the object changed since). KServe's own status updates change the
        resourceVersion too but not metadata.generation, which counts spec changes only (the CRD has a status
        subresource): on a conflict with the same generation the patch is re-sent against the fresh object,
        while a changed generation means someone else edited the spec, and the canary stops."""
        for _ in range(retries):
            self._check_lease()
            metadata = isvc.get("metadata") or {}
            sent = {**body, "metadata": {"resourceVersion": metadata.get("resourceVersion")}}
            try:
                return _call(self.where, "patch", self._api.patch_namespaced_custom_object, GROUP, VERSION,
                             self.namespace, PLURAL, self.name, sent)  # fmt: skip
            except ApiError as exc:
                if exc.status != 409:
                    raise
            fresh = self._get()
            if (fresh.get("metadata") or {}).get("generation") != metadata.get("generation"):
                raise CanaryflowError(
                    f"{self.where} was changed by someone else during the canary (generation "
                    f"{metadata.get('generation')} became {fresh['metadata'].get('generation')}); stopping"
                )
            isvc = fresh
        raise CanaryflowError(f"{self.where} kept changing under {retries} patches in a row (409 Conflict)")

    def _wait(self, what: str, done: Callable[[dict], bool], before: str | None | bool = False) -> dict:
        """Poll until `done` holds on a status that KServe computed for the spec as it is now
        (status.observedGeneration). With `before` (the latest revision before the spec changed) fail as soon as
        the revision that replaced it is reported failed, rather than at the timeout."""
        print(f"kserve: waiting for {what} ({self.where})", file=sys.stderr, flush=True)
        started, waited = time.monotonic(), 0.0
        while True:
            isvc = self._get()
            generation = (isvc.get("metadata") or {}).get("generation")
            observed = (isvc.get("status") or {}).get("observedGeneration")
            if (generation is None or observed == generation) and done(isvc):
                return isvc
            latest = _predictor(isvc).get("latestCreatedRevision")
            configured = _condition(isvc, "PredictorConfigurationReady")
            if before is not False and latest not in (None, before) and configured.get("status") == "False":
                reason = configured.get("message") or configured.get("reason") or "no reason given"
                raise CanaryflowError(f"{self.where}: revision {latest} failed: {reason}")
            # Counting the sleeps as well as the clock keeps the bound when `sleep` is not a real one.
            if max(waited, time.monotonic() - started) >= self.timeout_s:
                ready = _condition(isvc, "Ready")
                state = f"; Ready: {ready.get('status')} {ready.get('message') or ''}".rstrip() if ready else ""
                raise CanaryflowError(
                    f"{self.where}: {what} took over {self.timeout_s:g} s (canary.server_start_timeout_s){state}"
                )
            self._sleep(POLL_S)
            waited += POLL_S

    def _get(self, missing_ok: bool = False) -> dict | None:
        return _call(self.where, "get", self._api.get_namespaced_custom_object, GROUP, VERSION, self.namespace,
                     PLURAL, self.name, missing_ok=missing_ok)  # fmt: skip


def _count(value: float) -> int:
    return max(0, round(value)) if math.isfinite(value) else 0


def _per_bucket(series: list[tuple[dict, float]]) -> tuple[int, ...]:
    """Answers per chrF bucket from cumulative `le` counts (sum by (le) of the histogram's _bucket series)."""
    cumulative = {}
    for labels, value in series:
        bound = labels.get("le")
        if bound not in (None, "+Inf"):
            cumulative[float(bound)] = _count(value)
    counts, below = [], 0
    for bound in CHRF_BUCKETS:
        at = max(below, cumulative.get(float(bound), below))
        counts.append(at - below)
        below = at
    return tuple(counts)
