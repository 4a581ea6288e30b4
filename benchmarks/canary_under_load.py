"""How much a starved machine looks like a latency regression: healthy local canaries beside CPU hogs.

Two real model servers serve the same tiny T5 (trained here, one torch thread each) behind the router, and the
local backend's replay drives the tests' canary policy (tests/conftest.py, QUICK_CANARY: steps 50/100) over
them, as the suite's end-to-end canaries, drills and KServe comparison do while the other pytest worker runs.
Each canary's slow-share events (a request slower than the champion's running p95, per batch and side) are
recorded, then replayed through the rollback's event test (rollout/analysis.py, EventTest) at several
`canary.slow_tolerance` values: a healthy canary whose evidence crosses the threshold within the horizon would
have been rolled back. A challenger with 1 s of added latency (the drills' fault) shows what each tolerance
still catches, and how soon.

A server starved for a second or two answers every request it holds slowly at once, so slow events come in
bursts on one side: the test, which counts them as independent, sees far more evidence than there is. On 2 cores
the canary's own two servers, router and clients are enough to cause such bursts, with or without a hog beside them.

Usage: .venv/bin/python benchmarks/canary_under_load.py [--runs N] [--horizon REQUESTS] [--events EVENTS_JSON]
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
TOLERANCES = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0)
HOGS = {
    "none (baseline)": [],
    "torch matmul, 2 threads": ["import torch\ntorch.set_num_threads(2)\na = torch.randn(800, 800)\nwhile True: a @ a"],
    "2 busy loops": ["while True: pass"] * 2,
}
LATENCY_FAULT = "latency_ms=1000"


def _canary(policy, router, items) -> tuple[str, list[tuple[int, int, float]]]:
    """One local canary over `router`; its verdict and its slow events per batch (challenger, champion, share)."""
    from canaryflow.rollout import analysis
    from canaryflow.rollout.controller import drive

    events: list[tuple[int, int, float]] = []
    add_events = analysis.Evidence.add_events

    def recording(evidence, losses, share):
        slow = {side: int(sum(losses[side].get("slow", []))) for side in ("challenger", "champion")}
        events.append((slow["challenger"], slow["champion"], share))
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


def _replay(events, tolerance: float, alpha: float, horizon_batches: int) -> tuple[float, int | None]:
    """The event test at `tolerance` over recorded events: its largest log-evidence, and the batch at which it
    would have rolled back (None: never)."""
    from canaryflow.rollout.analysis import EventTest

    test, worst = EventTest(alpha, tolerance), 0.0
    for batch, (challenger, champion, share) in enumerate(events[:horizon_batches]):
        test.add(challenger, champion, share)
        worst = max(worst, test.log_e)
        if test.rejected:
            return worst, batch + 1
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


def _one_sided(canaries: list[list[tuple[int, int, float]]]) -> tuple[float, float]:
    """Of the batches with two slow requests or more, the share whose slow requests all came from one side, and
    that share expected were slow requests independent (each side's at its traffic share)."""
    seen, expected = [], []
    for events in canaries:
        for challenger, champion, share in events:
            if challenger + champion >= 2:
                seen.append(challenger == 0 or champion == 0)
                expected.append(share ** (challenger + champion) + (1 - share) ** (challenger + champion))
    return (statistics.mean(seen), statistics.mean(expected)) if seen else (0.0, 0.0)


def main() -> None:
    from canaryflow.config import load_config
    from canaryflow.rollout.analysis import sli_alpha
    from tests.conftest import QUICK_CANARY

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8, help="healthy canaries per load")
    parser.add_argument("--faulty-runs", type=int, default=3, help="canaries of the latency fault per load")
    parser.add_argument("--horizon", type=int, default=400, help="requests over which a canary is judged")
    parser.add_argument("--events", type=Path, help="re-analyse the events.json a run wrote, measuring nothing")
    args = parser.parse_args()

    # The live canary never rolls back on slowness (tolerance 50) and stops by the horizon: a healthy one is
    # promoted at it, the latency fault ends inconclusive there; the tolerances are compared on the replay.
    half = f"{args.horizon // 2}"
    policy = load_config(overrides=[
        *QUICK_CANARY, "canary.slow_tolerance=50", "canary.undecided_extensions=0",
        f"canary.min_requests_per_step={half}", f"canary.max_requests_per_step={half}",
    ]).canary  # fmt: skip
    if args.events:
        run = json.loads(args.events.read_text())
    else:
        run = {"measured": date.today().isoformat(), "machine": machine(), "horizon": args.horizon,
               "recorded": _measure(policy, args.runs, args.faulty_runs)}  # fmt: skip
        path = Path(tempfile.mkdtemp(prefix="canary-under-load-")) / "events.json"
        path.write_text(json.dumps(run))
        print(f"events: {path}")
    recorded, horizon = run["recorded"], run["horizon"]
    where = args.events.resolve() if args.events else None
    kept = f" (this table's: `{where.relative_to(REPO)}`)" if where and where.is_relative_to(REPO) else ""
    alpha, batches = sli_alpha(policy, shadow=False), math.ceil(horizon / policy.batch_requests)
    runs = {kind: len(next(iter(recorded.values()))[kind]) for kind in ("healthy", "faulty")}

    rows = []
    for load, kinds in recorded.items():
        for tolerance in TOLERANCES:
            healthy = [_replay(e, tolerance, alpha, batches) for e in kinds["healthy"]]
            faulty = [_replay(e, tolerance, alpha, batches) for e in kinds["faulty"]]
            caught = [at for _, at in faulty if at is not None]
            rows.append(
                f"| {load} | {tolerance:g} | {sum(at is not None for _, at in healthy)} of {len(healthy)} | "
                f"{_evidence(max(w for w, _ in healthy))} | {len(caught)} of {len(faulty)} | "
                f"{round(statistics.median(caught) * policy.batch_requests) if caught else '-'} |"
            )
    threshold = 1 / alpha
    default, ours = load_config().canary.slow_tolerance, load_config(overrides=QUICK_CANARY).canary.slow_tolerance
    every_healthy = [events for kinds in recorded.values() for events in kinds["healthy"]]
    worst = max(_replay(events, ours, alpha, batches)[0] for events in every_healthy)
    seen, expected = _one_sided(every_healthy)
    lines = [
        f"## Healthy canaries on a loaded machine — measured {run['measured']}",
        "",
        f"Machine: {run['machine']}. The tests' canary policy (QUICK_CANARY, steps 50/100, batches of "
        f"{policy.batch_requests}, concurrency {policy.concurrency}) on two real model servers serving the same "
        f"tiny T5, one torch thread each; {runs['healthy']} healthy canaries and {runs['faulty']} with the "
        f"drills' {LATENCY_FAULT} per load, each judged over its first {horizon} requests; the slow-share events "
        f"replayed through the event test at each tolerance (rollback at evidence {threshold:.0f}; {default:g} is "
        "the product's default).",
        "",
        "| load beside the canary | slow_tolerance | healthy rolled back | largest evidence, healthy | "
        "1 s latency caught | requests to catch it (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"Evidence is the event test's e-value (1: none; rollback at {threshold:.0f}). Slow requests come in bursts: "
        f"of the healthy canaries' batches with two slow requests or more, {seen:.0%} had them all on one side, "
        f"where {expected:.0%} would if each request were slow independently. The test counts each as independent "
        f"evidence, so a burst on the challenger's side reads as a regression. The tests' policy uses {ours:g}: its "
        f"largest healthy evidence here is {_evidence(worst)}.",
        "Reproduce: `.venv/bin/python benchmarks/canary_under_load.py` (about 15 minutes); `--events FILE` "
        f"re-analyses the events a run wrote{kept}.",
    ]
    print(write_section(BEGIN, END, lines))


if __name__ == "__main__":
    main()
