"""Batched prediction from a saved model directory: generated text (seq2seq) or a label (classifier).

Shared by evaluation, the MLflow pyfunc wrapper and the model server, so all three produce the same output
for the same input. Both predictors answer `generate` / `generate_timed` with one string per input, so
everything downstream (scoring, serving, the canary) takes either.
"""

from __future__ import annotations

from pathlib import Path


class Seq2SeqGenerator:
    def __init__(self, model_dir: str | Path, max_source_length: int = 128, num_threads: int | None = None):
        import torch
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir), use_safetensors=True).to(self.device)
        self.model.eval()
        self.max_source_length = max_source_length

    def generate(
        self, inputs: list[str], batch_size: int = 64, num_beams: int = 1, max_new_tokens: int = 64
    ) -> list[str]:
        """Generate one output per input, in input order."""
        return self.generate_timed(inputs, batch_size, num_beams, max_new_tokens)[0]

    def generate_timed(
        self, inputs: list[str], batch_size: int = 64, num_beams: int = 1, max_new_tokens: int = 64
    ) -> tuple[list[str], list[float]]:
        """Outputs in input order, and each input's latency in ms: the time its batch took, which is how
        long a caller waiting for that one output would have waited."""
        import time

        import torch

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
                ids = self.model.generate(**enc, num_beams=num_beams, max_new_tokens=max_new_tokens)
            elapsed_ms = (time.perf_counter() - started) * 1000
            for i, text in zip(idx, self.tokenizer.batch_decode(ids, skip_special_tokens=True)):
                outputs[i] = text.strip()
                latencies[i] = elapsed_ms
        return outputs, latencies


class SequenceClassifier:
    """A saved sequence classifier that answers with label names, in length-sorted batches."""

    def __init__(self, model_dir: str | Path, max_source_length: int = 128, num_threads: int | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), use_safetensors=True)
        self.model.to(self.device).eval()
        self.max_source_length = max_source_length

    def generate(self, inputs: list[str], batch_size: int = 64, num_beams: int = 1, max_new_tokens: int = 64):
        return self.generate_timed(inputs, batch_size)[0]

    def generate_timed(
        self, inputs: list[str], batch_size: int = 64, num_beams: int = 1, max_new_tokens: int = 64
    ) -> tuple[list[str], list[float]]:
        """Label names in input order, and each input's latency in ms (its batch's time). Beams and new
        tokens do not apply to a classifier; they are accepted so callers need not know which they hold."""
        import time

        import torch

        order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
        labels: list[str] = [""] * len(inputs)
        latencies: list[float] = [0.0] * len(inputs)
        names = self.model.config.id2label
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
                logits = self.model(**enc).logits
            elapsed_ms = (time.perf_counter() - started) * 1000
            for i, label_id in zip(idx, logits.argmax(dim=-1).tolist()):
                labels[i] = names[label_id]
                latencies[i] = elapsed_ms
        return labels, latencies


def load_predictor(model_dir: str | Path, max_source_length: int = 128, num_threads: int | None = None):
    """The predictor a saved directory calls for: a classifier if its config says so, else a generator."""
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(str(model_dir)).architectures or []
    if any(name.endswith("ForSequenceClassification") for name in architectures):
        return SequenceClassifier(model_dir, max_source_length, num_threads)
    return Seq2SeqGenerator(model_dir, max_source_length, num_threads)
