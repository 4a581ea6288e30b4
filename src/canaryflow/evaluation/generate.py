"""Batched generation from a saved seq2seq model directory.

Shared by evaluation, the MLflow pyfunc wrapper and the model server, so all three produce the same text
for the same input.
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
