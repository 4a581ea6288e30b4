"""Drift of serving inputs against the champion's training data, and the retraining it may trigger.

`check` reads the most recent sampled inputs from the input log (serving/inputlog.py) and measures them with
the same input profile as the data card (data/card.py), against the profile in the champion's own card: the
two sides are measured the same way, masked words included. `watch` checks on an interval and, on drift,
triggers one retraining at most per cool-down, remembering the last one in a state file, so that a restarted
watcher does not retrain again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from canaryflow.config import Config
from canaryflow.data.card import bar_length_shares, drift, profile_against
from canaryflow.errors import BadInputError, CanaryflowError

DRIFTED, WITHIN, TOO_FEW = "drifted", "within_threshold", "too_few_inputs"


def check(cfg: Config, log_dir: Path | str, reference: Callable[[], tuple[str, dict] | None] | None = None) -> dict:
    """Compare the last `drift.window` logged inputs with the champion's training data. `log_dir` is the log's
    directory, or the URI its servers ship it to (serving.input_log.upload_uri).

    `reference` gives (champion version, data card); by default the registry's champion. The verdict is
    `drifted` once either distance is over `drift.threshold`, and `too_few_inputs` below `drift.min_inputs`
    (nothing is triggered on too little evidence).
    """
    from canaryflow.serving.inputlog import is_uri, read_inputs

    if not is_uri(log_dir) and not Path(log_dir).is_dir():
        raise BadInputError(
            f"no input log at {log_dir}: serve the model with an input log first (serving.input_log), or give --log"
        )
    texts = read_inputs(log_dir, limit=cfg.drift.window)
    if reference is None:
        from canaryflow.registry.models import champion_data_card

        reference = lambda: champion_data_card(cfg)  # noqa: E731 - a default that needs cfg
    found = reference()
    if found is None:
        raise CanaryflowError(
            f"no champion with a data card in {cfg.registry.model_name!r} to compare with: nothing is serving yet"
        )
    version, card = found
    if "profile" not in card:
        raise CanaryflowError(f"champion version {version}'s data card has no input profile to compare with")
    result = {
        "champion_version": version,
        "reference_hash": card.get("content_hash"),
        "inputs": len(texts),
        "window": cfg.drift.window,
        "min_inputs": cfg.drift.min_inputs,
        "threshold": cfg.drift.threshold,
        "log_dir": str(log_dir),
        "checked_at": _iso(time.time()),
    }
    if not texts:
        return {**result, "status": TOO_FEW, "drifted": False, "distance": None}
    profile = profile_against(texts, card["profile"])
    distance = drift(profile, card["profile"])
    worst = max(distance, key=distance.get)
    if len(texts) < cfg.drift.min_inputs:
        status = TOO_FEW
    else:
        status = DRIFTED if distance[worst] > cfg.drift.threshold else WITHIN
    return {
        **result,
        "status": status,
        "drifted": status == DRIFTED,
        "distance": distance,
        "worst": worst,
        "length_histogram": profile["length_histogram"],
        "reference_length_histogram": card["profile"]["length_histogram"],
    }


def plot(result: dict, path: Path) -> Path:
    """Logged inputs' lengths beside the training data's, with both distances against the threshold: the
    picture an operator wants before retraining."""
    import matplotlib

    matplotlib.use("Agg")  # the CLI writes files; it never opens a window
    import matplotlib.pyplot as plt

    fig, (lengths, bars) = plt.subplots(1, 2, figsize=(11, 3.5), gridspec_kw={"width_ratios": [3, 1]})
    bar_length_shares(
        lengths,
        {
            f"champion v{result['champion_version']}'s training data": result.get("reference_length_histogram") or {},
            f"last {result['inputs']} logged inputs": result.get("length_histogram") or {},
        },
    )
    lengths.set_ylabel("share of inputs")
    lengths.legend()
    distance = result.get("distance") or {}
    names = list(distance) or ["input_length", "vocabulary"]
    values = [distance.get(n, 0.0) for n in names]
    colors = ["tab:red" if v > result["threshold"] else "tab:green" for v in values]
    bars.bar(names, values, color=colors)
    bars.axhline(result["threshold"], color="black", linestyle="--", label=f"threshold {result['threshold']:g}")
    bars.set_ylim(0, 1)
    bars.set_ylabel("Jensen-Shannon distance")
    bars.legend()
    fig.suptitle(f"Input drift: {result['status'].replace('_', ' ')} ({result['checked_at']})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- watch --------------------------------------------------------------------------------------------------


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


class NothingStarted(Exception):
    """Raised by a trigger that failed before any retraining began; `cause` is the error to report."""

    def __init__(self, cause: Exception):
        super().__init__(str(cause))
        self.cause = cause


class WatchState:
    """The last triggered retraining, in a JSON file beside the input log, written atomically: the cool-down
    holds across restarts of the watcher."""

    def __init__(self, path: Path):
        self.path = path

    def last(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except ValueError:
            raise BadInputError(f"drift watch state {self.path} is not valid JSON: fix or delete it") from None

    def restore(self, entry: dict | None) -> None:
        if entry is None:
            self.path.unlink(missing_ok=True)
        else:
            self.save(entry)

    def save(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(entry, indent=2), encoding="utf-8")
        os.replace(tmp, self.path)


def step(
    cfg: Config,
    log_dir: Path | str,
    state: WatchState,
    trigger: Callable[[dict], dict] | None,
    clock: Callable[[], float] = time.time,
    reference: Callable[[], tuple[str, dict] | None] | None = None,
) -> dict:
    """One check, and on drift one retraining through `trigger` unless the last one is within the cool-down
    (or `trigger` is None: report only). Returns the check with `action`: none, triggered, cooling_down, or
    not_started (with `error`) when the retraining could not be started, which the next check tries again."""
    result = check(cfg, log_dir, reference)
    result["action"] = "none"
    if not result["drifted"] or trigger is None:
        return result
    now = clock()
    last = state.last()
    cooldown = cfg.drift.cooldown_hours * 3600
    if last is not None and now - last["triggered_at_s"] < cooldown:
        result["action"] = "cooling_down"
        result["next_trigger_after"] = _iso(last["triggered_at_s"] + cooldown)
        result["last_trigger"] = last
        return result
    # Written before the retraining starts: a retraining that takes hours, or fails, still counts against the
    # cool-down, so a persistent drift cannot start one run after another.
    entry = {
        "triggered_at_s": now,
        "triggered_at": _iso(now),
        "distance": result["distance"],
        "champion_version": result["champion_version"],
    }
    state.save(entry)
    result["action"] = "triggered"
    try:
        result["run"] = trigger(result)
    except NothingStarted as exc:
        # No retraining exists (KFP unreachable, say): the next check may try again, not a day later.
        state.restore(last)
        result["action"], result["error"] = "not_started", str(exc.cause)
        return result
    state.save({**entry, "run": result["run"]})
    return result


def watch(
    cfg: Config,
    log_dir: Path | str,
    state: WatchState,
    trigger: Callable[[dict], dict] | None,
    *,
    checks: int | None = None,
    on_check: Callable[[dict], None] = lambda result: None,
    sleep: Callable[[float], None] = time.sleep,
    reference: Callable[[], tuple[str, dict] | None] | None = None,
) -> list[dict]:
    """Check every `drift.interval_s` seconds, `checks` times (None: until interrupted)."""
    results = []
    while checks is None or len(results) < checks:
        if results:
            sleep(cfg.drift.interval_s)
        results.append(step(cfg, log_dir, state, trigger, reference=reference))
        on_check(results[-1])
    return results
