"""The promotion gate: floors, then the paired bootstrap's comparisons, each at alpha or with Holm's correction."""

import pytest

from canaryflow.config import GateConfig
from canaryflow.evaluation.bootstrap import Comparison
from canaryflow.evaluation.gate import decide

GATE = GateConfig(floors={"bleu": 20.0}, non_inferiority={"bleu": 1.0, "chrf": 1.0})
HOLM = GATE.model_copy(update={"correction": "holm"})


def _c(metric: str, diff: float, p: float, threshold: float = -1.0, low: float = -0.5, high: float = 2.0):
    return Comparison(metric, 30.0 + diff, 30.0, diff, low, high, 0.95, threshold, p, 1000)


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
