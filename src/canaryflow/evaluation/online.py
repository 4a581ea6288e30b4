"""Online quality: one answer's chrF against its references, measured the same way by the canary controller
(which holds the references) and by a model server (when a request brings them: labels that came back)."""

from __future__ import annotations


def sentence_chrf(prediction: str, references: list[str]) -> float | None:
    """chrF (0-100) of one answer; None without references, since nothing can be said then."""
    if not references:
        return None
    import sacrebleu

    return sacrebleu.sentence_chrf(prediction, list(references)).score
