"""The promotion gate: floors, then the paired bootstrap's comparisons, each at alpha or with Holm's correction."""

import numpy as np
import pytest

from canaryflow.config import GateConfig
from canaryflow.evaluation.bootstrap import Comparison, ItemScores, paired_bootstrap
from canaryflow.evaluation.gate import decide, resolution_warnings

GATE = GateConfig(floors={"bleu": 20.0}, non_inferiority={"bleu": 1.0, "chrf": 1.0})
HOLM = GATE.model_copy(update={"correction": "holm"})


def _c(metric: str, diff: float, p: float, threshold: float = -1.0, low: float = -0.5, high: float = 2.0):
    return Comparison(metric, 30.0 + diff, 30.0, diff, low, high, 0.95, threshold, p, 1000, diff - low, 160)


@pytest.mark.parametrize(
    "challenger, comparisons, passed, failing",
    [
        ({"bleu": 30.0}, None, True, []),  # no champion: floors alone
        ({"bleu": 19.9}, None, False, ["bleu floor"]),
        ({"chrf": 50.0}, None, False, ["bleu floor"]),  # a gated metric that was not computed fails
        # Each metric at alpha 0.025, whatever the other's p-value.
        ({"bleu": 30.0}, {"bleu": _c("bleu", 2.0, 0.02), "chrf": _c("chrf", 1.0, 0.025)}, True, []),
        ({"bleu": 30.0}, {"bleu": _c("bleu", 2.0, 0.001), "chrf": _c("chrf", 1.0, 0.03)}, False, ["chrf vs champion"]),
        # A failing metric fails only itself: the other's check still says it passed.
        ({"bleu": 30.0}, {"bleu": _c("bleu", 2.0, 0.3), "chrf": _c("chrf", 1.0, 0.001)}, False, ["bleu vs champion"]),
        (
            {"bleu": 10.0},
            {"bleu": _c("bleu", -20, 0.9), "chrf": _c("chrf", 0, 0.001)},
            False,
            ["bleu floor", "bleu vs champion"],
        ),
        ({"bleu": 30.0}, {"bleu": _c("bleu", 2.0, 0.001)}, False, ["chrf vs champion"]),  # chrf was not compared
        # Better on average, but the interval reaches below the margin: not shown non-inferior.
        (
            {"bleu": 30.0},
            {"bleu": _c("bleu", 0.5, 0.08, low=-2.0, high=3.0), "chrf": _c("chrf", 1.0, 0.001)},
            False,
            ["bleu vs champion"],
        ),
    ],
)
def test_gate_table(challenger, comparisons, passed, failing):
    decision = decide(challenger, comparisons, GATE)
    assert decision.passed is passed
    assert [c.name for c in decision.checks if not c.passed] == failing
    assert len(decision.reasons) == len(decision.checks)


def test_the_default_needs_no_correction():
    assert GateConfig().correction == "none"


@pytest.mark.parametrize(
    "comparisons, failing",
    [
        # Holm with m=2 at alpha 0.025: the smaller p must be <= 0.0125, the other <= 0.025.
        ({"bleu": _c("bleu", 2.0, 0.001), "chrf": _c("chrf", 1.0, 0.02)}, []),
        ({"bleu": _c("bleu", 2.0, 0.001), "chrf": _c("chrf", 1.0, 0.03)}, ["chrf vs champion"]),
        # Both under 0.025, but the smaller is not under 0.0125: Holm stops at once and fails both.
        ({"bleu": _c("bleu", 2.0, 0.02), "chrf": _c("chrf", 1.0, 0.015)}, ["chrf vs champion", "bleu vs champion"]),
    ],
)
def test_holm_steps_down_and_stops_at_the_first_metric_it_cannot_pass(comparisons, failing):
    decision = decide({"bleu": 30.0}, comparisons, HOLM)
    assert decision.passed is not failing
    assert [c.name for c in decision.checks if not c.passed] == failing
    if len(failing) == 2:
        assert "(Holm stopped at a metric before it)" in decision.reasons[-1]


def test_a_required_improvement_is_judged_like_a_margin():
    gate = GateConfig(floors={}, non_inferiority={}, improvement={"bleu": 0.5})
    assert gate.thresholds() == {"bleu": 0.5}
    better = {"bleu": _c("bleu", 3.0, 0.004, threshold=0.5, low=1.0, high=5.0)}
    unsure = {"bleu": _c("bleu", 0.8, 0.4, threshold=0.5, low=-1.5, high=3.0)}
    assert decide({}, better, gate).passed is True
    decision = decide({}, unsure, gate)
    assert not decision.passed and "improvement: H0 diff <= +0.50, p=0.4000 > 0.0250" in decision.reasons[0]


def test_reasons_spell_out_the_difference_and_its_interval():
    decision = decide({"bleu": 25.0}, {"bleu": _c("bleu", 0.3, 0.2), "chrf": _c("chrf", 1.0, 0.001)}, GATE)
    reason = next(r for r in decision.reasons if r.startswith("FAIL bleu vs champion"))
    assert "diff +0.30 [95% CI -0.50, +2.00]; non-inferiority: H0 diff <= -1.00, p=0.2000 > 0.0250" in reason
    assert reason.endswith("; 160 test inputs resolve ±0.80")


@pytest.mark.parametrize(
    "update, message",
    [
        ({"non_inferiority": {"bleu": 1.0}, "improvement": {"bleu": 0.5}}, "bleu has both a non_inferiority"),
        ({"non_inferiority": {"bleurt": 1.0}}, "cannot compare 'bleurt' against the champion"),
    ],
)
def test_gate_config_refuses_contradictions(update, message):
    with pytest.raises(ValueError, match=message):
        GateConfig(**update)


# Two systems right on half the inputs each, on different halves: an equal challenger, diff exactly 0 on exact match.
ANSWERS = [[f"answer {i}"] for i in range(120)]
EQUAL = [f"answer {i}" if i % 4 in (0, 1) else "no" for i in range(120)]
CHAMPION = [f"answer {i}" if i % 4 in (1, 2) else "no" for i in range(120)]
# One input better than that: diff +0.83, an interval reaching below 0.
BETTER = [*EQUAL[:3], "answer 3", *EQUAL[4:]]


@pytest.fixture(scope="module")
def systems():
    return {
        name: ItemScores(hyps, ANSWERS) for name, hyps in (("equal", EQUAL), ("champion", CHAMPION), ("better", BETTER))
    }


def _judge(systems, challenger: str, gate: GateConfig) -> tuple[dict[str, Comparison], list[str], bool]:
    comparisons = paired_bootstrap(systems[challenger], systems["champion"], len(ANSWERS), gate.thresholds())
    return comparisons, resolution_warnings(comparisons, gate), decide({}, comparisons, gate).passed


def test_an_equal_challenger_passes_only_a_margin_wider_than_the_test_set_resolves(systems):
    probe, _, _ = _judge(systems, "equal", GateConfig(floors={}, non_inferiority={"exact_match": 1.0}))
    c = probe["exact_match"]
    assert c.diff == 0 and c.resolution > 5  # 120 inputs resolve nothing finer on a right-or-wrong score
    wide = GateConfig(floors={}, non_inferiority={"exact_match": 1.01 * c.resolution})
    assert _judge(systems, "equal", wide)[1:] == ([], True)
    narrow = GateConfig(floors={}, non_inferiority={"exact_match": 0.99 * c.resolution})
    assert _judge(systems, "equal", narrow)[1:] == (
        [
            f"gate: exact_match's margin {0.99 * c.resolution:.2f} is below what 120 test inputs can resolve "
            f"(±{c.resolution:.2f} at 95%): an equal challenger fails more often than it passes; widen the margin "
            "or the test set"
        ],
        False,
    )


def test_a_required_improvement_finer_than_the_resolution_is_warned_about(systems):
    gate = GateConfig(floors={}, non_inferiority={}, improvement={"exact_match": 0.5})
    comparisons, warnings, passed = _judge(systems, "better", gate)
    c = comparisons["exact_match"]
    assert not passed and c.threshold == 0.5
    assert warnings == [
        f"gate: exact_match's required improvement 0.50 is below what 120 test inputs can resolve "
        f"(±{c.resolution:.2f} at 95%): only a challenger about {0.5 + c.resolution:.2f} better passes as often as "
        "it fails; widen the test set"
    ]


def test_the_verdict_is_the_printed_interval_clearing_the_threshold_at_every_margin(systems):
    probe, _, _ = _judge(systems, "better", GateConfig(floors={}, non_inferiority={"exact_match": 1.0}))
    low = probe["exact_match"].ci_low
    assert low < 0  # so margins between -low / 2 and -low tell a halved margin from the real one
    for margin in np.linspace(0, -3 * low, 91).tolist():
        gate = GateConfig(floors={}, non_inferiority={"exact_match": margin})
        comparisons, _, passed = _judge(systems, "better", gate)
        c = comparisons["exact_match"]
        assert c.threshold == -margin
        assert passed is (c.ci_low > -margin), (margin, c)
        assert (c.ci_low, c.ci_high) == (probe["exact_match"].ci_low, probe["exact_match"].ci_high)
