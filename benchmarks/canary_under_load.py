"""How much a starved machine looks like a latency regression: healthy local canaries beside CPU hogs.

Two real model servers serve the same tiny T5 (trained here, one torch thread each) behind the router, and the
local backend's replay drives the tests' canary policy (tests/conftest.py, QUICK_CANARY: steps 50/100) over
them, as the suite's end-to-end canaries, drills and KServe comparison do while the other pytest worker runs.
Each canary's slow-share events (a request slower than the champion's running p95, per look and side, with the
requests of each side) are recorded, then replayed through the rollback's test of slow requests
(rollout/analysis.py, LookTest) at several `canary.slow_tolerance` values: a healthy canary whose evidence
crosses the threshold within the horizon would have been rolled back. A challenger with 1 s of added latency (the
drills' fault) shows what each tolerance still catches, and how soon. The per-request event test (EventTest),
which judged slow requests before, is replayed beside it.

A server starved for a second or two answers every request it holds slowly at once, so slow events come in
bursts on one side: a test that counts them as independent sees far more evidence than there is. On 2 cores the
canary's own two servers, router and clients are enough to cause such bursts, with or without a hog beside them.

Usage: .venv/bin/python benchmarks/canary_under_load.py [--runs N] [--horizon REQUESTS] [--concurrency CLIENTS]
       [--events EVENTS_JSON]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluation import _train  # noqa: E402
from report import machine, write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- canary-under-load:begin -->", "<!-- canary-under-load:end -->"
TOLERANCES = (1.0, 1.5, 2.0, 4.0)
HOGS = {
    "none (baseline)": [],
    "torch matmul, 2 threads": ["import torch\ntorch.set_num_threads(2)\na = torch.randn(800, 800)\nwhile True: a @ a"],
    "2 busy loops": ["while True: pass"] * 2,
}
LATENCY_FAULT = "latency_ms=1000"


def _canary(policy, router, items) -> tuple[str, list[tuple[int, int, float, int, int]]]:
    """One local canary over `router`; its verdict and its slow events per look: (challenger, champion, share,
    challenger requests, champion requests)."""
    from canaryflow.rollout import analysis
    from canaryflow.rollout.controller import drive

    events: list[tuple[int, int, float, int, int]] = []
    add_events = analysis.Evidence.add_events

    def recording(evidence, losses, share):
        c, b = (losses[side].get("slow", []) for side in ("challenger", "champion"))
        events.append((int(sum(c)), int(sum(b)), share, len(c), len(b)))
        add_events(evidence, losses, share)

    # drive() builds its Evidence itself: the events are read where they enter it.
    analysis.Evidence.add_events = recording
    traffic = _replayed(router, items, policy)
    try:
        result = drive(policy, traffic, True)
    finally:
        analysis.Evidence.add_events = add_events
        traffic.close()
    router.set_weights({"champion": 100, "challenger": 0})
    return result["verdict"], events


def _replayed(router, items, policy):
    """The local backend's replayed traffic, through `router`."""
    from canaryflow.rollout.controller import ReplayedTraffic

    backend = type("Backend", (), {"router": router})
    return ReplayedTraffic(backend, [i for i, _ in items], [r for _, r in items], policy)


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _replay(events, test, horizon_requests: int) -> tuple[float, int | None]:
    """`test` (LookTest or EventTest) over recorded events: its largest log-evidence, and the requests after which
    it would have rolled back (None: never)."""
    worst, sent = 0.0, 0
    for challenger, champion, share, *requests in events:
        if sent >= horizon_requests:
            break
        sent += sum(requests)
        test.add(challenger, champion, share, tuple(requests))
        worst = max(worst, test.log_e)
        if test.rejected:
            return worst, sent
    return worst, None


def _measure(policy, runs: int, faulty_runs: int) -> dict[str, dict[str, list]]:
    """Every load's healthy and faulty canaries on real servers: their slow events per batch."""
    from canaryflow.data.prepare import read_pairs
    from canaryflow.rollout.local import ModelServerProcess, Router

    root = Path(tempfile.mkdtemp(prefix="canary-under-load-"))
    print("training the tiny model ...", flush=True)
    data, model = _train(root, 350, 80)
    test = read_pairs(data, "test")
    items = list(zip(test["input"], [list(r) for r in test["references"]]))
    servers = {
        name: ModelServerProcess(str(model), variant, version, 1, _folder(root / name), {}, fault)
        for name, variant, version, fault in (
            ("champion", "champion", "1", "none"), ("healthy", "challenger", "2", "none"),
            ("faulty", "challenger", "3", LATENCY_FAULT),
        )
    }  # fmt: skip
    routers: dict = {}
    recorded: dict[str, dict[str, list]] = {}
    try:
        urls = {name: server.wait_ready(time.monotonic() + 180) for name, server in servers.items()}
        for kind in ("healthy", "faulty"):
            routers[kind] = Router({"champion": urls["champion"], "challenger": urls[kind]}, policy.request_timeout_s)
            routers[kind].set_weights({"champion": 100, "challenger": 0})
        warm = _replayed(routers["healthy"], items, policy)
        warm.send(60)  # the champion's production traffic before any canary
        warm.close()
        for load, programs in HOGS.items():
            hogs = [subprocess.Popen([sys.executable, "-c", program]) for program in programs]
            try:
                recorded[load] = {"healthy": [], "faulty": []}
                for kind, count in (("healthy", runs), ("faulty", faulty_runs)):
                    for run in range(count):
                        verdict, events = _canary(policy, routers[kind], items)
                        recorded[load][kind].append(events)
                        print(f"{load}: {kind} canary {run + 1}/{count}: {verdict}", flush=True)
            finally:
                for hog in hogs:
                    hog.kill()
                    hog.wait()
    finally:
        for router in routers.values():
            router.stop()
        for server in servers.values():
            server.stop()
    return recorded


def _evidence(log_e: float) -> str:
    value = math.exp(log_e)
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _one_sided(canaries: list[list[tuple[int, int, float, int, int]]]) -> tuple[float, float]:
    """Of the looks with two slow requests or more, the share whose slow requests all came from one side, and
    that share expected were slow requests independent (each side's at its traffic share)."""
    seen, expected = [], []
    for events in canaries:
        for challenger, champion, share, *_ in events:
            if challenger + champion >= 2:
                seen.append(challenger == 0 or champion == 0)
                expected.append(share ** (challenger + champion) + (1 - share) ** (challenger + champion))
    return (statistics.mean(seen), statistics.mean(expected)) if seen else (0.0, 0.0)


def main() -> None:
    from canaryflow.config import load_config
    from canaryflow.rollout.analysis import EventTest, LookTest, sli_alpha
    from tests.conftest import QUICK_CANARY

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8, help="healthy canaries per load")
    parser.add_argument("--faulty-runs", type=int, default=3, help="canaries of the latency fault per load")
    parser.add_argument("--horizon", type=int, default=400, help="requests over which a canary is judged")
    parser.add_argument("--concurrency", type=int, help="replay clients (default: the product's)")
    parser.add_argument("--events", type=Path, help="re-analyse the events.json a run wrote, measuring nothing")
    args = parser.parse_args()

    # The live canary never rolls back on slowness (tolerance 50) and stops by the horizon: a healthy one is
    # promoted at it, the latency fault ends inconclusive there; the tolerances are compared on the replay.
    half = f"{args.horizon // 2}"
    policy = load_config(overrides=[
        *QUICK_CANARY, "canary.slow_tolerance=50", "canary.undecided_extensions=0",
        f"canary.min_requests_per_step={half}", f"canary.max_requests_per_step={half}",
        *([f"canary.concurrency={args.concurrency}"] if args.concurrency else []),
    ]).canary  # fmt: skip
    if args.events:
        run = json.loads(args.events.read_text())
    else:
        recorded = _measure(policy, args.runs, args.faulty_runs)
        run = {"measured": date.today().isoformat(), "machine": machine(), "horizon": args.horizon,
               "concurrency": policy.concurrency, "recorded": recorded}  # fmt: skip
        path = Path(tempfile.mkdtemp(prefix="canary-under-load-")) / "events.json"
        path.write_text(json.dumps(run))
        print(f"events: {path}")
    recorded, horizon = run["recorded"], run["horizon"]
    where = args.events.resolve() if args.events else None
    kept = f" (this table's: `{where.relative_to(REPO)}`)" if where and where.is_relative_to(REPO) else ""
    alpha = sli_alpha(policy, shadow=False)
    runs = {kind: len(next(iter(recorded.values()))[kind]) for kind in ("healthy", "faulty")}

    tests = {"per look": LookTest, "per request": EventTest}
    rows = []
    for load, kinds in recorded.items():
        for tolerance in TOLERANCES:
            cells: dict[str, list[str]] = {"rolled": [], "worst": [], "caught": [], "after": []}
            for test in tests.values():
                healthy = [_replay(e, test(alpha, tolerance), horizon) for e in kinds["healthy"]]
                faulty = (_replay(e, test(alpha, tolerance), horizon)[1] for e in kinds["faulty"])
                caught = [at for at in faulty if at is not None]
                cells["rolled"].append(f"{sum(at is not None for _, at in healthy)} of {len(healthy)}")
                cells["worst"].append(_evidence(max(w for w, _ in healthy)))
                cells["caught"].append(f"{len(caught)} of {len(kinds['faulty'])}")
                cells["after"].append(f"{round(statistics.median(caught))}" if caught else "-")
            rows.append(f"| {load} | {tolerance:g} | " + " | ".join(" / ".join(c) for c in cells.values()) + " |")
    threshold = 1 / alpha
    product = load_config().canary
    default, product_clients = product.slow_tolerance, product.concurrency
    # More clients keep more requests in each server's queue, so a stall slows more of them at once.
    clients = (
        f"; the product's default is {product_clients}, with fewer in flight"
        if run["concurrency"] > product_clients
        else ""
    )
    every_healthy = [events for kinds in recorded.values() for events in kinds["healthy"]]
    worst = max(_replay(events, LookTest(alpha, default), horizon)[0] for events in every_healthy)
    seen, expected = _one_sided(every_healthy)
    lines = [
        f"## Healthy canaries on a loaded machine — measured {run['measured']}",
        "",
        f"Machine: {run['machine']}. The tests' canary policy (QUICK_CANARY, steps 50/100, looks every "
        f"{policy.batch_requests} requests, {run['concurrency']} replay clients{clients}) on two real model servers "
        "serving "
        f"the same tiny T5, one torch thread each; {runs['healthy']} healthy canaries and {runs['faulty']} with "
        f"the drills' {LATENCY_FAULT} per load, each judged over its first {horizon} requests; the slow-share "
        f"events replayed through the rollback's test of slow requests at each tolerance, a look at a time "
        f"(LookTest), and, as before, a request at a time (EventTest); rollback at evidence {threshold:.0f}, and "
        f"{default:g} is the product's default.",
        "",
        "| load beside the canary | slow_tolerance | healthy rolled back, per look / per request | largest "
        "evidence, healthy | 1 s latency caught | requests to catch it (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"Evidence is the test's e-value (1: none; rollback at {threshold:.0f}). Slow requests come in bursts: of "
        f"the healthy canaries' looks with two slow requests or more, {seen:.0%} had them all on one side, where "
        f"{expected:.0%} would if each request were slow independently. Counted as independent events, a burst on "
        "the challenger's side reads as a regression; as one look, it is one bet. At the product's default "
        f"tolerance the largest healthy evidence, a look at a time, is {_evidence(worst)}.",
        f"Reproduce: `.venv/bin/python benchmarks/canary_under_load.py --concurrency {run['concurrency']}` (about "
        f"15 minutes); `--events FILE` re-analyses the events a run wrote{kept}.",
    ]
    print(write_section(BEGIN, END, lines))


if __name__ == "__main__":
    main()
