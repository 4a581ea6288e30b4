"""What the benchmark scripts share: the machine's description and writing a section of BENCHMARKS.md."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = "# Benchmarks\n\nFigures come from `benchmarks/`, each a ratio against a baseline of the same run.\n"


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores, {cpu}, {platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def run_child(label: str, script: str, *args: str) -> dict:
    """Run one side of a benchmark in a fresh Python process (its memory and imports its own) and return
    the JSON object it printed last."""
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{label} failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_section(begin: str, end: str, lines: list[str]) -> str:
    """Replace (or append) the section between `begin` and `end` markers; a rerun overwrites its own figures."""
    section = "\n".join([begin, *lines, end])
    text = BENCHMARKS.read_text() if BENCHMARKS.is_file() else HEADER
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS.write_text(text)
    return section
