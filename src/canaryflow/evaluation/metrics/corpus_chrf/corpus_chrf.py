"""Corpus chrF through sacrebleu, with any number of references per prediction."""

import evaluate
import sacrebleu

from canaryflow.evaluation.metric_base import reference_streams, text_features

_INPUTS = """
Args:
    predictions: list of generated strings.
    references: list of lists of reference strings, one list per prediction.
Returns:
    score: corpus chrF (0-100).
"""


class CorpusChrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="sacreBLEU corpus chrF (character n-gram F-score, 0-100).",
            citation="Popovic, 2015. chrF: character n-gram F-score for automatic MT evaluation.",
            inputs_description=_INPUTS,
            features=text_features(),
        )

    def _compute(self, predictions, references):
        return {"score": sacrebleu.corpus_chrf(predictions, reference_streams(references)).score}
