"""Paired bootstrap resampling of the challenger-minus-champion difference, as sacrebleu does it.

Koehn (2004), "Statistical Significance Tests for Machine Translation Evaluation": resample the test items
with replacement, recompute each corpus metric for both systems on the same resample, and read the
difference's spread off the resamples. Corpus BLEU and chrF are recomputed from per-item sufficient
statistics (sacrebleu's own, summed over the resample), so a resample costs a sum, not a re-scoring;
metrics that are means of per-item scores (ROUGE, token F1, exact match) are resampled as means.

For a gate threshold t (a non-inferiority margin as -margin, or a required improvement as +delta), the
one-sided p-value of H0 "difference <= t" uses the resamples shifted to the null (sacrebleu's approach):
p = (1 + #{b : d_b - d >= d - t}) / (B + 1), where d is the observed difference and d_b a resample's. That
counts the reflected resamples r_b = 2d - d_b at or below t, so the interval this test inverts is the basic
bootstrap interval, read off the same r_b, not the percentile interval of the d_b: its lower end lies above t
exactly when p <= alpha, so the printed interval and the verdict cannot disagree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from canaryflow.config import CORPUS_METRICS, MEAN_METRICS
from canaryflow.errors import BadInputError

_CHUNK = 100  # resamples summed at once: bounds memory at _CHUNK x items x statistics


@dataclass(frozen=True)
class Comparison:
    """One metric, challenger against champion, on the same resamples of the test items.

    [ci_low, ci_high] is the basic (reflected) bootstrap interval at `confidence`, the one the p-value inverts:
    ci_low > threshold exactly when p_value <= (1 - confidence) / 2. `resolution`, diff - ci_low, is the
    smallest difference this test set can show at that confidence: a challenger equal to the champion passes
    a non-inferiority margin only if the margin exceeds it.
    """

    metric: str
    challenger: float
    champion: float
    diff: float
    ci_low: float
    ci_high: float
    confidence: float
    threshold: float  # H0: diff <= threshold (-margin for non-inferiority, +delta for a required improvement)
    p_value: float
    resamples: int
    resolution: float
    items: int  # test inputs resampled

    def to_dict(self) -> dict:
        return asdict(self)


def _sacrebleu_metric(name: str):
    from sacrebleu.metrics import BLEU, CHRF

    return BLEU() if name == "bleu" else CHRF()


def _streams(references: list[list[str]]) -> list[list[str | None]]:
    from canaryflow.evaluation.metric_base import reference_streams

    return reference_streams(references)


def macro_f1(predicted: np.ndarray, true: np.ndarray, classes: int) -> float:
    """Macro-F1 over the classes that occur in either array, in percent (as the classification module)."""
    hits = np.bincount(true[predicted == true], minlength=classes)
    occurs = np.bincount(predicted, minlength=classes) + np.bincount(true, minlength=classes)
    present = occurs > 0
    return float(100 * np.mean(2 * hits[present] / occurs[present]))


class ItemScores:
    """One system's per-item material for every gateable metric, computed once and resampled cheaply."""

    def __init__(self, predictions: list[str], references: list[list[str]], task: str = "seq2seq"):
        from canaryflow.evaluation.scoring import load_metric

        self.labels: tuple[np.ndarray, np.ndarray, int] | None = None
        if task == "classification":
            # An input with several labels is scored against its first, as scoring.score_labels does.
            names = sorted({*predictions, *(refs[0] for refs in references)})
            ids = {name: i for i, name in enumerate(names)}
            predicted = np.array([ids[p] for p in predictions])
            true = np.array([ids[refs[0]] for refs in references])
            self.labels, self.stats = (predicted, true, len(names)), {}
            self.values = {"accuracy": 100.0 * (predicted == true)}
            return
        streams = _streams(references)
        self.stats = {
            name: np.asarray(_sacrebleu_metric(name)._extract_corpus_statistics(predictions, streams), dtype=np.int64)
            for name in CORPUS_METRICS
        }
        rouge = load_metric("rouge_mean").compute(predictions=predictions, references=references, per_item=True)
        f1 = load_metric("token_f1").compute(predictions=predictions, references=references, per_item=True)
        self.values = {name: 100 * np.asarray(rouge["per_item"][name], dtype=float) for name in MEAN_METRICS[:4]}
        self.values["token_f1"] = 100 * np.asarray(f1["per_item"]["f1"], dtype=float)
        self.values["exact_match"] = 100 * np.asarray(f1["per_item"]["exact_match"], dtype=float)

    def score(self, metric: str, indices: np.ndarray) -> np.ndarray:
        """The metric on each resample (a row of item indices); one value per row."""
        if metric in self.values:
            return self.values[metric][indices].mean(axis=1)
        if metric == "macro_f1" and self.labels is not None:
            predicted, true, classes = self.labels
            return np.array([macro_f1(predicted[row], true[row], classes) for row in indices])
        if metric not in self.stats:
            raise KeyError(f"{metric!r} is not a metric of this task")
        scorer = _sacrebleu_metric(metric)
        out = np.empty(len(indices))
        for start in range(0, len(indices), _CHUNK):
            sums = self.stats[metric][indices[start : start + _CHUNK]].sum(axis=1)
            out[start : start + len(sums)] = [scorer._compute_score_from_stats(list(row)).score for row in sums]
        return out

    def full(self, metric: str, n: int) -> float:
        return float(self.score(metric, np.arange(n)[None, :])[0])


def paired_bootstrap(
    challenger: ItemScores,
    champion: ItemScores,
    n_items: int,
    thresholds: dict[str, float],
    resamples: int = 1000,
    seed: int = 12345,
    confidence: float = 0.95,
) -> dict[str, Comparison]:
    """Compare the two systems on every metric in thresholds, on the same seeded resamples."""
    if n_items < 2:
        raise BadInputError(f"the test split has {n_items} input; comparing with the champion needs at least 2")
    # integers() draws what sacrebleu's paired test draws (Generator.choice with replacement calls it), and one
    # draw serves both systems: pairing is what keeps the difference's spread down to where they disagree.
    indices = np.random.default_rng(seed).integers(0, n_items, size=(resamples, n_items))
    alpha = (1 - confidence) / 2
    # p <= alpha allows at most rank - 1 reflected resamples at or below the threshold (counted with the
    # p-value's own arithmetic), so the interval's ends are the rank-th from either end: ci_low > t iff p <= alpha.
    rank = int(np.count_nonzero(np.arange(1, resamples + 2) / (resamples + 1) <= alpha))
    if rank == 0:
        raise ValueError(f"{resamples} resamples cannot give a p-value at or below {alpha:.4g}")
    out: dict[str, Comparison] = {}
    for metric, threshold in thresholds.items():
        a, b = challenger.full(metric, n_items), champion.full(metric, n_items)
        observed = a - b
        deltas = challenger.score(metric, indices) - champion.score(metric, indices)
        reflected = np.sort(2 * observed - deltas)
        low, high = float(reflected[rank - 1]), float(reflected[resamples - rank])
        extreme = int(np.count_nonzero(reflected <= threshold))
        out[metric] = Comparison(
            metric=metric,
            challenger=a,
            champion=b,
            diff=observed,
            ci_low=low,
            ci_high=high,
            confidence=confidence,
            threshold=threshold,
            p_value=(1 + extreme) / (resamples + 1),
            resamples=resamples,
            resolution=observed - low,
            items=n_items,
        )
    return out


def holm(p_values: dict[str, float], alpha: float) -> dict[str, float]:
    """Holm's step-down thresholds: the smallest p-value is held to alpha/m, the next to alpha/(m-1), ...;
    a metric passes if its p-value and every smaller one are under their thresholds."""
    order = sorted(p_values, key=lambda name: (p_values[name], name))
    return {name: alpha / (len(order) - rank) for rank, name in enumerate(order)}
