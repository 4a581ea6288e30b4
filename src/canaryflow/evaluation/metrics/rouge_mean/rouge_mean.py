"""ROUGE-1/2/L/Lsum F-measure as the exact mean over predictions (not the bootstrap "mid")."""

import evaluate
from rouge_score import rouge_scorer

from canaryflow.evaluation.metric_base import text_features

_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_INPUTS = """
Args:
    predictions: list of generated strings.
    references: list of lists of reference strings; each prediction takes its best reference.
    per_item: also return each prediction's scores under "per_item" (for paired bootstrap resampling).
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

    def _compute(self, predictions, references, per_item=False):
        scorer = rouge_scorer.RougeScorer(list(_TYPES), use_stemmer=True)
        items = {name: [] for name in _TYPES}
        for prediction, refs in zip(predictions, references):
            # score_multi keeps, per type, the reference with the best F-measure.
            scores = scorer.score_multi(refs, prediction)
            for name in _TYPES:
                items[name].append(scores[name].fmeasure)
        count = max(len(predictions), 1)
        result = {name: sum(values) / count for name, values in items.items()}
        if per_item:
            result["per_item"] = items
        return result
