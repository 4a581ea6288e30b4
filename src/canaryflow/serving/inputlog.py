"""A sampled log of what the model servers are asked, for drift checks, with a privacy filter applied before
anything reaches disk.

Each server process appends JSON lines to `<dir>/inputs-<variant>-v<model_version>.jsonl`, rotated at
`max_bytes` into `.1`, `.2`, ... like logging.handlers.RotatingFileHandler. `read_inputs` merges the most
recent inputs of every server's files in a directory, which is what `canaryflow drift check` compares with the
champion's training data.

A pod's disk dies with the pod, so with `upload_uri` a server ships its log instead of keeping it: a file is
closed when it is full, every `upload_interval_s` and at shutdown, moved to `<dir>/outbox/` under a name of its
own (`inputs-<variant>-v<version>-<closed at>-<host>.jsonl`), and uploaded through MLflow's artifact
repositories (the tracking server's proxied `mlflow-artifacts:`, s3://, gs://, a directory ...). `read_inputs`
reads such a location too, downloading the most recently closed files until it has enough inputs.
"""

from __future__ import annotations

import glob
import hashlib
import hmac
import json
import logging
import os
import random
import re
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from canaryflow.data.card import mask_text
from canaryflow.errors import BadInputError, CanaryflowError, first_line

if TYPE_CHECKING:
    from canaryflow.config import InputLogConfig

SALT_ENV = "CANARYFLOW_INPUT_LOG_SALT"
SALT_FILE = ".salt"
HASH_PREFIX = "sha256:"
# Written by the log itself; a request field of the same name must not pass for them.
OWN_KEYS = ("ts", "variant", "model_version", "inputs")
_FILE = re.compile(r"^(inputs-.+\.jsonl)(?:\.(\d+))?$")
OUTBOX = "outbox"
_CLOSED_AT = re.compile(r"-(\d{8}T\d{12}Z)-[^/]*\.jsonl$")  # in a shipped file's name: when it was closed

log = logging.getLogger(__name__)


def check_fields(drop_fields: Iterable[str], hash_fields: Iterable[str]) -> None:
    """BadInputError when either list names "inputs", which the log exists to keep."""
    for kind, fields in (("drop_fields", drop_fields), ("hash_fields", hash_fields)):
        if "inputs" in fields:
            raise BadInputError(
                f"serving.input_log.{kind} names 'inputs': the inputs are what the log is for, so they are "
                "always kept (masked); remove it from the list or disable the input log"
            )


class PrivacyFilter:
    """Drops, hashes and masks the fields of one request before it is logged."""

    def __init__(
        self,
        drop_fields: Iterable[str] = (),
        hash_fields: Iterable[str] = (),
        salt: bytes | str = b"",
        emails: bool = True,
        numbers: bool = True,
    ) -> None:
        drop_fields, hash_fields = frozenset(drop_fields), frozenset(hash_fields)
        check_fields(drop_fields, hash_fields)
        self.drop_fields = drop_fields
        # A field named in both is dropped: the stricter reading of a config that contradicts itself.
        self.hash_fields = hash_fields - drop_fields
        if self.hash_fields and not salt:
            raise ValueError("hash_fields need a salt: an unsalted hash of a user id is reversible by guessing")
        self._salt = salt.encode() if isinstance(salt, str) else salt
        self.emails, self.numbers = emails, numbers

    @classmethod
    def from_config(cls, cfg: InputLogConfig, salt: bytes | str = b"") -> PrivacyFilter:
        return cls(cfg.drop_fields, cfg.hash_fields, salt, cfg.mask_emails, cfg.mask_numbers)

    def hash(self, value: Any) -> str:
        """HMAC of the value's canonical JSON: equal values (whatever their key order) give equal hashes."""
        message = json.dumps(value, sort_keys=True, ensure_ascii=False, default=str).encode()
        return HASH_PREFIX + hmac.new(self._salt, message, hashlib.sha256).hexdigest()

    def mask(self, value: Any) -> Any:
        """Every string in `value`, however deeply nested (dict keys too), masked; other scalars as they are."""
        if isinstance(value, str):
            return mask_text(value, emails=self.emails, numbers=self.numbers)
        if isinstance(value, list | tuple):
            return [self.mask(item) for item in value]
        if isinstance(value, dict):
            return {self.mask(str(key)): self.mask(item) for key, item in value.items()}
        return value

    def __call__(self, body: dict[str, Any]) -> dict[str, Any]:
        """A new dict: drop_fields gone, hash_fields hashed, everything else masked. Top-level field names are
        kept as they are, since drop_fields and hash_fields refer to them."""
        out: dict[str, Any] = {}
        for field, value in body.items():
            if field in self.drop_fields:
                continue
            # Hashed before masking, so the hash is of the real value (joinable), and not masked after: the
            # digits of the hex digest are not a number to hide.
            out[field] = self.hash(value) if field in self.hash_fields else self.mask(value)
        return out


def load_salt(directory: str | os.PathLike[str]) -> str:
    """$CANARYFLOW_INPUT_LOG_SALT, else the salt kept in `<directory>/.salt`, created (mode 0600) by the first
    process that needs it, so hashes from every server and restart sharing the directory can be joined."""
    salt = os.environ.get(SALT_ENV)
    if salt:
        return salt
    path = Path(directory) / SALT_FILE
    try:
        # O_EXCL: of two servers starting together, exactly one creates the salt and the other reads it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read_salt(path)
    salt = secrets.token_hex(32)
    try:
        os.fchmod(fd, 0o600)  # os.open's mode is only what the umask lets through
        os.write(fd, salt.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return salt


def _read_salt(path: Path) -> str:
    # The creating process may be between its open and its write: give it a moment rather than read nothing.
    deadline = time.monotonic() + 2.0
    while True:
        salt = path.read_text().strip()
        if salt or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if not salt:
        raise CanaryflowError(f"{path} is empty: delete it (a new salt is made) or set ${SALT_ENV}")
    return salt


class _RotatingFile:
    """Append-only file rotated into .1 ... .N once the next line would pass max_bytes, or handed to `seal`
    (which moves it away) when one is given. Not locked: the caller serializes writes. Raises OSError; after
    one, the file is reopened on the next write."""

    def __init__(self, path: Path, max_bytes: int, backups: int, seal=None) -> None:
        self.path, self.max_bytes, self.backups, self.seal = path, max_bytes, backups, seal
        self._fd: int | None = None
        self._size = 0

    def write(self, data: bytes) -> None:
        if self._fd is None:
            self._open()
        # A line longer than max_bytes still gets a file of its own rather than being lost.
        if self._size and self._size + len(data) > self.max_bytes:
            self._rotate()
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                self._size += written
        except OSError:
            self.close()
            raise

    def _open(self) -> None:
        # O_APPEND: each line is one write at the end, whatever else has the file open.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size

    def cut(self) -> None:
        """Seal the file now if it holds anything, so that the next line starts a new one."""
        self.close()
        if self.path.is_file() and self.path.stat().st_size:
            self.seal(self.path)

    def _rotate(self) -> None:
        self.close()
        if self.seal is not None:
            self.seal(self.path)
            self._open()
            return
        if self.backups:
            for n in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{n}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{n + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            # No backups kept: start the file afresh, so that the log stays bounded all the same.
            os.truncate(self.path, 0)
        # Left by an earlier run with more backups: they would keep disk the config no longer grants.
        for stale in self.path.parent.glob(f"{glob.escape(self.path.name)}.*"):
            suffix = stale.name[len(self.path.name) + 1 :]
            if suffix.isdigit() and int(suffix) > self.backups:
                stale.unlink(missing_ok=True)
        self._open()

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def _safe_name(part: str) -> str:
    # The variant and version come from the command line or the registry; keep them from naming another path.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", part) or "_"


class InputLog:
    """Sampled, filtered input log of one server process. `record` is thread-safe and never raises; `written`
    and `failed` count lines written and lines lost to an error (a full disk must not fail a prediction).
    With `upload_uri`, closed files are shipped there by a thread of the log's own (`shipped` counts them);
    a failed upload keeps its file for the next try, at most `backups` of them."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        variant: str,
        model_version: str | int,
        privacy: PrivacyFilter,
        sample_rate: float = 1.0,
        max_bytes: int = 10 << 20,
        backups: int = 5,
        seed: int | None = 0,
        upload_uri: str | None = None,
        upload_interval_s: float = 300.0,
    ) -> None:
        self.directory = Path(directory)
        self.variant, self.model_version = str(variant), str(model_version)
        self.privacy = privacy
        self.sample_rate = sample_rate
        self.path = self.directory / f"inputs-{_safe_name(self.variant)}-v{_safe_name(self.model_version)}.jsonl"
        self.written = 0
        self.failed = 0
        self.shipped = 0
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._closed = False
        self.upload_uri, self._backups = upload_uri, backups
        self._file = _RotatingFile(self.path, max_bytes, backups, self._seal if upload_uri else None)
        if upload_uri:
            self._outbox = self.directory / OUTBOX
            self._outbox.mkdir(exist_ok=True)
            self._host = _safe_name(socket.gethostname())
            self._shipping = threading.Lock()  # one upload pass at a time: the thread's, or close()'s last one
            self._stop = threading.Event()
            self._wake = threading.Event()  # a file was sealed, or the log is closing: ship now
            self._shipper = threading.Thread(
                target=self._ship_every, args=(upload_interval_s,), name="input-log-shipper", daemon=True
            )
            self._shipper.start()

    @classmethod
    def open(
        cls,
        cfg: InputLogConfig,
        directory: str | os.PathLike[str] | None,
        variant: str,
        model_version: str | int,
        seed: int | None = 0,
    ) -> InputLog | None:
        """The log a server writes to, its directory created; None when disabled, sampling nothing, or with
        no directory (`directory`, else `cfg.dir`). Raises CanaryflowError when the directory or its salt
        cannot be made, and BadInputError when the filter would drop or hash the inputs."""
        directory = directory if directory is not None else cfg.dir
        if not cfg.enabled or cfg.sample_rate == 0 or directory is None:
            return None
        check_fields(cfg.drop_fields, cfg.hash_fields)  # before any file is made for a log that cannot start
        try:
            Path(directory).mkdir(parents=True, exist_ok=True)
            # Only a log that hashes needs a salt: no secret is written beside a log that has no use for it.
            salt = load_salt(directory) if set(cfg.hash_fields) - set(cfg.drop_fields) else b""
            return cls(
                directory,
                variant,
                model_version,
                PrivacyFilter.from_config(cfg, salt),
                sample_rate=cfg.sample_rate,
                max_bytes=cfg.max_bytes,
                backups=cfg.backups,
                seed=seed,
                upload_uri=cfg.upload_uri,
                upload_interval_s=cfg.upload_interval_s,
            )
        except OSError as err:
            raise CanaryflowError(f"input log directory {directory}: {err}") from err

    def record(self, body: dict[str, Any]) -> bool:
        """Log one request's body if it is sampled; True when a line was written."""
        try:
            # Decided before any work, so an unsampled request costs one random number.
            with self._lock:
                if self._closed or self._random.random() >= self.sample_rate:
                    return False
            line = self._line(body)
        except Exception:
            with self._lock:
                self._count_failure("could not be filtered")
            return False
        with self._lock:
            if self._closed:
                return False
            try:
                self._file.write(line)
            except Exception:
                self._count_failure(f"could not be written to {self.path}")
                return False
            self.written += 1
            return True

    def _line(self, body: dict[str, Any]) -> bytes:
        filtered = self.privacy(body)
        inputs = filtered.get("inputs", [])
        record = {
            "ts": datetime.now(UTC).isoformat(timespec="microseconds"),
            "variant": self.variant,
            "model_version": self.model_version,
            "inputs": inputs if isinstance(inputs, list) else [inputs],
        }
        record.update((key, value) for key, value in filtered.items() if key not in OWN_KEYS)
        return (json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n").encode()

    def _count_failure(self, what: str) -> None:
        self.failed += 1
        # The first failure and then every thousandth: a full disk must not also flood the server's log.
        if self.failed % 1000 == 1:
            log.warning("input log: a sampled request %s (%d lost so far)", what, self.failed, exc_info=True)

    def _seal(self, path: Path) -> None:
        """Move a full or timed-out file into the outbox under a name no other file, server or pod takes; keep
        at most `backups` there, so that an upload failing for days cannot fill the disk."""
        closed_at = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        os.replace(path, self._outbox / f"{path.stem}-{closed_at}-{self._host}.jsonl")
        self._wake.set()
        waiting, keep = self._waiting(), max(self._backups, 1)
        for dropped in waiting[: max(0, len(waiting) - keep)]:
            dropped.unlink(missing_ok=True)
            log.warning("input log: %s dropped unshipped: the outbox holds %d files", dropped.name, keep)

    def _waiting(self) -> list[Path]:
        """This server's files in the outbox, oldest first."""
        return sorted(self._outbox.glob(f"{glob.escape(self.path.stem)}-*.jsonl"), key=_closed_at)

    def _ship_every(self, interval_s: float) -> None:
        """Ship each file as it is sealed, and seal the open one every `interval_s` (a quiet server's inputs
        must not wait for a full file)."""
        due = time.monotonic() + interval_s
        while not self._stop.is_set():
            self._wake.wait(max(0.0, due - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                return
            if time.monotonic() >= due:
                self._cut()
                due = time.monotonic() + interval_s
            self._ship()

    def _cut(self) -> None:
        with self._lock:
            try:
                self._file.cut()
            except OSError:
                self._count_failure(f"could not be closed for upload at {self.path}")

    def _ship(self) -> None:
        with self._shipping:
            for path in self._waiting():
                try:
                    _repository(self.upload_uri).log_artifact(str(path))
                except Exception as exc:  # kept for the next pass: the store may be back by then
                    log.warning(
                        "input log: cannot upload %s to %s (kept for the next try): %s",
                        path.name, self.upload_uri, first_line(exc),
                    )  # fmt: skip
                    return
                path.unlink(missing_ok=True)
                self.shipped += 1

    def close(self, timeout: float = 30.0) -> None:
        """Stop logging; later `record` calls are ignored. With an upload URI, what is left is shipped, waiting
        at most `timeout` seconds for the store. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                self._file.close()
            except OSError:
                pass
        if self.upload_uri:
            self._stop.set()
            self._wake.set()
            self._shipper.join(timeout)
            self._cut()
            last = threading.Thread(target=self._ship, name="input-log-last-upload", daemon=True)
            last.start()
            last.join(timeout)

    def __enter__(self) -> InputLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _closed_at(path: Path) -> str:
    match = _CLOSED_AT.search(path.name)
    return match.group(1) if match else ""


def _repository(uri: str):
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(uri)


def is_uri(location: str | os.PathLike[str]) -> bool:
    """True for a location `read_inputs` reaches through MLflow's artifact repositories, not as a directory."""
    return "://" in str(location) or str(location).startswith("mlflow-artifacts:")


def _log_files(directory: Path) -> dict[str, list[Path]]:
    """Each server's files, newest first (the live file, then .1, .2 ...); a file of the outbox, not shipped
    yet, counts as a server's of its own, like the files it would have been shipped with."""
    groups: dict[str, list[tuple[int, Path]]] = {}
    outbox = directory / OUTBOX
    for path in [*directory.iterdir(), *(outbox.iterdir() if outbox.is_dir() else ())]:
        match = _FILE.match(path.name)
        if match and path.is_file():
            groups.setdefault(match.group(1), []).append((int(match.group(2) or 0), path))
    return {base: [path for _, path in sorted(files)] for base, files in groups.items()}


def _entries(path: Path) -> list[tuple[datetime, str]]:
    """(time, input) of every input in one file, in file order; lines that do not parse are skipped."""
    entries = []
    try:
        content = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []  # rotated away between listing and reading: its lines are in the next file now
    for line in content.splitlines():
        try:
            record = json.loads(line)
            ts = datetime.fromisoformat(record["ts"])
            inputs = record["inputs"]
        except (ValueError, KeyError, TypeError):
            continue
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
        inputs = inputs if isinstance(inputs, list) else [inputs]
        entries.extend((ts, text) for text in inputs if isinstance(text, str))
    return entries


def read_inputs(directory: str | os.PathLike[str], limit: int = 500) -> list[str]:
    """The most recent `limit` logged inputs of every server's files in `directory` (rotated ones too), oldest
    first; [] when there is no such directory. `directory` may be an upload URI (`is_uri`): its most recently
    closed files are downloaded first. Raises CanaryflowError when that store cannot be read."""
    if is_uri(directory):
        with tempfile.TemporaryDirectory(prefix="canaryflow-input-log-") as tmp:
            _download_recent(str(directory), Path(tmp), limit)
            return read_inputs(tmp, limit)
    directory = Path(directory)
    if limit <= 0 or not directory.is_dir():
        return []
    merged: list[tuple[datetime, str]] = []
    for files in _log_files(directory).values():
        # One server can contribute at most `limit` inputs, so its older files are read only while it has fewer.
        recent: list[tuple[datetime, str]] = []
        for path in files:
            recent = _entries(path) + recent
            if len(recent) >= limit:
                break
        merged.extend(recent[-limit:])
    # Stable: inputs of one line, or lines of one server within a clock tick, keep their order.
    merged.sort(key=lambda entry: entry[0])
    return [text for _, text in merged[-limit:]]


def _download_recent(uri: str, into: Path, limit: int) -> None:
    """The shipped files of `uri`, most recently closed first, until they hold `limit` inputs."""
    try:
        repository = _repository(uri)
        shipped = [info.path for info in repository.list_artifacts() if not info.is_dir]
        shipped = sorted((p for p in shipped if _FILE.match(Path(p).name)), key=lambda p: _closed_at(Path(p)))
        held = 0
        for path in reversed(shipped):
            held += len(_entries(Path(repository.download_artifacts(path, str(into)))))
            if held >= limit:
                break
    except CanaryflowError:
        raise
    except Exception as exc:
        raise CanaryflowError(
            f"cannot read the input log at {uri}: {str(exc).splitlines()[0] if str(exc) else exc!r}"
        ) from exc
