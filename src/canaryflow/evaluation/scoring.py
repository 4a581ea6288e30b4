"""Score challenger and champion on the same test set, and judge them with the gate."""

from __future__ import annotations

import json
import time
from functools import cache
from pathlib import Path

from canaryflow import progress
from canaryflow.config import Config
from canaryflow.data.prepare import read_pairs
from canaryflow.evaluation import report
from canaryflow.evaluation.bootstrap import Comparison, ItemScores, paired_bootstrap
from canaryflow.evaluation.gate import decide, resolution_warnings
from canaryflow.inference.predictor import load_predictor
from canaryflow.stats import percentile

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
METRIC_MODULES = ("corpus_bleu", "corpus_chrf", "rouge_mean", "token_f1")
PLOT_FILE = "per_example_differences.png"
LEARNING_CURVE_FILE = "learning_curve.png"  # beside report.md, which shows it


@cache
def load_metric(name: str):
    """Load a shipped metric module by absolute path: hub names fail offline, bare names can hit ./name/."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name / f"{name}.py"))


def score(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    results: dict[str, float] = {}
    bleu = load_metric("corpus_bleu").compute(predictions=predictions, references=references)
    results["bleu"] = bleu["score"]
    results["chrf"] = load_metric("corpus_chrf").compute(predictions=predictions, references=references)["score"]
    rouge = load_metric("rouge_mean").compute(predictions=predictions, references=references)
    results.update({name: 100 * value for name, value in rouge.items()})
    f1 = load_metric("token_f1").compute(predictions=predictions, references=references)
    results["token_f1"] = 100 * f1["f1"]
    results["exact_match"] = 100 * f1["exact_match"]
    return {name: round(float(value), 4) for name, value in results.items()}


def score_labels(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Accuracy and macro-F1 (percent) of predicted label names; an input with several labels counts its first."""
    names = sorted({*predictions, *(refs[0] for refs in references)})
    ids = {name: i for i, name in enumerate(names)}
    scores = load_metric("classification").compute(
        predictions=[ids[p] for p in predictions], references=[ids[refs[0]] for refs in references]
    )
    return {name: round(100 * float(value), 4) for name, value in scores.items()}


def run_system(generator, inputs: list[str], references: list[list[str]], cfg: Config):
    started = time.perf_counter()
    predictions, latencies = generator.generate_timed(
        inputs,
        batch_size=cfg.eval.batch_size,
        num_beams=cfg.eval.num_beams,
        max_new_tokens=cfg.eval.max_new_tokens,
    )
    seconds = time.perf_counter() - started
    metrics = (
        score_labels(predictions, references) if cfg.model.task == "classification" else score(predictions, references)
    )
    metrics["examples_per_second"] = round(len(inputs) / seconds, 2)
    latency = {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95)}
    return predictions, metrics, latency


def compare(cfg: Config, references: list[list[str]], predictions: dict[str, list[str]]) -> dict[str, Comparison]:
    """The paired bootstrap of every metric the gate compares, challenger against champion."""
    return paired_bootstrap(
        ItemScores(predictions["challenger"], references, cfg.model.task),
        ItemScores(predictions["champion"], references, cfg.model.task),
        len(references),
        cfg.gate.thresholds(),
        resamples=cfg.gate.resamples,
        seed=cfg.gate.seed,
        confidence=cfg.gate.confidence,
    )


def evaluate_models(
    cfg: Config,
    data_dir: str | Path,
    challenger_dir: str | Path,
    champion: tuple[str, object] | None,
    out_dir: str | Path,
) -> dict:
    """Score both systems on the test split, compare them by paired bootstrap, judge them with the gate;
    write evaluation.json, report.md, report.html and the plot to out_dir; return the result."""
    test = read_pairs(data_dir, "test")
    inputs = list(test["input"])
    references = [list(refs) for refs in test["references"]]
    systems = [("challenger", load_predictor(challenger_dir, cfg.data.max_source_length))]
    if champion is not None:
        systems.append(("champion", champion[1]))
    predictions: dict[str, list[str]] = {}
    metrics: dict[str, dict[str, float] | None] = {"challenger": None, "champion": None}
    latency: dict[str, dict[str, float]] = {}
    for done, (role, generator) in enumerate(systems):
        progress.emit("evaluate", done, len(systems) + 1, system=role)
        predictions[role], metrics[role], latency[role] = run_system(generator, inputs, references, cfg)
    progress.emit("evaluate", len(systems), len(systems) + 1, step="paired bootstrap")
    comparisons = compare(cfg, references, predictions) if champion is not None else None
    progress.emit("evaluate", len(systems) + 1, len(systems) + 1)
    decision = decide(metrics["challenger"], comparisons, cfg.gate)
    result = {
        "metrics": metrics,
        "comparisons": {m: c.to_dict() for m, c in comparisons.items()} if comparisons else None,
        "latency_ms": latency,
        "champion_version": champion[0] if champion else None,
        "test_inputs": len(inputs),
        "gate": {**decision.to_dict(), "warnings": resolution_warnings(comparisons, cfg.gate)},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    built = report.build(result, inputs, references, predictions, cfg.model.task)
    trained = Path(challenger_dir) / "train_metrics.json"
    built.training = json.loads(trained.read_text(encoding="utf-8")) if trained.is_file() else None
    report.plot(built).figure.savefig(out / PLOT_FILE, dpi=100)
    curve = LEARNING_CURVE_FILE if report.write_learning_curve(built, out / LEARNING_CURVE_FILE) else None
    (out / "report.md").write_text(report.markdown(built, PLOT_FILE, curve), encoding="utf-8")
    (out / "report.html").write_text(report.to_html(built), encoding="utf-8")
    return result
