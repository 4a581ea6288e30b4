"""Paired bootstrap resampling: exact point values, sacrebleu's resamples, the basic interval the p-value inverts,
seeded, and Holm's thresholds."""

import random

import numpy as np
import pytest
import sacrebleu

from canaryflow.evaluation.bootstrap import ItemScores, holm, paired_bootstrap
from canaryflow.evaluation.scoring import score

rng = random.Random(3)
REFS = [[f"the {w} sat on mat {i}", f"a {w} is on mat {i}"] for i, w in enumerate(["cat", "dog", "owl", "eel"] * 40)]
GOOD = [refs[0] if rng.random() < 0.8 else "the animal sat" for refs in REFS]
WORSE = [refs[0] if rng.random() < 0.4 else "something else entirely" for refs in REFS]
CLOSE = [
    hyp if rng.random() < 0.85 else refs[1] if rng.random() < 0.5 else "the animal sat" for hyp, refs in zip(GOOD, REFS)
]


class Means:
    """One system's per-item scores of a mean metric, resampled as ItemScores resamples one."""

    def __init__(self, values: np.ndarray):
        self.values = values

    def score(self, metric: str, indices: np.ndarray) -> np.ndarray:
        return self.values[indices].mean(axis=1)

    def full(self, metric: str, n: int) -> float:
        return float(self.values.mean())


@pytest.fixture(scope="module")
def scores():
    return ItemScores(GOOD, REFS), ItemScores(WORSE, REFS)


def test_point_values_equal_the_metrics_themselves(scores):
    good, _ = scores
    full = score(GOOD, REFS)
    for metric in ("bleu", "chrf", "rouge1", "rougeL", "token_f1", "exact_match"):
        assert good.full(metric, len(REFS)) == pytest.approx(full[metric], abs=1e-3), metric
    streams = [[r[0] for r in REFS], [r[1] for r in REFS]]
    assert good.full("bleu", len(REFS)) == pytest.approx(sacrebleu.corpus_bleu(GOOD, streams).score, abs=1e-9)


def test_a_clearly_better_system_passes_non_inferiority_and_improvement(scores):
    good, worse = scores
    result = paired_bootstrap(good, worse, len(REFS), {"bleu": -1.0, "chrf": 2.0}, resamples=500, seed=1)
    for c in result.values():
        assert c.ci_low < c.diff < c.ci_high and c.ci_low > c.threshold
        assert c.p_value < 0.01
    # And the other way round it fails, with the interval below zero.
    back = paired_bootstrap(worse, good, len(REFS), {"bleu": -1.0}, resamples=500, seed=1)["bleu"]
    assert back.ci_high < 0 and back.p_value > 0.9


def test_identical_systems_have_a_zero_width_interval_and_seeds_reproduce(scores):
    good, worse = scores
    same = paired_bootstrap(good, good, len(REFS), {"bleu": -1.0}, resamples=200)["bleu"]
    assert same.diff == same.ci_low == same.ci_high == 0
    one = paired_bootstrap(good, worse, len(REFS), {"rougeL": 0.0}, resamples=200, seed=7)
    assert one == paired_bootstrap(good, worse, len(REFS), {"rougeL": 0.0}, resamples=200, seed=7)
    assert one != paired_bootstrap(good, worse, len(REFS), {"rougeL": 0.0}, resamples=200, seed=8)


@pytest.mark.slow
def test_false_passes_stay_near_alpha_for_a_system_exactly_at_the_margin():
    # Two systems of equal quality, tested for an improvement of 0: H0 is true, so it should be rejected
    # in about alpha of the test sets (one-sided 0.025), not more.
    rejected = 0
    trials = 40
    for t in range(trials):
        local = random.Random(t)
        a = [r[0] if local.random() < 0.6 else "the animal" for r in REFS]
        b = [r[0] if local.random() < 0.6 else "the animal" for r in REFS]
        c = paired_bootstrap(ItemScores(a, REFS), ItemScores(b, REFS), len(REFS), {"token_f1": 0.0}, resamples=300)
        rejected += c["token_f1"].p_value <= 0.025
    assert rejected <= 4  # 40 x 0.025 = 1 expected; 4 or more would happen by chance with p < 0.02


def test_holm_thresholds_step_down_from_the_smallest_p_value():
    assert holm({"a": 0.03, "b": 0.001, "c": 0.01}, 0.05) == pytest.approx({"b": 0.05 / 3, "c": 0.05 / 2, "a": 0.05})
    assert np.isclose(holm({"x": 0.2}, 0.025)["x"], 0.025)


def test_classification_metrics_resample_from_labels():
    from canaryflow.evaluation.scoring import score_labels

    truth = [["pos"], ["neg"], ["pos"], ["neu"], ["neg"], ["pos"]] * 10
    good = ["pos", "neg", "pos", "neu", "pos", "pos"] * 10
    poor = ["pos", "pos", "pos", "pos", "neg", "neg"] * 10
    a, b = ItemScores(good, truth, "classification"), ItemScores(poor, truth, "classification")
    expected = score_labels(good, truth)
    assert a.full("macro_f1", len(truth)) == pytest.approx(expected["macro_f1"], abs=1e-3)
    assert a.full("accuracy", len(truth)) == pytest.approx(expected["accuracy"], abs=1e-3)
    result = paired_bootstrap(a, b, len(truth), {"macro_f1": -1.0, "accuracy": 0.0}, resamples=300)
    assert result["macro_f1"].diff > 20 and result["macro_f1"].p_value < 0.01
    with pytest.raises(KeyError, match="'bleu' is not a metric of this task"):
        a.full("bleu", len(truth))


def _draw(n: int, resamples: int, seed: int) -> np.ndarray:
    # How sacrebleu.significance._paired_bs_test draws its resamples: one set of rows for both systems.
    return np.random.default_rng(seed).choice(n, size=(resamples, n), replace=True)


def _data(kind: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(len(kind))
    if kind == "normal":
        base = rng.normal(50, 10, n)
        return base + rng.normal(0.5, 3, n), base
    if kind == "skewed":  # a few items with large wins: the basic and percentile intervals part ways
        return rng.exponential(10, n) * (rng.random(n) < 0.2), rng.exponential(1, n)
    return 100.0 * (rng.random(n) < 0.55), 100.0 * (rng.random(n) < 0.5)


@pytest.mark.parametrize("kind", ["normal", "skewed", "binary"])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_the_p_value_is_at_most_alpha_exactly_when_the_interval_clears_the_threshold(kind, confidence):
    n, resamples, seed = 60, 400, 5
    a, b = _data(kind, n)
    observed = float(a.mean()) - float(b.mean())
    rows = _draw(n, resamples, seed)
    deltas = a[rows].mean(axis=1) - b[rows].mean(axis=1)
    # The p-value jumps at each reflected resample 2d - d_b: test at each, and a hair either side of each.
    edges = 2 * observed - deltas
    thresholds = [*edges, *np.nextafter(edges, np.inf), *np.nextafter(edges, -np.inf)]
    thresholds += list(np.random.default_rng(1).uniform(edges.min() - 1, edges.max() + 1, 100))
    result = paired_bootstrap(
        Means(a), Means(b), n, {str(i): float(t) for i, t in enumerate(thresholds)}, resamples, seed, confidence
    )
    alpha = (1 - confidence) / 2
    for i, t in enumerate(thresholds):
        c = result[str(i)]
        assert (c.p_value <= alpha) == (c.ci_low > t), (t, c)
        if i >= 3 * resamples:  # away from the jumps, the p-value is the one the module docstring gives
            assert c.p_value == (1 + np.sum(deltas - observed >= observed - t)) / (resamples + 1)
    assert c.ci_low < c.ci_high and c.resolution == pytest.approx(observed - c.ci_low)
    # The upper end is the lower end of the comparison the other way round.
    back = paired_bootstrap(Means(b), Means(a), n, {"x": 0.0}, resamples, seed, confidence)["x"]
    assert back.ci_low == -c.ci_high and back.ci_high == -c.ci_low


def test_bleu_resamples_are_sacrebleu_s_own_and_paired():
    """An independent computation: sacrebleu's corpus BLEU on the resampled texts, on sacrebleu's draw."""
    n, resamples, seed, confidence = 80, 100, 9, 0.9
    refs, ours, theirs = REFS[:n], GOOD[:n], CLOSE[:n]

    def bleu(hyps: list[str], rows) -> np.ndarray:
        return np.array(
            [
                sacrebleu.corpus_bleu([hyps[i] for i in row], [[refs[i][j] for i in row] for j in (0, 1)]).score
                for row in rows
            ]
        )

    rows = _draw(n, resamples, seed)
    observed = float(bleu(ours, [range(n)])[0] - bleu(theirs, [range(n)])[0])
    deltas = bleu(ours, rows) - bleu(theirs, rows)
    reflected = np.sort(2 * observed - deltas)
    alpha = (1 - confidence) / 2
    rank = sum((1 + count) / (resamples + 1) <= alpha for count in range(resamples + 1))
    a, b = ItemScores(ours, refs), ItemScores(theirs, refs)
    for threshold in (-4.0, -2.5, -1.0, 0.0, 0.7):
        c = paired_bootstrap(a, b, n, {"bleu": threshold}, resamples, seed, confidence)["bleu"]
        assert c.diff == pytest.approx(observed, abs=1e-9)
        # The basic interval: reflected resamples, as far in as the p-value's +1 convention allows.
        assert c.ci_low == pytest.approx(reflected[rank - 1], abs=1e-9)
        assert c.ci_high == pytest.approx(reflected[resamples - rank], abs=1e-9)
        assert c.resolution == pytest.approx(observed - reflected[rank - 1], abs=1e-9)
        assert c.p_value == (1 + np.sum(deltas - observed >= observed - threshold)) / (resamples + 1)
    # The data must make the checks above bite: the basic interval is not the percentile one, and the thresholds
    # land on both sides of it.
    percentile = np.sort(deltas)[rank - 1]
    assert abs(percentile - reflected[rank - 1]) > 1e-6
    assert -4.0 < reflected[rank - 1] < 0.7


def test_too_few_resamples_for_the_confidence_are_refused():
    good = Means(np.arange(10.0))
    with pytest.raises(ValueError, match="100 resamples cannot give a p-value at or below 0.0005"):
        paired_bootstrap(good, good, 10, {"m": 0.0}, resamples=100, confidence=0.999)
