"""Canary drills (game days): a canary whose challenger misbehaves on purpose, to see the gates catch it.

The champion's own model serves on both sides; the challenger's server gets a fault (serving/faults.py).
A drill moves no registry alias, whatever its verdict: it rehearses the decision, not a release. It is
recorded as a run in the `<experiment>-drills` MLflow experiment, with its timeline plot.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from canaryflow import progress
from canaryflow.config import Config
from canaryflow.errors import BadInputError, CanaryflowError
from canaryflow.registry import models


def _drill_data(cfg: Config, workdir: Path, out: Path) -> tuple[list[str], list[list[str]]]:
    """The test split the canary replays: the configured data, or on the demo task its latest drop."""
    from canaryflow.data.prepare import prepare_data, read_pairs
    from canaryflow.runner import next_demo_drop, with_demo_drop

    if cfg.uses_demo_data:
        cfg = with_demo_drop(cfg, workdir, max(1, next_demo_drop(workdir) - 1))
    prepare_data(cfg, out, report=progress.ignore)
    test = read_pairs(out, "test")
    return list(test["input"]), [list(refs) for refs in test["references"]]


def _record(cfg: Config, result: dict, out: Path, timeline: Path) -> str:
    import mlflow

    from canaryflow.registry.tracking import configure

    experiment_id = configure(cfg, f"{cfg.mlflow.experiment}-drills")
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"drill {result['fault']}") as run:
        mlflow.set_tags({"fault": result["fault"], "verdict": result["verdict"], "caught": str(result["caught"])})
        mlflow.log_metrics({"requests_to_decision": result["requests_to_decision"], "seconds": result["seconds"]})
        mlflow.log_artifact(str(out / "drill.json"))
        mlflow.log_artifact(str(timeline))
    return run.info.run_id


def canary_drill(cfg: Config, workdir: Path, fault: str, reporter=progress.ignore, on_start=None) -> dict:
    """Run one drill against the registry's champion; return what the gates decided, how fast, and proof
    that the champion kept the traffic and the registry is as it was. `on_start` gets the /metrics URLs, so
    dashboards can be watched while the challenger misbehaves."""
    from canaryflow.rollout.controller import run_canary, save_timeline
    from canaryflow.serving.faults import parse_fault

    parse_fault(fault)  # a bad SPEC is one line before anything starts
    version = models.alias_version(cfg, models.CHAMPION)
    if version is None:
        raise BadInputError("no champion in the registry to drill against: run `canaryflow run` first")
    before = models.aliases(cfg)
    out = workdir / "drills" / f"{time.strftime('%Y%m%d-%H%M%S')}-{re.sub(r'[^a-z0-9]+', '-', fault.lower())}"
    cache = workdir / "drills" / "models" / f"v{version}"
    # The whole MLflow model, served as KServe serves it: it carries the training data's profile for drift.
    mlmodel = next(cache.glob("**/MLmodel"), None)
    if mlmodel is None:
        models.download_model_dir(cfg, models.model_uri(cfg, version), cache)
        mlmodel = next(cache.glob("**/MLmodel"))
    model_dir = mlmodel.parent
    inputs, references = _drill_data(cfg, workdir, out / "data")
    result = run_canary(
        cfg,
        (str(model_dir), version),
        (str(model_dir), version),
        inputs,
        references,
        out / "logs",
        faults=None if fault == "none" else {"challenger": fault},
        reporter=reporter,
        on_start=on_start,
    )
    after = models.aliases(cfg)
    if after != before:
        raise CanaryflowError(f"a drill moved registry aliases: {before} became {after}")
    caught = result["verdict"] == ("promoted" if fault == "none" else "rolled_back")
    result.update(fault=fault, champion_version=version, caught=caught, aliases=after, aliases_unchanged=True)
    (out / "drill.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    timeline = save_timeline(result, out)
    result["mlflow_run_id"] = _record(cfg, result, out, timeline)
    result["artifacts"] = str(out)
    return result
