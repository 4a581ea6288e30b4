"""The canary's sequential analysis: the confidence sequence, each look's decision, and simulated canaries."""

from dataclasses import replace

import numpy as np
import pytest

from canaryflow.config import CanaryConfig
from canaryflow.rollout import analysis
from canaryflow.rollout.analysis import (
    CONTINUE,
    INCONCLUSIVE,
    PROMOTE,
    ROLLBACK,
    Bound,
    ConfidenceSequence,
    EventTest,
    Evidence,
    LookTest,
    Observation,
    confidence_sequence,
    look,
    summarize,
)
from canaryflow.rollout.controller import drive
from canaryflow.rollout.simulate import SimulatedTraffic, Variant
from canaryflow.stats import percentile

POLICY = CanaryConfig(min_requests_per_step=50, max_requests_per_step=400, max_step_seconds=60)


def test_percentile_is_nearest_rank():
    assert percentile(list(range(1, 101)), 95) == 95
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 95) is None


def test_summarize_per_variant():
    obs = [
        Observation("challenger", True, 10, 40),
        Observation("challenger", False, 900),
        Observation("champion", True, 20, 60),
    ]
    s = summarize(obs, "challenger")
    assert (s.requests, s.errors, s.error_rate, s.p95_ms, s.mean_chrf) == (2, 1, 0.5, 10, 40)
    assert summarize(obs, "nobody").error_rate is None


def test_the_confidence_sequence_covers_the_mean_at_every_look_at_once():
    """Across 400 streams of 1,500 draws, the running bounds exclude the true mean at some look in at most
    alpha of them: the anytime guarantee, not a per-look one."""
    rng = np.random.default_rng(7)
    alpha, missed = 0.1, 0
    for _ in range(400):
        cs = ConfidenceSequence(alpha)
        ever_missed = False
        for x in rng.random(1500) < 0.3:
            cs.update(float(x))
            ever_missed |= not cs.low <= 0.3 <= cs.high
        missed += ever_missed
    assert missed / 400 <= alpha


@pytest.mark.parametrize(
    "values, alpha, low_below, high_above",
    [
        ([], 0.05, 0.0, 1.0),  # no data: the whole range
        ([0.0] * 200, 0.05, 0.0, 0.0),  # all zeros: the upper bound falls fast (variance adapts)
        ([1.0] * 200, 0.05, 1.0, 1.0),
        ([0.0, 1.0] * 200, 0.05, 0.5, 0.5),
    ],
)
def test_confidence_sequence_bounds(values, alpha, low_below, high_above):
    low, high = confidence_sequence(values, alpha)
    assert 0 <= low <= low_below and high_above <= high <= 1
    if values:
        assert high - low < 0.25  # 200 or more values pin the mean to within a quarter


def test_the_bound_narrows_with_data_and_widens_with_confidence():
    x = [float(v) for v in np.random.default_rng(0).random(800) < 0.05]
    widths = [np.subtract(*confidence_sequence(x[:n], 0.05)[::-1]) for n in (100, 400, 800)]
    assert widths[0] > widths[1] > widths[2]
    assert np.subtract(*confidence_sequence(x, 0.001)[::-1]) > widths[2]


def _bound(sli="error", low=-0.01, high=0.02, tolerance=0.0, margin=0.05):
    return Bound(sli, low, high, tolerance, margin, (low + high) / 2, 100)


@pytest.mark.parametrize(
    "found, requests, seconds, action, failing",
    [
        ([_bound(), _bound("slow")], 60, 1, PROMOTE, []),
        ([_bound(), _bound("slow")], 20, 1, CONTINUE, ["requests"]),  # safe, but the step minimum is not met
        ([_bound(low=0.01), _bound("slow")], 20, 1, ROLLBACK, ["error rate"]),  # harm needs no minimum
        ([_bound(), _bound("slow", low=0.02, high=0.3)], 200, 1, ROLLBACK, ["slow share"]),
        ([_bound(high=0.08), _bound("slow")], 60, 1, CONTINUE, ["error rate"]),  # not yet surely safe
        # Undecided at the step's limit: not a rollback charged to alpha, but no promotion either.
        ([_bound(high=0.08), _bound("slow")], 400, 1, INCONCLUSIVE, ["error rate", "decided in time"]),
        ([_bound(high=0.08), _bound("slow")], 60, 61, INCONCLUSIVE, ["error rate", "decided in time"]),  # time limit
        ([_bound()], 60, 1, CONTINUE, []),  # no latency evidence yet: never promote on errors alone
        (
            [_bound(), _bound("slow"), _bound("quality", low=0.03, high=0.1, tolerance=0.02)],
            60,
            1,
            ROLLBACK,
            ["online chrF loss"],
        ),
    ],
)
def test_each_look_promotes_rolls_back_or_continues(found, requests, seconds, action, failing):
    decision = look(found, requests, seconds, POLICY)
    assert decision.action == action
    assert [c.name for c in decision.checks if not c.passed] == failing
    assert all(reason.startswith(("ok ", "FAIL ")) for reason in decision.reasons)


def test_a_step_before_the_deciding_one_advances_on_its_minimum_unless_harm_is_found():
    unproven = [_bound(high=0.08), _bound("slow")]
    assert look(unproven, 60, 1, POLICY, deciding=False).action == PROMOTE
    assert look(unproven, 20, 1, POLICY, deciding=False).action == CONTINUE
    assert look([_bound(low=0.01), _bound("slow")], 60, 1, POLICY, deciding=False).action == ROLLBACK
    # It holds while the data lean towards harm: an estimate beyond the margin, or evidence for a worse rate.
    assert look([_bound(low=-0.01, high=0.2), _bound("slow")], 60, 1, POLICY, deciding=False).action == CONTINUE
    leaning = EventTest(0.05)
    leaning.add(2, 3, 0.1)  # 2 of 5 events where the challenger serves 10 %: evidence, not yet enough
    assert 0 < leaning.log_e < leaning.log_threshold
    with_test = Bound("error", -0.01, 0.08, 0.0, 0.05, 0.005, 100, test=leaning)  # not yet proven safe
    assert look([with_test, _bound("slow")], 60, 1, POLICY, deciding=False).action == CONTINUE
    # Where the champion serves nothing a lean cannot resolve, so it holds nothing; harm still rolls back.
    assert look([with_test, _bound("slow")], 60, 1, POLICY, deciding=False, champion_serves=False).action == PROMOTE
    assert look([_bound(low=0.01)], 60, 1, POLICY, deciding=False, champion_serves=False).action == ROLLBACK
    assert analysis.deciding_step([10, 25, 50, 100]) == 2 and analysis.deciding_step([5, 100]) == 0


def test_an_early_step_holds_until_its_own_events_rule_out_a_gross_regression():
    """A challenger five times worse that started well by chance (none of its few events yet) must not leave
    the 10 % step on its minimum: it holds until the step's events rule the 5x rate out at 10:1, for at most
    GROSS_HOLD times the minimum; the deciding step and a step without champion events are not held."""
    test = EventTest(0.05, starts=3)
    test.add(0, 4, 0.1)  # 4 champion events, none of the challenger's: 5x not yet ruled out
    assert test.gross_open and test.log_e < 0  # the mixture does not lean: only the hold keeps the step
    error = Bound("error", -0.01, 0.08, 0.0, 0.02, -0.01, 60, test=test, ratio_margin=2.0)  # not proven
    assert look([error, _bound("slow")], 60, 1, POLICY, deciding=False).action == CONTINUE
    assert look([error, _bound("slow")], analysis.GROSS_HOLD * 50, 1, POLICY, deciding=False).action == PROMOTE
    test.add(0, 4, 0.1)  # 8 events, all the champion's: the 5x rate is now 1:15 against
    assert not test.gross_open and test.step_log_gross < -np.log(analysis.GROSS_ODDS)
    assert look([error, _bound("slow")], 60, 1, POLICY, deciding=False).action == PROMOTE
    test.restart(1)  # the next step judges its own events
    assert test.step_events == {"challenger": 0, "champion": 0} and test.step_log_gross == 0.0
    assert not test.gross_open  # no champion events: nothing to compare with, so nothing holds the step
    test.add(0, 2, 0.25)
    assert test.gross_open


def test_slow_requests_hold_an_early_step_only_while_they_lean():
    """The demo's case: the champion's slow share falls with its load, so at 25 % it shows a few slow requests and
    the challenger none. The events that hold a step for errors (5x not yet ruled out) do not hold it for slow
    requests, which are judged a look at a time; a slow share leaning towards harm still holds it."""
    errors, slow = EventTest(0.05, starts=3), LookTest(0.05, starts=3)
    for test in (errors, slow):
        test.restart(1)
        for look_ in range(10):  # looks at 25 %, 5 challenger and 15 champion requests each; 2 champion events
            test.add(0, int(look_ < 2), 0.25, (5, 15))
    assert errors.gross_open and not slow.gross_open and not slow.leaning
    bounds = {
        sli: Bound(sli, -0.1, 0.2, 0.0, 0.1, -0.02, 60, test=test, ratio_margin=1.5)  # margins not yet shown
        for sli, test in (("error", errors), ("slow", slow))
    }
    assert look([bounds["error"], _bound("quality")], 60, 1, POLICY, deciding=False).action == CONTINUE
    assert look([_bound(), bounds["slow"]], 60, 1, POLICY, deciding=False).action == PROMOTE
    for _ in range(3):  # the challenger now slow on every request of three looks: the step leans, and holds
        slow.add(5, 0, 0.25, (5, 15))
    assert slow.leaning and not slow.rejected
    assert look([_bound(), bounds["slow"]], 60, 1, POLICY, deciding=False).action == CONTINUE


@pytest.mark.slow
def test_a_gross_regression_is_judged_at_the_first_step():
    """With the default policy (steps 10/25/50 %), of 150 simulated challengers with 1 % -> 5 % errors at
    least 85 % are rolled back at 10 %, where each request says the most about the ratio (without the hold:
    69 % of 1,000 measured). Power: at a true share of 92 % (1,000 measured with the hold), 150 canaries fall
    below 85 % with probability about 0.001."""
    bad = HEALTHY.degraded(errors=0.05, latency=1.0, quality=1.0)
    outcomes = _canaries(bad, 150, CanaryConfig())
    assert all(o["verdict"] == "rolled_back" for o in outcomes)
    assert sum(o["steps"][-1]["weight"] == 10 for o in outcomes) >= 0.85 * 150


@pytest.mark.slow
def test_a_challenger_slow_from_the_start_is_judged_at_the_first_step_without_the_hold():
    """Slow requests hold no early step for a gross regression (LookTest.holds_gross), yet 100 simulated challengers
    twice as slow all roll back at 10 %: their slow share leans at once (measured, 150 of 150 at 1.5x, 2x and 3x,
    after the same requests as with the hold)."""
    outcomes = _canaries(HEALTHY.degraded(errors=0.01, latency=2.0, quality=1.0), 100, CanaryConfig())
    assert all(o["verdict"] == "rolled_back" and o["steps"][-1]["weight"] == 10 for o in outcomes)


@pytest.mark.parametrize(
    "champion_low, expected",
    [
        (None, 0.02),  # no champion rate to scale: the floor
        (0.001, 0.02),  # rare errors: 2x 0.1 % is within the floor
        (0.05, 0.05),  # 2x the champion's 5 %, surely: +5 points
    ],
)
def test_an_event_margin_is_a_ratio_with_a_floor(champion_low, expected):
    assert analysis.margin(CanaryConfig(), "error", champion_low) == pytest.approx(expected)
    assert analysis.margin(CanaryConfig(), "quality", champion_low) == CanaryConfig().quality_margin


def test_a_five_fold_error_rate_is_never_within_the_margin():
    """Whatever the champion's rate, 5x it is above both 2x and the 2-point floor once the rate is over 0.5 %;
    below that, 5x is within 2 points, and the floor is there to promote it: the ratio cannot be known."""
    for rate in (0.0051, 0.01, 0.05, 0.1):
        assert 5 * rate - rate > analysis.margin(CanaryConfig(), "error", rate)


def test_two_sample_bounds_compare_the_challenger_with_the_champion():
    evidence = Evidence(POLICY)
    evidence.add("champion", "error", [0.0] * 900 + [1.0] * 9)
    evidence.add("challenger", "error", ([0.0] * 4 + [1.0]) * 60)
    (bound,) = analysis.bounds(evidence, POLICY, "steps")
    assert bound.sli == "error" and bound.harmful and not bound.safe
    assert bound.estimate == pytest.approx(0.2 - 9 / 909)
    # The champion's own share of alpha: half of the SLI's, which is a third of the policy's.
    assert evidence.stream("error", "champion").log_term == pytest.approx(np.log(2 / (0.05 / 3 / 2)))
    # The step's promotion uses one side of each CS, so each is two-sided at the SLI's whole alpha.
    assert evidence.step_streams[("error", "champion")].log_term == pytest.approx(np.log(2 / (0.05 / 3)))
    evidence.new_step(1)
    (bound,) = analysis.bounds(evidence, POLICY, "steps")
    assert bound.harmful and bound.high == 1.0  # the new step has no two-sample evidence of its own yet


def test_paired_and_smoke_bounds():
    shadow = CanaryConfig(shadow_requests=200)
    evidence = Evidence(shadow)
    pairs = [(Observation("champion", True, 10, 60.0), Observation("challenger", True, 10, 30.0))] * 150
    for sli, values in analysis.paired_losses(pairs, slow_ms=50).items():
        evidence.add_pairs(sli, values)
    found = {b.sli: b for b in analysis.bounds(evidence, shadow, "shadow")}
    assert found["quality"].estimate == pytest.approx(0.3) and found["quality"].harmful
    assert found["error"].estimate == 0 and found["slow"].estimate == 0
    smoke = Evidence(POLICY, has_champion=False)
    for sli, values in analysis.request_losses([Observation("challenger", True, 3000.0, 50.0)] * 200, 2000).items():
        smoke.add("challenger", sli, values)
    found = {b.sli: b for b in analysis.bounds(smoke, POLICY, "smoke")}
    assert found["slow"].harmful and found["slow"].against == "the limit"
    assert found["error"].safe and found["quality"].safe


def _event_canaries(rng, runs, rate, ratio=1.0, weights=(10, 25, 50), per_step=3000, batch=20, routed=True):
    """Simulated canaries fed to EventTest at alpha 0.05 only (no promotion ends them early): each step
    sends `per_step` requests in batches, each routed to the challenger with its weight; the champion's event
    rate is `rate`, the challenger's `ratio` times it. Returns the share of canaries rejected."""
    rejected = 0
    for _ in range(runs):
        test = EventTest(0.05, starts=len(weights))  # a mixture restarting at each step, as the controller's
        for step, weight in enumerate(weights):
            test.restart(step)
            for _ in range(per_step // batch):
                challenger = rng.binomial(batch, weight / 100)
                events = rng.binomial(challenger, rate * ratio), rng.binomial(batch - challenger, rate)
                share = weight / 100 if routed else (challenger / batch)
                test.add(*events, share, (challenger, batch - challenger))
                if test.rejected:
                    break
            if test.rejected:
                break
        rejected += test.rejected
    return rejected / runs


@pytest.mark.slow
@pytest.mark.parametrize("rate", [0.001, 0.01])
@pytest.mark.parametrize("routed", [True, False], ids=["router-weights", "realized-shares"])
def test_the_event_tests_false_rollbacks_stay_within_alpha_at_rare_error_rates(rate, routed):
    """1,000 simulated healthy canaries, each looked at after every 20 of its 9,000 requests over steps of 10,
    25 and 50 %: the share the rollback test rejects stays within alpha (0.05), with the router's weights and
    with each look's realized shares (the KServe form).

    Power of this check: with 1,000 canaries the observed rate's standard error is at most 0.7 points, so a
    test whose real false-rollback rate were 0.08 would pass here with probability about 0.0002 (z = -3.5);
    the test's real rate is far below alpha (Ville's inequality is a bound over an infinite horizon), so a
    pass is not luck at the boundary. The last assertion shows the check can fail: told the wrong weight
    (the events compared against an even split, while the challenger served only 10 % of requests), the
    same test rolls back most healthy canaries."""
    rng = np.random.default_rng(2024 + int(rate * 1e4) + routed)
    assert _event_canaries(rng, 1000, rate, routed=routed) <= 0.05
    if rate == 0.01 and routed:
        wrong = 0
        for _ in range(200):
            test = EventTest(0.05)
            for _ in range(150):
                challenger = rng.binomial(20, 0.1)
                test.add(rng.binomial(challenger, rate), rng.binomial(20 - challenger, rate), 0.5)
            wrong += test.rejected
        assert wrong == 0  # at an even split the challenger's few events look like a better rate, not worse
        assert _event_canaries(rng, 200, rate, ratio=1.0, weights=(90,)) <= 0.05


def test_the_event_test_catches_a_five_fold_error_rate_in_a_few_hundred_challenger_requests():
    rng = np.random.default_rng(7)
    assert _event_canaries(rng, 200, 0.01, ratio=5.0, weights=(10,), per_step=6000) >= 0.99  # 600 challenger requests
    # Twice the champion's 1 %: most canaries, within 9,000 requests.
    assert _event_canaries(rng, 200, 0.01, ratio=2.0, weights=(10, 25, 50), per_step=3000) >= 0.6
    # A tolerance as a ratio: 1.5x tolerated, a 1.5x challenger is not rolled back more often than alpha.
    tolerant = []
    for _ in range(300):
        test = EventTest(0.05, ratio=1.5)
        for _ in range(450):
            challenger = rng.binomial(20, 0.25)
            test.add(rng.binomial(challenger, 0.015), rng.binomial(20 - challenger, 0.01), 0.25)
        tolerant.append(test.rejected)
    assert np.mean(tolerant) <= 0.05


def test_a_look_is_one_unit_of_evidence_however_many_of_its_requests_are_slow():
    """LookTest bets on y = s_c - ratio * s_b once a look: a look of a challenger slow on every request and a
    champion on none is worth at most log(1 + 0.95 / ratio), and 10 slow requests weigh as 1 of 1."""
    test = LookTest(0.05 / 3)
    for looks in range(1, 30):
        test.add(10, 0, 0.5, (10, 10))
        assert test.log_e <= looks * np.log1p(0.95)
        if test.rejected:
            break
    assert 7 <= looks <= 12 and test.leaning
    one = LookTest(0.05 / 3)
    for _ in range(looks):
        one.add(1, 0, 0.5, (1, 1))
    assert one.log_e == pytest.approx(test.log_e) and one.rejected
    # A tolerance is a ratio of shares: 3x at tolerance 4 is evidence against; the bets shrink to 1 / ratio.
    tolerant = LookTest(0.05, ratio=4.0)
    tolerant.add(6, 2, 0.5, (10, 10))
    assert tolerant.log_e < 0 and not tolerant.leaning
    # A look where one side served nothing compares nothing.
    alone = LookTest(0.05)
    alone.add(3, 0, 0.1, (3, 0))
    assert alone.log_e == 0 and alone.events["challenger"] == 3


def _stalling_looks(rng, test, looks, weight, stall, rate=0.05, factor=1.0):
    """Per look of 20, each server stalls with probability `stall` and then every request it holds is slow;
    otherwise each is slow with probability `rate` (the challenger's `factor` times it)."""
    for _ in range(looks):
        challenger = rng.binomial(20, weight)
        c_rate = 1.0 if rng.random() < stall else min(rate * factor, 1.0)
        b_rate = 1.0 if rng.random() < stall else rate
        test.add(
            rng.binomial(challenger, c_rate),
            rng.binomial(20 - challenger, b_rate),
            weight,
            (challenger, 20 - challenger),
        )
        if test.rejected:
            break
    return test.rejected


@pytest.mark.slow
def test_slow_requests_that_come_in_bursts_per_server_do_not_roll_a_healthy_challenger_back():
    """Latency is shared in time on one server: starved of CPU, or behind a long queue, it answers every request
    it holds slowly at once. Simulated here as a stall of a whole look on one side (10 % of looks, either side):
    1,000 healthy canaries of 150 looks at 25 and 50 %, where LookTest rolls back within alpha. Power of this
    check: at a real rate of 0.08, at most 5 % of 1,000 happens with probability about 0.0002. It can fail:
    the per-request EventTest, which counts each slow request as independent evidence, rolls back a third
    or more of the same canaries (BENCHMARKS.md measures the bursts on real servers)."""
    rng = np.random.default_rng(11)
    for weight in (0.25, 0.5):
        assert np.mean([_stalling_looks(rng, LookTest(0.05), 150, weight, 0.1) for _ in range(1000)]) <= 0.05
        assert np.mean([_stalling_looks(rng, EventTest(0.05), 150, weight, 0.1) for _ in range(200)]) >= 0.3
    # It still catches a challenger that is slow on every request, stalls or not, within a few dozen looks.
    caught = [_stalling_looks(rng, LookTest(0.05 / 3), 20, 0.5, 0.1, factor=20) for _ in range(200)]
    assert np.mean(caught) >= 0.95


HEALTHY = Variant()


def _canaries(challenger: Variant, runs: int, policy: CanaryConfig) -> list[dict]:
    return [drive(policy, SimulatedTraffic(HEALTHY, challenger, seed), True) for seed in range(runs)]


@pytest.mark.slow
def test_healthy_canaries_are_rarely_rolled_back():
    """The false-rollback rate over 200 simulated healthy canaries stays within alpha, although the
    controller looks after every batch of 20 requests. (With the default policy a healthy canary is
    rolled back far less often than alpha; the bound is conservative.)"""
    policy = CanaryConfig(steps=[25, 50, 100], min_requests_per_step=30, max_requests_per_step=1500)
    outcomes = _canaries(HEALTHY, 200, policy)
    rolled_back = sum(o["verdict"] == "rolled_back" for o in outcomes) / len(outcomes)
    assert rolled_back <= policy.alpha
    looks = [len(o["timeline"]) for o in outcomes]
    assert min(looks) > 10  # the rate holds over many looks per canary, not one final check
    # Past the deciding step, at 100 %, only harm can stop a healthy challenger: a lean carried over from the
    # step before cannot resolve where the champion serves nothing, so it must not hold the step.
    assert not [o["reason"] for o in outcomes if o["steps"][-1]["weight"] == 100 and o["verdict"] != "promoted"]


def test_bad_canaries_are_rolled_back_early():
    bad = HEALTHY.degraded(errors=0.05, latency=1.3, quality=0.9)
    policy = CanaryConfig(steps=[25, 50, 100], min_requests_per_step=30, max_requests_per_step=1500)
    outcomes = _canaries(bad, 30, policy)
    assert all(o["verdict"] == "rolled_back" for o in outcomes)
    # Caught while the champion still serves: the steps before full traffic advance without proof, but never
    # past the one that must prove every margin.
    assert all(o["steps"][-1]["weight"] < 100 for o in outcomes)
    assert all(o["steps"][-1]["action"] == ROLLBACK for o in outcomes)


@pytest.mark.slow
def test_a_slower_challenger_is_rolled_back_on_its_slow_share_and_a_healthy_one_beside_stalls_is_not():
    """End to end through the controller, with servers that stall for a batch now and then (simulate.Variant):
    healthy canaries stay within alpha, a challenger 8x slower (the drills' 1 s against a 120 ms median) rolls
    back on its slow share within a few looks' worth of its requests."""
    policy = CanaryConfig(steps=[25, 50, 100], min_requests_per_step=30, max_requests_per_step=1500)
    stalling = Variant(stall=0.1)
    outcomes = [drive(policy, SimulatedTraffic(stalling, stalling, seed), True) for seed in range(100)]
    assert sum(o["verdict"] == "rolled_back" for o in outcomes) <= 5
    assert not [o for o in outcomes if "FAIL slow share" in o["reason"]]
    slow = replace(stalling, latency_ms=8 * stalling.latency_ms)
    outcomes = [drive(policy, SimulatedTraffic(stalling, slow, seed), True) for seed in range(30)]
    assert all(o["verdict"] == "rolled_back" and "FAIL slow share" in o["reason"] for o in outcomes)
    served = sorted(sum(step["challenger"]["requests"] for step in o["steps"]) for o in outcomes)
    assert served[len(served) // 2] <= 80, served


def test_a_regression_that_shows_only_at_high_weight_is_judged_on_that_weights_requests():
    """The challenger is healthy at 10 and 25 %, and fails 5 % of requests from 50 % on (load). The 50 % step
    proves its margins on its own requests, and the event test's mixture restarted there, so the earlier
    healthy requests neither promote it nor dilute the evidence: every canary rolls back at 50 %."""
    loaded = (50, HEALTHY.degraded(errors=0.05, latency=1.0, quality=1.0))
    outcomes = [drive(CanaryConfig(), SimulatedTraffic(HEALTHY, HEALTHY, s, loaded=loaded), True) for s in range(20)]
    assert all(o["verdict"] == "rolled_back" and o["steps"][-1]["weight"] == 50 for o in outcomes)
    # On the errors; a slow-share alarm (a false one: latency does not change) may beat it now and then.
    assert sum("FAIL error rate" in o["reason"] for o in outcomes) >= 18


def test_an_undecided_step_is_extended_then_ends_inconclusive_with_the_champion_serving():
    """A healthy challenger at 1 % errors cannot prove a 0.1-point floor in 300 requests: the step is given
    its limits once more, then the canary ends inconclusive, not rolled back, and the champion gets all the
    traffic back."""
    policy = CanaryConfig(error_floor=0.001, max_requests_per_step=300, undecided_extensions=1)
    traffic = SimulatedTraffic(HEALTHY, HEALTHY, 4)
    outcome = drive(policy, traffic, True)
    assert outcome["verdict"] == "inconclusive" and "the champion keeps serving" in outcome["reason"]
    assert traffic.weights == {"champion": 100, "challenger": 0}
    last = outcome["steps"][-1]
    assert last["weight"] == 50 and 600 <= last["challenger"]["requests"] < 700  # twice the limit, not once
    once = drive(policy.model_copy(update={"undecided_extensions": 0}), SimulatedTraffic(HEALTHY, HEALTHY, 4), True)
    assert once["verdict"] == "inconclusive" and once["steps"][-1]["challenger"]["requests"] < 400


@pytest.mark.slow
@pytest.mark.parametrize("rate", [1, 5, 10])
def test_healthy_canaries_are_not_rolled_back_at_any_traffic_rate_time_limits_included(rate):
    """100 healthy canaries at each rate, with the default 600 s step limit, which slow traffic reaches
    before the deciding step has proven its margins. Such canaries end inconclusive; the rollbacks (only the
    tests' own false alarms) stay within alpha. Power: at a real false-rollback rate of 0.12 (what the old
    policy showed at 10 requests a second, where an undecided step rolled back), more than 5 of 100 happens
    with probability 0.99. From 10 requests a second up, a step reaches its request limit no later than its time limit,
    so 20 and 50 give these same canaries (BENCHMARKS.md shows all five rates)."""
    outcomes = [drive(CanaryConfig(), SimulatedTraffic(HEALTHY, HEALTHY, 500 + s, rate=rate), True) for s in range(100)]
    assert sum(o["verdict"] == "rolled_back" for o in outcomes) <= 5


class _InFlight(SimulatedTraffic):
    """Simulated traffic with requests still on their way at every look, as the local replay has: settle()
    hands them over, and it is called before every shift."""

    def __init__(self, *args, late: list[Observation] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.late, self.calls = late, []

    def shift(self, weights, mirror=False):
        self.calls.append("shift")
        super().shift(weights, mirror)

    def send(self, count):
        self.calls.append("send")
        return super().send(count)

    def settle(self):
        self.calls.append("settle")
        late, self.late = self.late or [], None
        return late


def test_a_decision_is_taken_again_with_the_requests_still_on_their_way():
    """The look that would promote a step comes before the answers still in flight, which are the slow ones and
    the timeouts: the controller acts only once they are in. Here the first step's late answers are 20 timeouts
    of the challenger, and the canary rolls back on them instead of advancing."""
    policy = CanaryConfig(steps=[50, 100], min_requests_per_step=30)
    calm = drive(policy, _InFlight(HEALTHY, HEALTHY, 3), True)
    assert calm["verdict"] == "promoted"
    timeouts = [Observation("challenger", False, 15000.0)] * 20
    traffic = _InFlight(HEALTHY, HEALTHY, 3, late=timeouts)
    outcome = drive(policy, traffic, True)
    assert outcome["verdict"] == "rolled_back" and "FAIL error rate" in outcome["reason"], outcome["reason"]
    assert outcome["steps"][-1]["weight"] == 50 and outcome["steps"][-1]["challenger"]["errors"] >= 20
    # Every shift after the first comes right after a settle: no answer routed at one weight counts at another.
    shifts = [i for i, call in enumerate(traffic.calls) if call == "shift"]
    assert len(shifts) >= 2 and all(traffic.calls[i - 1] == "settle" for i in shifts[1:])


def test_shadow_phase_catches_a_quality_drop_before_any_user_sees_it():
    worse = HEALTHY.degraded(errors=0.01, latency=1.0, quality=0.8)
    policy = CanaryConfig(shadow_requests=2000, min_requests_per_step=30)
    outcome = drive(policy, SimulatedTraffic(HEALTHY, worse, 3), True)
    assert outcome["verdict"] == "rolled_back" and [s["phase"] for s in outcome["steps"]] == ["shadow"]
    assert "online chrF loss" in outcome["reason"]


def test_the_running_percentile_is_the_nearest_rank_percentile_at_every_size():
    import random

    from canaryflow.stats import RunningPercentile, percentile

    rng, running, seen = random.Random(5), RunningPercentile(), []
    assert running(95) is None
    for _ in range(300):
        value = rng.lognormvariate(5, 0.5)
        running.add(value)
        seen.append(value)
        assert running(95) == percentile(seen, 95) and running(50) == percentile(seen, 50)
