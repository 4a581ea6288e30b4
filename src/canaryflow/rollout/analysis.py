"""Canary analysis: anytime-valid sequential tests on the canary's SLIs. Pure functions, table-tested.

Every SLI is a per-request loss in [0, 1], higher is worse:
- `error`: 1 for a failed request;
- `slow`: 1 for a request slower than the champion's p95 as estimated when the request arrived (the smoke
  check, with no champion, uses `canary.max_p95_ms`);
- `quality`: 1 - chrF / 100 for an answered request that has references.

The bound. For each SLI and variant, a confidence sequence (CS) for the mean loss holds at every look at
once: the predictable plug-in empirical-Bernstein CS of Waudby-Smith and Ramdas, "Estimating means of
bounded random variables by betting", JRSS-B 86(1), 2024, Theorem 2. In one line: for X_i in [0, 1] with
mean mu and any predictable lambda_i in [0, 1), prod_i exp(lambda_i (X_i - mu) - v_i psi_E(lambda_i)), with
v_i = 4 (X_i - muhat_{i-1})^2 and psi_E(l) = (-log(1 - l) - l) / 4, is a nonnegative supermartingale (the
empirical-Bernstein inequality of Fan et al. 2015 applied one step at a time); Ville's inequality bounds the
chance it ever exceeds 2/alpha by alpha/2, and solving for mu on both sides gives the bounds computed below.
Its width tracks the observed variance, so rare errors (a rate near 0) narrow it fast.

The tests. Per SLI the controller asks how much worse the challenger is, delta = loss(challenger) - loss(champion):
- traffic steps: two independent CSs, challenger and champion, each at alpha_sli / 2, give
  delta in [low_c - high_b, high_c - low_b] (a union bound) using all of the champion's larger share;
- shadow phase: both variants answer the same request, so one CS on the paired differences (mapped to
  [0, 1]) at alpha_sli, where a request's difficulty cancels;
- smoke check (no champion): the challenger's own CS against an absolute limit.
Roll back as soon as some delta is surely above its tolerance; promote a step once it has seen
`min_requests_per_step` challenger requests and every delta is surely below its margin; a step that hits
its request or time limit first rolls back. alpha is split evenly over the SLIs (and over the shadow phase
and the traffic steps when both run), so the chance of ever rolling back a challenger that is no worse than
the champion stays at most `canary.alpha`, however often the controller looks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from canaryflow.config import CanaryConfig
from canaryflow.decision import Check
from canaryflow.stats import percentile

SLIS = ("error", "slow", "quality")
PROMOTE, ROLLBACK, CONTINUE = "promote", "rollback", "continue"
# The largest betting fraction, as in the paper's experiments: near 1, a run of zeros would be bet on too hard.
_MAX_LAMBDA = 0.75
# The paper's lambda_t shrinks like 1/sqrt(t log t) from the first value on. Holding it where t log(1 + t)
# reaches this (about 150 requests, where a canary step decides) makes the bound tightest there: measured
# on simulated canaries, a bad one is rolled back after about 30% fewer requests, and no healthy one more
# often. Any predictable lambda keeps the CS valid.
_TUNED_FOR = 1000.0
# The smoke check: "p95 under max_p95_ms" is "fewer than this share of requests slower than it", with room
# for the few cold-start requests of a fresh server.
SMOKE_SLOW_SHARE = 0.15


@dataclass(frozen=True)
class Observation:
    variant: str
    ok: bool
    latency_ms: float
    chrf: float | None = None  # online quality, where the request had a reference
    slow: bool | None = None  # set where only counts are known (Prometheus); else judged from latency_ms


@dataclass(frozen=True)
class VariantStats:
    requests: int
    errors: int
    error_rate: float | None  # None: no requests, so nothing to judge (and JSON has no NaN)
    p95_ms: float | None
    mean_chrf: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(observations: Iterable[Observation], variant: str) -> VariantStats:
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


class ConfidenceSequence:
    """The CS above, updated one value at a time in O(1), so the controller can look after every batch."""

    def __init__(self, alpha: float):
        self.log_term = math.log(2 / alpha)
        self.n = 0
        self._sum = 0.0
        self._squares = 0.0  # sum of (x_i - muhat_i)^2
        self._mean, self._variance = 0.5, 0.25  # muhat_{t-1} and sigmahat^2_{t-1}, from their priors
        self._spent = self._weighted = self._penalty = 0.0
        self.low, self.high = 0.0, 1.0

    def update(self, x: float) -> None:
        self.n += 1
        t = self.n
        lam = min(math.sqrt(2 * self.log_term / (self._variance * max(t * math.log1p(t), _TUNED_FOR))), _MAX_LAMBDA)
        self._penalty += 4 * (x - self._mean) ** 2 * (-math.log1p(-lam) - lam) / 4
        self._spent += lam
        self._weighted += lam * x
        self._sum += x
        self._mean = (0.5 + self._sum) / (t + 1)
        self._squares += (x - self._mean) ** 2
        self._variance = (0.25 + self._squares) / (t + 1)
        centre = self._weighted / self._spent
        radius = (self.log_term + self._penalty) / self._spent
        # The running intersection: the CS holds at all times at once, so every past bound still holds.
        self.low, self.high = max(self.low, centre - radius, 0.0), min(self.high, centre + radius, 1.0)

    def extend(self, values: Iterable[float]) -> ConfidenceSequence:
        for x in values:
            self.update(x)
        return self


def confidence_sequence(values: Iterable[float], alpha: float) -> tuple[float, float]:
    """Bounds on the mean of values in [0, 1] that held at every look so far with probability >= 1 - alpha."""
    cs = ConfidenceSequence(alpha).extend(values)
    return cs.low, cs.high


class Stream(ConfidenceSequence):
    """One SLI's losses for one variant (or the paired differences, mapped to [0, 1]): its CS and mean."""

    @property
    def mean(self) -> float:
        return self._sum / self.n if self.n else 0.0


class Evidence:
    """Every SLI's streams: per variant in traffic steps (or the smoke check), paired in the shadow phase.
    Each stream's CS is built at its share of alpha (see `sli_alpha`), fixed when the stream starts."""

    def __init__(self, policy: CanaryConfig, has_champion: bool = True):
        self.alpha = sli_alpha(policy, shadow=has_champion and policy.shadow_requests > 0)
        # Two-sample bounds spend half of an SLI's alpha on each variant's CS (a union bound).
        self._side = self.alpha / 2 if has_champion else self.alpha
        self.streams: dict[tuple[str, str], Stream] = {}

    def stream(self, sli: str, variant: str) -> Stream | None:
        return self.streams.get((sli, variant))

    def add(self, variant: str, sli: str, values: Iterable[float]) -> None:
        self.streams.setdefault((sli, variant), Stream(self._side)).extend(values)

    def add_pairs(self, sli: str, differences: Iterable[float]) -> None:
        self.streams.setdefault((sli, "paired"), Stream(self.alpha)).extend((d + 1) / 2 for d in differences)


def request_losses(observations: list[Observation], slow_ms: float | None) -> dict[str, list[float]]:
    """The three SLI losses of each request; `slow` only once a reference latency exists."""
    out = {
        "error": [0.0 if o.ok else 1.0 for o in observations],
        "quality": [1 - o.chrf / 100 for o in observations if o.ok and o.chrf is not None],
    }
    if all(o.slow is not None for o in observations):
        out["slow"] = [float(o.slow) for o in observations]
    else:
        out["slow"] = [] if slow_ms is None else [1.0 if o.latency_ms > slow_ms else 0.0 for o in observations]
    return out


def paired_losses(pairs: list[tuple[Observation, Observation]], slow_ms: float | None) -> dict[str, list[float]]:
    """Challenger-minus-champion loss per mirrored request, (champion, challenger) answering the same input."""
    out: dict[str, list[float]] = {
        "error": [float(b.ok) - float(c.ok) for b, c in pairs],
        "quality": [
            (b.chrf - c.chrf) / 100 for b, c in pairs if b.ok and c.ok and b.chrf is not None and c.chrf is not None
        ],
    }
    out["slow"] = (
        [] if slow_ms is None else [float(c.latency_ms > slow_ms) - float(b.latency_ms > slow_ms) for b, c in pairs]
    )
    return out


@dataclass(frozen=True)
class Bound:
    """How much worse the challenger is on one SLI (delta, a share in [-1, 1]), and the two thresholds."""

    sli: str
    low: float
    high: float
    tolerance: float  # roll back once low exceeds it
    margin: float  # safe once high is below it
    estimate: float
    n: int
    against: str = "the champion"  # or "the limit", in the smoke check

    @property
    def harmful(self) -> bool:
        return self.low > self.tolerance

    @property
    def safe(self) -> bool:
        return self.high < self.margin


def thresholds(policy: CanaryConfig, sli: str) -> tuple[float, float]:
    return getattr(policy, f"{sli}_tolerance"), getattr(policy, f"{sli}_margin")


def bound_two_sample(sli: str, challenger: Stream | None, champion: Stream | None, policy) -> Bound | None:
    if challenger is None or champion is None or not challenger.n or not champion.n:
        return None
    tolerance, margin = thresholds(policy, sli)
    low, high = challenger.low - champion.high, challenger.high - champion.low
    return Bound(sli, low, high, tolerance, margin, challenger.mean - champion.mean, challenger.n)


def bound_paired(sli: str, paired: Stream | None, policy) -> Bound | None:
    if paired is None or not paired.n:
        return None
    tolerance, margin = thresholds(policy, sli)
    return Bound(sli, 2 * paired.low - 1, 2 * paired.high - 1, tolerance, margin, 2 * paired.mean - 1, paired.n)


def smoke_limits(policy: CanaryConfig) -> dict[str, float]:
    """The absolute loss limits of the smoke check, which runs when there is no champion to compare with."""
    return {"error": policy.max_error_rate, "slow": SMOKE_SLOW_SHARE, "quality": 1 - policy.min_chrf / 100}


def bound_absolute(sli: str, losses: Stream | None, limit: float) -> Bound | None:
    if losses is None or not losses.n:
        return None
    return Bound(sli, losses.low - limit, losses.high - limit, 0.0, 0.0, losses.mean - limit, losses.n, "the limit")


def sli_alpha(policy: CanaryConfig, shadow: bool) -> float:
    """Each test's share of alpha: split over the SLIs, and over the two phases when the shadow phase runs."""
    return policy.alpha / len(SLIS) / (2 if shadow else 1)


def bounds(evidence: Evidence, policy: CanaryConfig, phase: str) -> list[Bound]:
    """The current bound of every SLI that has data, for `phase` = shadow | steps | smoke."""
    found: list[Bound | None] = []
    for sli in SLIS:
        if phase == "shadow":
            found.append(bound_paired(sli, evidence.stream(sli, "paired"), policy))
        elif phase == "smoke":
            found.append(bound_absolute(sli, evidence.stream(sli, "challenger"), smoke_limits(policy)[sli]))
        else:
            challenger, champion = evidence.stream(sli, "challenger"), evidence.stream(sli, "champion")
            found.append(bound_two_sample(sli, challenger, champion, policy))
    return [b for b in found if b is not None]


@dataclass(frozen=True)
class Look:
    """The controller's decision at one look: promote this step, roll back, or continue; with reasons."""

    action: str
    checks: tuple[Check, ...]

    @property
    def reasons(self) -> list[str]:
        return [f"{'ok' if c.passed else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]

    def to_dict(self) -> dict:
        return {"action": self.action, "reasons": self.reasons}


_NAMES = {"error": "error rate", "slow": "slow share", "quality": "online chrF loss"}


def _describe(b: Bound) -> str:
    return (
        f"{b.estimate:+.3f} against {b.against}, surely in [{b.low:+.3f}, {b.high:+.3f}] after {b.n} "
        f"(roll back above {b.tolerance:+.3f}, safe below {b.margin:+.3f})"
    )


def look(
    found: list[Bound], step_requests: int, step_seconds: float, policy: CanaryConfig, limit_requests: int | None = None
) -> Look:
    """Decide after one batch: roll back on any surely harmful SLI; promote once the step has its minimum of
    challenger requests and every SLI with data is surely safe; roll back an undecided step at its limit
    (`limit_requests`, default `canary.max_requests_per_step`, or `canary.max_step_seconds`); else continue."""
    harmful = [b for b in found if b.harmful]
    if harmful:
        return Look(ROLLBACK, tuple(Check(_NAMES[b.sli], False, _describe(b)) for b in harmful))
    checks = [Check(_NAMES[b.sli], b.safe, _describe(b)) for b in found]
    enough = step_requests >= policy.min_requests_per_step
    checks.insert(
        0, Check("requests", enough, f"{step_requests} challenger requests (need {policy.min_requests_per_step})")
    )
    if enough and found and all(b.safe for b in found) and {b.sli for b in found} >= {"error", "slow"}:
        return Look(PROMOTE, tuple(checks))
    limit = limit_requests or policy.max_requests_per_step
    if step_requests >= limit or step_seconds >= policy.max_step_seconds:
        why = f"{step_requests} requests" if step_requests >= limit else f"{step_seconds:.0f} s"
        checks.append(Check("decided in time", False, f"undecided after {why}: rolling back is the safe default"))
        return Look(ROLLBACK, tuple(checks))
    return Look(CONTINUE, tuple(checks))
