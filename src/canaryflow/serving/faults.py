"""Faults a model server can be told to inject, for canary drills: a challenger that fails on purpose, so the
rollout's gates are seen to catch it.

A spec is one of `errors=P`, `latency_ms=N`, `quality=garbage`, `crash-after=N` or `none`
(`--fault SPEC` on the server, `LocalBackend(faults=...)` for a local canary).
"""

from __future__ import annotations

import os
import random
import string
import threading
import time
from dataclasses import dataclass, field

from canaryflow.errors import BadInputError

KINDS = ("errors=P", "latency_ms=N", "quality=garbage", "crash-after=N", "none")
# What an OOM kill leaves behind (128 + SIGKILL), so a drill's log reads like the real thing.
CRASH_EXIT_CODE = 137


@dataclass
class Fault:
    """A parsed spec and the state that carries it out; one per server process, shared by its threads."""

    kind: str  # "none" | "errors" | "latency_ms" | "quality" | "crash-after"
    value: float = 0.0
    seed: int = 0
    _count: int = field(default=0, init=False, repr=False)
    _rng: random.Random = field(init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "quality":
            return "quality=garbage"
        return f"{self.kind}={self.value:g}"

    def on_request(self) -> None:
        """Called as a predict request arrives, before its body is read: the crash comes here, so the request
        that finds the limit passed gets no answer at all."""
        if self.kind != "crash-after":
            return
        with self._lock:
            self._count += 1
            if self._count > self.value:
                os._exit(CRASH_EXIT_CODE)  # no cleanup, no answer: the way an OOM kill ends a server

    def before_predict(self) -> bool:
        """Called once a request's inputs are valid: sleeps for `latency_ms`; True when `errors` says this request
        must fail."""
        if self.kind == "latency_ms":
            time.sleep(self.value / 1000)
        elif self.kind == "errors":
            with self._lock:
                return self._rng.random() < self.value
        return False

    def after_predict(self, predictions: list[str]) -> list[str]:
        """For `quality=garbage`: as many answers as inputs, each a run of random tokens as long as the real one,
        so the response looks healthy and only an online quality check can tell."""
        if self.kind != "quality":
            return predictions
        with self._lock:
            return [self._garbage(len(p)) for p in predictions]

    def _garbage(self, length: int) -> str:
        words = []
        while sum(len(w) + 1 for w in words) < max(length, 1):
            words.append("".join(self._rng.choices(string.ascii_lowercase + string.digits, k=self._rng.randint(2, 7))))
        return " ".join(words)


def parse_fault(spec: str, seed: int = 0) -> Fault:
    """Parse `--fault SPEC`; a bad spec raises BadInputError with one line that says what is wrong."""
    text = spec.strip()
    kind, sep, raw = text.partition("=")
    kind, raw = kind.strip(), raw.strip()
    expected = ", ".join(KINDS)
    if kind == "none" and not sep:
        return Fault("none", seed=seed)
    if kind not in ("errors", "latency_ms", "quality", "crash-after"):
        raise BadInputError(f"fault {spec!r}: unknown kind {kind!r}; expected one of {expected}")
    if not raw:
        raise BadInputError(
            f"fault {spec!r}: {kind} needs a value, e.g. {next(k for k in KINDS if k.startswith(kind))}"
        )
    if kind == "quality":
        if raw != "garbage":
            raise BadInputError(f"fault {spec!r}: quality takes only 'garbage'")
        return Fault("quality", seed=seed)
    try:
        value = float(raw) if kind != "crash-after" else int(raw)
    except ValueError:
        number = "a whole number" if kind == "crash-after" else "a number"
        raise BadInputError(f"fault {spec!r}: {raw!r} is not {number}") from None
    if value != value or value in (float("inf"), float("-inf")):  # NaN or infinite
        raise BadInputError(f"fault {spec!r}: {raw!r} is not a finite number")
    if kind == "errors" and not 0 < value <= 1:
        raise BadInputError(f"fault {spec!r}: the error fraction P must be in (0, 1]")
    if kind in ("latency_ms", "crash-after") and value < 0:
        raise BadInputError(f"fault {spec!r}: N must not be negative")
    return Fault(kind, float(value), seed=seed)
