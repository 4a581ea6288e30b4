"""Fine-tune a seq2seq model with transformers' Seq2SeqTrainer and save it as safetensors."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

from canaryflow import progress
from canaryflow.config import TINY_BASE, Config
from canaryflow.data.prepare import read_pairs
from canaryflow.errors import BadInputError, CanaryflowError


def _build_or_load(cfg: Config, train_texts: list[str]):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, T5Config, T5ForConditionalGeneration

    from canaryflow.training.tokenizer import train_tokenizer

    if cfg.model.base == TINY_BASE:
        tiny = cfg.model.tiny
        tokenizer = train_tokenizer(train_texts, tiny.vocab_size)
        model = T5ForConditionalGeneration(
            T5Config(
                vocab_size=len(tokenizer),
                d_model=tiny.d_model,
                d_kv=tiny.d_model // tiny.num_heads,
                d_ff=tiny.d_ff,
                num_layers=tiny.num_layers,
                num_decoder_layers=tiny.num_decoder_layers,
                num_heads=tiny.num_heads,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
            )
        )
        return tokenizer, model
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.base)
        model = AutoModelForSeq2SeqLM.from_pretrained(cfg.model.base, use_safetensors=True)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"model.base {cfg.model.base!r} cannot be loaded: {first}") from None
    return tokenizer, model


def _progress_callback(total: int):
    from transformers import TrainerCallback

    class _Progress(TrainerCallback):
        """Report every logging step so a person watching a long run sees it move."""

        def __init__(self) -> None:
            self.losses: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))
                progress.emit("train", state.global_step, total, loss=round(float(logs["loss"]), 4))

    return _Progress()


def fine_tune(cfg: Config, data_dir: str | Path, out_dir: str | Path) -> dict:
    """Train on data_dir's train split, save the model and tokenizer to out_dir, return training metrics."""
    if cfg.model.task != "seq2seq":
        raise BadInputError(f"model.task {cfg.model.task!r} is not supported yet; use seq2seq")
    import datasets
    import torch
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, set_seed

    torch.set_num_threads(cfg.train.num_threads)
    set_seed(cfg.train.seed)
    datasets.disable_progress_bars()
    train = read_pairs(data_dir, "train")
    validation = read_pairs(data_dir, "validation")
    tokenizer, model = _build_or_load(cfg, list(train["input"]) + list(train["target"]))

    def encode(batch):
        enc = tokenizer(batch["input"], max_length=cfg.data.max_source_length, truncation=True)
        enc["labels"] = tokenizer(text_target=batch["target"], max_length=cfg.data.max_target_length, truncation=True)[
            "input_ids"
        ]
        return enc

    def to_dataset(frame):
        ds = datasets.Dataset.from_dict({"input": list(frame["input"]), "target": list(frame["target"])})
        return ds.map(encode, batched=True, remove_columns=["input", "target"])

    train_ds, val_ds = to_dataset(train), to_dataset(validation)
    steps_per_epoch = math.ceil(len(train_ds) / cfg.train.batch_size)
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(steps_per_epoch * cfg.train.epochs)
    out = Path(out_dir)
    args = Seq2SeqTrainingArguments(
        output_dir=str(out / "_trainer"),
        max_steps=total,
        learning_rate=cfg.train.learning_rate,
        per_device_train_batch_size=cfg.train.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        lr_scheduler_type="linear",
        seed=cfg.train.seed,
        logging_steps=max(1, min(25, total // 10)),
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    callback = _progress_callback(total)
    trainer = Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - started
    val_loss = float(trainer.evaluate()["eval_loss"])
    if not math.isfinite(result.training_loss) or not math.isfinite(val_loss):
        # A diverged model must never reach the registry.
        raise CanaryflowError(f"training diverged: train loss {result.training_loss}, validation loss {val_loss}")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    metrics = {
        "train_loss": float(result.training_loss),
        "first_loss": callback.losses[0] if callback.losses else float(result.training_loss),
        "final_loss": callback.losses[-1] if callback.losses else float(result.training_loss),
        "val_loss": val_loss,
        "steps": int(result.global_step),
        "train_seconds": round(train_seconds, 2),
        "samples_per_second": round(result.global_step * cfg.train.batch_size / train_seconds, 2),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "base": cfg.model.base,
    }
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    shutil.rmtree(out / "_trainer", ignore_errors=True)
    return metrics
