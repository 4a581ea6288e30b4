"""One warm process that the steps of a local run, and their model servers, fork from, so that each does not
import its libraries again.

kfp.local starts a fresh interpreter for every step, and each one imported MLflow, torch, transformers and
`evaluate` again before its work began; so did every model server a canary starts: a third of `make run`
(BENCHMARKS.md). `canaryflow run` starts this process once; it imports them, then waits.

A step's own process is still the one kfp.local starts and reads. It hands its call here, and a fork of the
warm process runs the step on that process's stdin, stdout and stderr, answers with the result or the
exception, and exits; kfp.local then writes the step's outputs and status as before, and the log, the progress
lines and a failure's last line read as they did. A canary's model server is forked the same way, on its log
file, and handled like the process it would have been (`popen`).

Only under `canaryflow run`, on Linux: a fork after torch's import is unsafe on macOS, and on a cluster each
step is its own pod. Where the warm process is missing or gone, everything runs in its own process as before.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, NoReturn

SOCKET_ENV = "CANARYFLOW_WARM_SOCKET"
# Set to 0 to run every step in its own interpreter, as kfp.local alone does (for example to profile a step).
ENABLE_ENV = "CANARYFLOW_WARM_STEPS"
# In the order the DAG needs them, so that prepare_data can fork before torch is in; a module that fails to
# import is left for the step to import, and to fail on, itself.
PRELOAD = (
    "mlflow",
    # What mlflow imports only on its first call to a SQLite or SQL store, and for a run's source version: a
    # second a step, found with PYTHONPROFILEIMPORTTIME (benchmarks/run_make_run.py).
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "git",
    "canaryflow.registry.models",
    "canaryflow.data.prepare",
    "matplotlib.pyplot",
    "canaryflow.steps",
    "torch",
    "transformers",
    "canaryflow.training.fine_tune",
    "mlflow.pyfunc",
    "evaluate",
    "canaryflow.evaluation.scoring",
    "sacrebleu",
    "rouge_score.rouge_scorer",  # what the ROUGE metric module imports when `evaluate` loads it
    "canaryflow.rollout.controller",
    "canaryflow.serving.server",
    "canaryflow.serving.app",
    "uvicorn",
)
# Every message is a pickle behind its length. The caller's stdin, stdout and stderr travel beside the
# request's length (SCM_RIGHTS); the fork then sends its pid and its answer, and the warm process, once it has
# reaped the fork, its wait status.
_LENGTH = struct.Struct("!Q")
_STDIO = (0, 1, 2)
_STARTER = 0  # the warm process's stdin: a pipe from the run that started it
_parent_socket: str | None = None  # in a fork: the warm process it came from, for the servers it starts


def available() -> bool:
    return sys.platform == "linux" and os.environ.get(ENABLE_ENV, "1") != "0"


def _socket_path() -> str | None:
    return (os.environ.get(SOCKET_ENV) or _parent_socket) if available() else None


def _connect(path: str, instead: str) -> socket.socket | None:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError as exc:
        conn.close()
        print(f"canaryflow: the warm process is not there ({exc}); {instead}", file=sys.stderr)
        return None
    return conn


def _send(conn: socket.socket, message, fds: list[int] | None = None) -> None:
    payload = pickle.dumps(message)
    if fds:
        socket.send_fds(conn, [_LENGTH.pack(len(payload))], fds)
    else:
        conn.sendall(_LENGTH.pack(len(payload)))
    conn.sendall(payload)


def _receive(conn: socket.socket, with_fds: int = 0):
    """The next message, with the descriptors that came with it; (None, []) at the end of the stream."""
    if with_fds:
        header, fds, _, _ = socket.recv_fds(conn, _LENGTH.size, with_fds)
    else:
        header, fds = conn.recv(_LENGTH.size), []
    if not header:
        return None, fds
    header += _read_exactly(conn, _LENGTH.size - len(header))
    return pickle.loads(_read_exactly(conn, _LENGTH.unpack(header)[0])), fds


def _read_exactly(conn: socket.socket, length: int) -> bytes:
    data = bytearray()
    while len(data) < length:
        chunk = conn.recv(length - len(data))
        if not chunk:
            raise ConnectionError("the other side hung up in the middle of a message")
        data += chunk
    return bytes(data)


class _NotStarted(Exception):
    """The warm process could not start the fork: the caller runs it the way it would have without one."""


def _request(conn: socket.socket, stdio: list[int], **request) -> int:
    """Send what to run (kind, module, name, args, kwargs, env) and where; return the fork's pid."""
    # What this process printed so far must come before what the fork prints on the same descriptors.
    sys.stdout.flush()
    sys.stderr.flush()
    request["cwd"] = os.getcwd()
    try:
        _send(conn, request, stdio)
        reply, _ = _receive(conn)
    except OSError as exc:
        raise _NotStarted(str(exc)) from None
    if reply is None or reply[0] != "pid":
        how = _ended(_exit_code(reply[1]) if reply else None)
        raise _NotStarted(f"its fork {how} before it started (logs/warm-steps.log)")
    return reply[1]


def _exit_code(status: int) -> int:
    return os.waitstatus_to_exitcode(status)


def _ended(code: int | None) -> str:
    if code is None:
        return "ended with the warm process"
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"


# --- a step's own process ---------------------------------------------------------------------------------


def forked_when_warm(step: Callable) -> Callable:
    """Run `step` in a fork of the warm process when this process has one; in this process otherwise."""

    @functools.wraps(step)
    def call(*args, **kwargs):
        path = os.environ.get(SOCKET_ENV) if available() else None
        conn = _connect(path, "running the step in this process") if path else None
        if conn is None:
            return step(*args, **kwargs)
        with conn:
            names = {"module": step.__module__, "name": step.__qualname__}
            try:
                _request(conn, list(_STDIO), kind="call", **names, args=args, kwargs=kwargs, env=dict(os.environ))
            except _NotStarted as exc:
                print(f"canaryflow: the warm process failed ({exc}); running the step in this process", file=sys.stderr)
                return step(*args, **kwargs)
            answer, code = None, None
            while (message := _receive(conn)[0]) is not None:
                if message[0] == "status":
                    code = _exit_code(message[1])
                else:
                    answer = message
        if answer is None:
            raise RuntimeError(f"the step's process (a fork of the warm process) {_ended(code)} without an answer")
        if answer[0] == "error":
            raise answer[1]
        return answer[1]

    return call


# --- a model server a step starts -------------------------------------------------------------------------


class WarmProcess:
    """`python -m MODULE ARGS...` as a fork of the warm process, with what a caller of subprocess.Popen uses."""

    def __init__(self, conn: socket.socket, module: str, argv: list[str], out: IO, env: dict[str, str]):
        self._conn = conn
        with open(os.devnull, "rb") as stdin:
            stdio = [stdin.fileno(), out.fileno(), out.fileno()]
            self.pid = _request(conn, stdio, kind="main", module=module, name="main", args=(argv,), kwargs={}, env=env)
        self.returncode: int | None = None
        self.args = [module, *argv]

    def poll(self) -> int | None:
        return self._wait(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._wait(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return code

    def _wait(self, timeout: float | None) -> int | None:
        while self.returncode is None and select.select([self._conn], [], [], timeout)[0]:
            message, _ = _receive(self._conn)
            if message is None:  # the warm process went before it could say: the fork went with it
                self.returncode = -signal.SIGKILL
            elif message[0] == "status":
                self.returncode = _exit_code(message[1])
        if self.returncode is not None:
            self._conn.close()
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def wait_or_kill(process: subprocess.Popen | WarmProcess, grace_s: float = 10.0) -> None:
    """Wait for a process that was asked to exit; past `grace_s`, kill it."""
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def popen(module: str, argv: list[str], out: IO, env: dict[str, str]) -> subprocess.Popen | WarmProcess:
    """`python -m module argv...` with stdout and stderr on `out`: forked from the warm process when this process
    came from one (the module's main(argv) runs there), a process of its own otherwise."""
    path = _socket_path()
    conn = _connect(path, f"starting {module} as a process of its own") if path else None
    if conn is not None:
        try:
            return WarmProcess(conn, module, argv, out, env)
        except _NotStarted as exc:
            conn.close()
            print(
                f"canaryflow: the warm process failed ({exc}); starting {module} as a process of its own",
                file=sys.stderr,
            )
    command = [sys.executable, "-m", module, *argv]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)


# --- the run that starts it -------------------------------------------------------------------------------


@contextlib.contextmanager
def warm_steps(log_dir: Path) -> Iterator[None]:
    """While the block runs, steps started from this process fork from one warm process (logged to log_dir)."""
    if not available() or os.environ.get(SOCKET_ENV):
        yield
        return
    folder = tempfile.mkdtemp(prefix="canaryflow-warm-")  # 0700: only this user can ask it to run anything
    path = os.path.join(folder, "steps.sock")
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "warm-steps.log", "ab") as log:
        # Its stdin is its life line: it ends when this process does, however this process ends.
        process = subprocess.Popen(
            [sys.executable, "-m", "canaryflow.warm", path], stdin=subprocess.PIPE, stdout=log, stderr=log
        )
    try:
        if _wait_for(path, process):
            os.environ[SOCKET_ENV] = path
        yield
    finally:
        os.environ.pop(SOCKET_ENV, None)
        process.stdin.close()
        process.terminate()
        wait_or_kill(process)
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(folder)


def _wait_for(path: str, process: subprocess.Popen, timeout_s: float = 30.0) -> bool:
    """Until it listens: it binds before its first import. False if it died or never did: steps run as before."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if os.path.exists(path):
            return True
        time.sleep(0.02)
    return False


# --- the warm process -------------------------------------------------------------------------------------


class _Warm:
    def __init__(self, path: str):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path + ".tmp")
        self.listener.listen(16)
        os.rename(path + ".tmp", path)  # appears only once it accepts
        self.forks: dict[int, socket.socket] = {}  # pid -> its caller, told the wait status once it is reaped
        # A fork's end wakes the loop at once: a step's caller waits on its status.
        self.wakeup, self._wakeup_w = os.pipe()
        os.set_blocking(self.wakeup, False)
        os.set_blocking(self._wakeup_w, False)
        signal.set_wakeup_fd(self._wakeup_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, _leave)

    def serve(self) -> None:
        print(f"warm: {os.getpid()} listening on {self.path}", flush=True)
        for module in PRELOAD:
            self.handle(wait_s=0)
            try:
                if module == "matplotlib.pyplot":
                    importlib.import_module("matplotlib").use("Agg")  # files only, as every plot here asks
                importlib.import_module(module)
            except Exception as exc:  # the step imports it itself, and fails there with its own message
                print(f"warm: {module} not preloaded: {exc}", flush=True)
        print(f"warm: ready, {len(sys.modules)} modules loaded", flush=True)
        while True:
            self.handle(wait_s=None)

    def handle(self, wait_s: float | None) -> None:
        """Fork for every caller waiting, and tell the callers of forks that ended how they ended."""
        while True:
            ready = select.select([self.listener, self.wakeup, _STARTER], [], [], wait_s)[0]
            if not ready:
                return
            if _STARTER in ready and not os.read(_STARTER, 1):
                _leave()  # the run that started it is gone
            if self.wakeup in ready:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self.wakeup, 512):
                        pass
                self.reap()
            if self.listener in ready:
                self.fork(self.listener.accept()[0])
            wait_s = 0

    def fork(self, conn: socket.socket) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: the caller, told nothing, runs it itself
            print(f"warm: cannot fork: {exc}", flush=True)
            conn.close()
            return
        if pid == 0:
            signal.set_wakeup_fd(-1)
            for fd in (self.wakeup, self._wakeup_w):
                os.close(fd)
            self.listener.close()
            for other in self.forks.values():  # their callers wait for the end of the stream: it is not ours
                other.close()
            _run_request(conn, self.path)  # never returns
        self.forks[pid] = conn

    def reap(self) -> None:
        while self.forks:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            conn = self.forks.pop(pid, None)
            if conn is not None:
                with contextlib.suppress(OSError), conn:  # a caller that went no longer listens
                    conn.setblocking(False)
                    _send(conn, ("status", status))


def _leave(*_) -> NoReturn:
    """End the warm process at once. It holds nothing to save (each fork ran and ended on its own), and the
    interpreter's own teardown, with torch, transformers and MLflow loaded, took 2.4 s that `canaryflow run`
    waited for at its end."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_request(conn: socket.socket, path: str) -> None:
    """In the fork: take over the caller's stdio and environment, run what it asked for, answer, exit."""
    global _parent_socket
    code = 0
    try:
        for signum in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        request, fds = _receive(conn, with_fds=len(_STDIO))
        print(f"warm: {os.getpid()} runs {request['module']}.{request['name']}", flush=True)  # to the warm log
        for fd, stdio in zip(fds, _STDIO, strict=True):
            os.dup2(fd, stdio)
            os.close(fd)
        _send(conn, ("pid", os.getpid()))
        # The module's own name for it: with the socket gone from the environment, a step runs here.
        target = getattr(importlib.import_module(request["module"]), request["name"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.pop(SOCKET_ENV, None)  # what the step starts as a process of its own runs as it would have
        _parent_socket = path  # its model servers are forked from the warm process too
        os.chdir(request["cwd"])
        # The caller gone (kfp.local interrupted, a step killed) means nobody waits for this fork any more.
        threading.Thread(target=_exit_when_closed, args=(conn,), daemon=True).start()
        if request["kind"] == "main":
            code = _run_main(target, request["args"])
        else:
            try:
                answer = ("ok", target(*request["args"], **request["kwargs"]))
            except BaseException as exc:  # noqa: BLE001 - every failure goes back to the caller, which raises it
                traceback.print_exc()  # where it was raised; the caller's own traceback ends where it is re-raised
                answer = ("error", _portable(exc))
            atexit._run_exitfuncs()  # what the step's own interpreter would have run at exit, before it is done
            sys.stdout.flush()
            sys.stderr.flush()
            _send(conn, answer)
    except BaseException:  # noqa: BLE001 - the fork must never return into the warm process's loop
        traceback.print_exc()
        code = 1
    finally:
        os._exit(code)


def _run_main(main: Callable, args: tuple) -> int:
    """A module's main(argv), ended as `python -m module` ends: its return value or SystemExit is the exit code."""
    try:
        code = main(*args)
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - printed as the interpreter would, then exit 1
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code if isinstance(code, int) else (0 if code is None else 1)


def _portable(exc: BaseException) -> BaseException:
    """The exception itself where it survives pickling, so the step process raises what the step raised."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any exception class may fail to pickle, in any way
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _exit_when_closed(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while conn.recv(1):
            pass
    os._exit(1)


if __name__ == "__main__":
    # As canaryflow.warm, not __main__: the forks' state (the socket their servers fork from) must be where
    # popen reads it.
    importlib.import_module("canaryflow.warm")._Warm(sys.argv[1]).serve()
