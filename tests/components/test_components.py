"""Each KFP component through `.python_func`, with real artifact objects on temporary paths, chained as
the DAG chains them, against a real MLflow SQLite store and real model servers."""

import json

import pytest
from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model
from mlflow import MlflowClient

from canaryflow.components.canary_rollout import canary_rollout
from canaryflow.components.evaluate_model import evaluate_model
from canaryflow.components.fine_tune import fine_tune
from canaryflow.components.prepare_data import prepare_data
from canaryflow.components.record_outcome import record_outcome
from canaryflow.components.register_model import register_model
from canaryflow.registry.tracking import sqlite_uri
from tests.conftest import demo_config

pytestmark = pytest.mark.slow  # each test runs a component through kfp.local in its own processes


def _artifact(kind, tmp_path, name):
    return kind(name=name, uri=str(tmp_path / name), metadata={})


@pytest.fixture(scope="module")
def chain(tmp_path_factory, demo_files):
    tmp = tmp_path_factory.mktemp("components")
    cfg = demo_config(
        demo_files,
        f"mlflow.tracking_uri={sqlite_uri(tmp / 'workdir')}",
        "train.max_steps=40",
        "gate.floors={bleu: 0.0}",
        "canary.min_chrf=0",
        "canary.max_error_rate=0.3",  # loose smoke limits: a few dozen requests decide
        "canary.min_requests_per_step=20",
        # The briefly trained model answers slowly (long garbage); a looser alpha halves the requests the smoke
        # check needs to show its answers are fast enough. The policy's own alpha is tested by simulation.
        "canary.alpha=0.2",
        "canary.concurrency=2",
    )
    ids = {"config_json": cfg.model_dump_json(), "run_key": "", "job_id": "job-1"}
    out = {"cfg": cfg, "ids": ids, "tmp": tmp}
    out["data"] = _artifact(Dataset, tmp, "data")
    out["data_card"] = _artifact(Markdown, tmp, "data_card.md")
    prepare_data.python_func(data=out["data"], data_card=out["data_card"], **ids)
    out["model"], out["train_metrics"] = _artifact(Model, tmp, "model"), _artifact(Metrics, tmp, "train_metrics")
    fine_tune.python_func(data=out["data"], model=out["model"], metrics=out["train_metrics"], **ids)
    out["evaluation"] = _artifact(Artifact, tmp, "evaluation")
    out["eval_metrics"], out["report"] = _artifact(Metrics, tmp, "eval_metrics"), _artifact(Markdown, tmp, "report.md")
    out["report_html"] = _artifact(HTML, tmp, "report.html")
    out["gate_passed"] = evaluate_model.python_func(
        data=out["data"],
        model=out["model"],
        evaluation=out["evaluation"],
        metrics=out["eval_metrics"],
        report=out["report"],
        report_html=out["report_html"],
        **ids,
    )
    out["version"] = register_model.python_func(
        data=out["data"], model=out["model"], evaluation=out["evaluation"], **ids
    )
    out["canary"] = _artifact(Artifact, tmp, "canary")
    out["verdict"] = canary_rollout.python_func(
        data=out["data"], model_version=out["version"], canary=out["canary"], **ids
    )
    out["summary"] = _artifact(Artifact, tmp, "summary.json")
    record_outcome.python_func(summary=out["summary"], **ids)
    return out


def test_prepare_data_fills_the_dataset_artifact(chain):
    data = chain["data"]
    assert {"train.parquet", "validation.parquet", "test.parquet", "data_card.json"} <= {
        p.name for p in (chain["tmp"] / "data").iterdir()
    }
    assert data.metadata["train_rows"] == 270 and len(data.metadata["content_hash"]) == 64
    assert (chain["tmp"] / "data_card.md").read_text().startswith("# Data card")


def test_fine_tune_writes_model_and_metrics(chain):
    assert (chain["tmp"] / "model" / "model.safetensors").is_file()
    assert chain["train_metrics"].metadata["steps"] == 40


def test_fine_tune_logs_every_parameter_and_per_step_telemetry_to_mlflow(chain):
    from mlflow import MlflowClient

    from canaryflow.registry.tracking import find_run

    run = find_run(chain["cfg"], "job-1")
    params = run.data.params
    for key in ("train.lr_scheduler", "train.warmup_ratio", "train.gradient_accumulation_steps", "train.seed"):
        assert key in params, key
    assert params["train.max_steps"] == "40" and params["model.base"] == "tiny-t5"
    client = MlflowClient()
    for metric in ("train.loss", "train.tokens_per_second", "train.samples_per_second", "train.peak_memory_mb"):
        history = client.get_metric_history(run.info.run_id, metric)
        assert len(history) >= 3 and len({h.step for h in history}) == len(history), metric  # one per logged step
    counters = client.get_metric_history(run.info.run_id, "train.nonfinite_losses")
    assert counters and all(h.value == 0 for h in counters)
    # Why training stopped, and its learning curve as a plot a reviewer opens in the run.
    assert run.data.tags["train.stopped"] == "budget"
    assert "train/learning_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id, "train")}


def test_evaluate_model_returns_the_gate_and_a_report(chain):
    assert chain["gate_passed"] is True
    assert chain["eval_metrics"].metadata["bleu"] >= 0
    assert (chain["tmp"] / "report.md").read_text().startswith("# Evaluation")
    html = (chain["tmp"] / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "data:image/png;base64," in html
    evaluation = json.loads((chain["tmp"] / "evaluation" / "evaluation.json").read_text())
    assert evaluation["metrics"]["champion"] is None  # nothing served yet
    assert evaluation["comparisons"] is None and evaluation["latency_ms"]["challenger"]["p95"] > 0
    from canaryflow.registry.tracking import find_run

    run = find_run(chain["cfg"], "job-1")
    logged = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/report.md", "evaluation/report.html", "evaluation/per_example_differences.png"} <= logged
    # The reviewer sees in the report why the challenger's training stopped, and its learning curve.
    assert "evaluation/learning_curve.png" in logged
    assert "## Training" in (chain["tmp"] / "report.md").read_text() and "Stopped: budget" in html


def test_register_and_canary_promote_the_first_model_after_a_smoke_check(chain):
    assert chain["version"] == "1"
    tags = MlflowClient().get_model_version(chain["cfg"].registry.model_name, "1").tags
    for key in ("train.steps", "train.final_loss", "train.val_loss", "data_hash", "config_hash", "base_model"):
        assert key in tags, key
    assert chain["verdict"] == "promoted"
    canary = json.loads((chain["tmp"] / "canary" / "canary.json").read_text())
    assert canary["mode"] == "smoke" and canary["steps"][0]["challenger"]["requests"] >= 20
    assert canary["aliases"]["champion"] == "1"
    assert chain["canary"].metadata["verdict"] == "promoted"


def test_record_outcome_summarises_the_run(chain):
    summary = json.loads((chain["tmp"] / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["run_key"] == "job-1"  # job id stands in for run_key
    assert summary["registry"]["aliases"]["champion"] == "1"
    assert summary["gate"]["passed"] is True and summary["canary"]["verdict"] == "promoted"
    assert summary["data"]["counts"]["train"] == 270
    run = MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["canaryflow.status"] == "succeeded"


def test_evaluate_scores_the_champion_from_the_registry(chain):
    # The champion is the same model as the challenger here, so the two must score identically.
    tmp, ids = chain["tmp"], dict(chain["ids"], job_id="job-2")
    evaluation = _artifact(Artifact, tmp, "evaluation-2")
    evaluate_model.python_func(
        data=chain["data"],
        model=chain["model"],
        evaluation=evaluation,
        metrics=_artifact(Metrics, tmp, "m2"),
        report=_artifact(Markdown, tmp, "r2.md"),
        report_html=_artifact(HTML, tmp, "r2.html"),
        **ids,
    )
    result = json.loads((tmp / "evaluation-2" / "evaluation.json").read_text())
    assert result["champion_version"] == "1"
    for name in ("bleu", "chrf", "rougeL", "token_f1"):
        assert result["metrics"]["champion"][name] == result["metrics"]["challenger"][name]
    # Identical systems: every resample's difference is 0, so non-inferiority by a margin is certain.
    bleu = result["comparisons"]["bleu"]
    assert bleu["diff"] == bleu["ci_low"] == bleu["ci_high"] == bleu["resolution"] == 0 and bleu["p_value"] < 0.01
    assert result["gate"]["warnings"] == []  # no margin is finer than a zero-width interval
    report = (tmp / "r2.md").read_text()
    assert "[+0.00, +0.00] (95%)" in report and "H0: diff <= -5.00" in report


def test_record_outcome_names_the_step_that_did_not_finish(chain):
    tmp, ids = chain["tmp"], dict(chain["ids"], job_id="job-never-ran")
    record_outcome.python_func(summary=_artifact(Artifact, tmp, "failed.json"), **ids)
    summary = json.loads((tmp / "failed.json").read_text())
    assert summary["status"] == "failed" and summary["failed_step"] == "prepare_data"
    assert MlflowClient().get_run(summary["mlflow_run_id"]).info.status == "FAILED"


def test_a_canary_that_cannot_run_rolls_back_and_fails(chain):
    from canaryflow.errors import CanaryflowError
    from canaryflow.registry import models
    from canaryflow.rollout.controller import canary_rollout as rollout

    cfg = chain["cfg"]
    version = models.register_candidate(
        cfg,
        "job-3",
        chain["tmp"] / "model",
        {"metrics": {"challenger": {}}, "gate": {"passed": True, "reasons": []}},
        {"data_hash": "x"},
    )
    assert models.aliases(cfg)["challenger"] == version
    impatient = cfg.model_copy(update={"canary": cfg.canary.model_copy(update={"server_start_timeout_s": 0.01})})
    with pytest.raises(CanaryflowError, match="did not come up in time"):
        rollout(impatient, chain["tmp"] / "data", version, "job-3", chain["tmp"] / "canary-3")
    assert models.aliases(cfg)["challenger"] is None
    assert models.aliases(cfg)["champion"] == "1"
    assert MlflowClient().get_model_version(cfg.registry.model_name, version).tags["canary.verdict"] == "rolled_back"
