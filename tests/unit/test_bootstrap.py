"""Paired bootstrap resampling: exact point values, sound intervals, seeded, and Holm's thresholds."""

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
