"""Token-overlap F1 and exact match (SQuAD style), best over each prediction's references."""

import collections
import re
import string

import evaluate

from canaryflow.evaluation.metric_base import text_features

_INPUTS = """
Args:
    predictions: list of generated strings.
    references: list of lists of reference strings.
    per_item: also return each prediction's f1 and exact_match under "per_item" (for bootstrap resampling).
Returns:
    f1: mean token F1 (0-1); exact_match: share of predictions equal to a reference after normalisation.
"""


def normalize_answer(text):
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction, reference):
    pred_tokens = normalize_answer(prediction).split()
    ref_tokens = normalize_answer(reference).split()
    if not pred_tokens or not ref_tokens:
        return float(pred_tokens == ref_tokens)
    common = sum((collections.Counter(pred_tokens) & collections.Counter(ref_tokens)).values())
    if common == 0:
        return 0.0
    precision = common / len(pred_tokens)
    recall = common / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


class TokenF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Token F1 and exact match against the best of several references.",
            citation="Rajpurkar et al., 2016. SQuAD: 100,000+ Questions for Machine Comprehension of Text.",
            inputs_description=_INPUTS,
            features=text_features(),
        )

    def _compute(self, predictions, references, per_item=False):
        f1 = [max(token_f1(p, r) for r in refs) for p, refs in zip(predictions, references)]
        exact = [
            max(float(normalize_answer(p) == normalize_answer(r)) for r in refs)
            for p, refs in zip(predictions, references)
        ]
        count = max(len(predictions), 1)
        result = {"f1": sum(f1) / count, "exact_match": sum(exact) / count}
        if per_item:
            result["per_item"] = {"f1": f1, "exact_match": exact}
        return result
