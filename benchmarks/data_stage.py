"""The data stage on a generated 1M-row jsonl file, next to plain pandas read + dedupe, in one run.

Each side runs in a fresh process, so its peak RSS is its own, and the two take turns, `--repeats` times
each, so a busy moment on the machine falls on both; the medians are reported. Writes rows/s and peak
memory of both, and their ratios, into BENCHMARKS.md between this benchmark's markers.

Usage: .venv/bin/python benchmarks/data_stage.py [--rows N] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

from report import machine, run_child, write_section  # a sibling module: scripts run from benchmarks/

BEGIN, END = "<!-- data-stage:begin -->", "<!-- data-stage:end -->"

_CHILD = r"""
import json, resource, sys, time
side, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
started = time.perf_counter()
if side == "pandas":
    import pandas as pd
    frame = pd.read_json(path, lines=True)
    frame = frame.drop_duplicates(subset=["input", "target"])
    rows = len(frame)
else:
    from canaryflow.config import load_config
    from canaryflow.data.prepare import prepare_data
    cfg = load_config(overrides=[f"data.train={path}", "data.max_source_length=512"])
    card = prepare_data(cfg, out)
    rows = sum(card["counts"].values())
seconds = time.perf_counter() - started
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"rows": rows, "seconds": seconds, "peak_mb": peak_mb}))
"""


def generate(path: Path, rows: int) -> None:
    """Data-to-text-like rows, about 1% of them exact repeats of the row before, written once."""
    rng = random.Random(7)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()
    line = ""
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(rows):
            if not line or rng.random() > 0.01:
                text = " ".join(rng.choice(words) for _ in range(8))
                line = json.dumps({"input": f"record {i} | {text}", "target": f"Sentence about {i}."}) + "\n"
            handle.write(line)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="canaryflow-data-bench-") as tmp:
        path = Path(tmp) / "rows.jsonl"
        started = time.perf_counter()
        generate(path, args.rows)
        print(
            f"generated {args.rows} rows ({path.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.0f} s"
        )
        runs: dict[str, list[dict]] = {"pandas": [], "canaryflow": []}
        for i in range(args.repeats):
            for side in runs:
                runs[side].append(run_child(side, _CHILD, side, str(path), str(Path(tmp) / f"prepared-{i}")))
        size_mb = path.stat().st_size / 1e6
    baseline, stage = (
        {key: statistics.median(r[key] for r in runs[side]) for key in ("seconds", "peak_mb")} for side in runs
    )
    rate = {name: args.rows / r["seconds"] for name, r in (("pandas", baseline), ("stage", stage))}
    lines = [
        f"## Data stage on {args.rows:,} jsonl rows ({size_mb:.0f} MB) — measured {date.today().isoformat()}",
        "",
        f"Machine: {machine()}. Medians of {args.repeats} alternating runs of each side, each in a fresh process "
        "(imports included).",
        "",
        "| what | rows/s | peak memory (MB) | time ratio | memory ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
        f"| canaryflow data stage (load, validate, clean, dedupe, split, card) | {rate['stage']:,.0f} "
        f"| {stage['peak_mb']:,.0f} | {stage['seconds'] / baseline['seconds']:.2f}x | "
        f"{stage['peak_mb'] / baseline['peak_mb']:.2f}x |",
        f"| baseline: pandas read_json(lines=True) + drop_duplicates | {rate['pandas']:,.0f} "
        f"| {baseline['peak_mb']:,.0f} | 1.00x | 1.00x |",
        "",
        "Target (data-preparation issue): no slower and no larger than the baseline. "
        f"Time: {'met' if stage['seconds'] <= baseline['seconds'] else 'not met'}; "
        f"memory: {'met' if stage['peak_mb'] <= baseline['peak_mb'] else 'not met'}.",
        "Ratios above 1 mean the stage is slower or larger than the baseline. Reproduce: "
        "`.venv/bin/python benchmarks/data_stage.py`.",
    ]
    print(write_section(BEGIN, END, lines))


if __name__ == "__main__":
    main()
