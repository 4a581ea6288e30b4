import pytest

from canaryflow.config import CanaryConfig
from canaryflow.rollout.analysis import Observation, VariantStats, judge_step, summarize
from canaryflow.stats import percentile

POLICY = CanaryConfig(
    min_requests_per_step=10,
    smoke_requests=15,
    max_error_rate=0.1,
    max_p95_ms=500,
    max_p95_ratio=2.0,
    min_chrf=30,
    chrf_margin=5,
)


def stats(requests=20, errors=0, p95=100.0, chrf=50.0):
    return VariantStats(requests, errors, errors / requests if requests else None, p95, chrf)


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 95) == 95
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
    empty = summarize(obs, "nobody")
    assert empty.requests == 0 and empty.error_rate is None and empty.p95_ms is None


@pytest.mark.parametrize(
    "challenger, champion, passed, failing",
    [
        (stats(), stats(), True, []),
        (stats(), None, True, []),  # smoke check: absolute SLOs only
        (stats(requests=5), stats(), False, ["enough requests"]),
        (stats(requests=12), stats(), True, []),
        (stats(requests=12), None, False, ["enough requests"]),  # the smoke check wants smoke_requests
        (stats(errors=3), stats(), False, ["error rate"]),
        (stats(p95=600), None, False, ["p95 latency"]),
        (stats(p95=250), stats(p95=100), False, ["p95 vs champion"]),
        (stats(chrf=25), None, False, ["online chrF"]),
        (stats(chrf=40), stats(chrf=50), False, ["online chrF vs champion"]),
        (stats(chrf=None), stats(), True, []),  # no references: quality is not judged
        (VariantStats(20, 20, 1.0, None, None), None, False, ["error rate", "p95 latency"]),
    ],
)
def test_step_gate_table(challenger, champion, passed, failing):
    decision = judge_step(challenger, champion, POLICY)
    assert decision.passed is passed
    assert [c.name for c in decision.checks if not c.passed] == failing
