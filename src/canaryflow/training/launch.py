"""Data-parallel fine-tuning across the GPUs of one pod, through torchrun.

fine_tune_step calls `data_parallel` when the pod has more than one GPU. torchrun starts one process per
GPU, each running `python -m canaryflow.training.launch`; transformers' Trainer sees the distributed
environment torchrun sets and wraps the model in DistributedDataParallel. Rank 0 writes the metrics and the
model; the parent step reads them back and logs them to MLflow. Several nodes are a job for Kubeflow
Trainer, not for this module (docs/design/multi-node-training.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from canaryflow.config import Config
from canaryflow.errors import CanaryflowError
from canaryflow.training.checkpoints import ensure_writable

METRICS_LOG = "train_log.jsonl"


def command(gpus: int, config_file: Path, data_dir: str, out_dir: str, checkpoint_dir: str | None) -> list[str]:
    """The torchrun command line: one process per GPU on this node."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]
    cmd += ["-m", "canaryflow.training.launch", "--config", str(config_file), "--data", data_dir, "--out", out_dir]
    return cmd + (["--checkpoints", checkpoint_dir] if checkpoint_dir else [])


def data_parallel(cfg: Config, gpus: int, data_dir: str, out_dir: str, checkpoint_dir: str | None) -> dict:
    """Train on `gpus` GPUs; return rank 0's metrics, with its per-step log under "steps"."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if checkpoint_dir and cfg.train.checkpoint_steps:  # here, once, rather than as every rank's own traceback
        ensure_writable(checkpoint_dir, cfg)
    config_file = out / "_launch_config.json"
    config_file.write_text(cfg.model_dump_json(), encoding="utf-8")
    done = subprocess.run(command(gpus, config_file, data_dir, out_dir, checkpoint_dir))
    config_file.unlink(missing_ok=True)
    if done.returncode != 0:
        raise CanaryflowError(f"data-parallel training on {gpus} GPUs failed (torchrun exit {done.returncode})")
    metrics = json.loads((out / "train_metrics.json").read_text(encoding="utf-8"))
    log = out / METRICS_LOG
    metrics["steps_log"] = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    log.unlink(missing_ok=True)
    return metrics


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

    fine_tune(cfg, args.data, args.out, args.checkpoints, on_metrics=record)


if __name__ == "__main__":
    main()
