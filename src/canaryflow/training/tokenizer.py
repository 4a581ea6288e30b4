"""A BPE tokenizer trained on the train split.

BPE with a Metaspace pre-tokenizer round-trips templated text exactly; Unigram degenerates into
characters on it and WordPiece does not round-trip punctuation (PROBED.md).
"""

from __future__ import annotations

import string
from collections.abc import Iterable

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
# Every printable ASCII character and the Latin-1 letters are in the vocabulary even when the train
# split lacks them: a test entity with an unseen letter must still be spelled, not dropped as <unk>.
ALPHABET = sorted(set(string.printable.strip()) | {chr(c) for c in range(0xC0, 0x100)})


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS, UNK], initial_alphabet=ALPHABET, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # T5 expects every sequence to end with </s>.
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)
