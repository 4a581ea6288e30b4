"""The MLflow pyfunc wrapper around a saved model directory: a seq2seq generator or a classifier (the
saved config says which; both answer one string per input).

transformers' own MLflow flavor cannot log T5 on transformers 5 (its text2text-generation task is gone),
so models are logged as a PythonModel that loads the saved directory. It is logged as "models from
code" (pyfunc_entry.py), so no live model object is ever pickled into the registry.
"""

from __future__ import annotations

import mlflow.pyfunc


class Seq2SeqModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from canaryflow.evaluation.generate import load_predictor

        config = context.model_config or {}
        self.generator = load_predictor(
            context.artifacts["model_dir"],
            max_source_length=int(config.get("max_source_length", 128)),
            num_threads=config.get("num_threads"),
        )

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        params = params or {}
        return self.generator.generate(
            list(model_input),
            num_beams=int(params.get("num_beams", 1)),
            max_new_tokens=int(params.get("max_new_tokens", 64)),
        )
