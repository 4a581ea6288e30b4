"""The MLflow pyfunc wrapper around a saved model directory: a seq2seq generator or a classifier (the
saved config says which; both answer one string per input).

transformers' own MLflow flavor cannot log T5 on transformers 5 (its text2text-generation task is gone),
so models are logged as a PythonModel that loads the saved directory. It is logged as "models from
code" (pyfunc_entry.py), so no live model object is ever pickled into the registry.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.pyfunc


class Seq2SeqModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from canaryflow.inference.predictor import load_predictor

        config = context.model_config or {}
        self.generator = load_predictor(
            context.artifacts["model_dir"],
            max_source_length=int(config.get("max_source_length", 128)),
            num_threads=config.get("num_threads"),
        )
        # How it was evaluated is how it is served: the generation parameters it was registered with.
        self.generator.generation.update({k: int(config[k]) for k in self.generator.generation if k in config})
        # The training data's input profile (from its data card), so a server can tell how far live inputs
        # have drifted from it; versions logged before it was bundled have none.
        profile = context.artifacts.get("input_profile")
        self.input_profile = json.loads(Path(profile).read_text(encoding="utf-8")) if profile else None

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        params = params or {}
        return self.generator.generate(
            list(model_input),
            num_beams=int(params.get("num_beams", self.generator.generation["num_beams"])),
            max_new_tokens=int(params.get("max_new_tokens", self.generator.generation["max_new_tokens"])),
        )
