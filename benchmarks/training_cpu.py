"""fine_tune's training throughput against a plain Seq2SeqTrainer script, on the same model, data and
settings, side by side in one invocation.

Both sides train the tiny T5 (same config, same tokenizer trained on the same train split) for the same
steps, batch size, learning rate and seed, in fp32 on the CPU, and count the same thing: input tokens
without padding per second of `trainer.train()`. The plain side is what the transformers examples do:
random batches, padded per batch by DataCollatorForSeq2Seq. fine_tune adds the health guard and
telemetry, and runs twice: with its defaults, and with length-grouped batches. Every side also reports its
validation loss, since grouping trades randomness for speed. Each side runs in a fresh process, in turns,
`--repeats` times, each repeat starting with another side; medians are reported. The data is a demo
drop whose inputs vary in length.

Usage: .venv/bin/python benchmarks/training_cpu.py [--steps N] [--repeats N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from datetime import date
from pathlib import Path

from report import machine, run_child, write_section

BEGIN, END = "<!-- training-cpu:begin -->", "<!-- training-cpu:end -->"

_CHILD = r"""
import json, sys, time
side, data_dir, out, steps, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
from canaryflow.config import load_config
cfg = load_config(overrides=[f"train.max_steps={steps}", f"train.num_threads={threads}", "train.checkpoint_steps=0",
                             "train.min_loss_ratio=null", f"train.group_by_length={side == 'grouped'}"])
if side != "plain":
    from canaryflow.training.fine_tune import fine_tune
    metrics = fine_tune(cfg, data_dir, out)
    print(json.dumps({"tokens_per_second": metrics["tokens_per_second"], "seconds": metrics["train_seconds"],
                      "val_loss": metrics["val_loss"]}))
    sys.exit(0)
import datasets, torch
from transformers import (DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments,
                          T5ForConditionalGeneration, set_seed)
from canaryflow.data.prepare import read_pairs
from canaryflow.training.fine_tune import _tiny_config
from canaryflow.training.tokenizer import train_tokenizer
torch.set_num_threads(threads)
set_seed(cfg.train.seed)
datasets.disable_progress_bars()
train = read_pairs(data_dir, "train")
tokenizer = train_tokenizer(list(train["input"]) + list(train["target"]), cfg.model.tiny.vocab_size)
model = T5ForConditionalGeneration(_tiny_config(cfg, tokenizer, None))
def encode(batch):
    enc = tokenizer(batch["input"], max_length=cfg.data.max_source_length, truncation=True)
    enc["labels"] = tokenizer(text_target=batch["target"], max_length=cfg.data.max_target_length,
                              truncation=True)["input_ids"]
    return enc
ds = datasets.Dataset.from_dict({"input": list(train["input"]), "target": list(train["target"])})
ds = ds.map(encode, batched=True, remove_columns=["input", "target"])
args = Seq2SeqTrainingArguments(output_dir=out, max_steps=steps, learning_rate=cfg.train.learning_rate,
    per_device_train_batch_size=cfg.train.batch_size, seed=cfg.train.seed, save_strategy="no", report_to=[],
    disable_tqdm=True, logging_steps=max(1, steps // 10), dataloader_num_workers=0,
    include_num_input_tokens_seen="non_padding")
trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                         data_collator=DataCollatorForSeq2Seq(tokenizer, model=model))
started = time.perf_counter()
trainer.train()
seconds = time.perf_counter() - started
val = datasets.Dataset.from_dict({k: list(v) for k, v in read_pairs(data_dir, "validation").items()})
val_loss = trainer.evaluate(val.map(encode, batched=True, remove_columns=["input", "target"]))["eval_loss"]
print(json.dumps({"tokens_per_second": trainer.state.num_input_tokens_seen / seconds, "seconds": seconds,
                  "val_loss": val_loss}))
"""


def _prepare(root: Path, records: int) -> Path:
    from canaryflow.config import load_config
    from canaryflow.data.prepare import prepare_data
    from canaryflow.data.synthetic import write_drop

    files = write_drop(root, 1, records=records, test_records=100)
    cfg = load_config(overrides=[f"data.{split}={path}" for split, path in files.items()])
    prepare_data(cfg, root / "data")
    return root / "data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--records", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="canaryflow-train-bench-") as tmp:
        data = _prepare(Path(tmp), args.records)
        runs: dict[str, list[dict]] = {"plain": [], "canaryflow": [], "grouped": []}
        sides = list(runs)
        for i in range(args.repeats):
            # Each repeat starts with another side, so no side always runs first (or after the same one).
            for side in sides[i % len(sides) :] + sides[: i % len(sides)]:
                out = str(Path(tmp) / f"{side}-{i}")
                runs[side].append(run_child(side, _CHILD, side, str(data), out, str(args.steps), str(args.threads)))
                print(side, runs[side][-1], flush=True)
    rate = {side: statistics.median(r["tokens_per_second"] for r in results) for side, results in runs.items()}
    loss = {side: statistics.median(r["val_loss"] for r in results) for side, results in runs.items()}
    ratio = {side: rate[side] / rate["plain"] for side in runs}
    lines = [
        f"## Training throughput on the CPU — measured {date.today().isoformat()}",
        "",
        f"Machine: {machine()}. Tiny T5 (0.8M parameters), {args.steps} steps of batch 32, fp32, "
        f"{args.threads} torch thread(s), demo data ({args.records} records); medians of {args.repeats} "
        "runs in rotating order, each in a fresh process.",
        "",
        "| what | input tokens/s (no padding) | ratio | validation loss after training |",
        "| --- | ---: | ---: | ---: |",
        f"| canaryflow fine_tune, defaults (health guard, telemetry) | {rate['canaryflow']:,.0f} "
        f"| {ratio['canaryflow']:.2f}x | {loss['canaryflow']:.3f} |",
        f"| canaryflow fine_tune, train.group_by_length=true | {rate['grouped']:,.0f} | {ratio['grouped']:.2f}x "
        f"| {loss['grouped']:.3f} |",
        f"| baseline: plain Seq2SeqTrainer script, random batches, per-batch padding | {rate['plain']:,.0f} | 1.00x "
        f"| {loss['plain']:.3f} |",
        "",
        "Target (fine-tuning issue): at least as fast as the plain script, faster through length grouping. "
        f"Defaults: {'met' if ratio['canaryflow'] >= 0.98 else 'not met'} (within 2%, the run-to-run noise); "
        f"grouped: {'met' if ratio['grouped'] >= 1 else 'not met'}. Grouping is off by default because the less "
        "random batches cost validation loss on data this small (last column).",
        "Reproduce: `.venv/bin/python benchmarks/training_cpu.py`.",
    ]
    print(write_section(BEGIN, END, lines))


if __name__ == "__main__":
    main()
