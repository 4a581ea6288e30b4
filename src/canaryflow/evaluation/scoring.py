"""Score challenger and champion on the same test set, and judge them with the gate."""

from __future__ import annotations

import json
import time
from functools import cache
from pathlib import Path

from canaryflow import progress
from canaryflow.config import Config
from canaryflow.data.prepare import read_pairs
from canaryflow.evaluation.gate import decide
from canaryflow.evaluation.generate import Seq2SeqGenerator

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
METRIC_MODULES = ("corpus_bleu", "corpus_chrf", "rouge_mean", "token_f1")


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


def run_system(generator: Seq2SeqGenerator, inputs: list[str], references: list[list[str]], cfg: Config):
    started = time.perf_counter()
    predictions = generator.generate(
        inputs,
        batch_size=cfg.eval.batch_size,
        num_beams=cfg.eval.num_beams,
        max_new_tokens=cfg.eval.max_new_tokens,
    )
    seconds = time.perf_counter() - started
    metrics = score(predictions, references)
    metrics["examples_per_second"] = round(len(inputs) / seconds, 2)
    return predictions, metrics


def evaluate_models(
    cfg: Config,
    data_dir: str | Path,
    challenger_dir: str | Path,
    champion: tuple[str, Seq2SeqGenerator] | None,
    out_dir: str | Path,
) -> dict:
    """Score both systems on the test split; write evaluation.json and report.md to out_dir; return the result."""
    test = read_pairs(data_dir, "test")
    inputs = list(test["input"])
    references = [list(refs) for refs in test["references"]]
    systems = [("challenger", Seq2SeqGenerator(challenger_dir, cfg.data.max_source_length))]
    if champion is not None:
        systems.append(("champion", champion[1]))
    predictions: dict[str, list[str]] = {}
    metrics: dict[str, dict[str, float] | None] = {"challenger": None, "champion": None}
    for done, (role, generator) in enumerate(systems):
        progress.emit("evaluate", done, len(systems), system=role)
        predictions[role], metrics[role] = run_system(generator, inputs, references, cfg)
    progress.emit("evaluate", len(systems), len(systems))
    decision = decide(metrics["challenger"], metrics["champion"], cfg.gate)
    result = {
        "metrics": metrics,
        "champion_version": champion[0] if champion else None,
        "test_inputs": len(inputs),
        "gate": decision.to_dict(),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    (out / "report.md").write_text(render_report(result, inputs, references, predictions), encoding="utf-8")
    return result


def render_report(result: dict, inputs: list[str], references: list[list[str]], predictions: dict) -> str:
    challenger, champion = result["metrics"]["challenger"], result["metrics"]["champion"]
    lines = [
        "# Evaluation",
        "",
        f"Gate: **{'PASSED' if result['gate']['passed'] else 'FAILED'}** on {result['test_inputs']} test inputs.",
        "",
        "| metric | challenger | champion |",
        "| --- | ---: | ---: |",
    ]
    for name, value in challenger.items():
        base = f"{champion[name]:.2f}" if champion else "-"
        lines.append(f"| {name} | {value:.2f} | {base} |")
    lines += ["", "## Gate reasons", ""] + [f"- {reason}" for reason in result["gate"]["reasons"]]
    lines += ["", "## Examples", "", "| input | challenger | reference |", "| --- | --- | --- |"]
    for i in range(min(5, len(inputs))):
        lines.append(f"| {inputs[i]} | {predictions['challenger'][i]} | {references[i][0]} |")
    return "\n".join(lines) + "\n"
