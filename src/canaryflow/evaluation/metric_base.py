"""What the local `evaluate` metric modules under metrics/ share.

The modules are loaded by path with `evaluate.load(<absolute path>)` because hub names fail offline.
evaluate reads each module's imports as requirements, so the modules keep one import per line.
"""

import datasets


def text_features() -> datasets.Features:
    """One string prediction and a list of reference strings per example."""
    return datasets.Features(
        {
            "predictions": datasets.Value("string"),
            "references": datasets.Sequence(datasets.Value("string")),
        }
    )


def reference_streams(references: list[list[str]]) -> list[list[str | None]]:
    """sacrebleu wants one stream per reference position; a shorter list is padded with None."""
    width = max(len(refs) for refs in references)
    return [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
