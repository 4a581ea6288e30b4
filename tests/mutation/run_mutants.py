"""Mutants of the gate's p-value and interval code: each must turn at least one test red.

Not part of `make test` (each mutant reruns the gate's unit tests). Run from the repository root:
`.venv/bin/python tests/mutation/run_mutants.py [NAME-PREFIX ...]`. Each mutant is applied to a copy of
src/ in a temporary folder, never to the working tree, and the gate's tests run against that copy. Exit 1
if any mutant survives.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BOOTSTRAP = "canaryflow/evaluation/bootstrap.py"
CONFIG = "canaryflow/config.py"
TESTS = ["tests/unit/test_bootstrap.py", "tests/unit/test_gate.py", "tests/unit/test_config.py"]
_COUNTED = "np.count_nonzero(reflected <= threshold)"
_OTHER_DRAW = "np.random.default_rng(seed + 1).integers(0, n_items, size=(resamples, n_items))"

# name -> (file under src/, the text replaced, its mutant)
MUTANTS = {
    "margin sign flipped": (BOOTSTRAP, _COUNTED, "np.count_nonzero(reflected <= -threshold)"),
    "margin ignored": (BOOTSTRAP, _COUNTED, "np.count_nonzero(reflected <= 0)"),
    "margin halved": (BOOTSTRAP, _COUNTED, "np.count_nonzero(reflected <= threshold / 2)"),
    "percentile interval for basic": (
        BOOTSTRAP,
        "low, high = float(reflected[rank - 1]), float(reflected[resamples - rank])",
        "low, high = float(np.sort(deltas)[rank - 1]), float(np.sort(deltas)[resamples - rank])",
    ),
    "resample indices unpaired": (
        BOOTSTRAP,
        "deltas = challenger.score(metric, indices) - champion.score(metric, indices)",
        f"deltas = challenger.score(metric, indices) - champion.score(metric, {_OTHER_DRAW})",
    ),
    "p-value without the +1": (
        BOOTSTRAP,
        "p_value=(1 + extreme) / (resamples + 1)",
        "p_value=extreme / resamples",
    ),
    "threshold sign in GateConfig.thresholds": (
        CONFIG,
        "{m: -margin for m, margin in self.non_inferiority.items()}",
        "{m: margin for m, margin in self.non_inferiority.items()}",
    ),
}


def run(name: str, path: str, old: str, new: str) -> list[str]:
    """The tests the mutant turns red (empty: it survived)."""
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(REPO / "src", src)
        target = src / path
        text = target.read_text(encoding="utf-8")
        if text.count(old) != 1:
            raise SystemExit(f"mutant {name!r}: the code it changes is no longer in {path}; update this script")
        target.write_text(text.replace(old, new), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", *TESTS],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
    return sorted(
        {line.split(" - ")[0].removeprefix("FAILED ") for line in done.stdout.splitlines() if line.startswith("FAILED")}
    )


def main() -> int:
    wanted = sys.argv[1:]
    # A mutant is caught only if the unmutated code passes the same tests.
    baseline = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TESTS], cwd=REPO)
    if baseline.returncode:
        print("the gate's tests fail on the unmutated code; fix that first")
        return 1
    survivors = []
    for name, (path, old, new) in MUTANTS.items():
        if wanted and not any(name.startswith(prefix) for prefix in wanted):
            continue
        caught = run(name, path, old, new)
        print(f"{name}: {'caught by ' + str(len(caught)) + ' test(s)' if caught else 'SURVIVED'}", flush=True)
        for test in caught:
            print(f"    {test}")
        if not caught:
            survivors.append(name)
    if survivors:
        print(f"{len(survivors)} mutant(s) survived: {', '.join(survivors)}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
