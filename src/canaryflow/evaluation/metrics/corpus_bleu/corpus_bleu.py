"""Corpus BLEU through sacrebleu, with any number of references per prediction."""

import evaluate
import sacrebleu

from canaryflow.evaluation.metric_base import reference_streams, text_features

_DESCRIPTION = "sacreBLEU corpus BLEU (0-100). Predictions may have different numbers of references."
_INPUTS = """
Args:
    predictions: list of generated strings.
    references: list of lists of reference strings, one list per prediction.
Returns:
    score: corpus BLEU; bp: brevity penalty; sys_len, ref_len: lengths in tokens.
"""


class CorpusBleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, 2018. A Call for Clarity in Reporting BLEU Scores.",
            inputs_description=_INPUTS,
            features=text_features(),
        )

    def _compute(self, predictions, references):
        result = sacrebleu.corpus_bleu(predictions, reference_streams(references))
        return {"score": result.score, "bp": result.bp, "sys_len": result.sys_len, "ref_len": result.ref_len}
