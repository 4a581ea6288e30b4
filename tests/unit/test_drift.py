"""`drift check` and `drift watch` as library calls: the verdict on logged inputs, and the cool-down."""

import json

import pytest

from canaryflow.config import InputLogConfig, load_config
from canaryflow.data import drift
from canaryflow.data.prepare import read_pairs
from canaryflow.errors import BadInputError, CanaryflowError
from canaryflow.serving.inputlog import InputLog

SHIFTED = [
    f"Refund request {i}: card ending {i:04d}, write to billing{i}@shop.example today please" for i in range(300)
]


def _log(directory, texts, batch=10):
    log = InputLog.open(InputLogConfig(sample_rate=1.0), directory, "champion", "1")
    for start in range(0, len(texts), batch):
        assert log.record({"inputs": texts[start : start + batch]})
    log.close()
    return directory


@pytest.fixture(scope="module")
def reference(prepared):
    return lambda: ("4", prepared[1])


@pytest.fixture(scope="module")
def familiar(prepared):
    # Unseen inputs of the same task: the test split, not the training rows the profile was taken from.
    inputs = read_pairs(prepared[0], "test")["input"].tolist()
    return (inputs * 10)[:300]


def _cfg(*extra):
    return load_config(overrides=["drift.window=300", "drift.min_inputs=100", *extra])


def test_inputs_like_the_training_data_are_within_the_threshold(tmp_path, reference, familiar):
    result = drift.check(_cfg(), _log(tmp_path / "log", familiar), reference)
    assert result["status"] == "within_threshold" and result["drifted"] is False
    assert result["inputs"] == 300 and result["champion_version"] == "4"
    assert max(result["distance"].values()) < 0.5


def test_a_shifted_stream_is_drifted_and_the_picture_shows_it(tmp_path, reference):
    result = drift.check(_cfg(), _log(tmp_path / "log", SHIFTED), reference)
    assert result["status"] == "drifted" and result["drifted"] is True
    assert result["distance"][result["worst"]] > 0.5
    png = drift.plot(result, tmp_path / "drift.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_only_the_most_recent_window_counts(tmp_path, reference, familiar):
    directory = _log(tmp_path / "log", SHIFTED)
    _log(directory, familiar)  # the world came back: the old shifted inputs fall out of the window
    assert drift.check(_cfg(), directory, reference)["status"] == "within_threshold"


def test_too_few_inputs_are_no_verdict(tmp_path, reference):
    result = drift.check(_cfg(), _log(tmp_path / "log", SHIFTED[:50]), reference)
    assert result["status"] == "too_few_inputs" and result["drifted"] is False
    assert result["distance"]["vocabulary"] > 0.5  # shown, but not acted on


def test_a_missing_log_or_champion_is_one_clear_error(tmp_path, reference):
    with pytest.raises(BadInputError, match="no input log at"):
        drift.check(_cfg(), tmp_path / "nowhere", reference)
    with pytest.raises(CanaryflowError, match="no champion with a data card"):
        drift.check(_cfg(), _log(tmp_path / "log", SHIFTED[:5]), lambda: None)


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self):
        return self.now


def test_watch_retrains_at_most_once_per_cool_down_and_remembers_across_restarts(tmp_path, reference):
    directory = _log(tmp_path / "log", SHIFTED)
    cfg, clock, runs = _cfg("drift.cooldown_hours=2"), Clock(), []

    def trigger(result):
        runs.append(result["distance"])
        return {"where": "test", "n": len(runs)}

    state = drift.WatchState(directory / "drift-watch.json")
    first = drift.step(cfg, directory, state, trigger, clock, reference)
    assert first["action"] == "triggered" and first["run"] == {"where": "test", "n": 1}
    clock.now += 3600
    again = drift.step(cfg, directory, drift.WatchState(directory / "drift-watch.json"), trigger, clock, reference)
    assert again["action"] == "cooling_down" and len(runs) == 1
    assert again["next_trigger_after"] == drift._iso(1_000_000.0 + 7200)
    clock.now += 3601
    assert drift.step(cfg, directory, state, trigger, clock, reference)["action"] == "triggered"
    assert len(runs) == 2
    saved = json.loads((directory / "drift-watch.json").read_text())
    assert saved["run"] == {"where": "test", "n": 2} and saved["triggered_at_s"] == clock.now


def test_a_failed_retraining_still_counts_against_the_cool_down(tmp_path, reference):
    directory = _log(tmp_path / "log", SHIFTED)
    cfg, clock = _cfg(), Clock()

    def failing(result):
        raise CanaryflowError("step fine_tune failed")

    state = drift.WatchState(directory / "drift-watch.json")
    with pytest.raises(CanaryflowError):
        drift.step(cfg, directory, state, failing, clock, reference)
    assert drift.step(cfg, directory, state, failing, clock, reference)["action"] == "cooling_down"


def test_without_a_trigger_watch_only_reports(tmp_path, reference):
    directory = _log(tmp_path / "log", SHIFTED)
    results = drift.watch(
        _cfg(),
        directory,
        drift.WatchState(directory / "s.json"),
        None,
        checks=2,
        sleep=lambda s: None,
        reference=reference,
    )
    assert [r["action"] for r in results] == ["none", "none"] and all(r["drifted"] for r in results)
    assert not (directory / "s.json").exists()


def test_a_retraining_that_never_started_does_not_start_the_cool_down(tmp_path, reference):
    directory = _log(tmp_path / "log", SHIFTED)
    cfg, clock, state = _cfg(), Clock(), drift.WatchState(directory / "drift-watch.json")

    def unreachable(result):
        raise drift.NothingStarted(CanaryflowError("cannot reach KFP at http://kfp: connection refused"))

    failed = drift.step(cfg, directory, state, unreachable, clock, reference)
    assert failed["action"] == "not_started" and failed["error"].startswith("cannot reach KFP")
    assert state.last() is None
    assert drift.step(cfg, directory, state, lambda r: {"where": "test"}, clock, reference)["action"] == "triggered"


def test_a_watch_goes_on_after_a_retraining_it_could_not_start(tmp_path, reference):
    """KFP down for one check: the watcher reports it and retries at the next check, as the README says."""
    directory = _log(tmp_path / "log", SHIFTED)
    cfg, state = _cfg(), drift.WatchState(directory / "drift-watch.json")
    attempts = []

    def flaky(result):
        attempts.append(result["worst"])
        if len(attempts) == 1:
            raise drift.NothingStarted(CanaryflowError("cannot reach KFP at http://kfp: connection refused"))
        return {"where": "test"}

    results = drift.watch(cfg, directory, state, flaky, checks=2, sleep=lambda s: None, reference=reference)
    assert [r["action"] for r in results] == ["not_started", "triggered"] and len(attempts) == 2
