"""Training throughput and model-FLOPs utilization of a t5-small-sized model on one GPU, in bf16.

The model is built from config (no hub on the device): model.tiny sized like t5-small (d_model 512,
6 + 6 layers, 8 heads, d_ff 2048) and trained through canaryflow's own fine_tune on a generated demo
drop, with precision auto (bf16 where the GPU has it, TF32 allowed). It reports input tokens/s (padding
excluded) and model-FLOPs utilization: 6 x parameters FLOPs per trained token (forward and backward),
counting the target tokens the decoder trains on too, against the GPU's dense bf16 peak.

Usage (on the GPU machine): python benchmarks/training_gpu.py [--steps N] [--batch N]
        --dry-run trains a few steps of a small model, to check the script where there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import date
from pathlib import Path

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets, without sparsity.
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 70.0,
    "L4": 121.0,
}
BEGIN, END = "<!-- training-gpu:begin -->", "<!-- training-gpu:end -->"


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():  # longest names first would matter only for H100 variants
        if key in name:
            return value
    return None


def main() -> None:
    import pandas as pd
    import torch

    from canaryflow.config import load_config
    from canaryflow.data.prepare import prepare_data
    from canaryflow.data.synthetic import write_drop
    from canaryflow.training.fine_tune import fine_tune

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--write", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    size = (
        ["model.tiny.d_model=64", "model.tiny.d_ff=128", "model.tiny.num_heads=2"]
        if args.dry_run
        else [
            "model.tiny.d_model=512",
            "model.tiny.d_ff=2048",
            "model.tiny.num_layers=6",
            "model.tiny.num_decoder_layers=6",
            "model.tiny.num_heads=8",
            "model.tiny.vocab_size=8000",
        ]
    )
    steps = 10 if args.dry_run else args.steps
    with tempfile.TemporaryDirectory(prefix="canaryflow-gpu-bench-") as tmp:
        files = write_drop(Path(tmp), 1, records=500 if args.dry_run else args.records, test_records=100)
        cfg = load_config(
            overrides=[
                *(f"data.{split}={path}" for split, path in files.items()),
                *size,
                f"train.max_steps={steps}",
                f"train.batch_size={args.batch}",
                "train.checkpoint_steps=0",
                "train.min_loss_ratio=null",
                "train.num_threads=8",
            ]
        )
        prepare_data(cfg, Path(tmp) / "data")
        train = pd.read_parquet(Path(tmp) / "data" / "train.parquet")
        metrics = fine_tune(cfg, Path(tmp) / "data", Path(tmp) / "model")
    # Words per target over words per input approximates the decoder's share of the tokens.
    target_share = train["target"].str.split().str.len().mean() / train["input"].str.split().str.len().mean()
    tokens_per_s = metrics["tokens_per_second"] * (1 + target_share)
    achieved = 6 * metrics["parameters"] * tokens_per_s / 1e12
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak_tflops(device)
    result = {
        "device": device,
        "precision": metrics["precision"],
        "parameters": metrics["parameters"],
        "steps": metrics["steps"],
        "batch": args.batch,
        "input_tokens_per_second": round(metrics["tokens_per_second"]),
        "achieved_tflops": round(achieved, 2),
        "mfu": round(achieved / peak, 4) if peak else None,
        "peak_memory_mb": metrics["peak_memory_mb"],
    }
    print(json.dumps(result))
    if args.write:
        from report import write_section

        write_section(
            BEGIN,
            END,
            [
                f"## Training on one GPU — measured {date.today().isoformat()}",
                "",
                f"{device}, {result['precision']}, t5-small-sized model built from config "
                f"({result['parameters'] / 1e6:.0f}M parameters), batch {args.batch}, {result['steps']} steps.",
                "",
                "| input tokens/s | achieved TFLOP/s | MFU | peak memory (MB) |",
                "| ---: | ---: | ---: | ---: |",
                f"| {result['input_tokens_per_second']:,} | {result['achieved_tflops']} | {result['mfu']} "
                f"| {result['peak_memory_mb']:,.0f} |",
            ],
        )


if __name__ == "__main__":
    main()
