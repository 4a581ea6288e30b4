"""The model server under concurrent load: today's server (an ASGI app with dynamic batching) against the one it
replaced (the standard library's threading server, generating one request at a time under a lock), same
model, same machine, in one invocation.

The baseline is that server's own source, taken from git at BASELINE_COMMIT and run as it ran then, so nothing
is re-implemented for the comparison. Both serve a tiny T5 trained briefly, one torch thread, each in its own
process; a load generator in another process sends one test input per request over keep-alive connections at
concurrency 1, 4 and 16. The sides take turns in short slices (4 requests per connection, the first side
alternating), because this machine's speed wanders by 20 % over tens of seconds: long turns measured that
wander, not the servers. Latency percentiles pool every slice; throughput is a side's requests over the time
its slices took.

Usage: .venv/bin/python benchmarks/serving.py [--requests N] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from evaluation import _train
from report import machine, run_child, write_section
from router import LOAD_PRELUDE, _percentile

BEGIN, END = "<!-- serving:begin -->", "<!-- serving:end -->"
REPO = Path(__file__).resolve().parents[1]
# The last commit whose model server generated one request at a time on ThreadingHTTPServer.
BASELINE_COMMIT = "811f0baad43082cad35466228eba00431285a8c4"
BASELINE_PATH = "src/canaryflow/serving/server.py"
CONCURRENCY = (1, 4, 16)
PER_CONNECTION = 4  # requests per connection in one slice of a side's turn

_LOAD = (
    LOAD_PRELUDE
    + r"""
urls, bodies_file, concurrency, per_side = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
bodies = [b.encode() for b in json.loads(open(bodies_file).read())]
pools = {name: ConnectionPool(url, timeout=60, max_idle=concurrency) for name, url in urls.items()}

stats = {name: {"latencies_ms": [], "errors": 0, "seconds": 0.0, "sent": 0} for name in urls}
with ThreadPoolExecutor(concurrency) as workers:
    for pool in pools.values():  # open the connections and warm the path up, untimed
        list(workers.map(lambda body: send(pool, body), bodies[: max(32, concurrency * 4)]))
    size, turn = concurrency * __PER_CONNECTION__, 0
    while min(side["sent"] for side in stats.values()) < per_side:
        names = list(urls)[turn % 2 :] + list(urls)[: turn % 2]
        for name in names:
            chunk = [bodies[(stats[name]["sent"] + i) % len(bodies)] for i in range(size)]
            started = time.perf_counter()
            results = list(workers.map(lambda body: send(pools[name], body), chunk))
            stats[name]["seconds"] += time.perf_counter() - started
            stats[name]["sent"] += size
            stats[name]["latencies_ms"] += [ms for _, ms in results]
            stats[name]["errors"] += sum(status != 200 for status, _ in results)
        turn += 1
print(json.dumps(stats))
""".replace("__PER_CONNECTION__", str(PER_CONNECTION))
)


def _start(argv: list[str], port_file: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, *argv, "--port-file", str(port_file)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"server {argv[0]} did not start")
        time.sleep(0.1)
    return process, f"http://127.0.0.1:{port_file.read_text()}"


def main() -> None:
    from canaryflow.config import BatchConfig
    from canaryflow.data.prepare import read_pairs

    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=480, help="per side and concurrency")
    parser.add_argument("--steps", type=int, default=150, help="training steps of the tiny model")
    args = parser.parse_args()
    started = time.perf_counter()
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", BASELINE_COMMIT], capture_output=True,
                            text=True, check=True).stdout.strip()  # fmt: skip
    baseline = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:{BASELINE_PATH}"], capture_output=True,
                              text=True, check=True).stdout  # fmt: skip
    results: dict[int, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="canaryflow-serving-bench-") as tmp:
        root = Path(tmp)
        data, model = _train(root, args.steps, 80)
        inputs = list(read_pairs(data, "test")["input"])
        bodies = [json.dumps({"inputs": [inputs[i % len(inputs)]]}) for i in range(args.requests)]
        (root / "bodies.json").write_text(json.dumps(bodies))
        (root / "baseline_server.py").write_text(baseline)
        common = ["--model-uri", str(model), "--num-threads", "1"]
        servers = {
            "today": _start(["-m", "canaryflow.serving.server", *common], root / "today.port"),
            "baseline": _start([str(root / "baseline_server.py"), *common], root / "baseline.port"),
        }
        try:
            urls = json.dumps({name: url for name, (_, url) in servers.items()})
            for concurrency in CONCURRENCY:
                stats = run_child(f"load at {concurrency}", _LOAD, urls, str(root / "bodies.json"), str(concurrency),
                                  str(args.requests))  # fmt: skip
                results[concurrency] = {
                    name: {
                        "p50_ms": _percentile(side["latencies_ms"], 0.5),
                        "p99_ms": _percentile(side["latencies_ms"], 0.99),
                        "rps": side["sent"] / side["seconds"],
                        "errors": side["errors"],
                    }
                    for name, side in stats.items()
                }
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait()
    errors = sum(r["errors"] for by_side in results.values() for r in by_side.values())
    rows = []
    for concurrency, by_side in results.items():
        new, old = by_side["today"], by_side["baseline"]
        rows.append(
            f"| {concurrency} | {old['rps']:,.1f} | {new['rps']:,.1f} | {new['rps'] / old['rps']:.2f}x "
            f"| {old['p50_ms']:.1f} | {new['p50_ms']:.1f} | {new['p50_ms'] / old['p50_ms']:.2f}x "
            f"| {old['p99_ms']:.1f} | {new['p99_ms']:.1f} | {new['p99_ms'] / old['p99_ms']:.2f}x |"
        )
    top, one, batch = results[CONCURRENCY[-1]], results[1], BatchConfig()
    lines = [
        f"## Model server under concurrent load — measured {date.today().isoformat()}",
        "",
        f"Machine: {machine()}. Tiny T5 trained {args.steps} steps, 1 torch thread, one test input per request, "
        f"at least {args.requests} requests per side and concurrency, the sides taking turns in slices of "
        f"{PER_CONNECTION} requests per connection; keep-alive connections from a load generator in its own "
        f"process. Baseline: the server at {commit} "
        "(ThreadingHTTPServer, one generation at a time under a lock); today: the ASGI server with dynamic "
        f"batching at its defaults (serving.batch.max_size {batch.max_size}, max_latency_ms {batch.max_latency_ms:g}).",
        "",
        "| concurrency | baseline req/s | today req/s | throughput ratio | baseline p50 ms | today p50 ms "
        "| p50 ratio | baseline p99 ms | today p99 ms | p99 ratio |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"At concurrency {CONCURRENCY[-1]}, today's server answers "
        f"{top['today']['rps'] / top['baseline']['rps']:.2f}x the baseline's throughput (target: at least 3x); "
        f"one request at a time its p50 is {one['today']['p50_ms'] / one['baseline']['p50_ms']:.2f}x the "
        f"baseline's (target: within 10 %). Non-200 answers: {errors}.",
        f"Reproduce: `.venv/bin/python benchmarks/serving.py` ({time.perf_counter() - started:.0f} s).",
    ]
    print(json.dumps({str(c): r for c, r in results.items()}))
    print(write_section(BEGIN, END, lines))


if __name__ == "__main__":
    main()
