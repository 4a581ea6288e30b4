"""Batched prediction from a saved model directory: generated text (seq2seq) or a label (classifier).

Shared by evaluation, the MLflow pyfunc wrapper and the model server, so all three produce the same output
for the same input. Both predictors answer `generate` / `generate_timed` with one string per input, so
everything downstream (scoring, serving, the canary) takes either.
"""

from __future__ import annotations

from pathlib import Path

# How a model generates when nothing says otherwise; a registered version carries its own (eval.num_beams and
# eval.max_new_tokens when it was trained, in its pyfunc model_config), which every loader of it applies.
GENERATION = {"num_beams": 1, "max_new_tokens": 64}


def input_limit(wanted: int, tokenizer, model_config) -> int:
    """The longest input, in tokens, to give a model: `wanted` (data.max_source_length), cut to what a model
    with learned absolute positions takes (BERT's 512, MiniLM's): one token past it, the position lookup
    fails with a tensor size error. Relative positions (T5) have no such limit."""
    positions = getattr(model_config, "max_position_embeddings", None)
    if not positions:
        return wanted
    # RoBERTa-style models learn 514 positions and start counting at 2: their tokenizer says 512.
    return min(wanted, positions, tokenizer.model_max_length or positions)


class _Predictor:
    """Loads tokenizer and model, and runs inputs through them in length-sorted batches."""

    def __init__(self, model_dir: str | Path, max_source_length: int = 128, num_threads: int | None = None):
        import torch
        import transformers
        from transformers import AutoTokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        auto = getattr(transformers, self.AUTO_CLASS)
        self.model = auto.from_pretrained(str(model_dir), use_safetensors=True).to(self.device)
        self.model.eval()
        self.max_source_length = input_limit(max_source_length, self.tokenizer, self.model.config)
        self.generation = dict(GENERATION)

    AUTO_CLASS = ""

    def _predict(self, enc, num_beams: int, max_new_tokens: int) -> list[str]:
        raise NotImplementedError

    def generate(
        self, inputs: list[str], batch_size: int = 64, num_beams: int | None = None, max_new_tokens: int | None = None
    ) -> list[str]:
        """One output per input, in input order; beams and new tokens default to the model's `generation`."""
        return self.generate_timed(inputs, batch_size, num_beams, max_new_tokens)[0]

    def generate_timed(
        self, inputs: list[str], batch_size: int = 64, num_beams: int | None = None, max_new_tokens: int | None = None
    ) -> tuple[list[str], list[float]]:
        """Outputs in input order, and each input's latency in ms: the time its batch took, which is how
        long a caller waiting for that one output would have waited."""
        import time

        import torch

        num_beams = num_beams or self.generation["num_beams"]
        max_new_tokens = max_new_tokens or self.generation["max_new_tokens"]

        # Batches of similar length waste little compute on padding.
        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        outputs: list[str] = [""] * len(inputs)
        latencies: list[float] = [0.0] * len(inputs)
        for start in range(0, len(order), batch_size):
            started = time.perf_counter()
            idx = order[start : start + batch_size]
            enc = self.tokenizer(
                [inputs[i] for i in idx],
                max_length=self.max_source_length,
                truncation=True,
                padding=True,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                predicted = self._predict(enc, num_beams, max_new_tokens)
            elapsed_ms = (time.perf_counter() - started) * 1000
            for i, text in zip(idx, predicted):
                outputs[i] = text
                latencies[i] = elapsed_ms
        return outputs, latencies


class Seq2SeqGenerator(_Predictor):
    """Generated text, greedy or with beams."""

    AUTO_CLASS = "AutoModelForSeq2SeqLM"

    def _predict(self, enc, num_beams: int, max_new_tokens: int) -> list[str]:
        ids = self.model.generate(**enc, num_beams=num_beams, max_new_tokens=max_new_tokens)
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]


class SequenceClassifier(_Predictor):
    """Label names. Beams and new tokens do not apply; they are accepted so callers need not know which
    predictor they hold."""

    AUTO_CLASS = "AutoModelForSequenceClassification"

    def _predict(self, enc, num_beams: int, max_new_tokens: int) -> list[str]:
        names = self.model.config.id2label
        return [names[label_id] for label_id in self.model(**enc).logits.argmax(dim=-1).tolist()]


def load_predictor(model_dir: str | Path, max_source_length: int = 128, num_threads: int | None = None):
    """The predictor a saved directory calls for: a classifier if its config says so, else a generator."""
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(str(model_dir)).architectures or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return SequenceClassifier(model_dir, max_source_length, num_threads)
    return Seq2SeqGenerator(model_dir, max_source_length, num_threads)
