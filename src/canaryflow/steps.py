"""One function per pipeline step: the library call plus what the step records in MLflow.

KFP components in `components/` are an import and a call into here; everything below takes JSON and
paths, so it runs and is tested without KFP. All steps of one pipeline run log into one MLflow run,
found by its run key (see registry/tracking.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from canaryflow.config import Config
from canaryflow.registry.tracking import mlflow_step
from canaryflow.warm import forked_when_warm

STEP_TAG = "canaryflow.step."
STEPS = ("prepare_data", "fine_tune", "evaluate_model", "register_model", "canary_rollout")


def run_key_of(run_key: str, job_id: str) -> str:
    """The CLI passes its own key; a scheduled or submitted run falls back to the KFP job id."""
    return run_key or job_id


def _mark_done(step: str) -> None:
    import mlflow

    mlflow.set_tag(STEP_TAG + step, "done")


def config_hash(cfg: Config) -> str:
    return hashlib.sha256(cfg.model_dump_json().encode("utf-8")).hexdigest()[:16]


@forked_when_warm
@mlflow_step("preparing the data")
def prepare_data_step(config_json: str, run_key: str, out_dir: str) -> dict:
    import mlflow

    from canaryflow.data.card import plot_input_lengths, render_markdown
    from canaryflow.data.prepare import prepare_data
    from canaryflow.registry.models import champion_data_card
    from canaryflow.registry.tracking import DATA_CARD, pipeline_run

    cfg = Config.from_json(config_json)
    card = prepare_data(cfg, out_dir, reference=lambda: champion_data_card(cfg))
    with pipeline_run(cfg, run_key):
        mlflow.log_dict(card, DATA_CARD)
        mlflow.log_text(render_markdown(card), "data/data_card.md")
        mlflow.log_figure(plot_input_lengths(card).figure, "data/input_lengths.png")
        if card["drift"]:
            mlflow.log_metrics({f"drift.{name}": value for name, value in card["drift"]["distance"].items()})
        mlflow.log_metrics({f"data.{split}": n for split, n in card["counts"].items()})
        mlflow.set_tags({"data_hash": card["content_hash"], "config_hash": config_hash(cfg)})
        _mark_done("prepare_data")
    return card


def _flat(prefix: str, values: dict) -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(f"{prefix}{key}.", value))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@forked_when_warm
@mlflow_step("fine-tuning")
def fine_tune_step(config_json: str, run_key: str, data_dir: str, out_dir: str, checkpoint_claim: str = "") -> dict:
    """Train, logging every parameter up front and each logged step's telemetry as it happens, so an
    operator watching MLflow sees loss, throughput, memory and the health counters live. A run that
    fails (NaN, no learning, a crash) keeps what it logged; its checkpoints stay for the rerun. With
    train.nodes > 1 a Kubeflow Trainer TrainJob trains on the nodes and this step waits for it; its nodes share
    `checkpoint_claim`, the claim mounted at train.checkpoint_dir."""
    import mlflow
    import torch

    from canaryflow.registry.tracking import pipeline_run
    from canaryflow.training.fine_tune import fine_tune
    from canaryflow.training.launch import data_parallel
    from canaryflow.training.trainjob import train_on_nodes

    cfg = Config.from_json(config_json)
    checkpoints = str(Path(cfg.train.checkpoint_dir) / run_key) if cfg.train.checkpoint_dir else None
    with pipeline_run(cfg, run_key):
        params = _flat("", {"train": cfg.train.model_dump(), "model": cfg.model.model_dump()})
        params.update({f"data.{k}": getattr(cfg.data, k) for k in ("max_source_length", "max_target_length")})
        # A retried step logs the same values again, which MLflow accepts; a changed value it refuses.
        mlflow.log_params(params)

        def log_step(step: int, m: dict) -> None:
            mlflow.log_metrics({f"train.{k}": v for k, v in m.items()}, step=step)

        gpus = torch.cuda.device_count()
        if cfg.train.nodes > 1:
            metrics = train_on_nodes(cfg, run_key, data_dir, out_dir, checkpoint_claim, on_metrics=log_step)
        elif gpus > 1:
            metrics = data_parallel(cfg, gpus, data_dir, out_dir, checkpoints)
            for entry in metrics.pop("steps_log"):
                mlflow.log_metrics({f"train.{k}": v for k, v in entry.items() if k != "step"}, step=entry["step"])
        else:
            metrics = fine_tune(cfg, data_dir, out_dir, checkpoints, on_metrics=log_step)
        mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
        mlflow.log_dict(metrics, "train/train_metrics.json")
        if metrics.get("learning_curve"):
            _log_learning_curve(metrics)
        _mark_done("fine_tune")
    return metrics


def _log_learning_curve(metrics: dict) -> None:
    """Validation losses as a metric series beside the training loss, the plot, and why training stopped."""
    import tempfile

    import mlflow

    from canaryflow.training.health import plot_learning_curve

    for step, loss in metrics["learning_curve"]["validation"]:
        mlflow.log_metric("train.val_loss", loss, step=int(step))
    mlflow.set_tag("train.stopped", metrics["stopped"])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "learning_curve.png"
        plot_learning_curve(metrics["learning_curve"], metrics["stopped"], path)
        mlflow.log_artifact(str(path), "train")


@forked_when_warm
@mlflow_step("evaluating")
def evaluate_model_step(config_json: str, run_key: str, data_dir: str, model_dir: str, out_dir: str) -> dict:
    import mlflow

    from canaryflow.evaluation.scoring import LEARNING_CURVE_FILE, PLOT_FILE, evaluate_models
    from canaryflow.registry import models
    from canaryflow.registry.tracking import pipeline_run

    cfg = Config.from_json(config_json)
    champion_version = models.alias_version(cfg, models.CHAMPION)
    champion = (champion_version, models.load_generator(cfg, champion_version)) if champion_version else None
    result = evaluate_models(cfg, data_dir, model_dir, champion, out_dir)
    with pipeline_run(cfg, run_key):
        for role, values in result["metrics"].items():
            if values:
                mlflow.log_metrics({f"{role}.{k}": v for k, v in values.items()})
        for metric, c in (result["comparisons"] or {}).items():
            mlflow.log_metrics({f"gate.{metric}.diff": c["diff"], f"gate.{metric}.p_value": c["p_value"]})
        mlflow.log_dict(result, "evaluation/evaluation.json")
        for name in ("report.md", "report.html", PLOT_FILE, LEARNING_CURVE_FILE):
            if (Path(out_dir) / name).is_file():  # no learning curve from a model folder without its metrics
                mlflow.log_artifact(str(Path(out_dir) / name), "evaluation")
        mlflow.set_tag("gate.passed", str(result["gate"]["passed"]).lower())
        _mark_done("evaluate_model")
    return result


@forked_when_warm
@mlflow_step("registering the candidate")
def register_model_step(config_json: str, run_key: str, data_dir: str, model_dir: str, evaluation_dir: str) -> str:
    import mlflow

    from canaryflow.registry import models
    from canaryflow.registry.tracking import pipeline_run

    cfg = Config.from_json(config_json)
    evaluation = json.loads((Path(evaluation_dir) / "evaluation.json").read_text(encoding="utf-8"))
    card = json.loads((Path(data_dir) / "data_card.json").read_text(encoding="utf-8"))
    lineage = {"data_hash": card["content_hash"], "config_hash": config_hash(cfg), "base_model": cfg.model.base}
    trained = json.loads((Path(model_dir) / "train_metrics.json").read_text(encoding="utf-8"))
    for key in ("steps", "final_loss", "val_loss", "precision", "val_macro_f1", "nonfinite_losses"):
        if trained.get(key) is not None:
            value = trained[key]
            lineage[f"train.{key}"] = f"{value:.4f}" if isinstance(value, float) else str(value)
    version = models.register_candidate(cfg, run_key, model_dir, evaluation, lineage, card.get("profile"))
    with pipeline_run(cfg, run_key):
        mlflow.set_tag("registered_version", version)
        _mark_done("register_model")
    return version


@forked_when_warm
@mlflow_step("rolling out the canary")
def canary_rollout_step(config_json: str, run_key: str, data_dir: str, version: str, out_dir: str) -> dict:

    from canaryflow.registry.tracking import pipeline_run
    from canaryflow.rollout.controller import canary_rollout

    cfg = Config.from_json(config_json)
    result = canary_rollout(cfg, data_dir, version, run_key, out_dir)
    with pipeline_run(cfg, run_key):
        _mark_done("canary_rollout")
    return result


def _canary_summary(canary: dict | None) -> dict:
    """The canary's verdict and each phase's SLIs and reasons (every look, the timeline, stays in MLflow)."""
    if canary is None:
        return {"verdict": "not_run"}
    return {k: v for k, v in canary.items() if k != "timeline"}


@forked_when_warm
@mlflow_step("recording the outcome")
def record_outcome_step(config_json: str, run_key: str, out_path: str) -> dict:
    """Exit handler: build the run's summary from what the steps logged, whether or not they all ran.

    A run that failed before its first step logged anything still gets an MLflow run, marked FAILED, so
    reviewers see every attempt, not only the ones that got far.
    """
    import mlflow
    from mlflow import MlflowClient

    from canaryflow.registry import models
    from canaryflow.registry.tracking import DATA_CARD, load_logged_dict, pipeline_run

    cfg = Config.from_json(config_json)
    with pipeline_run(cfg, run_key) as active:
        run = MlflowClient().get_run(active.info.run_id)
        tags = run.data.tags
        evaluation = load_logged_dict(run.info.run_id, "evaluation/evaluation.json")
        needed = STEPS if evaluation is None or evaluation["gate"]["passed"] else STEPS[:-1]
        missing = [step for step in needed if tags.get(STEP_TAG + step) != "done"]
        canary = load_logged_dict(run.info.run_id, "canary/canary.json")
        summary = {
            "status": "failed" if missing else "succeeded",
            "failed_step": missing[0] if missing else None,
            "run_key": run_key,
            "mlflow_run_id": run.info.run_id,
            "data": load_logged_dict(run.info.run_id, DATA_CARD),
            "train": load_logged_dict(run.info.run_id, "train/train_metrics.json"),
            "metrics": evaluation["metrics"] if evaluation else None,
            "gate": {
                "passed": evaluation["gate"]["passed"],
                "reasons": evaluation["gate"]["reasons"],
                "warnings": evaluation["gate"].get("warnings", []),
            }
            if evaluation
            else None,
            "version": tags.get("registered_version"),
            "canary": _canary_summary(canary),
            "registry": {"model_name": cfg.registry.model_name, "aliases": models.aliases(cfg)},
            "duration_s": round(time.time() - run.info.start_time / 1000, 1),
        }
        mlflow.log_dict(summary, "summary.json")
        mlflow.set_tag("canaryflow.status", summary["status"])
    MlflowClient().set_terminated(run.info.run_id, "FAILED" if missing else "FINISHED")
    Path(out_path).write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
