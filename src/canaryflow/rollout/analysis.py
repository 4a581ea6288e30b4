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

Promotion. The steps before the deciding one (the last below 100 %) advance once they have seen
`min_requests_per_step` challenger requests, nothing is surely harmful, nothing leans towards harm and
their own error events rule out a gross regression (see `look`): they bound how many users a bad challenger
reaches while the rollback tests, which never stop, gather evidence. The deciding step must also prove every
margin on its own requests (per-step streams, so earlier steps at lower load neither promote it nor dilute
it): for errors and slow requests the challenger's rate surely under `*_margin` times
the champion's or within `*_floor` of it (`margin`), for quality within `quality_margin`. Its CSs are
two-sided at the SLI's whole alpha, of which a promotion uses one side of each variant's: alpha_sli / 2 +
alpha_sli / 2, so a challenger worse than its margin is promoted with probability at most alpha_sli. A step
undecided at its request or time limit is not a rollback: the controller extends it or ends the canary
inconclusive (controller.drive).

Rolling back on errors and slow requests: tests on events (EventTest; LookTest for slow requests, below), not
the CSs above, which work on a variance scale and spend half their alpha on the promotion side. Given that an
event happened on a request the challenger served with probability w, the challenger served it with probability
theta = w rho / (w rho + 1 - w), where rho is the ratio of the challenger's event rate to the champion's,
whatever the champion's own rate is (Lindon and Malek, "Anytime-valid inference for multinomial count data",
NeurIPS 2022; Lindon, Sanden and Shirikian, "Rapid regression detection in software deployments through
sequential testing", KDD 2022). The test of H0: rho <= r0 (the SLI's tolerance, a ratio) mixes the
Bernoulli likelihood ratios of a grid of alternatives above r0; under H0 each is a nonnegative
supermartingale, and so their average, so by Ville's inequality it passes 1/alpha_sli with probability at
most alpha_sli, however often it is looked at. The whole one-sided alpha_sli goes to the rollback. Locally
w is the router's weight for the request; on KServe, where only counts per look are known, the look's
realized share of requests (the count form: Poisson counts conditioned on their sum are binomial). In the
shadow phase both variants answer each request, and of the requests where exactly one of them failed,
the challenger's share is tested against w = 1/2 (slow requests: per look, the shares of pairs where only
the challenger was slow and where only the champion was).

Slow requests are not independent events. A server slows every request it holds at once: starved of CPU,
behind a long queue, in a large batch. Measured on real servers (BENCHMARKS.md, healthy canaries on a loaded
machine), 70 % of the looks with two slow requests or more had them all on one side, where 34 % would if
each were slow on its own, and the per-request test rolled back 2 of 8 healthy canaries at tolerance 1. So
their unit is a look (LookTest): each look gives one bet on the difference of the two sides' slow shares,
valid whatever the requests of one side in one look have in common. It is slower on a challenger slow on
every request (about 4x the challenger requests, simulated: a look is worth at most log 1.95 at tolerance
1), the price of not counting one stall as many regressions.

alpha is split evenly over the SLIs (and over the shadow phase and the traffic steps when both run), so the
chance of ever rolling back a challenger that is no worse than the champion stays at most `canary.alpha`,
however often the controller looks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np

from canaryflow.config import CanaryConfig
from canaryflow.decision import Check
from canaryflow.stats import percentile

SLIS = ("error", "slow", "quality")
EVENT_SLIS = ("error", "slow")  # counted events, judged by EventTest
PROMOTE, ROLLBACK, CONTINUE, INCONCLUSIVE = "promote", "rollback", "continue", "inconclusive"
# The largest betting fraction, as in the paper's experiments: near 1, a run of zeros would be bet on too hard.
_MAX_LAMBDA = 0.75
# The paper's lambda_t shrinks like 1/sqrt(t log t) from the first value on. Holding it where t log(1 + t)
# reaches this (about 150 requests, where a canary step decides) makes the bound tightest there: measured
# on simulated canaries, a bad one is rolled back after about 30% fewer requests, and no healthy one more
# often. Any predictable lambda keeps the CS valid.
_TUNED_FOR = 1000.0
# EventTest's alternatives: rate ratios from 1.5x to 10x the tolerance, evenly on a log scale, equally
# weighted. Measured on simulated canaries (1 % errors, steps of 10/25/50 %, the gross hold below; 600 to
# 1,000 per scenario), this grid catches a 2x and a 3x rate after 7 % fewer challenger requests (median)
# than 1.2-16x, and a 5x one after 3 % fewer at the p95 (5 % more at the median); a larger ratio is
# caught within a few events whatever the grid's top. Against the best single alternative it loses at most
# log 24 of evidence.
_RATIOS = np.geomspace(1.5, 10.0, 24)
# LookTest's bets, as fractions of the largest a look allows (1 / ratio): evenly on a log scale, equally weighted.
_BETS = np.geomspace(0.2, 0.95, 8)
# A step before the deciding one holds its weight until its own events rule out a gross regression: a rate
# GROSS times the tolerance, at odds of GROSS_ODDS to 1 (so a challenger that bad leaves the step with
# probability about 1 / GROSS_ODDS, Ville's inequality under that alternative). See `look`.
GROSS, GROSS_ODDS = 5.0, 10.0
# ... for at most this many times min_requests_per_step: where errors are rare the odds come slowly, and
# a challenger with no events of its own has nothing for the rollback test to find at that weight.
GROSS_HOLD = 4
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


class EventTest:
    """The mixture likelihood-ratio test of H0: rate ratio <= `ratio` on events (module docstring), at
    `alpha`, one-sided; updated per stretch of requests at one challenger share, in O(grid).

    With `starts` > 1 it is also change-aware: one mixture starts at the first traffic step and one more at
    each later step (`restart`), and the evidence is their weighted sum, the first weighted 3/4 and the
    rest sharing 1/4. A mixture that has not started is 1, so each is a nonnegative supermartingale under
    H0 from the beginning, and so is the sum, whose weights were fixed before any data: Ville's inequality
    holds as for one. A regression that appears only at a high weight is then judged on that weight's
    events alone, not diluted by the healthy ones before it, at a cost of log(4/3) in evidence to the first
    step and log(4 (starts - 1)) to a later one."""

    _grid = len(_RATIOS)  # the mixture's components
    # Whether `look` holds an early step until this test's own step events rule out `gross` (gross_open).
    holds_gross = True

    def __init__(self, alpha: float, ratio: float = 1.0, starts: int = 1):
        self.ratio = ratio
        self.log_threshold = math.log(1 / alpha)
        self._alternatives = ratio * _RATIOS
        self._log_weights = np.log([1.0] if starts <= 1 else [0.75] + [0.25 / (starts - 1)] * (starts - 1))
        self._log_lr = np.zeros((len(self._log_weights), self._grid))
        self._started = 1
        self.gross = ratio * GROSS
        self.step_events = {"challenger": 0, "champion": 0}
        self.step_log_gross = 0.0  # log likelihood ratio of `gross` against `ratio`, this step's events alone
        self.log_e = 0.0  # log of the mixture: the evidence against H0 (an e-value)
        self.rejected = False
        self.events = {"challenger": 0, "champion": 0}
        self.requests = {"challenger": 0, "champion": 0}

    def restart(self, step: int) -> None:
        """Traffic step `step` (0-based) begins: its own mixture starts now, if the test has one for it."""
        self._started = max(self._started, min(step + 1, len(self._log_weights)))
        self.step_events, self.step_log_gross = {"challenger": 0, "champion": 0}, 0.0

    def add(self, challenger_events: int, champion_events: int, share: float, requests: tuple[int, int] = (0, 0)):
        """Events seen where the challenger served each request with probability `share` (or served that
        share of them, in the count form); `requests` (challenger, champion) only feed the estimate."""
        self.events["challenger"] += challenger_events
        self.events["champion"] += champion_events
        self.requests["challenger"] += requests[0]
        self.requests["champion"] += requests[1]
        if not 0 < share < 1:
            return  # one variant alone: nothing about the ratio
        if self.holds_gross and (challenger_events or champion_events):
            self.step_events["challenger"] += challenger_events
            self.step_events["champion"] += champion_events
            null = share * self.ratio / (share * self.ratio + 1 - share)
            gross = share * self.gross / (share * self.gross + 1 - share)
            self.step_log_gross += challenger_events * math.log(gross / null)
            self.step_log_gross += champion_events * (math.log1p(-gross) - math.log1p(-null))
        gained = self._log_gains(challenger_events, champion_events, share, requests)
        if gained is None:
            return
        self._log_lr[: self._started] += gained
        # log of sum_k w_k mean_j exp(log_lr[k, j]), computed without overflow.
        terms = self._log_weights[:, None] + self._log_lr - math.log(self._log_lr.shape[1])
        top = float(terms.max())
        self.log_e = top + math.log(float(np.exp(terms - top).sum()))
        self.rejected = self.rejected or self.log_e >= self.log_threshold

    def _log_gains(self, challenger_events: int, champion_events: int, share: float, requests: tuple[int, int]):
        """Each alternative's log likelihood ratio for these events (None: no events, no change)."""
        if not (challenger_events or champion_events):
            return None
        null = share * self.ratio / (share * self.ratio + 1 - share)
        theta = share * self._alternatives / (share * self._alternatives + 1 - share)
        return challenger_events * (np.log(theta) - math.log(null)) + champion_events * (
            np.log1p(-theta) - math.log1p(-null)
        )

    @property
    def leaning(self) -> bool:
        """Any evidence at all for the alternatives: `look` holds an early step while there is."""
        return self.log_e > 0

    @property
    def gross_open(self) -> bool:
        """The step's own events, once the champion has shown some, do not yet rule out `gross` at
        GROSS_ODDS to 1. Without champion events there is nothing to compare with: a challenger's own
        events make the mixture lean instead. A test that does not hold steps counts no step events."""
        return self.step_events["champion"] > 0 and self.step_log_gross > -math.log(GROSS_ODDS)

    @property
    def estimate(self) -> float | None:
        """The observed ratio of the challenger's event rate to the champion's, where both are known."""
        (ce, be), (cn, bn) = self.events.values(), self.requests.values()
        return (ce / cn) / (be / bn) if cn and bn and be else None


class LookTest(EventTest):
    """The test of H0: rate ratio <= `ratio` whose unit is a look, not a request: EventTest's interface, mixture
    and restarts, for events that come in bursts (module docstring, slow requests).

    Each look gives y = s_c - ratio * s_b, the two sides' shares of requests with an event in it. Under H0 each
    share's mean is its side's rate, whatever the requests of one side have in common, so E[y] <= 0: the bets
    1 + lambda * y, for lambda in [0, 1 / ratio) (so that y >= -ratio keeps them positive), multiply to a
    nonnegative supermartingale, as in testing by betting (Waudby-Smith and Ramdas, JRSS-B 86(1), 2024, Section
    4). The mixture averages a grid of lambdas, as EventTest averages its alternatives. The price of assuming
    nothing within a look: a look is worth at most log(1 + 1 / ratio) of evidence however many of its requests
    are slow, so at tolerance 1 a challenger slow on every request takes at least 7 looks to roll back."""

    _grid = len(_BETS)
    # An early step is not held for slow requests until a gross regression is ruled out (`look`). That hold is for
    # EventTest, whose events say less about the ratio at a higher weight. A look's bet says more there: its
    # challenger share comes from more requests. The hold's test also counts each slow request as an event of its
    # own, which a burst is not. A step whose slow share leans towards harm is still held (`leaning`). On the
    # demo's canary the champion's slow share falls once its load does, and the hold kept the 25 % step past its
    # minimum in 5 of 10 canaries, by up to 300 requests, for a challenger that had no slow request at all (0 of 6
    # without the hold). Simulated challengers 1.5x to 3x slower from the start were all rolled back at 10 % after
    # the same requests with the hold or without it: their share leans at once.
    holds_gross = False

    def _log_gains(self, challenger_events: int, champion_events: int, share: float, requests: tuple[int, int]):
        if not (requests[0] and requests[1]):
            return None  # one side served nothing in this look: no share to compare
        y = challenger_events / requests[0] - self.ratio * champion_events / requests[1]
        return np.log1p(_BETS / self.ratio * y)

    @property
    def leaning(self) -> bool:
        """A healthy challenger's bets drift down by only about lambda^2 var(y) / 2 a look, so its evidence hovers
        around 1 for a long time: a lean here also needs the observed ratio past the least of EventTest's
        alternatives (measured: with evidence alone, healthy simulated canaries were held at 25 % until the
        step's limit)."""
        estimate = self.estimate
        return self.log_e > 0 and (estimate is None or estimate >= _RATIOS[0] * self.ratio)


# Errors are judged request by request; slow requests look by look, as a server slows every request it holds
# at once (module docstring).
EVENT_TESTS = {"error": EventTest, "slow": LookTest}


class Evidence:
    """Every SLI's streams: per variant over the whole canary (the quality rollback, the smoke check) and
    over the current traffic step alone (what promotes it), paired in the shadow phase; and the event
    tests. Each stream's CS is built at its share of alpha (see `sli_alpha`), fixed when it starts."""

    def __init__(self, policy: CanaryConfig, has_champion: bool = True):
        self.alpha = sli_alpha(policy, shadow=has_champion and policy.shadow_requests > 0)
        # Two-sample bounds spend half of an SLI's alpha on each variant's CS (a union bound).
        self._side = self.alpha / 2 if has_champion else self.alpha
        self.streams: dict[tuple[str, str], Stream] = {}
        # A step is promoted on one side of each variant's CS (the challenger's upper bound, the champion's
        # lower), so a two-sided CS at the SLI's whole alpha puts alpha / 2 on each side that is used.
        self.step_streams: dict[tuple[str, str], Stream] = {}
        self.policy = policy
        self.events: dict[tuple[str, str], EventTest] = {}  # (sli, "steps" | "shadow")
        # Steps below 100 % carry evidence on the ratio (at 100 % the champion serves nothing).
        self._starts = sum(w < 100 for w in policy.steps)
        self._step = 0

    def stream(self, sli: str, variant: str) -> Stream | None:
        return self.streams.get((sli, variant))

    def new_step(self, step: int) -> None:
        """Traffic step `step` (0-based) begins: its promotion rests on its own requests alone."""
        self.step_streams = {}
        for (_, phase), test in self.events.items():
            if phase == "steps":
                test.restart(step)
        self._step = step

    def add(self, variant: str, sli: str, values: Iterable[float]) -> None:
        values = list(values)
        self.streams.setdefault((sli, variant), Stream(self._side)).extend(values)
        self.step_streams.setdefault((sli, variant), Stream(self.alpha)).extend(values)

    def add_pairs(self, sli: str, differences: Iterable[float]) -> None:
        differences = list(differences)
        self.streams.setdefault((sli, "paired"), Stream(self.alpha)).extend((d + 1) / 2 for d in differences)
        if sli in EVENT_SLIS:  # discordant pairs: which of the two failed, against a fair coin
            worse, better = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
            self.event_test(sli, "shadow").add(worse, better, 0.5, (len(differences), len(differences)))

    def event_test(self, sli: str, phase: str) -> EventTest:
        key = (sli, phase)
        if key not in self.events:
            starts = self._starts if phase == "steps" else 1
            test = EVENT_TESTS[sli](self.alpha, getattr(self.policy, f"{sli}_tolerance"), starts)
            test.restart(self._step)
            self.events[key] = test
        return self.events[key]

    def add_events(self, losses: dict[str, dict[str, list[float]]], share: float) -> None:
        """One batch of the traffic steps: per variant, its losses (request_losses); `share` is the
        challenger's routing weight for these requests, or its realized share of them."""
        for sli in EVENT_SLIS:
            challenger, champion = losses["challenger"].get(sli, []), losses["champion"].get(sli, [])
            if challenger or champion:
                self.event_test(sli, "steps").add(
                    int(sum(challenger)), int(sum(champion)), share, (len(challenger), len(champion))
                )


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
    """How much worse the challenger is on one SLI (delta, a share in [-1, 1]), and the two thresholds. In
    traffic steps `high`, `margin` and `estimate` are the current step's own; `low` is the whole canary's."""

    sli: str
    low: float
    high: float
    tolerance: float  # roll back once low exceeds it
    margin: float  # safe once high is below it
    estimate: float
    n: int
    against: str = "the champion"  # or "the limit", in the smoke check
    test: EventTest | None = None  # error and slow against the champion: the rollback is this test's
    ratio_margin: float | None = None  # error and slow: margin is the larger of this ratio and the floor

    @property
    def harmful(self) -> bool:
        return self.test.rejected if self.test is not None else self.low > self.tolerance

    @property
    def safe(self) -> bool:
        return self.high < self.margin


def margin(policy: CanaryConfig, sli: str, champion_low: float | None) -> float:
    """The most the challenger's loss may surely exceed the champion's for a step to be promoted. For
    errors and slow requests it is a ratio with a floor: surely below `margin` times the champion's rate,
    or surely within `floor` of it. Where events are rare the ratio cannot be known (no champion events,
    no ratio), and the floor decides; where they are not, a 5x rate is never within a 1.5x margin."""
    if sli not in EVENT_SLIS:
        return getattr(policy, f"{sli}_margin")
    floor = getattr(policy, f"{sli}_floor")
    if champion_low is None:
        return floor
    return max((getattr(policy, f"{sli}_margin") - 1) * champion_low, floor)


def _tolerance(policy: CanaryConfig, sli: str) -> float:
    """The roll-back threshold on delta. An event SLI's tolerance is a rate ratio, its EventTest's; its delta
    bound rolls nothing back, so 0 there is only shown."""
    return 0.0 if sli in EVENT_SLIS else policy.quality_tolerance


def bound_steps(sli: str, evidence: Evidence, policy: CanaryConfig, test: EventTest | None) -> Bound | None:
    """One SLI in a traffic step: promoted on the step's own two-sample bound, rolled back on the whole
    canary's (quality) or on the event test (errors, slow requests)."""
    challenger, champion = evidence.stream(sli, "challenger"), evidence.stream(sli, "champion")
    if challenger is None or champion is None or not challenger.n or not champion.n:
        return None
    step_c = evidence.step_streams.get((sli, "challenger"))
    step_b = evidence.step_streams.get((sli, "champion"))
    low = challenger.low - champion.high
    if step_c is None or step_b is None or not step_c.n or not step_b.n:
        # The step has no two-sample evidence of its own (the champion serves nothing at 100 %).
        high, limit, estimate, n = 1.0, margin(policy, sli, None), challenger.mean - champion.mean, challenger.n
    else:
        high, limit = step_c.high - step_b.low, margin(policy, sli, step_b.low)
        estimate, n = step_c.mean - step_b.mean, step_c.n
    ratio = getattr(policy, f"{sli}_margin") if sli in EVENT_SLIS else None
    return Bound(sli, low, high, _tolerance(policy, sli), limit, estimate, n, test=test, ratio_margin=ratio)


def bound_paired(sli: str, paired: Stream | None, policy, test: EventTest | None = None) -> Bound | None:
    """The shadow phase: mirrored requests, so no champion rate of its own to scale a ratio by; an event
    SLI's margin there is its floor."""
    if paired is None or not paired.n:
        return None
    low, high, estimate = 2 * paired.low - 1, 2 * paired.high - 1, 2 * paired.mean - 1
    return Bound(sli, low, high, _tolerance(policy, sli), margin(policy, sli, None), estimate, paired.n, test=test)


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
        test = evidence.events.get((sli, phase))
        if phase == "shadow":
            found.append(bound_paired(sli, evidence.stream(sli, "paired"), policy, test))
        elif phase == "smoke":
            found.append(bound_absolute(sli, evidence.stream(sli, "challenger"), smoke_limits(policy)[sli]))
        else:
            found.append(bound_steps(sli, evidence, policy, test))
    return [b for b in found if b is not None]


def deciding_step(steps: list[int]) -> int:
    """The index of the step that must prove every margin: the last below 100 %, the highest weight at which
    the champion still serves alongside. The steps before it advance once they have their minimum of
    requests and no harm is found or leaning: they limit how many users a bad challenger reaches while the rollback
    tests, which never stop, gather evidence; proof at a low weight would cost the most requests."""
    return max(i for i, weight in enumerate(steps) if weight < 100)


@dataclass(frozen=True)
class Look:
    """The controller's decision at one look: promote this step, roll back, continue, or undecided at the
    step's limit (an inconclusive canary, unless the policy extends the step); with reasons."""

    action: str
    checks: tuple[Check, ...]

    @property
    def reasons(self) -> list[str]:
        return [f"{'ok' if c.passed else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]

    def to_dict(self) -> dict:
        return {"action": self.action, "reasons": self.reasons}


_NAMES = {"error": "error rate", "slow": "slow share", "quality": "online chrF loss"}


def _describe(b: Bound) -> str:
    if b.against == "the limit":
        return (
            f"{b.estimate:+.3f} against the limit, surely in [{b.low:+.3f}, {b.high:+.3f}] after {b.n} "
            f"(roll back above {b.tolerance:+.3f}, safe below {b.margin:+.3f})"
        )
    safe = f"safe below {b.margin:+.3f}"
    if b.ratio_margin is not None:
        safe += f": {b.ratio_margin:g}x the champion's rate, or its floor"
    text = f"{b.estimate:+.3f} against the champion, surely below {b.high:+.3f} after {b.n} ({safe})"
    if b.test is None:
        return f"{text}; overall surely above {b.low:+.3f} (roll back above {b.tolerance:+.3f})"
    t = b.test
    ratio = "no champion events yet" if t.estimate is None else f"{t.estimate:.2f}x the champion's rate"
    return (
        f"{text}; overall {ratio} ({t.events['challenger']} vs {t.events['champion']} events), evidence of more "
        f"than {t.ratio:g}x: {math.exp(t.log_e):.3g} (roll back at {math.exp(t.log_threshold):.3g})"
    )


def look(
    found: list[Bound],
    step_requests: int,
    step_seconds: float,
    policy: CanaryConfig,
    limit_requests: int | None = None,
    deciding: bool = True,
    limit_seconds: float | None = None,
    champion_serves: bool = True,
) -> Look:
    """Decide after one batch: roll back on any surely harmful SLI; promote once the step has its minimum of
    challenger requests and, if it is `deciding`, every SLI with data is surely safe (if not, once no SLI
    leans towards harm, where the `champion_serves` alongside so that a lean can resolve); at the step's limit
    (`limit_requests`, default `canary.max_requests_per_step`, or `limit_seconds`, default
    `canary.max_step_seconds`) an undecided step is INCONCLUSIVE; else continue."""
    harmful = [b for b in found if b.harmful]
    if harmful:
        return Look(ROLLBACK, tuple(Check(_NAMES[b.sli], False, _describe(b)) for b in harmful))
    # A step that need not prove its margins shows them, but they do not hold it back.
    checks = [Check(_NAMES[b.sli], b.safe or not deciding, _describe(b)) for b in found]
    enough = step_requests >= policy.min_requests_per_step
    checks.insert(
        0, Check("requests", enough, f"{step_requests} challenger requests (need {policy.min_requests_per_step})")
    )
    proven = found and all(b.safe for b in found) and {b.sli for b in found} >= {"error", "slow"}
    # A step before the deciding one holds its weight while the data lean towards harm (the step's estimate
    # beyond its margin, or any evidence for the event test's alternatives): a bad challenger is then judged
    # where it reaches the fewest users. Measured on simulated canaries (1 % -> 5 % errors), the median
    # challenger requests to roll back fall by a quarter; healthy ones advance as before.
    # Where the champion serves nothing (the 100 % step after the deciding one) no request can tell the variants
    # apart, so a lean carried over from the step before could never resolve: it would hold a healthy challenger
    # until the step's limit (9 of 200 simulated healthy canaries ended inconclusive so). The rollback tests
    # still run there.
    # A challenger that started well by chance looks healthy for its first requests: 1 % -> 5 % errors shows none in 50
    # requests once in 13. Past the step it would be judged at a higher weight, where each of its requests says less
    # about the ratio (at 10 %, 0.033 nats per request of a 5x rate; at 50 %, 0.015), so an early step also holds until
    # its own events rule out a gross regression (EventTest.gross_open; errors alone, see LookTest.holds_gross), for at
    # most GROSS_HOLD times its minimum. Measured (benchmarks/canary.py, 1,000 simulated canaries, 1 % -> 5 %, with the
    # grid of _RATIOS): p95 of the challenger requests to roll back 503 -> 371, rolled back at 10 % 69 % -> 92 %. The
    # price: a healthy challenger takes 19 % more requests to promote (4,680 -> 5,560).
    held = step_requests < GROSS_HOLD * policy.min_requests_per_step
    leaning = [
        b
        for b in found
        if b.estimate >= b.margin
        or (b.test is not None and (b.test.leaning or (held and not deciding and b.test.gross_open)))
    ]
    leaning = leaning if champion_serves else []
    if enough and (proven or (not deciding and not leaning)):
        return Look(PROMOTE, tuple(checks))
    limit = limit_requests or policy.max_requests_per_step
    seconds = limit_seconds or policy.max_step_seconds
    if step_requests >= limit or step_seconds >= seconds:
        why = f"{step_requests} requests" if step_requests >= limit else f"{step_seconds:.0f} s"
        checks.append(Check("decided in time", False, f"undecided after {why}"))
        return Look(INCONCLUSIVE, tuple(checks))
    return Look(CONTINUE, tuple(checks))
