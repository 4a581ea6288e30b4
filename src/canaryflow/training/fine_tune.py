"""Fine-tune with transformers' Trainer, seq2seq or classification, and save the model as safetensors.

- Precision follows the device (training/precision.py); batches are grouped by length and padded per
  batch, so little compute goes to padding.
- The health guard (training/health.py) fails the step on repeated NaN/Inf, and so does a loss that never
  fell below train.min_loss_ratio of where it started: such a model never reaches the registry.
- Checkpoints go every train.checkpoint_steps into a folder that outlives the process (a PVC on a
  cluster). A rerun of the same pipeline run resumes from the last one, and the step counter carries on,
  provided the checkpoint was written for the same config and data.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

from canaryflow import progress
from canaryflow.config import TINY_BASE, Config
from canaryflow.data.prepare import read_pairs
from canaryflow.errors import BadInputError, CanaryflowError
from canaryflow.inference.predictor import input_limit
from canaryflow.training.checkpoints import ensure_writable
from canaryflow.training.health import HealthGuard, OnMetrics, Telemetry, TimeLimit, learning_curve, peak_memory_mb
from canaryflow.training.precision import Precision, choose, current_device

FINGERPRINT = "canaryflow-fingerprint.txt"


def _labels(train, validation) -> list[str]:
    labels = sorted(set(train["target"]))
    unseen = sorted(set(validation["target"]) - set(labels))
    if unseen:
        raise BadInputError(f"classification: validation labels {unseen[:5]} never occur in train")
    if len(labels) < 2:
        raise BadInputError(f"classification: train has {len(labels)} label(s); at least 2 are needed")
    return labels


def _tiny_config(cfg: Config, tokenizer, labels: list[str] | None):
    from transformers import T5Config

    tiny = cfg.model.tiny
    extra = {"id2label": dict(enumerate(labels)), "label2id": {x: i for i, x in enumerate(labels)}} if labels else {}
    return T5Config(
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
        **extra,
    )


def tiny_model(cfg: Config, train_texts: list[str], labels: list[str] | None, resume: str | None = None):
    """The tiny T5 of `model.tiny`, untrained, with its tokenizer: trained on `train_texts`, or taken from the
    checkpoint being resumed; a classifier's head when there are `labels`."""
    from transformers import AutoTokenizer, T5ForConditionalGeneration, T5ForSequenceClassification

    from canaryflow.training.tokenizer import train_tokenizer

    vocab = cfg.model.tiny.vocab_size
    tokenizer = AutoTokenizer.from_pretrained(resume) if resume else train_tokenizer(train_texts, vocab)
    head = T5ForSequenceClassification if labels else T5ForConditionalGeneration
    return tokenizer, head(_tiny_config(cfg, tokenizer, labels))


def _build_or_load(cfg: Config, base: str, train_texts: list[str], labels: list[str] | None, resume: str | None):
    """Tokenizer and model: the tiny T5 built from config (its tokenizer trained on the data, or taken
    from the checkpoint being resumed), or a pretrained model from a directory or the hub."""
    from transformers import AutoModelForSeq2SeqLM, AutoModelForSequenceClassification, AutoTokenizer

    if base == TINY_BASE:
        return tiny_model(cfg, train_texts, labels, resume)
    remote = {"trust_remote_code": cfg.model.trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(base, **remote)
        if labels:
            model = AutoModelForSequenceClassification.from_pretrained(
                base,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)},
                ignore_mismatched_sizes=True,  # a new label set gets a new head; the body is what is reused
                use_safetensors=True,
                **remote,
            )
        else:
            model = AutoModelForSeq2SeqLM.from_pretrained(base, use_safetensors=True, **remote)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInputError(f"model.base {cfg.model.base!r} cannot be loaded: {first}") from None
    return tokenizer, model


def resolve_base(cfg: Config, scratch: Path) -> str:
    """model.base as something from_pretrained reads: a registered model is downloaded first."""
    if not cfg.model.base.startswith("models:/"):
        return cfg.model.base
    from canaryflow.registry.models import download_model_dir

    return str(download_model_dir(cfg, cfg.model.base, scratch))


def fingerprint(cfg: Config, data_dir: str | Path) -> str:
    """What a checkpoint must have been trained on to be resumed: the model and training config (not where
    it runs) and the data's content hash."""
    card = json.loads((Path(data_dir) / "data_card.json").read_text(encoding="utf-8"))
    where = {"checkpoint_dir", "checkpoint_pvc", "cpu_request", "memory_request", "node_selector", "tolerations"}
    # The TrainJob's runtime and its wait bound; not train.nodes, which multiplies the batch a step trains on.
    where |= {"runtime", "runtime_kind", "max_wall_seconds"}
    train = cfg.train.model_dump(exclude=where | {"accelerator_type", "accelerator_limit", "num_threads"})
    payload = json.dumps([cfg.model.model_dump(), train, card["content_hash"]], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _complete(checkpoint: Path) -> bool:
    # The Trainer writes trainer_state.json last, after weights, optimizer and RNG state: a process killed
    # while saving leaves a checkpoint without it (or with a torn one).
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return True


def checkpoint_to_resume(folder: Path, mark: str) -> str | None:
    """The last complete checkpoint in folder, if it was written for this config and data. A folder left by
    other training is cleared, since resuming it would train something nobody asked for; a checkpoint torn
    by the kill is removed, and the one before it is resumed."""
    # Under torchrun every rank asks; all reach the same answer, and only rank 0 changes the folder (which
    # launch.data_parallel has already put in order, so that no rank sees it change).
    lead = os.environ.get("RANK", "0") == "0"
    stamp = folder / FINGERPRINT
    found = sorted(
        (p for p in folder.glob("checkpoint-*") if p.name.rsplit("-", 1)[-1].isdigit()),
        key=lambda p: int(p.name.rsplit("-", 1)[-1]),
    )
    # An empty folder is a first run's (ensure_writable made it), not another training's.
    stale = stamp.read_text() != mark if stamp.is_file() else bool(found)
    if stale:
        if not lead:
            return None
        print(f"checkpoints in {folder} are from another config or data; starting over", flush=True)
        shutil.rmtree(folder)
        found = []
    if lead and not (stamp.is_file() and stamp.read_text() == mark):
        # Written only when it differs: a rewrite is, for a moment, an empty stamp that another rank reads.
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(mark)
    while found and not _complete(found[-1]):
        torn = found.pop()
        if lead:
            print(f"removing {torn.name}: it was not completely written", flush=True)
            shutil.rmtree(torn)
    if found and lead:
        print(f"resuming from {found[-1]}", flush=True)
    return str(found[-1]) if found else None


def training_arguments(cfg: Config, total_steps: int, folder: Path, precision: Precision, classify: bool) -> dict:
    """The Trainer's arguments, from config and the chosen precision."""
    import torch

    t = cfg.train
    checkpoints = t.checkpoint_steps > 0
    # Ranks of torchrun without a GPU: accelerate makes them one data-parallel job only when told the CPU is
    # meant; untold, each rank trains alone and all of them write. gloo is named because accelerate would
    # otherwise take MPI wherever torch was built with it.
    cpu_ranks = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    evaluate = t.early_stopping_patience > 0
    return {
        "output_dir": str(folder),
        "max_steps": total_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": math.ceil(t.warmup_ratio * total_steps),
        "per_device_train_batch_size": t.batch_size,
        "per_device_eval_batch_size": cfg.eval.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "weight_decay": t.weight_decay,
        "label_smoothing_factor": t.label_smoothing,
        "max_grad_norm": t.max_grad_norm,
        "seed": t.seed,
        **precision.trainer_arguments(),
        "train_sampling_strategy": "group_by_length" if t.group_by_length else "random",
        "include_num_input_tokens_seen": "non_padding",
        "logging_steps": max(1, min(25, total_steps // 10)),
        "save_strategy": "steps" if checkpoints else "no",
        "save_steps": t.checkpoint_steps or 500,
        "save_total_limit": t.checkpoint_limit,
        "save_only_model": False,  # optimizer, scheduler and RNG state too: a resume must continue, not restart
        "eval_strategy": "steps" if evaluate else "no",
        "eval_steps": t.checkpoint_steps or None,
        "load_best_model_at_end": evaluate,
        "metric_for_best_model": "eval_loss" if evaluate else None,
        "greater_is_better": False if evaluate else None,
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
        "use_cpu": cpu_ranks,
        "ddp_backend": "gloo" if cpu_ranks else None,
        # Left on, the Trainer multiplies each rank's loss by the number of ranks, trusting the model to divide
        # by the token count of all ranks together (num_items_in_batch); T5, for one, takes the mean of its own
        # batch, so losses and gradients came out N times too large. One process: no difference.
        "average_tokens_across_devices": False,
    }


def _guarded(trainer_class, guard: HealthGuard):
    class Guarded(trainer_class):
        """The Trainer with every training loss shown to the health guard (and the drill's NaN injected)."""

        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            if not model.training:
                return result
            loss = result[0] if return_outputs else result
            loss = guard.inspect_loss(loss, self.state.global_step, self.control)
            return (loss, result[1]) if return_outputs else loss

    return Guarded


def _classification_metrics(eval_pred) -> dict[str, float]:
    import numpy as np

    from canaryflow.evaluation.scoring import load_metric

    logits, labels = eval_pred
    if isinstance(logits, tuple):  # encoder-decoder classifiers return their hidden states after the logits
        logits = logits[0]
    scores = load_metric("classification").compute(predictions=np.argmax(logits, axis=-1), references=labels)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}


def _why_stopped(cfg: Config, timer, early, step: int, total: int) -> str:
    """plateau (the validation loss stopped falling), time (train.max_seconds) or budget (steps or epochs)."""
    if timer.tripped and step < total:
        return "time"
    if cfg.train.early_stopping_patience and early.early_stopping_patience_counter >= early.early_stopping_patience:
        return "plateau"
    return "budget"


def _losses(log_history: list[dict]) -> list[float]:
    return [float(entry["loss"]) for entry in log_history if "loss" in entry]


def fine_tune(
    cfg: Config,
    data_dir: str | Path,
    out_dir: str | Path,
    checkpoint_dir: str | Path | None = None,
    on_metrics: OnMetrics | None = None,
) -> dict:
    """Train on data_dir's train split, save model and tokenizer to out_dir, return training metrics.

    checkpoint_dir is where this run's checkpoints go; unset, a folder inside out_dir (which a rerun does
    not see, so it cannot resume). on_metrics(step, metrics) receives the per-step telemetry.
    """
    import datasets
    import torch
    import transformers
    from transformers import (
        DataCollatorForSeq2Seq,
        DataCollatorWithPadding,
        EarlyStoppingCallback,
        PrinterCallback,
        Seq2SeqTrainer,
        Seq2SeqTrainingArguments,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    torch.set_num_threads(cfg.train.num_threads)
    set_seed(cfg.train.seed)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()  # per-shard save bars; progress lines say enough
    out = Path(out_dir)
    classify = cfg.model.task == "classification"
    train, validation = read_pairs(data_dir, "train"), read_pairs(data_dir, "validation")
    labels = _labels(train, validation) if classify else None
    label_ids = {label: i for i, label in enumerate(labels or [])}
    precision = choose(cfg.train.precision, current_device(), cfg.train.tf32)
    folder = Path(checkpoint_dir) if checkpoint_dir else out / "_checkpoints"
    if cfg.train.checkpoint_steps:
        ensure_writable(folder, cfg)
    resume = checkpoint_to_resume(folder, fingerprint(cfg, data_dir)) if cfg.train.checkpoint_steps else None
    base = resolve_base(cfg, out / "_base")
    tokenizer, model = _build_or_load(cfg, base, list(train["input"]) + list(train["target"]), labels, resume)
    max_source = input_limit(cfg.data.max_source_length, tokenizer, model.config)
    if max_source < cfg.data.max_source_length:
        print(
            f"data.max_source_length {cfg.data.max_source_length} is over what {cfg.model.base} takes: "
            f"inputs are cut at {max_source} tokens",
            flush=True,
        )

    def encode(batch):
        enc = tokenizer(batch["input"], max_length=max_source, truncation=True)
        if classify:
            enc["labels"] = [label_ids[label] for label in batch["target"]]
        else:
            targets = tokenizer(text_target=batch["target"], max_length=cfg.data.max_target_length, truncation=True)
            enc["labels"] = targets["input_ids"]
        return enc

    def to_dataset(frame):
        ds = datasets.Dataset.from_dict({"input": list(frame["input"]), "target": list(frame["target"])})
        return ds.map(encode, batched=True, remove_columns=["input", "target"])

    train_ds, val_ds = to_dataset(train), to_dataset(validation)
    # Each of torchrun's ranks takes its own batches: a step trains on all of theirs.
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    samples_per_step = cfg.train.batch_size * cfg.train.gradient_accumulation_steps * ranks
    steps_per_epoch = math.ceil(len(train_ds) / samples_per_step)
    total = cfg.train.max_steps if cfg.train.max_steps > 0 else math.ceil(steps_per_epoch * cfg.train.epochs)
    arguments = training_arguments(cfg, total, folder, precision, classify)
    guard = HealthGuard(cfg.train.max_nonfinite, cfg.train.fault_nan_after_step)

    def show(step: int, of: int, loss: float) -> None:
        progress.emit("train", step, of, loss=round(loss, 4), **guard.counters())

    telemetry = Telemetry(guard, samples_per_step, on_metrics or (lambda step, m: None), show)
    timer = TimeLimit(cfg.train.max_seconds)
    callbacks = [guard, telemetry, timer]
    early = EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience)
    if cfg.train.early_stopping_patience:
        callbacks.append(early)
    if classify:
        trainer_class, args = Trainer, TrainingArguments(**arguments)
        collator, extra = DataCollatorWithPadding(tokenizer), {"compute_metrics": _classification_metrics}
    else:
        trainer_class, args = Seq2SeqTrainer, Seq2SeqTrainingArguments(**arguments)
        # Padded to a multiple of 8 on a GPU, where tensor cores want it; per batch, never to the maximum.
        multiple = 8 if precision.name != "fp32" else None
        collator, extra = DataCollatorForSeq2Seq(tokenizer, model=model, pad_to_multiple_of=multiple), {}
    trainer = _guarded(trainer_class, guard)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        **extra,
    )
    trainer.remove_callback(PrinterCallback)  # Telemetry reports each logged step, once
    lead = trainer.is_world_process_zero()  # under torchrun every rank runs this; one reports and saves
    if not lead:
        telemetry.on_metrics, telemetry.on_progress = (lambda step, m: None), (lambda step, of, loss: None)
    resumed_from = int(Path(resume).name.rsplit("-", 1)[-1]) if resume else 0
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - started
    if guard.tripped:
        raise CanaryflowError(guard.error())
    evaluation = trainer.evaluate()
    val_loss = float(evaluation["eval_loss"])
    losses = _losses(trainer.state.log_history)  # the whole run's, resumed or not: the state carries them
    if not losses or not all(map(math.isfinite, [*losses, val_loss])):
        raise CanaryflowError(f"training diverged: losses {losses[-3:]}, validation loss {val_loss}")
    ratio = cfg.train.min_loss_ratio
    if ratio is not None and losses[-1] >= ratio * losses[0]:
        raise CanaryflowError(
            f"training did not learn: loss {losses[-1]:.4f} is not below train.min_loss_ratio {ratio} of its "
            f"start {losses[0]:.4f}; nothing is registered"
        )

    if not lead:
        return {}
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    steps_run = int(result.global_step) - resumed_from
    stopped = _why_stopped(cfg, timer, early, int(result.global_step), total)
    metrics = {
        "train_loss": float(result.training_loss),
        "first_loss": losses[0],
        "final_loss": losses[-1],
        "val_loss": val_loss,
        "steps": int(result.global_step),
        "resumed_from_step": resumed_from,
        "train_seconds": round(train_seconds, 2),
        "samples_per_second": round(steps_run * samples_per_step / max(train_seconds, 1e-9), 2),
        "tokens_per_second": round(telemetry.tokens_seen(trainer.state) / max(train_seconds, 1e-9), 1),
        "peak_memory_mb": round(peak_memory_mb(), 1),
        "precision": precision.name,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "max_source_tokens": max_source,
        "base": cfg.model.base,
        "task": cfg.model.task,
        "stopped": stopped,
        "max_steps": total,
        "learning_curve": learning_curve(trainer.state.log_history),
        **guard.counters(),
    }
    if classify:
        metrics.update({"val_accuracy": evaluation["eval_accuracy"], "val_macro_f1": evaluation["eval_macro_f1"]})
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    # The model is saved: the checkpoints have done their job, and on a shared PVC they take real space.
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(out / "_base", ignore_errors=True)
    return metrics
