"""The local canary backend: two real model servers on loopback behind a weighted router.

Each model server is its own process (`canaryflow.serving.server`), as a KServe predictor would be. The
router runs in-process, forwards each /predict to one variant chosen by weight, and tags the answer
with `X-Canary-Variant` and `X-Request-Id`. Its weights change at run time; in mirror mode every request
goes to one variant and a copy to another (a shadow step), whose answer the controller claims by request id.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

from canaryflow.config import ServingConfig
from canaryflow.errors import BadInputError, CanaryflowError
from canaryflow.serving.faults import parse_fault
from canaryflow.serving.http import (
    LATENCY_BUCKETS,
    ConnectionPool,
    RequestError,
    ServiceHandler,
    parse_json_object,
    serve_in_thread,
)
from canaryflow.warm import popen, wait_or_kill


def post_json(url: str, body: bytes, timeout: float) -> tuple[int, bytes, Message]:
    """POST and return (status, body, headers); an HTTP error status is a result, not an exception. The headers
    are looked up case-insensitively, as HTTP has them: an ASGI server sends their names in lower case."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


class ModelServerProcess:
    def __init__(
        self,
        model_uri: str,
        variant: str,
        model_version: str,
        num_threads: int,
        log_dir: Path,
        env: dict[str, str],
        fault: str = "none",
        serving: ServingConfig | None = None,
    ):
        parse_fault(fault)  # a bad spec is the caller's mistake: say so here, not as a server that died starting
        self.variant = variant
        self._port_file = Path(tempfile.mkdtemp(prefix=f"canaryflow-{variant}-")) / "port"
        self.log_path = log_dir / f"server-{variant}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        # Forked from `canaryflow run`'s warm process when the canary runs in one of its steps: the imports are done.
        self.process = popen(
            "canaryflow.serving.server",
            [
                "--model-uri",
                model_uri,
                "--variant",
                variant,
                "--model-version",
                model_version,
                "--num-threads",
                str(num_threads),
                "--port-file",
                str(self._port_file),
                "--fault",
                fault,
                "--serving-config",
                (serving or ServingConfig()).model_dump_json(),
            ],
            self._log,
            {**os.environ, "TOKENIZERS_PARALLELISM": "false", **env},
        )
        self.url: str | None = None
        self._terminated = False

    def wait_ready(self, deadline: float) -> str:
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise CanaryflowError(f"{self.variant} model server exited during start-up: {tail[0]}")
            if self._port_file.is_file():
                self.url = f"http://127.0.0.1:{self._port_file.read_text().strip()}"
                return self.url
            time.sleep(0.2)
        raise CanaryflowError(f"{self.variant} model server did not come up in time (log: {self.log_path})")

    def terminate(self) -> None:
        """Ask it to drain and exit, once: uvicorn takes a second SIGTERM as "exit now, drop what is in flight"."""
        if not self._terminated and self.process.poll() is None:
            self.process.terminate()
        self._terminated = True

    def stop(self) -> None:
        self.terminate()
        wait_or_kill(self.process)
        self._log.close()


@dataclass(frozen=True)
class MirrorResult:
    """The shadow's answer to a mirrored request; status 502 when the shadow could not be reached."""

    status: int
    latency_ms: float
    body: bytes


class Router:
    """Weighted router over named backends; weights are percentages and change at run time.

    Limits, so that no client can take the process down: bodies over the server's limit get 413, bodies that
    are not a JSON object 400 (the original bytes are what is forwarded), and requests beyond `max_in_flight`
    503 at once. Mirror results wait to be claimed, at most `mirror_cap` of them; the oldest go first.
    """

    # Seconds a client connection may sit silent before its thread is freed: an idle or stuck client must not
    # hold a thread for ever.
    CLIENT_IDLE_TIMEOUT_S = 60

    def __init__(
        self,
        backends: dict[str, str],
        timeout: float,
        seed: int = 0,
        *,
        versions: dict[str, str] | None = None,
        max_in_flight: int = 64,
        mirror_cap: int = 1024,
    ):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        if max_in_flight < 1 or mirror_cap < 1:
            raise ValueError(f"max_in_flight and mirror_cap must be >= 1: {max_in_flight}, {mirror_cap}")
        self.backends = dict(backends)
        # Every per-variant series also carries the model version, so a dashboard can follow one version
        # from canary to champion, whichever variant name it held.
        self.versions = {name: (versions or {}).get(name, "unknown") for name in backends}
        self.weights = {name: 0 for name in backends}
        self.mirror: tuple[str, str] | None = None
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.mirror_cap = mirror_cap
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._pools = {name: ConnectionPool(url, timeout, max_idle=max_in_flight) for name, url in backends.items()}
        self._slots = threading.BoundedSemaphore(max_in_flight)
        # Shadow copies have their own bound: a slow shadow drops copies rather than queueing without end.
        self._shadow_slots = threading.BoundedSemaphore(max_in_flight)
        self._shadows = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="router-shadow")
        self._mirror_done = threading.Condition()
        self._mirror_results: OrderedDict[str, MirrorResult] = OrderedDict()
        self._mirror_pending: set[str] = set()

        self.registry = CollectorRegistry()
        self._requests = Counter(
            "canaryflow_router_requests",
            "Requests routed, by variant and status.",
            ("variant", "model_version", "code"),
            registry=self.registry,
        )
        self._latency = Histogram(
            "canaryflow_router_latency_seconds",
            "Upstream answer time of routed requests, as the router saw it.",
            ("variant", "model_version"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._mirrored = Counter(
            "canaryflow_router_mirrored_requests",
            "Copies sent to the shadow in mirror mode, by variant and status; code 'dropped' when the shadow "
            "was too far behind to take one.",
            ("variant", "model_version", "code"),
            registry=self.registry,
        )
        self._mirror_latency = Histogram(
            "canaryflow_router_mirror_latency_seconds",
            "Answer time of the shadow's copies.",
            ("variant", "model_version"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._in_flight = Gauge("canaryflow_router_in_flight", "Requests being answered now.", registry=self.registry)
        self._rejected = Counter(
            "canaryflow_router_rejected_requests",
            "Requests refused before routing, by reason: too_large (413), malformed (400), overloaded (503).",
            ("reason",),
            registry=self.registry,
        )
        for reason in ("too_large", "malformed", "overloaded"):
            self._rejected.labels(reason)
        self._weight = Gauge(
            "canaryflow_router_weight_percent",
            "Traffic weight per variant.",
            ("variant", "model_version"),
            registry=self.registry,
        )
        self._state = Gauge(
            "canaryflow_canary_state",
            "1 for the canary's current state (shadow, canary, promoted, rolled_back, inconclusive), per challenger "
            "version.",
            ("model_version", "state"),
            registry=self.registry,
        )
        self.server = serve_in_thread(self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def set_weights(self, weights: dict[str, int]) -> None:
        unknown = set(weights) - set(self.backends)
        if unknown or sum(weights.values()) != 100 or any(w < 0 for w in weights.values()):
            raise ValueError(f"weights must be >= 0 over {sorted(self.backends)} and sum to 100: {weights}")
        with self._lock:
            self.weights = {name: weights.get(name, 0) for name in self.backends}
        for name, weight in self.weights.items():
            self._weight.labels(name, self.versions[name]).set(weight)

    def set_mirror(self, primary: str | None, shadow: str | None) -> None:
        """Send every request to `primary`, whose answer the client gets, and a copy to `shadow` in the
        background; `set_mirror(None, None)` goes back to the weights."""
        if (primary is None) != (shadow is None):
            raise ValueError("set_mirror takes both a primary and a shadow, or neither")
        if primary is not None and (primary == shadow or {primary, shadow} - set(self.backends)):
            raise ValueError(f"mirror needs two different variants of {sorted(self.backends)}: {primary}, {shadow}")
        with self._lock:
            self.mirror = (primary, shadow) if primary is not None else None

    CANARY_STATES = ("shadow", "canary", "promoted", "rolled_back", "inconclusive")

    def set_canary_state(self, state: str, model_version: str) -> None:
        """Mark the canary of `model_version` as in `state` (and in no other), for the on-call dashboard."""
        if state not in self.CANARY_STATES:
            raise ValueError(f"canary state must be one of {self.CANARY_STATES}: {state!r}")
        for name in self.CANARY_STATES:
            self._state.labels(model_version, name).set(1 if name == state else 0)

    def pick(self) -> str:
        with self._lock:
            roll = self._rng.uniform(0, 100)
            total = 0.0
            for name, weight in self.weights.items():
                total += weight
                if weight and roll < total:
                    return name
            return next(name for name, weight in self.weights.items() if weight)

    def mirrored(self, request_id: str, timeout: float) -> MirrorResult | None:
        """The shadow's answer to the request the router tagged `request_id`, claimed once; None when there was
        no copy (not mirrored, dropped, or claimed already), it was evicted unclaimed, or it is not back in time."""
        deadline = time.monotonic() + timeout
        with self._mirror_done:
            while request_id not in self._mirror_results:
                remaining = deadline - time.monotonic()
                if request_id not in self._mirror_pending or remaining <= 0:
                    return None
                self._mirror_done.wait(remaining)
            return self._mirror_results.pop(request_id)

    def _forward(self, variant: str, body: bytes, request_id: str) -> tuple[int, bytes, str, float]:
        """POST to a variant; (status, body, content type, seconds). An unreachable backend is a 502."""
        started = time.perf_counter()
        try:
            status, payload, headers = self._pools[variant].request(
                "POST", "/predict", body, {"X-Request-Id": request_id}
            )
            kind = headers.get("Content-Type", "application/json")
        except (OSError, http.client.HTTPException) as exc:  # down, timed out, or broke off mid-answer
            status, kind = 502, "application/json"
            payload = json.dumps({"error": f"upstream {variant}: {exc}"}).encode()
        return status, payload, kind, time.perf_counter() - started

    def _shadow(self, variant: str, body: bytes, request_id: str) -> None:
        result = None
        try:
            status, payload, _, seconds = self._forward(variant, body, request_id)
            self._mirrored.labels(variant, self.versions[variant], str(status)).inc()
            self._mirror_latency.labels(variant, self.versions[variant]).observe(seconds)
            result = MirrorResult(status, round(seconds * 1000, 3), payload)
        finally:
            self._shadow_slots.release()
            self._settle(request_id, result)  # even on a surprise, so mirrored() never waits on a lost copy

    def _settle(self, request_id: str, result: MirrorResult | None) -> None:
        with self._mirror_done:
            self._mirror_pending.discard(request_id)
            if result is not None:
                self._mirror_results[request_id] = result
                while len(self._mirror_results) > self.mirror_cap:
                    self._mirror_results.popitem(last=False)
            self._mirror_done.notify_all()

    def _send_copy(self, shadow: str, body: bytes, request_id: str) -> None:
        if not self._shadow_slots.acquire(blocking=False):
            self._mirrored.labels(shadow, self.versions[shadow], "dropped").inc()
            return
        with self._mirror_done:
            self._mirror_pending.add(request_id)  # before the client's answer, so mirrored() knows to wait
        try:
            self._shadows.submit(self._shadow, shadow, body, request_id)
        except RuntimeError:  # the router is stopping
            self._shadow_slots.release()
            self._settle(request_id, None)

    def _handler(self):
        router = self

        class RouterHandler(ServiceHandler):
            registry = router.registry
            timeout = router.CLIENT_IDLE_TIMEOUT_S

            def health(self) -> dict:
                return {"weights": router.weights, "mirror": router.mirror}

            def predict(self) -> None:
                request_id = uuid.uuid4().hex
                ids = {"X-Request-Id": request_id}
                if not router._slots.acquire(blocking=False):
                    self.discard_body()
                    router._rejected.labels("overloaded").inc()
                    self.send_json(503, {"error": f"over {router.max_in_flight} requests in flight"}, ids)
                    return
                router._in_flight.inc()
                try:
                    self._route(ids)
                finally:
                    router._in_flight.dec()
                    router._slots.release()

            def _route(self, ids: dict) -> None:
                try:
                    body = self.read_body()
                    parse_json_object(body)
                except RequestError as exc:
                    router._rejected.labels("too_large" if exc.status == 413 else "malformed").inc()
                    self.send_json(exc.status, {"error": str(exc)}, ids)
                    return
                with router._lock:
                    mirror = router.mirror
                variant = mirror[0] if mirror else router.pick()
                if mirror:
                    router._send_copy(mirror[1], body, ids["X-Request-Id"])
                status, payload, kind, seconds = router._forward(variant, body, ids["X-Request-Id"])
                version = router.versions[variant]
                router._requests.labels(variant, version, str(status)).inc()
                router._latency.labels(variant, version).observe(seconds)
                self.send_bytes(status, payload, kind, {"X-Canary-Variant": variant, **ids})

        return RouterHandler

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._shadows.shutdown(wait=False, cancel_futures=True)
        for pool in self._pools.values():
            pool.close()


class LocalBackend:
    """Champion (optional) and challenger servers plus the router; a context manager that always cleans up."""

    def __init__(
        self,
        servers: dict[str, tuple[str, str]],
        num_threads: int,
        start_timeout: float,
        request_timeout: float,
        log_dir: Path,
        env: dict[str, str] | None = None,
        faults: dict[str, str] | None = None,
        serving: ServingConfig | None = None,
    ):
        unknown = set(faults or {}) - set(servers)
        if unknown:
            raise BadInputError(f"faults name no server: {sorted(unknown)}; the servers are {sorted(servers)}")
        for spec in (faults or {}).values():
            parse_fault(spec)
        self._faults = faults or {}  # variant -> fault spec, for drills
        self._serving = serving  # limits, drift window and input log of every server
        self._specs = servers  # variant -> (model uri, model version)
        self._env = env or {}
        self._num_threads = num_threads
        self._start_timeout = start_timeout
        self._request_timeout = request_timeout
        self._log_dir = log_dir
        self.servers: dict[str, ModelServerProcess] = {}
        self.router: Router | None = None

    def __enter__(self) -> LocalBackend:
        self._log_dir.mkdir(parents=True, exist_ok=True)
        try:
            for variant, (uri, version) in self._specs.items():
                self.servers[variant] = ModelServerProcess(
                    uri,
                    variant,
                    version,
                    self._num_threads,
                    self._log_dir,
                    self._env,
                    self._faults.get(variant, "none"),
                    self._serving,
                )
            deadline = time.monotonic() + self._start_timeout
            urls = {variant: server.wait_ready(deadline) for variant, server in self.servers.items()}
            versions = {variant: version for variant, (_, version) in self._specs.items()}
            self.router = Router(urls, self._request_timeout, versions=versions)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def metrics_urls(self) -> dict[str, str]:
        """Where each part serves its Prometheus metrics, for a person (or a test) watching the rollout."""
        urls = {variant: f"{server.url}/metrics" for variant, server in self.servers.items() if server.url}
        return {"router": f"{self.router.url}/metrics", **urls} if self.router else urls

    def close(self) -> None:
        if self.router is not None:
            self.router.stop()
        for server in self.servers.values():  # all drain at once: each exit takes a second or two
            server.terminate()
        for server in self.servers.values():
            server.stop()
