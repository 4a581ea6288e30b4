"""The KServe canary backend: one InferenceService per registered model, its predictor's
canaryTrafficPercent as the challenger's weight, Knative's per-revision metrics in Prometheus as evidence.

KServe sends canaryTrafficPercent to the predictor's latest revision and the rest to the last revision that
served 100% (status.components.predictor.latestRolledoutRevision). So a canary points the predictor at the
challenger with 0% in one patch, raises the percentage, then removes it (promote: the latest revision takes
all) or returns to 0% with the champion's storage (rollback). Every change is a JSON merge patch (RFC 7386).

The predictor is canaryflow's own server in a custom container. KServe's storage initializer downloads the
kserve-container's STORAGE_URI (how a custom predictor names its model) into /mnt/models before the server
starts, so a revision is pinned to one model's files and the server needs no access to MLflow.
"""

from __future__ import annotations

import bisect
import copy
import http.client
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from canaryflow.config import Config
from canaryflow.errors import BadInputError, CanaryflowError
from canaryflow.images import BASE_IMAGE

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
CONTAINER = "kserve-container"  # the one container KServe gives the downloaded model
STORAGE_ENV = "STORAGE_URI"
# The registered version the storage holds, for the server's model_version label: /mnt/models does not say.
VERSION_ENV = "CANARYFLOW_MODEL_VERSION"
MODEL_DIR = "/mnt/models"
PORT = 8080
POLL_S = 2.0
PROMETHEUS_TIMEOUT_S = 10.0
# Bucket bounds (ms) of the latency histogram Knative's queue-proxy exports per revision.
KNATIVE_LATENCY_BOUNDS_MS = (
    5, 10, 20, 40, 60, 80, 100, 150, 200, 250, 300, 350, 400, 450, 500, 600, 700, 800, 900, 1000,
    2000, 5000, 10000, 20000, 50000, 100000,
)  # fmt: skip
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


def inference_service(name: str, storage: str, namespace: str | None = None, version: str | None = None) -> dict:
    """The InferenceService that serves `storage`: manifests/base/inferenceservice.yaml in Python (a test
    holds the two equal), for the canary step to create when the manifests were never applied."""
    metadata: dict[str, Any] = {
        "name": name,
        "labels": {"app.kubernetes.io/part-of": "canaryflow"},
        "annotations": {"serving.kserve.io/enable-prometheus-scraping": "true"},
    }
    if namespace:
        metadata["namespace"] = namespace
    container = {
        "name": CONTAINER,
        "image": BASE_IMAGE,
        "command": ["canaryflow", "serve"],
        "args": ["--model-uri", MODEL_DIR, "--host", "0.0.0.0", "--port", str(PORT)],
        "env": [{"name": STORAGE_ENV, "value": storage}, {"name": VERSION_ENV, "value": version or "unknown"}],
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": PORT}, "initialDelaySeconds": 5},
        "resources": {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"cpu": "2", "memory": "4Gi"}},
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {"predictor": {"minReplicas": 1, "maxReplicas": 3, "containers": [container]}},
    }


def latency_bucket(threshold_ms: float) -> int:
    """The smallest bound of Knative's latency histogram at or above `threshold_ms`: the histogram counts
    requests only per bucket. Past the last finite bound, that bound (+Inf would count nothing as slow, and
    a p95 over 100 s is an outage either way)."""
    index = bisect.bisect_left(KNATIVE_LATENCY_BOUNDS_MS, threshold_ms)
    return KNATIVE_LATENCY_BOUNDS_MS[min(index, len(KNATIVE_LATENCY_BOUNDS_MS) - 1)]


@dataclass(frozen=True)
class VariantCounts:
    requests: int
    errors: int
    slow: int  # requests slower than threshold_ms
    p95_ms: float | None


def prometheus_query(url: str, timeout: float = PROMETHEUS_TIMEOUT_S) -> Callable[[str], float]:
    """`query -> number` over Prometheus' HTTP API (GET /api/v1/query): the one value of a vector or scalar
    result; an empty vector is 0.0 (nothing was recorded in the window)."""
    endpoint = url.rstrip("/") + "/api/v1/query"

    def query(promql: str) -> float:
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
        return _one_value(body, url)

    return query


def _one_value(body: bytes, url: str) -> float:
    try:
        data = json.loads(body)["data"]
        kind, result = data["resultType"], data["result"]
        if kind == "scalar":
            return float(result[1])
        if kind == "vector" and len(result) <= 1:
            return float(result[0]["value"][1]) if result else 0.0
    except (ValueError, KeyError, IndexError, TypeError):
        raise CanaryflowError(f"Prometheus at {url} sent something that is not a query result") from None
    found = f"{len(result)} series" if kind == "vector" else f"a {kind}"
    raise BadInputError(f"the query returned {found}; a canary query must return one number (aggregate it)")


def _json_field(body: bytes | str | None, field: str) -> str | None:
    try:
        value = json.loads(body or "").get(field)
    except (ValueError, AttributeError):
        return None
    return " ".join(str(value).split()) if value else None


def kubernetes_api() -> Any:
    """A CustomObjectsApi as the pod's service account inside a cluster, else the kubeconfig's context."""
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
    return client.CustomObjectsApi()


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


def _container(isvc: dict) -> dict | None:
    containers = isvc.get("spec", {}).get("predictor", {}).get("containers") or []
    return next((c for c in containers if c.get("name") == CONTAINER), None)


def _storage(isvc: dict) -> str | None:
    env = (_container(isvc) or {}).get("env") or []
    return next((e.get("value") for e in env if e.get("name") == STORAGE_ENV), None)


def _replaced_and_ready(before: str | None) -> Callable[[dict], bool]:
    """Whether the latest revision is newer than `before`, and ready."""

    def check(isvc: dict) -> bool:
        status = _predictor(isvc)
        latest = status.get("latestCreatedRevision")
        return latest not in (None, before) and status.get("latestReadyRevision") == latest

    return check


def _count(value: float) -> int:
    return max(0, round(value)) if math.isfinite(value) else 0


@dataclass
class _Canary:
    champion_storage: str
    champion_revision: str
    challenger_revision: str | None = None


class KServeBackend:
    """A canary on the InferenceService `canary.kserve.service` (default: `registry.model_name`) in
    `canary.kserve.namespace`, through `api` (a kubernetes CustomObjectsApi) and `prometheus` (query -> number).
    deploy() comes first; it records the two revisions that read(), set_weight(), promote() and rollback() use."""

    def __init__(
        self,
        cfg: Config,
        api: Any = None,
        prometheus: Callable[[str], float] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        kserve = cfg.canary.kserve
        self.name = kserve.service or cfg.registry.model_name
        if len(self.name) > 63 or not _ISVC_NAME.fullmatch(self.name):
            raise BadInputError(
                f"{self.name!r} cannot name an InferenceService (lowercase letters, digits and '-', starting with "
                "a letter, at most 63); set canary.kserve.service"
            )
        self.namespace = kserve.namespace
        self.queries = kserve.queries
        self.timeout_s = cfg.canary.server_start_timeout_s
        self._api = api if api is not None else kubernetes_api()
        self._prometheus = prometheus if prometheus is not None else prometheus_query(kserve.prometheus_url)
        self._sleep = sleep
        self._canary: _Canary | None = None
        self.versions: dict[str, str] = {}  # storage URI -> registered version, for the servers' metric labels

    @property
    def where(self) -> str:
        return f"InferenceService {self.namespace}/{self.name}"

    def deploy(self, champion_storage: str, challenger_storage: str) -> None:
        """Make sure the champion serves all the traffic (creating the InferenceService if missing), then start
        the challenger's revision at 0% and wait until it is ready. On failure the champion keeps all the
        traffic, and rollback() puts its storage back in the spec."""
        if champion_storage == challenger_storage:
            raise BadInputError(f"champion and challenger are both {champion_storage}: there is nothing to canary")
        isvc = self._get(missing_ok=True)
        if isvc is None:
            self._call(
                "create",
                "create_namespaced_custom_object",
                inference_service(self.name, champion_storage, self.namespace, self.versions.get(champion_storage)),
            )
            isvc = self._wait_rolled_out(before=None)
        elif _storage(isvc) != champion_storage:
            # Something else serves (a canary cut short, a hand edit): roll the champion out in full first, or
            # the challenger would be judged against, and fall back to, the wrong model.
            before = _predictor(isvc).get("latestCreatedRevision")
            self._patch(self._storage_patch(isvc, champion_storage, percent=None))
            isvc = self._wait_rolled_out(before)
        else:
            isvc = self._wait("the champion to serve all the traffic", self._champion_serves_all)
        status = _predictor(isvc)
        self._canary = _Canary(champion_storage, status["latestRolledoutRevision"])
        # Storage and 0% in one patch: a revision of the challenger must never run under another percentage.
        self._patch(self._storage_patch(isvc, challenger_storage, percent=0))
        before = status.get("latestCreatedRevision")
        isvc = self._wait("the challenger's revision to be ready", _replaced_and_ready(before), True, before)
        self._canary.challenger_revision = _predictor(isvc)["latestReadyRevision"]

    def set_weight(self, percent: int) -> None:
        """Send `percent` of the traffic to the challenger and the rest to the champion."""
        canary = self._require(challenger=True)
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
            raise BadInputError(f"a canary weight is a whole percentage from 0 to 100, not {percent!r}")
        self._patch({"spec": {"predictor": {"canaryTrafficPercent": percent}}})
        self._wait(
            f"{percent}% of the traffic to reach the challenger",
            lambda isvc: _traffic(isvc).get(canary.challenger_revision) == percent,
        )

    def read(self, window_s: float, threshold_ms: float) -> dict[str, VariantCounts]:
        """Each variant's requests, errors, requests slower than `threshold_ms` (rounded up to a bucket bound of
        Knative's latency histogram) and p95 latency over the last `window_s` seconds, by its revision."""
        canary = self._require(challenger=True)
        values = {
            "namespace": self.namespace,
            "window": f"{max(1, math.ceil(window_s))}s",
            "threshold_ms": latency_bucket(threshold_ms),
        }
        revisions = {CHAMPION: canary.champion_revision, CHALLENGER: canary.challenger_revision}
        return {variant: self._counts(variant, revision, values) for variant, revision in revisions.items()}

    def promote(self) -> None:
        """Give the challenger all the traffic for good: without canaryTrafficPercent the latest revision serves."""
        canary = self._require(challenger=True)
        self._patch({"spec": {"predictor": {"canaryTrafficPercent": None}}})
        self._wait(
            "the challenger to be rolled out",
            lambda isvc: (
                _predictor(isvc).get("latestRolledoutRevision") == canary.challenger_revision
                and _traffic(isvc).get(canary.challenger_revision) == 100
            ),
        )

    def rollback(self) -> None:
        """Give the champion all the traffic back, then its storage back to the predictor, at 0%.

        0% goes alone first: once the challenger has served 100% (the last step, or after promote) KServe counts
        it as rolled out, and only an unchanged spec at 0% makes KServe fall back to the revision before it; a
        new storage in the same patch would start a revision and leave the challenger with the rest of the
        traffic. The storage follows so that the spec names the champion again, and no later change of the
        spec rolls the challenger back out.
        """
        canary = self._require()
        self._patch({"spec": {"predictor": {"canaryTrafficPercent": 0}}})
        isvc = self._wait(
            "the champion to take all the traffic back",
            lambda isvc: _traffic(isvc).get(canary.champion_revision) == 100,
        )
        self._patch(self._storage_patch(isvc, canary.champion_storage, percent=0))

    def _counts(self, variant: str, revision: str, values: dict) -> VariantCounts:
        found = {}
        for name in ("requests", "errors", "slow", "p95_ms"):
            try:
                found[name] = self._prometheus(self.queries[name].format(revision=revision, **values))
            except CanaryflowError as exc:
                raise type(exc)(f"canary.kserve.queries.{name} ({variant}, revision {revision}): {exc}") from None
        # increase() extrapolates each series on its own: counts come back fractional, a part may top its whole.
        requests = _count(found["requests"])
        p95 = found["p95_ms"]
        # An empty answer reads 0.0, and no quantile of real latencies is 0: both mean there was no data.
        has_p95 = requests > 0 and not math.isnan(p95) and p95 > 0
        return VariantCounts(
            requests,
            min(requests, _count(found["errors"])),
            min(requests, _count(found["slow"])),
            p95 if has_p95 else None,
        )

    def _require(self, challenger: bool = False) -> _Canary:
        if self._canary is None or (challenger and self._canary.challenger_revision is None):
            raise CanaryflowError(f"{self.where}: no challenger revision is running; deploy() first")
        return self._canary

    def _champion_serves_all(self, isvc: dict) -> bool:
        rolled_out = _predictor(isvc).get("latestRolledoutRevision")
        return bool(rolled_out) and _traffic(isvc).get(rolled_out) == 100

    def _wait_rolled_out(self, before: str | None) -> dict:
        ready = _replaced_and_ready(before)

        def serves_all(isvc: dict) -> bool:
            rolled_out = _predictor(isvc).get("latestRolledoutRevision")
            return (
                ready(isvc)
                and rolled_out == _predictor(isvc)["latestCreatedRevision"]
                and self._champion_serves_all(isvc)
            )

        return self._wait("the champion's new revision to serve all the traffic", serves_all, True, before)

    def _storage_patch(self, isvc: dict, storage: str, percent: int | None) -> dict:
        """A merge patch that points the kserve-container at `storage` and sets canaryTrafficPercent (None drops
        it). A merge patch replaces a list whole, so the containers go back complete with only STORAGE_URI changed."""
        containers = copy.deepcopy(isvc["spec"]["predictor"].get("containers") or [])
        container = next((c for c in containers if c.get("name") == CONTAINER), None)
        if container is None:
            raise CanaryflowError(
                f"{self.where} has no container named {CONTAINER}; the KServe backend serves canaryflow's own "
                "container (manifests/base/inferenceservice.yaml)"
            )
        env = container.setdefault("env", [])
        for name, value in ((STORAGE_ENV, storage), (VERSION_ENV, self.versions.get(storage, "unknown"))):
            entry = next((e for e in env if e.get("name") == name), None)
            if entry is None:
                env.append({"name": name, "value": value})
            else:
                entry.clear()  # a valueFrom must not survive beside the value
                entry.update(name=name, value=value)
        return {"spec": {"predictor": {"canaryTrafficPercent": percent, "containers": containers}}}

    def _wait(
        self, what: str, done: Callable[[dict], bool], new_since: bool = False, before: str | None = None
    ) -> dict:
        """Poll until `done`. With `new_since`, the spec just changed and `before` was the latest revision then:
        fail as soon as the revision that replaced it is reported failed, rather than at the timeout."""
        print(f"kserve: waiting for {what} ({self.where})", file=sys.stderr, flush=True)
        started, waited = time.monotonic(), 0.0
        while True:
            isvc = self._get()
            if done(isvc):
                return isvc
            latest = _predictor(isvc).get("latestCreatedRevision")
            configured = _condition(isvc, "PredictorConfigurationReady")
            if new_since and latest not in (None, before) and configured.get("status") == "False":
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
        return self._call("get", "get_namespaced_custom_object", self.name, missing_ok=missing_ok)

    def _patch(self, body: dict) -> None:
        self._call("patch", "patch_namespaced_custom_object", self.name, body)

    def _call(self, verb: str, method: str, *args: Any, missing_ok: bool = False) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError as TransportError

        try:
            return getattr(self._api, method)(GROUP, VERSION, self.namespace, PLURAL, *args)
        except ApiException as exc:
            if exc.status == 404 and missing_ok:
                return None
            detail = _json_field(exc.body, "message") or exc.reason or "no reason given"
            hint = {
                403: "; the canary step's service account needs the Role in manifests/base/rbac.yaml",
                404: "; is KServe installed, and canary.kserve.namespace right?",
            }.get(exc.status, "")
            raise CanaryflowError(f"cannot {verb} {self.where}: {exc.status} {detail}{hint}") from None
        except (OSError, TransportError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CanaryflowError(f"the Kubernetes API did not answer ({verb} {self.where}): {first}") from None
