"""Run the DAG locally through kfp.local, on the embedded default: MLflow on SQLite under the workdir.

With no data configured, the run uses the offline demo task: each run takes the next synthetic data
drop (training on all drops so far), and with no champion in the registry a first, shorter run
establishes one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from canaryflow.config import CLASSIFICATION_METRICS, Config
from canaryflow.errors import BadInputError, CanaryflowError

LineCallback = Callable[[str], None]
# The longest step, which trains on one core: while it runs the CLI imports what reading the run's summary will need.
_TRAINING_STARTS = re.compile(r"Executing task (?:\x1b\[[0-9;]*m)?'?fine-tune\b")
_STEP_SPEAKS = "[KFP Executor "  # how a step's own log lines begin (kfp/dsl/executor_main.py's logger)
_ERROR_LINE = re.compile(r"^\s*(?:[\w.]+\.)?(BadInputError|CanaryflowError|[A-Z]\w*(?:Error|Exception)): (.+)$")


class PipelineFailed(CanaryflowError):
    def __init__(self, message: str, exit_code: int, summary: dict | None):
        super().__init__(message)
        self.exit_code = exit_code
        self.summary = summary


def with_workdir(cfg: Config, workdir: Path) -> Config:
    """Fill in what the workdir decides, where the config leaves it open: the SQLite tracking store, the
    checkpoint folder (which must outlive a step's process, so a rerun can resume) and the input log."""
    from canaryflow.registry.tracking import sqlite_uri

    workdir.mkdir(parents=True, exist_ok=True)
    if not cfg.mlflow.tracking_uri:
        cfg = cfg.model_copy(update={"mlflow": cfg.mlflow.model_copy(update={"tracking_uri": sqlite_uri(workdir)})})
    if not cfg.train.checkpoint_dir:
        checkpoints = str(workdir.resolve() / "checkpoints")
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"checkpoint_dir": checkpoints})})
    if not cfg.serving.input_log.dir:
        log = cfg.serving.input_log.model_copy(update={"dir": str(input_log_dir(workdir))})
        cfg = cfg.model_copy(update={"serving": cfg.serving.model_copy(update={"input_log": log})})
    return cfg


def input_log_dir(workdir: Path) -> Path:
    """Where the local model servers keep their sampled inputs, for `drift check`."""
    return workdir.resolve() / "input-log"


def _demo_state(workdir: Path) -> Path:
    return workdir / "demo-data" / "state.json"


def next_demo_drop(workdir: Path) -> int:
    state = _demo_state(workdir)
    return json.loads(state.read_text())["completed_drops"] + 1 if state.is_file() else 1


def with_demo_drop(cfg: Config, workdir: Path, drop: int, max_steps: int | None = None) -> Config:
    """Point cfg.data at demo drop `drop`: train on drops 1..drop, validate and test on this drop."""
    from canaryflow.data.synthetic import write_drop

    root = workdir / "demo-data"
    paths = [write_drop(root, d, cfg.demo.records_per_drop, cfg.demo.test_records) for d in range(1, drop + 1)]
    data = cfg.data.model_copy(
        update={
            "train": [str(p["train"]) for p in paths],
            "validation": [str(paths[-1]["validation"])],
            "test": [str(paths[-1]["test"])],
        }
    )
    update: dict = {"data": data}
    if max_steps is not None:
        update["train"] = cfg.train.model_copy(update={"max_steps": max_steps})
    return cfg.model_copy(update=update)


def _mark_drop_done(workdir: Path, drop: int) -> None:
    state = _demo_state(workdir)
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"completed_drops": drop}))


class _LineSink(io.TextIOBase):
    """Stands in for stdout while kfp.local runs: keeps every line in a log file and hands it on."""

    def __init__(self, log, on_line: LineCallback):
        self._log, self._on_line, self._buffer = log, on_line, ""
        self.lines: list[str] = []

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._log.write(text)
        self._buffer += text
        *complete, self._buffer = self._buffer.split("\n")
        for line in complete:
            self.lines.append(line)
            self._on_line(line)
        return len(text)

    def flush(self) -> None:
        self._log.flush()


def _importing_while_training(on_line: LineCallback) -> LineCallback:
    """on_line, which first imports MLflow in this process once the fine-tune step runs. The steps run in
    processes of their own, so this takes an idle core (train.num_threads is 1 by default) instead of 2 s between
    two pipeline runs. It waits for the step's own first line: kfp.local starts the step after it has printed
    that the task is executing, through this very callback. Lines wait meanwhile; the step's output waits in its
    pipe."""
    training = False

    def relay(line: str) -> None:
        nonlocal training
        training = training or bool(_TRAINING_STARTS.search(line))
        if training and "mlflow" not in sys.modules and _STEP_SPEAKS in line:
            import mlflow.store.model_registry.sqlalchemy_store
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
        on_line(line)

    return relay


def failure_reason(lines: list[str]) -> tuple[str, int]:
    """The last exception a step raised, as one line, and the exit code it calls for (2: bad input)."""
    for line in reversed(lines):
        match = _ERROR_LINE.match(line)
        if match:
            return match.group(2).strip(), 2 if match.group(1) == "BadInputError" else 1
    return "", 1


def read_summary(cfg: Config, run_key: str) -> dict | None:
    """The summary the exit handler logged; None when it never ran (the caller reports the step failure)."""
    from canaryflow.registry.tracking import find_run, load_logged_dict

    run = find_run(cfg, run_key)
    return load_logged_dict(run.info.run_id, "summary.json") if run is not None else None


def local_pipeline_root(workdir: Path) -> Path:
    """Where kfp.local writes the steps' artifacts: <workdir>/pipeline_root. kfp.local replaces the text `python3`
    in every executor argument, the artifacts' paths included, with its interpreter's path (Config.to_json says
    where), so a workdir whose path spells it (a project under .../lib/python3.11/..., a ~/python3-work) is
    reached through a link in the temp folder instead: the artifacts still land in the workdir."""
    root = workdir / "pipeline_root"
    if "python3" not in str(root.resolve()):
        return root
    root.mkdir(parents=True, exist_ok=True)
    target = root.resolve()
    link = Path(tempfile.gettempdir()).resolve() / f"canaryflow-root-{hashlib.sha256(bytes(target)).hexdigest()[:12]}"
    if "python3" in str(link):
        raise BadInputError(
            f"kfp.local corrupts every path that contains 'python3' (kubeflow/pipelines#14459), as {target} and the "
            f"temp folder {link.parent} do: give another --workdir, or set TMPDIR elsewhere"
        )
    for _ in range(2):  # another run may be making the same link at the same moment
        if link.is_symlink() and link.resolve() == target:
            return link
        link.unlink(missing_ok=True)
        with contextlib.suppress(FileExistsError):
            link.symlink_to(target, target_is_directory=True)
    return link


def run_pipeline(cfg: Config, workdir: Path, on_line: LineCallback = lambda line: None) -> dict:
    """Run the whole DAG once through kfp.local and return the summary the exit handler recorded."""
    from kfp import local

    from canaryflow.pipelines.lifecycle import build_pipeline

    root = local_pipeline_root(workdir)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    run_key = uuid.uuid4().hex
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"run-{run_key[:12]}.log"
    started = time.perf_counter()
    error: Exception | None = None
    with open(log_path, "w", encoding="utf-8") as log:
        sink = _LineSink(log, _importing_while_training(on_line))
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            try:
                build_pipeline(cfg, local=True)(config_json=cfg.to_json(), run_key=run_key)
            except Exception as exc:  # kfp.local raises RuntimeError naming the failed task
                error = exc
    summary = read_summary(cfg, run_key)
    if summary is not None:
        summary["duration_s"] = round(time.perf_counter() - started, 1)
        summary["log"] = str(log_path)
    if error is not None or summary is None or summary.get("status") != "succeeded":
        reason, code = failure_reason(sink.lines)
        step = (summary or {}).get("failed_step") or "pipeline"
        detail = reason or str(error or "the exit handler recorded no summary").splitlines()[0]
        raise PipelineFailed(f"step {step} failed: {detail} (log: {log_path})", code, summary)
    return summary


def preflight(cfg: Config) -> None:
    """Catch what is cheap to catch before any process starts: data files that are not there."""
    from canaryflow.data.prepare import SPLITS
    from canaryflow.data.sources import resolve_files

    for split in SPLITS:
        patterns = getattr(cfg.data, split)
        if patterns:
            resolve_files(patterns, split)
    classify = cfg.model.task == "classification"
    if classify and cfg.uses_demo_data:
        raise BadInputError("model.task classification needs your data (data.train): the demo task is seq2seq")
    gated = sorted({*cfg.gate.floors, *cfg.gate.thresholds()})
    wrong = [m for m in gated if (m in CLASSIFICATION_METRICS) != classify]
    if wrong:
        fits = "accuracy or macro_f1" if classify else "bleu, chrf, rouge*, token_f1 or exact_match"
        raise BadInputError(
            f"gate names {wrong[0]!r}, which a {cfg.model.task} model is not scored on; gate {fits} "
            "(configs/classification.yaml shows a classifier's gate)"
        )


def run_lifecycle(
    cfg: Config,
    workdir: Path,
    on_line: LineCallback = lambda line: None,
    on_phase: Callable[[str], None] = lambda text: None,
) -> dict:
    """`canaryflow run`: one DAG run, preceded on the demo task by a bootstrap run when there is no champion."""
    from canaryflow.warm import warm_steps

    workdir = workdir.resolve()
    cfg = with_workdir(cfg, workdir)
    preflight(cfg)
    with warm_steps(workdir / "logs"):
        return _run_lifecycle(cfg, workdir, on_line, on_phase)


def _run_lifecycle(cfg: Config, workdir: Path, on_line: LineCallback, on_phase: Callable[[str], None]) -> dict:
    from canaryflow.registry import models
    from canaryflow.registry.tracking import unborn_store

    if not cfg.uses_demo_data:
        return run_pipeline(cfg, workdir, on_line)
    bootstrap = None
    if cfg.demo.bootstrap and (unborn_store(cfg) or models.alias_version(cfg, models.CHAMPION) is None):
        drop = next_demo_drop(workdir)
        on_phase(f"No champion yet: establishing one on demo data drop {drop}")
        bootstrap = run_pipeline(with_demo_drop(cfg, workdir, drop, cfg.demo.bootstrap_max_steps), workdir, on_line)
        _mark_drop_done(workdir, drop)
    drop = next_demo_drop(workdir)
    on_phase(f"Training a challenger on demo data drops 1-{drop}")
    summary = run_pipeline(with_demo_drop(cfg, workdir, drop), workdir, on_line)
    _mark_drop_done(workdir, drop)
    summary["demo_drop"] = drop
    if bootstrap is not None:
        summary["bootstrap"] = {
            "version": bootstrap.get("version"),
            "canary": bootstrap.get("canary"),
            "duration_s": bootstrap.get("duration_s"),
        }
        summary["duration_s"] = round(summary["duration_s"] + bootstrap["duration_s"], 1)
    return summary
