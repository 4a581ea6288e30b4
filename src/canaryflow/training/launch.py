"""Data-parallel fine-tuning on one machine, through torchrun: across the GPUs of one pod, or across processes
on the CPU (gloo), which is how the path runs in tests and on laptops.

fine_tune_step calls `data_parallel` when the pod has more than one GPU. torchrun starts one process per
GPU, each running `python -m canaryflow.training.launch`; transformers' Trainer sees the distributed
environment torchrun sets and wraps the model in DistributedDataParallel. Rank 0 writes the metrics and the
model; the parent step reads them back and logs them to MLflow. Several nodes are a job for Kubeflow
Trainer, not for this module (docs/design/multi-node-training.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from canaryflow.config import Config
from canaryflow.errors import BadInputError, CanaryflowError
from canaryflow.training.checkpoints import ensure_writable

METRICS_LOG = "train_log.jsonl"
FAILURE_REPORT = "_launch_failure.txt"
PEER_GRACE_S = 10  # how long a failed rank waits to be stopped by torchrun before its error is raised


def command(processes: int, config_file: Path, data_dir: str, out_dir: str, checkpoint_dir: str | None) -> list[str]:
    """The torchrun command line (through canaryflow.training.torchrun): `processes` ranks on this node."""
    report = Path(out_dir) / FAILURE_REPORT
    cmd = [sys.executable, "-m", "canaryflow.training.torchrun", str(report)]
    cmd += ["--standalone", f"--nproc_per_node={processes}"]
    cmd += ["-m", "canaryflow.training.launch", "--config", str(config_file), "--data", data_dir, "--out", out_dir]
    return cmd + (["--checkpoints", checkpoint_dir] if checkpoint_dir else [])


def data_parallel(cfg: Config, processes: int, data_dir: str, out_dir: str, checkpoint_dir: str | None) -> dict:
    """Train with `processes` ranks, one per GPU (or on the CPU where there is none); return rank 0's metrics,
    with its per-step log under "steps_log"."""
    import torch

    from canaryflow.training.fine_tune import checkpoint_to_resume, fingerprint

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.checkpoint_steps:
        # Here, once, before any rank starts: every rank would check the folder and rank 0 would clear a stale
        # one, while the others were writing their own check into it.
        folder = Path(checkpoint_dir) if checkpoint_dir else out / "_checkpoints"
        ensure_writable(folder, cfg)
        checkpoint_to_resume(folder, fingerprint(cfg, data_dir))
    log, report = out / METRICS_LOG, out / FAILURE_REPORT
    for stale in (log, report):  # a failed run's: the rerun reports its own steps
        stale.unlink(missing_ok=True)
    config_file = out / "_launch_config.json"
    config_file.write_text(cfg.model_dump_json(), encoding="utf-8")
    done = subprocess.run(command(processes, config_file, data_dir, out_dir, checkpoint_dir))
    config_file.unlink(missing_ok=True)
    if done.returncode != 0:
        what = "GPUs" if torch.cuda.is_available() else "CPU processes"
        why = f": {report.read_text(encoding='utf-8')}" if report.is_file() else ""
        report.unlink(missing_ok=True)
        error = BadInputError if done.returncode == 2 else CanaryflowError
        raise error(f"data-parallel training on {processes} {what} failed (torchrun exit {done.returncode}){why}")
    metrics = json.loads((out / "train_metrics.json").read_text(encoding="utf-8"))
    metrics["steps_log"] = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    log.unlink(missing_ok=True)
    return metrics


def _fail(message: str, exit_code: int) -> None:
    """End this rank with one line: torch elastic's error file carries it to canaryflow.training.torchrun."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        Path(error_file).write_text(json.dumps({"message": message, "timestamp": int(time.time())}))
    else:
        print(f"error: {message}", file=sys.stderr)
    raise SystemExit(exit_code)


def main(argv: list[str] | None = None) -> None:
    from canaryflow.training.fine_tune import fine_tune

    parser = argparse.ArgumentParser(description="One rank of data-parallel fine-tuning (started by torchrun).")
    parser.add_argument("--config", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoints")
    args = parser.parse_args(argv)
    cfg = Config.from_json(Path(args.config).read_text(encoding="utf-8"))
    log = Path(args.out) / METRICS_LOG

    def record(step: int, metrics: dict) -> None:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")

    try:
        fine_tune(cfg, args.data, args.out, args.checkpoints, on_metrics=record)
    except CanaryflowError as exc:
        _fail(str(exc), exc.exit_code)
    except Exception:
        # A peer rank that died (killed, out of memory) fails this one too, in whatever collective it was in
        # (gloo: "Connection reset by peer", out of loss.backward()), and torchrun, which looks every 0.1 s,
        # stops this one with SIGTERM a moment later. Waiting for that leaves the peer's death as what the
        # step reports, not this rank's traceback through DDP; an error of this rank's own is raised, with its
        # traceback, once the wait is over.
        time.sleep(PEER_GRACE_S)
        raise


if __name__ == "__main__":
    main()
