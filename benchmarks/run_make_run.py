"""Time `make run` (the venv already built) and compare it with a baseline measured in the same run.

The target: `make run` takes at most 5 minutes on the 2-core machine. The baseline is the training that
`make run` cannot avoid — the same two fine-tunes (bootstrap champion, then challenger) called in-process,
without KFP, MLflow, evaluation or canary — so the ratio shows what the lifecycle costs on top of it.
Writes the figures into BENCHMARKS.md between the markers of this benchmark.

Usage: .venv/bin/python benchmarks/run_make_run.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from report import machine, write_section

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 300.0
BEGIN, END = "<!-- make-run:begin -->", "<!-- make-run:end -->"


def time_make_run(workdir: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "canaryflow"), "run", "--json", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"canaryflow run failed: {result.stderr.strip().splitlines()[-1]}")
    return elapsed, json.loads(result.stdout)


def time_training_baseline(workdir: Path) -> float:
    """The same two fine-tunes as make run, in one process, on the same demo drops."""
    from canaryflow.config import load_config
    from canaryflow.data.prepare import prepare_data
    from canaryflow.runner import with_demo_drop
    from canaryflow.training.fine_tune import fine_tune

    cfg = load_config()
    total = 0.0
    for drop, steps in ((1, cfg.demo.bootstrap_max_steps), (2, cfg.train.max_steps)):
        run_cfg = with_demo_drop(cfg, workdir, drop, steps)
        prepare_data(run_cfg, workdir / f"data-{drop}")
        started = time.perf_counter()
        fine_tune(run_cfg, workdir / f"data-{drop}", workdir / f"model-{drop}")
        total += time.perf_counter() - started
    return total


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="canaryflow-bench-") as tmp:
        elapsed, summary = time_make_run(Path(tmp) / "run")
        baseline = time_training_baseline(Path(tmp) / "baseline")
    boot_s = summary["bootstrap"]["duration_s"]
    steps = f"{boot_s} s bootstrap run + {summary['duration_s'] - boot_s:.1f} s challenger run"
    lines = [
        f"## `make run` wall time (venv already built) — measured {date.today().isoformat()}",
        "",
        f"Machine: {machine()}.",
        "",
        "| what | seconds | ratio |",
        "| --- | ---: | ---: |",
        "| `canaryflow run` on a fresh workdir (bootstrap champion, then challenger + canary) "
        f"| {elapsed:.1f} | {elapsed / baseline:.2f}x baseline |",
        f"| baseline: the same two fine-tunes in one process, nothing else | {baseline:.1f} | 1.00x |",
        f"| budget from the foundation issue | {BUDGET_S:.0f} | {elapsed / BUDGET_S:.2f} of budget |",
        "",
        f"Breakdown: {steps}; canary verdict `{summary['canary']['verdict']}` after "
        f"{summary['canary']['requests']} requests; challenger BLEU "
        f"{summary['metrics']['challenger']['bleu']:.1f} vs champion {summary['metrics']['champion']['bleu']:.1f}.",
        "Reproduce: `.venv/bin/python benchmarks/run_make_run.py` (about 6 minutes); `make bench` runs them all.",
    ]
    print(write_section(BEGIN, END, lines))


if __name__ == "__main__":
    main()
