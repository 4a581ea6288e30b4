"""The canary controller: replay traffic through the router step by step, judge each step, then promote
or roll back through the registry.

With no champion yet, the challenger serves alone for a smoke check against the absolute SLOs.
"""

from __future__ import annotations

import itertools
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from canaryflow import progress
from canaryflow.config import Config
from canaryflow.data.prepare import read_pairs
from canaryflow.errors import CanaryflowError
from canaryflow.registry import models
from canaryflow.rollout.analysis import Observation, judge_step, summarize
from canaryflow.rollout.local import LocalBackend, post_json

CHAMPION, CHALLENGER = "champion", "challenger"


def send_one(url: str, text: str, references: list[str], timeout: float) -> Observation:
    import sacrebleu

    started = time.perf_counter()
    try:
        status, body, headers = post_json(url + "/predict", json.dumps({"inputs": [text]}).encode(), timeout)
    except OSError:
        # The router itself did not answer; count it against nobody rather than guess a variant.
        return Observation("unrouted", False, (time.perf_counter() - started) * 1000)
    latency_ms = (time.perf_counter() - started) * 1000
    variant = headers.get("X-Canary-Variant", "unrouted")
    if status != 200:
        return Observation(variant, False, latency_ms)
    try:
        prediction = json.loads(body)["predictions"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return Observation(variant, False, latency_ms)
    return Observation(variant, True, latency_ms, sacrebleu.sentence_chrf(prediction, references).score)


class Replayer:
    """Replays test inputs (cycling) through the router, `concurrency` requests at a time."""

    def __init__(self, url: str, inputs: list[str], references: list[list[str]], concurrency: int, timeout: float):
        self.url = url
        self._items = itertools.cycle(list(zip(inputs, references)))
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="replay")
        self._timeout = timeout
        self.sent = 0

    def send(self, count: int) -> list[Observation]:
        items = [next(self._items) for _ in range(count)]
        self.sent += count
        return list(self._pool.map(lambda item: send_one(self.url, item[0], item[1], self._timeout), items))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def _run_step(replayer: Replayer, cfg: Config, weight: int, has_champion: bool) -> dict:
    policy = cfg.canary
    observations: list[Observation] = []
    batch = policy.concurrency * 4
    target = policy.min_requests_per_step if has_champion else policy.smoke_requests
    while True:
        observations += replayer.send(batch)
        challenger = summarize(observations, CHALLENGER)
        progress.emit("canary", min(challenger.requests, target), target, weight=weight)
        if challenger.requests >= target or len(observations) >= policy.max_requests_per_step:
            break
    champion = summarize(observations, CHAMPION) if has_champion else None
    decision = judge_step(challenger, champion, policy)
    return {
        "weight": weight,
        "requests": len(observations),
        "challenger": challenger.to_dict(),
        "champion": champion.to_dict() if champion else None,
        **decision.to_dict(),
    }


def run_canary(
    cfg: Config,
    challenger: tuple[str, str],
    champion: tuple[str, str] | None,
    inputs: list[str],
    references: list[list[str]],
    log_dir: Path,
) -> dict:
    """Run the rollout steps on the local backend; return verdict ('promoted' | 'rolled_back') and evidence."""
    servers = {CHALLENGER: challenger}
    if champion is not None:
        servers[CHAMPION] = champion
    weights = cfg.canary.steps if champion is not None else [100]
    steps: list[dict] = []
    started = time.perf_counter()
    # The servers resolve models:/ URIs themselves, so they get the same store explicitly.
    env = {"MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri} if cfg.mlflow.tracking_uri else {}
    with LocalBackend(
        servers, cfg.canary.num_threads, cfg.canary.server_start_timeout_s, cfg.canary.request_timeout_s, log_dir, env
    ) as backend:
        replayer = Replayer(
            backend.router.url, inputs, references, cfg.canary.concurrency, cfg.canary.request_timeout_s
        )
        try:
            for weight in weights:
                split = {CHALLENGER: weight, CHAMPION: 100 - weight} if champion is not None else {CHALLENGER: 100}
                backend.router.set_weights(split)
                step = _run_step(replayer, cfg, weight, champion is not None)
                steps.append(step)
                if not step["passed"]:
                    break
        finally:
            replayer.close()
    passed = bool(steps) and all(step["passed"] for step in steps) and len(steps) == len(weights)
    last = steps[-1]
    failed = [reason for reason in last["reasons"] if reason.startswith("FAIL")]
    return {
        "mode": "canary" if champion is not None else "smoke",
        "verdict": "promoted" if passed else "rolled_back",
        "reason": (
            f"all {len(steps)} step(s) passed" if passed else f"step at {last['weight']}%: " + "; ".join(failed)
        ),
        "requests": sum(step["requests"] for step in steps),
        "requests_to_decision": sum(step["requests"] for step in steps),
        "seconds": round(time.perf_counter() - started, 2),
        "steps": steps,
    }


def canary_rollout(cfg: Config, data_dir: str | Path, version: str, run_key: str, out_dir: str | Path) -> dict:
    """Canary `version` against the current champion, then promote it or roll it back in the registry."""
    import mlflow

    from canaryflow.registry.tracking import pipeline_run

    champion_version = models.alias_version(cfg, models.CHAMPION)
    if champion_version == version:
        raise CanaryflowError(f"version {version} is already the champion")
    test = read_pairs(data_dir, "test")
    out = Path(out_dir)
    try:
        result = run_canary(
            cfg,
            (models.model_uri(cfg, version), version),
            (models.model_uri(cfg, champion_version), champion_version) if champion_version else None,
            list(test["input"]),
            [list(refs) for refs in test["references"]],
            out / "logs",
        )
    except Exception as exc:
        # No verdict is a rollback: the challenger must not keep its alias as if it were still in canary.
        models.reject(cfg, version, f"canary could not run: {exc}")
        raise
    result["champion_version"] = champion_version
    result["challenger_version"] = version
    if result["verdict"] == "promoted":
        result["aliases"] = models.promote(cfg, version, champion_version, result["reason"], run_key)
    else:
        result["aliases"] = models.reject(cfg, version, result["reason"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "canary.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    with pipeline_run(cfg, run_key):
        mlflow.log_dict(result, "canary/canary.json")
        mlflow.log_metrics({"canary_requests": result["requests"], "canary_seconds": result["seconds"]})
        mlflow.set_tag("canary.verdict", result["verdict"])
    return result
