"""A real Prometheus for the tests that need one: the `prometheus` server on a free loopback port over a
throwaway TSDB, and `promtool`. Both come from the distribution's package (Debian's `prometheus`, 2.42).

Probed with Debian's 2.42 on 2 cores, as root: it starts as root with the flags below (no user of its own
needed, unlike PostgreSQL), answers /-/ready about 0.1 s after exec and exits within 0.01 s of SIGTERM. Its
first scrape comes about 5-6 s after start whatever the scrape interval, because the scrape manager takes
target updates from discovery in 5 s batches: wait_scraped(), not a sleep, is what a test should wait on.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pytest
import yaml

from tests.servers import free_port

LOG_TAIL = 20


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"no {name} on PATH (Debian and Ubuntu: apt-get install prometheus)")
    return path


class PrometheusError(RuntimeError):
    pass


Target = str | Mapping[str, object]


def _static_config(target: Target) -> dict:
    if isinstance(target, str):
        return {"targets": [target]}
    return {"targets": list(target["targets"]), "labels": dict(target.get("labels", {}))}


def _scrape_config(name: str, job: Iterable[Target] | Mapping[str, object]) -> dict:
    """A job is its targets, or {"targets": [...], "relabel_configs": [...]}: relabelling as a PodMonitor's
    endpoint generates it, over the `__meta_*` labels a target carries in place of service discovery."""
    if isinstance(job, Mapping):
        config = {"job_name": name, "static_configs": [_static_config(t) for t in job["targets"]]}
        return {**config, "relabel_configs": list(job.get("relabel_configs", []))}
    return {"job_name": name, "static_configs": [_static_config(t) for t in job]}


class Prometheus:
    """`prometheus` on 127.0.0.1 scraping `jobs`: job name -> its targets, each "host:port" or a static config
    {"targets": [...], "labels": {...}} whose labels go on every series scraped from those targets (as a
    PodMonitor adds namespace and pod), or a job as _scrape_config() takes it. Started by start() or `with`;
    stop() leaves the config and the log in `root` (the TSDB goes), for a failing test to point at."""

    def __init__(
        self,
        jobs: Mapping[str, Iterable[Target] | Mapping[str, object]],
        *,
        scrape_interval: str = "1s",
        evaluation_interval: str | None = None,
        rule_files: Iterable[Path] = (),
        lifecycle: bool = False,
        root: Path | None = None,
    ) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="canaryflow-prometheus-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_file = self.root / "prometheus.yml"
        self.log = self.root / "prometheus.log"
        self.data = self.root / "data"
        self.lifecycle = lifecycle
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.url = ""
        config = {
            "global": {
                "scrape_interval": scrape_interval,
                "evaluation_interval": evaluation_interval or scrape_interval,
            },
            "rule_files": [str(Path(f).resolve()) for f in rule_files],
            "scrape_configs": [_scrape_config(name, job) for name, job in jobs.items()],
        }
        self.config_file.write_text(yaml.safe_dump(config, sort_keys=False))

    def __enter__(self) -> Prometheus:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def tail(self, lines: int = LOG_TAIL) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _error(self, message: str) -> PrometheusError:
        return PrometheusError(f"{message}\n--- last lines of {self.log} ---\n{self.tail()}")

    def start(self, timeout: float = 30, attempts: int = 3) -> None:
        argv = [binary("prometheus"), f"--config.file={self.config_file}", f"--storage.tsdb.path={self.data}"]
        if self.lifecycle:
            argv.append("--web.enable-lifecycle")
        for attempt in range(attempts):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            with open(self.log, "a") as log:
                self.process = subprocess.Popen(
                    [*argv, f"--web.listen-address=127.0.0.1:{self.port}"], stdout=log, stderr=subprocess.STDOUT
                )
            try:
                self._wait_ready(timeout)
                return
            except PrometheusError:
                self.stop()
                # free_port() frees the port before Prometheus binds it: another process may take it between.
                if "address already in use" not in self.tail() or attempt == attempts - 1:
                    raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self._error(f"prometheus exited with {self.process.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise self._error(f"prometheus was not ready within {timeout:.0f} s")

    def stop(self, timeout: float = 10) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
        shutil.rmtree(self.data, ignore_errors=True)

    def api(self, path: str, **params: object) -> dict:
        """GET /api/v1/<path> with `params` (None ones left out); the `data` of a successful answer."""
        params = {k: v for k, v in params.items() if v is not None}
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.load(response)
        except urllib.error.HTTPError as exc:
            # Prometheus answers a bad query with 400 or 422 and says why in the JSON body.
            body = json.loads(exc.read() or b"{}")
            raise self._error(f"{path} {params}: {body.get('errorType')}: {body.get('error')}") from None
        except OSError as exc:
            raise self._error(f"{path} {params}: {exc}") from None
        if body.get("status") != "success":
            raise self._error(f"{path} {params}: {body}")
        return body["data"]

    def query(self, promql: str, time: float | str | None = None) -> dict:
        return self.api("query", query=promql, time=time)

    def query_range(self, promql: str, start: float | str, end: float | str, step: float | str = 1) -> dict:
        return self.api("query_range", query=promql, start=start, end=end, step=step)

    def targets(self) -> dict:
        return self.api("targets")

    def wait_for(
        self, promql: str, predicate: Callable[[dict], object], timeout: float = 30, interval: float = 0.25
    ) -> dict:
        """Query `promql` until `predicate` holds for the answer's data; that data."""
        deadline = time.monotonic() + timeout
        while True:
            data = self.query(promql)
            if predicate(data):
                return data
            if time.monotonic() > deadline:
                raise self._error(f"{promql!r} did not meet the condition within {timeout:.0f} s: last {data}")
            time.sleep(interval)

    def wait_scraped(self, scrapes: int = 1, timeout: float = 30) -> list[dict]:
        """Wait until every configured target is up and has been scraped at least `scrapes` times (each scrape
        writes one `up` sample); the active targets."""
        expected = sum(len(c["targets"]) for job in self._config()["scrape_configs"] for c in job["static_configs"])
        deadline = time.monotonic() + timeout
        while True:
            active = self.targets()["activeTargets"]
            counts = {
                (r["metric"]["job"], r["metric"]["instance"]): float(r["value"][1])
                for r in self.query("count_over_time(up[1d])")["result"]
            }
            if len(active) == expected and all(
                t["health"] == "up" and counts.get((t["labels"]["job"], t["labels"]["instance"]), 0) >= scrapes
                for t in active
            ):
                return active
            if time.monotonic() > deadline:
                states = [(t["scrapeUrl"], t["health"], t["lastError"]) for t in active]
                raise self._error(f"not every target up with {scrapes} scrapes within {timeout:.0f} s: {states}")
            time.sleep(0.25)

    def _config(self) -> dict:
        return yaml.safe_load(self.config_file.read_text())
