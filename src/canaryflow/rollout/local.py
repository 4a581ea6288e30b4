"""The local canary backend: two real model servers on loopback behind a weighted router.

Each model server is its own process (`canaryflow.serving.server`), as a KServe predictor would be. The
router runs in-process, forwards each /predict to one variant chosen by weight, and tags the answer
with `X-Canary-Variant`. Its weights change at run time.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from canaryflow.errors import CanaryflowError
from canaryflow.serving.http import RequestError, ServiceHandler, serve_in_thread


def post_json(url: str, body: bytes, timeout: float) -> tuple[int, bytes, dict]:
    """POST and return (status, body, headers); an HTTP error status is a result, not an exception."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


class ModelServerProcess:
    def __init__(
        self, model_uri: str, variant: str, model_version: str, num_threads: int, log_dir: Path, env: dict[str, str]
    ):
        self.variant = variant
        self._port_file = Path(tempfile.mkdtemp(prefix=f"canaryflow-{variant}-")) / "port"
        self.log_path = log_dir / f"server-{variant}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "canaryflow.serving.server",
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
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **env},
        )
        self.url: str | None = None

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

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


class Router:
    """Weighted router over named backends; weights are percentages and change at run time."""

    def __init__(self, backends: dict[str, str], timeout: float, seed: int = 0):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.backends = dict(backends)
        self.weights = {name: 0 for name in backends}
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "canaryflow_router_requests",
            "Requests routed, by variant and status.",
            ("variant", "code"),
            registry=self.registry,
        )
        self._weight = Gauge(
            "canaryflow_router_weight_percent", "Traffic weight per variant.", ("variant",), registry=self.registry
        )
        self.timeout = timeout
        self.server = serve_in_thread(self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def set_weights(self, weights: dict[str, int]) -> None:
        unknown = set(weights) - set(self.backends)
        if unknown or sum(weights.values()) != 100 or any(w < 0 for w in weights.values()):
            raise ValueError(f"weights must be >= 0 over {sorted(self.backends)} and sum to 100: {weights}")
        with self._lock:
            self.weights = {name: weights.get(name, 0) for name in self.backends}
        for name, weight in self.weights.items():
            self._weight.labels(name).set(weight)

    def pick(self) -> str:
        with self._lock:
            roll = self._rng.uniform(0, 100)
            total = 0.0
            for name, weight in self.weights.items():
                total += weight
                if weight and roll < total:
                    return name
            return next(name for name, weight in self.weights.items() if weight)

    def _handler(self):
        router = self

        class RouterHandler(ServiceHandler):
            registry = router.registry

            def health(self) -> dict:
                return {"weights": router.weights}

            def predict(self) -> None:
                variant = router.pick()
                try:
                    status, body, headers = post_json(
                        router.backends[variant] + "/predict", self.read_body(), router.timeout
                    )
                    kind = headers.get("Content-Type", "application/json")
                except RequestError as exc:
                    status, body, kind = exc.status, str(exc).encode(), "text/plain"
                except OSError as exc:  # the backend is down or timed out: the client sees a 502
                    status, body, kind = 502, f"upstream {variant}: {exc}".encode(), "text/plain"
                router._requests.labels(variant, str(status)).inc()
                self.send_bytes(status, body, kind, {"X-Canary-Variant": variant})

        return RouterHandler

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
    ):
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
                    uri, variant, version, self._num_threads, self._log_dir, self._env
                )
            deadline = time.monotonic() + self._start_timeout
            urls = {variant: server.wait_ready(deadline) for variant, server in self.servers.items()}
            self.router = Router(urls, self._request_timeout)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self.router is not None:
            self.router.stop()
        for server in self.servers.values():
            server.stop()
