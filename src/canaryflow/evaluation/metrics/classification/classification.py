"""Accuracy and macro-F1 of predicted class ids against the true ones."""

import datasets
import evaluate

_INPUTS = """
Args:
    predictions: list of predicted class ids.
    references: list of true class ids.
Returns:
    accuracy: share predicted right (0-1); macro_f1: the unweighted mean of each class's F1 (0-1), over
    every class that occurs in predictions or references.
"""


class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Accuracy and macro-averaged F1 for single-label classification.",
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references):
        pairs = list(zip(predictions, references))
        accuracy = sum(p == r for p, r in pairs) / max(len(pairs), 1)
        scores = []
        for label in sorted(set(predictions) | set(references)):
            true_pos = sum(p == label and r == label for p, r in pairs)
            predicted = sum(p == label for p, _ in pairs)
            actual = sum(r == label for _, r in pairs)
            scores.append(2 * true_pos / (predicted + actual) if predicted + actual else 0.0)
        return {"accuracy": accuracy, "macro_f1": sum(scores) / max(len(scores), 1)}
