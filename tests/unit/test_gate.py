import pytest

from canaryflow.config import GateConfig
from canaryflow.evaluation.gate import decide

GATE = GateConfig(floors={"bleu": 20.0}, non_inferiority={"bleu": 1.0})


@pytest.mark.parametrize(
    "challenger, champion, passed, failing",
    [
        ({"bleu": 30.0}, None, True, []),
        ({"bleu": 19.9}, None, False, ["bleu floor"]),
        ({"bleu": 30.0}, {"bleu": 30.5}, True, []),  # within the non-inferiority margin
        ({"bleu": 30.0}, {"bleu": 31.0}, True, []),  # exactly at the margin
        ({"bleu": 30.0}, {"bleu": 31.01}, False, ["bleu vs champion"]),
        ({"bleu": 10.0}, {"bleu": 40.0}, False, ["bleu floor", "bleu vs champion"]),
        ({"chrf": 50.0}, None, False, ["bleu floor"]),  # a gated metric that was not computed fails
        ({"bleu": 30.0}, {"chrf": 1.0}, False, ["bleu vs champion"]),
    ],
)
def test_gate_table(challenger, champion, passed, failing):
    decision = decide(challenger, champion, GATE)
    assert decision.passed is passed
    assert [c.name for c in decision.checks if not c.passed] == failing
    assert len(decision.reasons) == len(decision.checks)


def test_reasons_spell_out_the_numbers():
    decision = decide({"bleu": 25.0}, {"bleu": 27.0}, GATE)
    assert "FAIL bleu vs champion: 25.00 vs champion 27.00 (diff -2.00, allowed -1.00)" in decision.reasons
