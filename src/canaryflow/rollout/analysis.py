"""Canary analysis: per-variant SLIs from observed requests, and the fixed-threshold step gate.

Pure functions, table-tested. (Sequential, anytime-valid analysis replaces the fixed thresholds in a
later issue; the shape `judge_step(...) -> Decision` stays.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from canaryflow.config import CanaryConfig
from canaryflow.decision import Check, Decision
from canaryflow.stats import percentile


@dataclass(frozen=True)
class Observation:
    variant: str
    ok: bool
    latency_ms: float
    chrf: float | None = None  # online quality, where the request had a reference


@dataclass(frozen=True)
class VariantStats:
    requests: int
    errors: int
    error_rate: float | None  # None: no requests, so nothing to judge (and JSON has no NaN)
    p95_ms: float | None
    mean_chrf: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(observations: list[Observation], variant: str) -> VariantStats:
    mine = [o for o in observations if o.variant == variant]
    errors = sum(not o.ok for o in mine)
    quality = [o.chrf for o in mine if o.ok and o.chrf is not None]
    return VariantStats(
        requests=len(mine),
        errors=errors,
        error_rate=errors / len(mine) if mine else None,
        p95_ms=percentile([o.latency_ms for o in mine if o.ok], 95),
        mean_chrf=sum(quality) / len(quality) if quality else None,
    )


def judge_step(challenger: VariantStats, champion: VariantStats | None, policy: CanaryConfig) -> Decision:
    """Pass this traffic step, or roll back. With no champion (the smoke check) absolute SLOs alone decide.

    Too few challenger requests fails: a step that cannot decide by its limit rolls back.
    """
    needed = policy.min_requests_per_step if champion is not None else policy.smoke_requests
    checks = [
        Check(
            "enough requests",
            challenger.requests >= needed,
            f"{challenger.requests} challenger requests (need {needed})",
        )
    ]
    if challenger.requests == 0:
        return Decision.of(checks)
    checks.append(
        Check(
            "error rate",
            challenger.error_rate <= policy.max_error_rate,
            f"{challenger.error_rate:.3f} (max {policy.max_error_rate:.3f})",
        )
    )
    if challenger.p95_ms is None:
        checks.append(Check("p95 latency", False, "no successful challenger request to measure"))
        return Decision.of(checks)
    checks.append(
        Check(
            "p95 latency",
            challenger.p95_ms <= policy.max_p95_ms,
            f"{challenger.p95_ms:.1f} ms (max {policy.max_p95_ms:.0f} ms)",
        )
    )
    if champion is not None and champion.p95_ms is not None:
        ceiling = champion.p95_ms * policy.max_p95_ratio
        checks.append(
            Check(
                "p95 vs champion",
                challenger.p95_ms <= ceiling,
                f"{challenger.p95_ms:.1f} ms vs champion {champion.p95_ms:.1f} ms (max x{policy.max_p95_ratio})",
            )
        )
    if challenger.mean_chrf is not None:
        checks.append(
            Check(
                "online chrF",
                challenger.mean_chrf >= policy.min_chrf,
                f"{challenger.mean_chrf:.1f} (min {policy.min_chrf:.1f})",
            )
        )
        if champion is not None and champion.mean_chrf is not None:
            checks.append(
                Check(
                    "online chrF vs champion",
                    challenger.mean_chrf >= champion.mean_chrf - policy.chrf_margin,
                    f"{challenger.mean_chrf:.1f} vs champion {champion.mean_chrf:.1f} "
                    f"(allowed -{policy.chrf_margin:.1f})",
                )
            )
    return Decision.of(checks)
