"""ROUGE-1/2/L/Lsum F-measure as the exact mean over predictions (not the bootstrap "mid")."""

import evaluate
from rouge_score import rouge_scorer

from canaryflow.evaluation.metric_base import text_features

_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_INPUTS = """
Args:
    predictions: list of generated strings.
    references: list of lists of reference strings; each prediction takes its best reference.
Returns:
    rouge1, rouge2, rougeL, rougeLsum: mean F-measure (0-1).
"""


class RougeMean(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="ROUGE F-measure averaged exactly over predictions.",
            citation="Lin, 2004. ROUGE: A Package for Automatic Evaluation of Summaries.",
            inputs_description=_INPUTS,
            features=text_features(),
        )

    def _compute(self, predictions, references):
        scorer = rouge_scorer.RougeScorer(list(_TYPES), use_stemmer=True)
        totals = dict.fromkeys(_TYPES, 0.0)
        for prediction, refs in zip(predictions, references):
            # score_multi keeps, per type, the reference with the best F-measure.
            scores = scorer.score_multi(refs, prediction)
            for name in _TYPES:
                totals[name] += scores[name].fmeasure
        count = max(len(predictions), 1)
        return {name: total / count for name, total in totals.items()}
