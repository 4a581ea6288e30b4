"""Simulated canary traffic: the controller's own loop (rollout/controller.drive) run against synthetic
variants instead of model servers, to measure a policy's false-rollback rate and how many requests it needs
(tests/unit/test_analysis.py, benchmarks/canary.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from canaryflow.rollout.analysis import Observation


@dataclass(frozen=True)
class Variant:
    """How one simulated model behaves: its error rate, a log-normal latency, and per-request chrF."""

    error_rate: float = 0.01
    latency_ms: float = 120.0  # median
    latency_sigma: float = 0.35
    chrf: float = 55.0  # mean per-request chrF
    chrf_sd: float = 15.0
    # The chance that the server stalls for a whole batch (starved of CPU, a long queue), answering each of its
    # requests in it `stall_factor` times slower: latency shared in time, as real servers show
    # (BENCHMARKS.md, healthy canaries on a loaded machine).
    stall: float = 0.0
    stall_factor: float = 3.0

    def degraded(self, errors: float, latency: float, quality: float) -> Variant:
        """The bad canary of the benchmark: error rate set to `errors`, latency and chrF scaled."""
        return replace(self, error_rate=errors, latency_ms=self.latency_ms * latency, chrf=self.chrf * quality)


class SimulatedTraffic:
    """The `Traffic` the controller drives, with each request's outcome drawn from its variant's profile."""

    def __init__(
        self,
        champion: Variant,
        challenger: Variant,
        seed: int,
        rate: float = 50.0,
        loaded: tuple[int, Variant] | None = None,
    ):
        self.variants = {"champion": champion, "challenger": challenger}
        # (weight, variant): from that share of the traffic on, the challenger behaves as `variant` (a
        # regression that shows only under load).
        self.loaded = loaded
        self._calm = challenger
        self.rate = rate  # requests a second: what the step time limit sees
        self.rng = np.random.default_rng(seed)
        self.weights = {"champion": 100, "challenger": 0}
        self.mirror = False
        self.sent = 0
        self.clock = 0.0

    def shift(self, weights: dict[str, int], mirror: bool = False) -> None:
        self.weights = {"champion": 0, "challenger": 0, **weights}
        self.mirror = mirror
        if self.loaded is not None:
            at, variant = self.loaded
            self.variants["challenger"] = variant if self.weights["challenger"] >= at else self._calm

    def elapsed(self) -> float:
        return self.clock

    def _one(self, variant: str, difficulty: float, stalled: frozenset = frozenset()) -> Observation:
        v = self.variants[variant]
        latency = float(v.latency_ms * np.exp(v.latency_sigma * self.rng.standard_normal()))
        latency *= v.stall_factor if variant in stalled else 1.0
        if self.rng.random() < v.error_rate:
            return Observation(variant, False, latency)
        chrf = min(max(v.chrf + difficulty * v.chrf_sd, 0.0), 100.0)  # np.clip costs 10x this on one number
        return Observation(variant, True, latency, chrf)

    def send(self, count: int) -> list[Observation]:
        share = self.weights["challenger"] / 100
        self.sent += count
        self.clock += count / self.rate
        stalled = frozenset(name for name, v in self.variants.items() if v.stall and self.rng.random() < v.stall)
        return [
            self._one("challenger" if self.rng.random() < share else "champion", self.rng.standard_normal(), stalled)
            for _ in range(count)
        ]

    def settle(self) -> list:
        return []  # each request is drawn when sent: none is ever on its way

    def send_mirrored(self, count: int) -> list[tuple[Observation, Observation]]:
        self.sent += count
        self.clock += count / self.rate
        # The same input for both: its difficulty is shared, which is what pairing cancels.
        pairs = []
        for _ in range(count):
            difficulty = self.rng.standard_normal()
            pairs.append((self._one("champion", difficulty), self._one("challenger", difficulty)))
        return pairs
