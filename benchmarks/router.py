"""The canary router's added latency and throughput on loopback, against calling its upstream directly, in one
invocation.

Two upstreams: a real model server (`canaryflow.serving.server`, its own process, a tiny T5 trained briefly,
one torch thread), and a trivial server that echoes its inputs at once, which leaves only the router's own
cost to see. Each is loaded directly and through the router (in this process, as the local canary runs it),
with the same requests (one test input each, as the canary replays them) at the same concurrency, from a
load generator in its own process that keeps its connections alive. The model server is loaded one request
at a time (the router's cost alone) and `--concurrency` at a time (a queue behind the model). Sides take
turns, `--rounds` times, each round starting with the other side; latency percentiles pool every round,
throughput is the median round. The trivial upstream is also loaded through the router in mirror mode, a
copy of every request going to a second trivial server.

Usage: .venv/bin/python benchmarks/router.py [--requests N] [--concurrency N] [--rounds N] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from evaluation import _train
from report import machine, run_child, write_section

BEGIN, END = "<!-- router:begin -->", "<!-- router:end -->"

_TRIVIAL = r"""
import sys, threading
from canaryflow.serving.http import ServiceHandler, serve_in_thread

class Echo(ServiceHandler):
    def health(self):
        return {"status": "ok"}

    def predict(self):
        self.send_json(200, {"predictions": self.read_json()["inputs"], "model_version": "echo"})

print(serve_in_thread(Echo).server_address[1], flush=True)
threading.Event().wait()
"""

# The start of every load generator (this one and benchmarks/serving.py's): one timed POST to /predict.
LOAD_PRELUDE = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from canaryflow.serving.http import ConnectionPool

def send(pool, body):
    started = time.perf_counter()
    try:
        status = pool.request("POST", "/predict", body)[0]
    except OSError:  # a connection the server reset is that request's failure, counted, not the run's end
        status = 0
    return status, (time.perf_counter() - started) * 1000
"""

_LOAD = (
    LOAD_PRELUDE
    + r"""
url, bodies_file, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3])
bodies = [b.encode() for b in json.loads(open(bodies_file).read())]
pool = ConnectionPool(url, timeout=60, max_idle=concurrency)

for body in bodies[: concurrency * 2]:  # open the connections and warm the path up, untimed
    send(pool, body)

started = time.perf_counter()
with ThreadPoolExecutor(concurrency) as workers:
    results = list(workers.map(lambda body: send(pool, body), bodies))
seconds = time.perf_counter() - started
print(json.dumps({"latencies_ms": [ms for _, ms in results], "errors": sum(s != 200 for s, _ in results),
                  "rps": len(bodies) / seconds}))
"""
)


def _start_trivial() -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-c", _TRIVIAL], stdout=subprocess.PIPE, text=True)
    return process, f"http://127.0.0.1:{process.stdout.readline().strip()}"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _measure(targets: dict[str, str], bodies_file: Path, concurrency: int, rounds: int) -> dict[str, dict]:
    """Load each target in turns; per target: pooled p50/p99 latency, median throughput, errors."""
    latencies: dict[str, list[float]] = {name: [] for name in targets}
    rates: dict[str, list[float]] = {name: [] for name in targets}
    errors = dict.fromkeys(targets, 0)
    names = list(targets)
    for round_ in range(rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            result = run_child(name, _LOAD, targets[name], str(bodies_file), str(concurrency))
            latencies[name] += result["latencies_ms"]
            rates[name].append(result["rps"])
            errors[name] += result["errors"]
    return {
        name: {
            "p50_ms": _percentile(latencies[name], 0.5),
            "p99_ms": _percentile(latencies[name], 0.99),
            "rps": statistics.median(rates[name]),
            "errors": errors[name],
        }
        for name in targets
    }


def _rows(upstream: str, results: dict[str, dict], labels: dict[str, str]) -> list[str]:
    base = results["direct"]
    return [
        f"| {upstream} | {labels[name]} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['rps']:,.0f} "
        f"| {r['p50_ms'] - base['p50_ms']:+.2f} | {r['p50_ms'] / base['p50_ms']:.2f}x "
        f"| {r['p99_ms'] / base['p99_ms']:.2f}x | {r['rps'] / base['rps']:.2f}x |"
        for name, r in results.items()
    ]


def main() -> None:
    from canaryflow.data.prepare import read_pairs
    from canaryflow.rollout.local import ModelServerProcess, Router

    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=240, help="per side and round, model server")
    parser.add_argument("--trivial-requests", type=int, default=3000, help="per side and round, trivial upstream")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150, help="training steps of the tiny model")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="canaryflow-router-bench-") as tmp:
        root = Path(tmp)
        data, model = _train(root, args.steps, 80)
        inputs = list(read_pairs(data, "test")["input"])
        for name, count in (("model", args.requests), ("trivial", args.trivial_requests)):
            bodies = [json.dumps({"inputs": [inputs[i % len(inputs)]]}) for i in range(count)]
            (root / f"{name}.json").write_text(json.dumps(bodies))
        server = ModelServerProcess(str(model), "champion", "1", 1, root, {})
        trivial, trivial_url = _start_trivial()
        shadow, shadow_url = _start_trivial()
        routers = []
        try:
            server_url = server.wait_ready(time.monotonic() + 120)
            for url in (server_url, trivial_url):
                routers.append(Router({"direct": url}, timeout=60))
                routers[-1].set_weights({"direct": 100})
            mirror = Router({"primary": trivial_url, "shadow": shadow_url}, timeout=60)
            mirror.set_mirror("primary", "shadow")
            routers.append(mirror)
            model_targets = {"direct": server_url, "router": routers[0].url}
            serial_results = _measure(model_targets, root / "model.json", 1, args.rounds)
            model_results = _measure(model_targets, root / "model.json", args.concurrency, args.rounds)
            trivial_results = _measure(
                {"direct": trivial_url, "router": routers[1].url, "mirror": mirror.url},
                root / "trivial.json",
                args.concurrency,
                args.rounds,
            )
        finally:
            for router in routers:
                router.stop()
            server.stop()
            for process in (trivial, shadow):
                process.kill()
                process.wait()
    labels = {"direct": "direct", "router": "through the router", "mirror": "through the router, mirrored"}
    errors = sum(r["errors"] for rs in (serial_results, model_results, trivial_results) for r in rs.values())
    added_serial = serial_results["router"]["p50_ms"] - serial_results["direct"]["p50_ms"]
    added_model = model_results["router"]["p50_ms"] - model_results["direct"]["p50_ms"]
    added_trivial = trivial_results["router"]["p50_ms"] - trivial_results["direct"]["p50_ms"]
    lines = [
        f"## Canary router overhead on loopback — measured {date.today().isoformat()}",
        "",
        f"Machine: {machine()}. Client-side latency and throughput, one input per request, {args.concurrency} "
        "requests at a time (the model server also 1 at a time); "
        f"{args.rounds} rounds in turns of {args.requests} requests per side (model server) "
        f"and {args.trivial_requests} (trivial upstream); keep-alive connections. Model server: tiny T5 trained "
        f"{args.steps} steps, 1 torch thread, its own process; the router runs in the benchmark's process; the load "
        "generator in another.",
        "",
        "| upstream | path | p50 ms | p99 ms | req/s | p50 added ms | p50 ratio | p99 ratio | throughput ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *_rows("tiny T5 model server, 1 at a time", serial_results, labels),
        *_rows(f"tiny T5 model server, {args.concurrency} at a time", model_results, labels),
        *_rows(f"trivial echo server, {args.concurrency} at a time", trivial_results, labels),
        "",
        f"The router adds {added_serial:.2f} ms at the median in front of the model server one request at a time, "
        f"{added_model:.2f} ms with {args.concurrency} queued behind the model, and {added_trivial:.2f} ms in front "
        "of a server that does nothing. That last is the router's own cost: a JSON check of the body, a pooled "
        "keep-alive connection upstream, metrics, a thread per client connection, all under one GIL; on 2 cores "
        "the load generator, the router and the upstream share the CPU, so the trivial upstream's ratios are the "
        "worst case. With a queue behind the model, p99 is the queue's tail and moves more between runs than p50 "
        "does. Mirror mode sends every request twice; the client waits for the primary only. "
        f"Non-200 answers: {errors}.",
        f"Reproduce: `.venv/bin/python benchmarks/router.py` ({time.perf_counter() - started:.0f} s).",
    ]
    print(json.dumps({"model_serial": serial_results, "model": model_results, "trivial": trivial_results}))
    print(write_section(BEGIN, END, lines))


if __name__ == "__main__":
    main()
