"""The sampled serving-input log: privacy filter, salt, sampling, rotation, threads, failures, reading back."""

from __future__ import annotations

import errno
import hashlib
import hmac
import json
import re
import stat
import threading
import time

import pytest

from canaryflow.config import InputLogConfig
from canaryflow.errors import BadInputError
from canaryflow.serving.inputlog import SALT_ENV, InputLog, PrivacyFilter, read_inputs

HASHED = re.compile(r"^sha256:[0-9a-f]{64}$")


@pytest.fixture(autouse=True)
def _no_env_salt(monkeypatch):
    # A salt in the developer's environment would hide the salt file from these tests.
    monkeypatch.delenv(SALT_ENV, raising=False)


def config(**fields) -> InputLogConfig:
    return InputLogConfig(**{"sample_rate": 1.0, **fields})


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_emails_and_numbers_masked_everywhere_word_count_kept():
    text = "mail bob.smith+x@corp.example.com about order 12345 by 2024-05-01"
    body = {
        "inputs": [text],
        "references": [["call 555 0100 or ann@x.io"]],
        "meta": {"note": "from carl@y.org", "deep": [{"phone": "+44 20 7946 0958"}], "count": 3},
    }
    out = PrivacyFilter()(body)
    assert out["inputs"] == ["mail <email> about order <num> by <num>-<num>-<num>"]
    assert len(out["inputs"][0].split()) == len(text.split())
    assert out["references"] == [["call <num> <num> or <email>"]]
    assert out["meta"]["note"] == "from <email>"
    assert out["meta"]["deep"] == [{"phone": "+<num> <num> <num> <num>"}]
    assert out["meta"]["count"] == 3  # not text: left as it is
    assert body["inputs"] == [text]  # the request itself is not modified


def test_masking_can_be_switched_off():
    out = PrivacyFilter(emails=False, numbers=True)({"inputs": ["a@b.io 42"]})
    assert out["inputs"] == ["a@b.io <num>"]
    out = PrivacyFilter(emails=True, numbers=False)({"inputs": ["a@b.io 42"]})
    assert out["inputs"] == ["<email> 42"]


def test_logged_line_is_masked(tmp_path):
    log = InputLog.open(config(), tmp_path, variant="champion", model_version="3")
    assert log.record({"inputs": ["write to eve@evil.com, card 4111 1111"], "references": [["id 77"]]})
    log.close()
    (record,) = lines(tmp_path / "inputs-champion-v3.jsonl")
    assert record["variant"] == "champion" and record["model_version"] == "3"
    assert record["ts"].endswith("+00:00")
    assert record["inputs"] == ["write to <email>, card <num> <num>"]
    assert record["references"] == [["id <num>"]]
    raw = (tmp_path / "inputs-champion-v3.jsonl").read_text()
    assert "eve@evil.com" not in raw and "4111" not in raw


def test_drop_and_hash_fields_share_salt_file(tmp_path):
    cfg = config(drop_fields=["session"], hash_fields=["user_id", "account"])
    body = {"inputs": ["hi"], "user_id": "u1", "session": "s-secret", "account": {"b": 1, "a": [2]}}
    first = InputLog.open(cfg, tmp_path, variant="champion", model_version="3")
    second = InputLog.open(cfg, tmp_path, variant="challenger", model_version="4")
    first.record(body)
    second.record({**body, "account": {"a": [2], "b": 1}})  # same value, other key order
    first.close()
    second.close()
    (a,) = lines(first.path)
    (b,) = lines(second.path)
    assert "session" not in a and "s-secret" not in first.path.read_text()
    assert HASHED.match(a["user_id"]) and a["user_id"] == b["user_id"]
    assert HASHED.match(a["account"]) and a["account"] == b["account"]
    assert a["user_id"] != a["account"]

    salt_file = tmp_path / ".salt"
    assert stat.S_IMODE(salt_file.stat().st_mode) == 0o600
    salt = salt_file.read_text()
    assert len(salt) == 64
    expected = hmac.new(salt.encode(), json.dumps("u1").encode(), hashlib.sha256).hexdigest()
    assert a["user_id"] == "sha256:" + expected


def test_env_salt_changes_the_hash(tmp_path, monkeypatch):
    cfg = config(hash_fields=["user_id"])
    with InputLog.open(cfg, tmp_path / "file", variant="c", model_version="1") as log:
        log.record({"inputs": ["x"], "user_id": "u1"})
    monkeypatch.setenv(SALT_ENV, "from-a-secret")
    with InputLog.open(cfg, tmp_path / "env", variant="c", model_version="1") as log:
        log.record({"inputs": ["x"], "user_id": "u1"})
    (from_file,) = lines(tmp_path / "file" / "inputs-c-v1.jsonl")
    (from_env,) = lines(tmp_path / "env" / "inputs-c-v1.jsonl")
    assert from_file["user_id"] != from_env["user_id"]
    assert not (tmp_path / "env" / ".salt").exists()


def test_no_salt_file_without_hash_fields(tmp_path):
    InputLog.open(config(drop_fields=["user_id"]), tmp_path, variant="c", model_version="1").close()
    assert not (tmp_path / ".salt").exists()


@pytest.mark.parametrize("kind", ["drop_fields", "hash_fields"])
def test_inputs_cannot_be_dropped_or_hashed(tmp_path, kind):
    with pytest.raises(BadInputError, match="inputs"):
        PrivacyFilter(**{kind: ["user_id", "inputs"]}, salt="s")
    with pytest.raises(BadInputError, match=f"{kind}.*inputs"):
        InputLog.open(config(**{kind: ["inputs"]}), tmp_path / "log", variant="c", model_version="1")
    assert not (tmp_path / "log").exists()


def test_sampling(tmp_path):
    half = InputLog.open(config(sample_rate=0.5), tmp_path, variant="half", model_version="1", seed=7)
    taken = [half.record({"inputs": [f"request {i}"]}) for i in range(2000)]
    assert 900 <= half.written <= 1100
    assert sum(taken) == half.written == len(lines(half.path))

    again = InputLog.open(config(sample_rate=0.5), tmp_path, variant="again", model_version="1", seed=7)
    assert [again.record({"inputs": ["x"]}) for _ in range(2000)] == taken  # seeded: reproducible

    everything = InputLog.open(config(sample_rate=1.0), tmp_path, variant="all", model_version="1")
    assert all(everything.record({"inputs": ["x"]}) for _ in range(300))
    assert everything.written == 300


def test_rotation_keeps_backups_and_newest_records(tmp_path):
    cfg = config(max_bytes=1000, backups=2, mask_numbers=False)
    with InputLog.open(cfg, tmp_path, variant="champion", model_version="3") as log:
        for i in range(300):
            log.record({"inputs": [f"text {i}"]})
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["inputs-champion-v3.jsonl", "inputs-champion-v3.jsonl.1", "inputs-champion-v3.jsonl.2"]
    assert all((tmp_path / name).stat().st_size <= 1000 for name in files)
    assert lines(tmp_path / files[0])[-1]["inputs"] == ["text 299"]
    kept = read_inputs(tmp_path, limit=10_000)
    assert 20 <= len(kept) < 40  # two full backups and the live file; the rest deleted
    assert kept == [f"text {i}" for i in range(300 - len(kept), 300)]  # no gaps, oldest first
    assert read_inputs(tmp_path, limit=15) == [f"text {i}" for i in range(285, 300)]


def test_read_inputs_merges_servers_and_skips_bad_lines(tmp_path):
    cfg = config(max_bytes=800, backups=3, mask_numbers=False)
    champion = InputLog.open(cfg, tmp_path, variant="champion", model_version="3")
    challenger = InputLog.open(cfg, tmp_path, variant="challenger", model_version="4")
    sent = []
    for i in range(60):
        server, name = (champion, "champ") if i % 3 else (challenger, "chall")
        server.record({"inputs": [f"{name} {i} a", f"{name} {i} b"]})
        sent += [f"{name} {i} a", f"{name} {i} b"]
        time.sleep(0.001)  # distinct timestamps: the merge across servers orders by them
    champion.close()
    challenger.close()
    assert (tmp_path / "inputs-champion-v3.jsonl.1").exists() and (tmp_path / "inputs-challenger-v4.jsonl.1").exists()
    with (tmp_path / "inputs-champion-v3.jsonl").open("a") as f:
        f.write('{"ts": "not a time", "inputs": ["x"]}\n["a list"]\n{"ts": "2099-01-01T00:00:00+00:00", "inp')
    (tmp_path / "notes.txt").write_text("not a log")

    assert read_inputs(tmp_path, limit=30) == sent[-30:]
    assert read_inputs(tmp_path, limit=1) == sent[-1:]
    assert read_inputs(tmp_path / "missing") == []


def test_threads_with_rotation_write_whole_lines(tmp_path):
    cfg = config(max_bytes=4096, backups=200)
    log = InputLog.open(cfg, tmp_path, variant="champion", model_version="3")

    def work(t: int) -> None:
        for i in range(200):
            log.record({"inputs": [f"thread {t} request {i} " + "word " * (i % 20)], "user": f"u{t}"})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    log.close()
    files = list(tmp_path.glob("inputs-champion-v3.jsonl*"))
    assert len(files) > 10  # rotation did happen, many times
    records = [record for path in files for record in lines(path)]  # json.loads raises on a torn line
    assert len(records) == log.written == 1600 and log.failed == 0
    assert len(read_inputs(tmp_path, limit=10_000)) == 1600


def test_write_failure_is_counted_not_raised(tmp_path, monkeypatch):
    log = InputLog.open(config(), tmp_path, variant="champion", model_version="3")

    def disk_full(data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(log._file, "write", disk_full)
    assert log.record({"inputs": ["lost"]}) is False
    assert (log.written, log.failed) == (0, 1)
    monkeypatch.undo()
    assert log.record({"inputs": ["kept"]}) is True  # recovers once the disk has room again
    assert (log.written, log.failed) == (1, 1)
    log.close()


def test_unwritable_path_and_bad_body_are_counted(tmp_path):
    # A directory where the log file should be: open() fails even for root, which ignores permissions.
    (tmp_path / "inputs-champion-v3.jsonl").mkdir()
    log = InputLog.open(config(), tmp_path, variant="champion", model_version="3")
    assert log.record({"inputs": ["x"]}) is False
    assert log.record(None) is False  # type: ignore[arg-type]
    assert (log.written, log.failed) == (0, 2)
    log.close()
    assert log.record({"inputs": ["after close"]}) is False
    assert log.failed == 2


def test_disabled_log_is_none(tmp_path):
    assert InputLog.open(config(enabled=False), tmp_path / "a", variant="c", model_version="1") is None
    assert InputLog.open(config(sample_rate=0), tmp_path / "b", variant="c", model_version="1") is None
    assert InputLog.open(config(), None, variant="c", model_version="1") is None
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    log = InputLog.open(config(dir=str(tmp_path / "from-config")), None, variant="c", model_version="1")
    assert log is not None and log.path.parent == tmp_path / "from-config"
    log.close()


def test_variant_cannot_escape_the_directory(tmp_path):
    log = InputLog.open(config(), tmp_path / "log", variant="../../etc", model_version="1/2")
    log.record({"inputs": ["x"]})
    log.close()
    assert log.path.parent == tmp_path / "log"
    assert [p.name for p in (tmp_path / "log").iterdir()] == [log.path.name]


def test_rotation_without_backups_truncates_and_drops_stale_backups(tmp_path):
    stale = tmp_path / "inputs-c-v1.jsonl.4"  # from an earlier run that kept more backups
    stale.write_text("{}\n")
    with InputLog.open(config(max_bytes=500, backups=0), tmp_path, variant="c", model_version="1") as log:
        for i in range(50):
            log.record({"inputs": [f"text {i}"]})
    assert [p.name for p in tmp_path.iterdir()] == ["inputs-c-v1.jsonl"]
    assert 0 < log.path.stat().st_size <= 500
    assert log.written == 50


# --- shipped to a store: a pod's disk dies with the pod ---


def test_closed_files_are_shipped_and_read_back_from_the_store(tmp_path):
    store, spool = tmp_path / "store", tmp_path / "pod"
    cfg = config(max_bytes=600, backups=10, mask_numbers=False, upload_uri=str(store), upload_interval_s=3600)
    champion = InputLog.open(cfg, spool, variant="champion", model_version="3")
    challenger = InputLog.open(cfg, spool, variant="challenger", model_version="4")
    for i in range(60):
        (challenger if i % 3 == 0 else champion).record({"inputs": [f"text {i}"]})
    # Full files are closed and shipped at once, not rotated; the open one waits for the interval or the close.
    assert not list(spool.glob("*.jsonl.1"))
    assert read_inputs(spool, limit=1000)[-3:] == ["text 57", "text 58", "text 59"]
    deadline = time.monotonic() + 10
    while champion.shipped < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert champion.shipped >= 3 and (spool / "inputs-champion-v3.jsonl").exists()
    champion.close()
    challenger.close()
    shipped = sorted(p.name for p in store.iterdir())
    assert champion.shipped + challenger.shipped == len(shipped) >= 4
    assert all(re.fullmatch(r"inputs-(champion-v3|challenger-v4)-\d{8}T\d{12}Z-.+\.jsonl", n) for n in shipped)
    assert not list((spool / "outbox").iterdir()) and not (spool / "inputs-champion-v3.jsonl").exists()
    # Read as drift check reads an upload URI: through MLflow's artifact repository, newest files first.
    assert read_inputs(f"file://{store}", limit=1000) == [f"text {i}" for i in range(60)]
    assert read_inputs(f"file://{store}", limit=7) == [f"text {i}" for i in range(53, 60)]


def test_a_store_that_fails_keeps_the_newest_files_and_ships_them_once_it_is_back(tmp_path, monkeypatch):
    import canaryflow.serving.inputlog as inputlog

    store = tmp_path / "store"
    real = inputlog._repository
    down = {"yes": True}

    def repository(uri):
        if down["yes"]:
            raise ConnectionError("store unreachable")
        return real(uri)

    monkeypatch.setattr(inputlog, "_repository", repository)
    cfg = config(max_bytes=300, backups=2, mask_numbers=False, upload_uri=str(store), upload_interval_s=0.05)
    log = InputLog.open(cfg, tmp_path / "pod", variant="champion", model_version="3")
    for i in range(40):
        log.record({"inputs": [f"text {i}"]})
    time.sleep(0.3)  # several shipping passes fail
    outbox = sorted((tmp_path / "pod" / "outbox").iterdir())
    assert len(outbox) == 2 and log.shipped == 0  # bounded by backups, the oldest dropped
    kept = read_inputs(tmp_path / "pod", limit=1000)
    assert kept and kept == [f"text {i}" for i in range(40 - len(kept), 40)]
    down["yes"] = False
    deadline = time.monotonic() + 10
    while log.shipped < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    log.close()
    assert read_inputs(str(store), limit=1000) == kept


def test_an_unreadable_store_is_one_clear_error(tmp_path):
    from canaryflow.errors import CanaryflowError

    with pytest.raises(CanaryflowError, match=r"cannot read the input log at mlflow-artifacts:/nowhere: "):
        read_inputs("mlflow-artifacts:/nowhere", limit=10)
