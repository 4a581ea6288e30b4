"""Sequential canary analysis against a Flagger-style fixed check, on simulated canaries.

Both sides see the same kind of traffic (rollout/simulate.py): a healthy champion (1 % errors, log-normal
latency with a 120 ms median, per-request chrF around 55) and either a healthy challenger (no change) or a
bad one (error rate 1 % -> 5 %, latency +30 %, quality -10 %).

- Sequential: canaryflow's controller loop (`rollout.controller.drive`) with the default policy
  (steps 10/25/50/100 %, a look every 20 requests, alpha 0.05).
- Fixed check, as Flagger runs it: every `interval` (60 s) one check on the canary's requests of that
  interval, passing when the success rate is >= 99 % and the p99 latency is under the limit; a passing
  check moves the weight up by `stepWeight` (10 %) and past `maxWeight` (50 %) promotes; a failed check
  counts, and `threshold` (5) failed checks roll back. The latency limit is set 20 % above the healthy
  p99, a tuned limit (Flagger's own example uses 500 ms, which this latency never reaches).

A second table has errors alone (1 % -> 5 %, 3 % and 2 %, latency and quality unchanged): the scenarios the
rollback's event test (rollout/analysis.py, EventTest) must catch by itself, with Wald's SPRT that knows both
rates as the reference for 1 % -> 5 %. A third has healthy challengers at 1, 5, 10, 20 and 50 requests a
second, the step time limit included; the fixed check also runs with a 98 % success threshold. A fourth has
challengers that regress only from 50 % of the traffic on (load): errors 1 % -> 5 %, or latency x1.5.

Requests to a decision depend on the traffic rate for the fixed check (its clock is the interval), so the
table shows three rates. Run: `.venv/bin/python benchmarks/canary.py [--runs N]`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from report import machine, write_section  # noqa: E402

from canaryflow.config import CanaryConfig  # noqa: E402
from canaryflow.rollout.controller import drive  # noqa: E402
from canaryflow.rollout.simulate import SimulatedTraffic, Variant  # noqa: E402

HEALTHY = Variant()
BAD = HEALTHY.degraded(errors=0.05, latency=1.3, quality=0.9)
ERRORS_ONLY = {  # errors alone, latency and quality unchanged: what the rollback's event test must catch alone
    "1 % -> 5 % errors": HEALTHY.degraded(errors=0.05, latency=1.0, quality=1.0),
    "1 % -> 3 % errors": HEALTHY.degraded(errors=0.03, latency=1.0, quality=1.0),
    "1 % -> 2 % errors": HEALTHY.degraded(errors=0.02, latency=1.0, quality=1.0),
}
RATES = (10, 20, 50)  # requests per second
UNDER_LOAD = {  # healthy below 50 % of the traffic, worse from there on
    "errors 1 % -> 5 % from 50 %": (50, HEALTHY.degraded(errors=0.05, latency=1.0, quality=1.0)),
    "latency x1.5 from 50 %": (50, HEALTHY.degraded(errors=0.01, latency=1.5, quality=1.0)),
}


def healthy_p99_ms() -> float:
    return HEALTHY.latency_ms * math.exp(HEALTHY.latency_sigma * 2.3263)


def fixed_check(
    challenger: Variant, rate: int, seed: int, interval_s=60, threshold=5, step=10, max_weight=50, success=0.99
):
    """One Flagger-style analysis; returns (verdict, requests sent until it)."""
    rng = np.random.default_rng(seed)
    limit = 1.2 * healthy_p99_ms()
    weight, failed, sent = step, 0, 0
    while True:
        total = rate * interval_s
        canary = rng.binomial(total, weight / 100)
        sent += total
        errors = rng.binomial(canary, challenger.error_rate)
        latencies = challenger.latency_ms * np.exp(challenger.latency_sigma * rng.standard_normal(canary))
        ok = canary == 0 or (1 - errors / canary >= success and np.percentile(latencies, 99) <= limit)
        if ok:
            weight += step
            if weight > max_weight:
                return "promoted", sent
        else:
            failed += 1
            if failed >= threshold:
                return "rolled_back", sent


def sequential(challenger: Variant, seed: int) -> tuple[str, int]:
    verdict, _, requests, _ = challenger_requests(challenger, seed)
    return verdict, requests


def challenger_requests(challenger: Variant, seed: int, loaded=None, rate=50.0) -> tuple[str, int, int, dict]:
    """(verdict, challenger requests, all requests, the last step) of one canaryflow canary."""
    outcome = drive(CanaryConfig(), SimulatedTraffic(HEALTHY, challenger, seed, rate, loaded), True)
    mine = sum(s["challenger"]["requests"] for s in outcome["steps"])
    return outcome["verdict"], mine, outcome["requests"], outcome["steps"][-1]


def _verdicts(outcomes, runs: int) -> str:
    """The rolled back | promoted | inconclusive cells."""
    return " | ".join(
        f"{sum(o[0] == verdict for o in outcomes)} of {runs}" for verdict in ("rolled_back", "promoted", "inconclusive")
    )


def known_rates_sprt(challenger: Variant, seed: int, weight: float = 0.10, alpha: float = 0.05 / 3) -> int:
    """The reference: Wald's one-sided SPRT on the same events that knows both rates (the champion's and the
    bad challenger's), at the first step's weight and the error SLI's alpha; challenger requests to roll back."""
    rng = np.random.default_rng(seed)
    null = weight
    bad = weight * challenger.error_rate / (weight * challenger.error_rate + (1 - weight) * HEALTHY.error_rate)
    llr, served = 0.0, 0
    while llr < math.log(1 / alpha):
        mine = rng.binomial(20, weight)
        served += mine
        ours, theirs = rng.binomial(mine, challenger.error_rate), rng.binomial(20 - mine, HEALTHY.error_rate)
        llr += ours * math.log(bad / null) + theirs * math.log((1 - bad) / (1 - null))
    return served


HEALTHY_RATES = (1, 5, 10, 20, 50)  # requests a second, for the step time limit (canary.max_step_seconds)


def healthy_by_rate(runs: int) -> list[str]:
    """Healthy challengers at several traffic rates, time limits included: how often each ends rolled back."""
    lines = [
        "",
        "Healthy challengers (no change), default policy, time limits included (`canary.max_step_seconds` 600): "
        "false rollbacks by traffic rate, and requests to promote (median).",
        "",
        "| traffic | false rollbacks | promoted | inconclusive | requests to promote (median / p95) |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for rate in HEALTHY_RATES:
        outcomes = [challenger_requests(HEALTHY, 20_000 + seed, rate=rate) for seed in range(runs)]
        promoted = [total for verdict, _, total, _ in outcomes if verdict == "promoted"]
        lines.append(f"| {rate} req/s | {_verdicts(outcomes, runs)} | {_spread(promoted)} |")
    return lines


def under_load(runs: int) -> list[str]:
    """Challengers that are healthy at 10 and 25 % and regress from 50 % on."""
    lines = [
        "",
        "Regressions that show only from 50 % of the traffic on (load), default policy: where each canary ends, "
        "and the challenger requests of the 50 % step before its rollback (median / p95).",
        "",
        "| scenario | rolled back | promoted | inconclusive | rolled back at 50 % | challenger requests at 50 % |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, loaded in UNDER_LOAD.items():
        outcomes = [challenger_requests(HEALTHY, seed, loaded) for seed in range(runs)]
        at_50 = [o[3]["challenger"]["requests"] for o in outcomes if o[0] == "rolled_back" and o[3]["weight"] == 50]
        lines.append(f"| {name} | {_verdicts(outcomes, runs)} | {len(at_50)} of {runs} | {_spread(at_50)} |")
    return lines


def _spread(values: list[int], interval: bool = False) -> str:
    """median / p95; with `interval`, the p95's distribution-free 95 % interval (order statistics: the rank
    of the 95th percentile in n draws is binomial(n, 0.95))."""
    if not values:
        return "-"
    text = f"{np.median(values):,.0f} / {np.percentile(values, 95):,.0f}"
    if interval:
        n, ordered = len(values), sorted(values)
        half = 1.96 * math.sqrt(n * 0.95 * 0.05)
        low, high = ordered[max(int(0.95 * n - half) - 1, 0)], ordered[min(math.ceil(0.95 * n + half) - 1, n - 1)]
        text += f" ({low:,}-{high:,})"
    return text


def errors_only(runs: int, tail_runs: int) -> list[str]:
    lines = [
        "",
        "Errors alone (latency and quality unchanged), default policy. Challenger requests to a rollback, median / "
        f"p95; the reference is Wald's SPRT that knows both error rates, at the first step's 10 % and the error "
        f"SLI's alpha (0.05 / 3; at alpha 0.05 it needs {_spread(_sprt_runs(tail_runs, 0.05))}). 1 % -> 5 % "
        f"runs {tail_runs:,} canaries, for a p95 that 200 leave uncertain by about +-40 requests; in brackets, "
        "the p95's 95 % interval.",
        "",
        "| scenario | check | rolled back | promoted | inconclusive | challenger requests to roll back | "
        "all requests to roll back |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, challenger in ERRORS_ONLY.items():
        tail = challenger is ERRORS_ONLY["1 % -> 5 % errors"]
        n = tail_runs if tail else runs
        outcomes = [challenger_requests(challenger, seed) for seed in range(n)]
        back = [(mine, total) for verdict, mine, total, _ in outcomes if verdict == "rolled_back"]
        lines.append(
            f"| {name} | sequential (canaryflow) | {_verdicts(outcomes, n)} "
            f"| {_spread([m for m, _ in back], tail)} | {_spread([t for _, t in back])} |"
        )
        if tail:
            reference = _sprt_runs(n, 0.05 / 3)
            lines.append(f"| {name} | SPRT with known rates | {n} of {n} | - | - | {_spread(reference, True)} | - |")
    return lines


def _sprt_runs(runs: int, alpha: float) -> list[int]:
    return [known_rates_sprt(ERRORS_ONLY["1 % -> 5 % errors"], seed, alpha=alpha) for seed in range(runs)]


def summarize(outcomes: list[tuple[str, int]], wanted: str) -> tuple[float, float]:
    """The share of runs reaching `wanted`, and the median requests they took."""
    hits = [n for verdict, n in outcomes if verdict == wanted]
    return len(hits) / len(outcomes), float(np.median(hits)) if hits else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="simulated canaries per side and scenario")
    parser.add_argument("--tail-runs", type=int, default=1000, help="simulated canaries for 1 % -> 5 % errors")
    args = parser.parse_args()
    started = time.perf_counter()
    alone = errors_only(args.runs, args.tail_runs) + healthy_by_rate(args.runs) + under_load(args.runs)
    seq_bad = [sequential(BAD, seed) for seed in range(args.runs)]
    seq_good = [sequential(HEALTHY, 10_000 + seed) for seed in range(args.runs)]
    caught, seq_bad_requests = summarize(seq_bad, "rolled_back")
    false_rollback, seq_good_requests = summarize(seq_good, "rolled_back")[0], summarize(seq_good, "promoted")[1]
    lines = [
        "## Canary analysis: sequential tests against a Flagger-style fixed check",
        "",
        f"Machine: {machine()}. {args.runs} simulated canaries per side and scenario (`benchmarks/canary.py`; "
        "the scenarios and both policies are in its docstring). Requests count all user requests, champion's "
        "and challenger's, from the first shift of traffic to the decision.",
        "",
        "| traffic | check | bad canary rolled back | requests to roll back (median) | ratio fixed / sequential | "
        "false-rollback rate (healthy) | requests to promote (median) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
        f"| any | sequential (canaryflow) | {caught:.1%} | {seq_bad_requests:,.0f} | 1.00 | {false_rollback:.1%} "
        f"| {seq_good_requests:,.0f} |",
    ]
    ratios = []
    for rate in RATES:
        bad = [fixed_check(BAD, rate, seed) for seed in range(args.runs)]
        good = [fixed_check(HEALTHY, rate, 10_000 + seed) for seed in range(args.runs)]
        fixed_caught, fixed_bad_requests = summarize(bad, "rolled_back")
        fixed_false, fixed_good_requests = summarize(good, "rolled_back")[0], summarize(good, "promoted")[1]
        ratios.append(fixed_bad_requests / seq_bad_requests)
        lines.append(
            f"| {rate} req/s | fixed (interval 60 s, threshold 5, step 10 %, max 50 %) | {fixed_caught:.1%} "
            f"| {fixed_bad_requests:,.0f} | {ratios[-1]:.2f} | {fixed_false:.1%} | {fixed_good_requests:,.0f} |"
        )
        # Flagger's success threshold set below the healthy rate, so that healthy checks pass.
        bad = [fixed_check(BAD, rate, seed, success=0.98) for seed in range(args.runs)]
        good = [fixed_check(HEALTHY, rate, 10_000 + seed, success=0.98) for seed in range(args.runs)]
        caught98, requests98 = summarize(bad, "rolled_back")
        false98, promote98 = summarize(good, "rolled_back")[0], summarize(good, "promoted")[1]
        lines.append(
            f"| {rate} req/s | fixed, success threshold 98 % | {caught98:.1%} | {requests98:,.0f} "
            f"| {requests98 / seq_bad_requests:.2f} | {false98:.1%} | {promote98:,.0f} |"
        )
    lines += alone
    lines += [
        "",
        f"The sequential test rolls a bad canary back after {min(ratios):.1f}x to {max(ratios):.1f}x fewer requests "
        f"than the fixed check at {RATES[0]} to {RATES[-1]} requests a second, and rolls back {false_rollback:.1%} "
        "of healthy canaries at 50 requests a second; at any rate a step still undecided at its time limit is "
        "given it once more and then ends inconclusive, not rolled back (the table of healthy challengers by "
        "rate). The fixed check's 99 % "
        "success threshold sits at the healthy error rate (1 %), so it fails a healthy canary's check about as "
        "often as it passes it; at 98 % it rolls back no healthy canary, and a bad one after the same requests. "
        f"The goal of 2x fewer requests holds from {next((r for r, x in zip(RATES, ratios) if x >= 2), 'no')} "
        "requests a second up. Wall time of this benchmark: "
        f"{time.perf_counter() - started:.0f} s.",
    ]
    print(write_section("<!-- canary:begin -->", "<!-- canary:end -->", lines))


if __name__ == "__main__":
    main()
