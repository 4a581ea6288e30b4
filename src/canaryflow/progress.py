"""Progress lines that cross the process boundary.

A KFP step runs in a subprocess whose output kfp.local relays line by line. A step reports progress by
printing one marked JSON line; the CLI (see `cli.py`) picks those out of the relayed output to drive its
Rich progress bar. On a cluster the same lines are plain, readable log lines.
"""

from __future__ import annotations

import json
import sys

MARKER = "::canaryflow-progress::"


def emit(stage: str, done: int, total: int, **info: object) -> None:
    print(f"{MARKER} " + json.dumps({"stage": stage, "done": done, "total": total, **info}), flush=True)
    sys.stdout.flush()


def ignore(stage: str, done: int, total: int, **info: object) -> None:
    """A reporter that reports nothing, for callers that have no one to show progress to."""


def parse(line: str) -> dict | None:
    head, sep, payload = line.partition(MARKER)
    if not sep:
        return None
    try:
        event = json.loads(payload)
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "stage" in event else None
