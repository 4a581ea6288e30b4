"""Steps forked from the warm process (canaryflow/warm.py): a step must see what it saw in its own process, its
failures must reach the caller as they were, and no process may outlive the one waiting for it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from canaryflow.errors import BadInputError
from canaryflow.warm import ENABLE_ENV, SOCKET_ENV, WarmProcess, forked_when_warm, popen, warm_steps

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the warm process forks only on Linux")


class Unpicklable(Exception):
    def __init__(self, a, b):  # pickling rebuilds it from args=(message,): one argument short
        super().__init__(f"{a} {b}")


@forked_when_warm
def report(text: str) -> dict:
    print(f"out: {text}", flush=True)
    print(f"err: {text}", file=sys.stderr, flush=True)
    return {"pid": os.getpid(), "value": os.environ.get("CANARYFLOW_TEST_VALUE"), "cwd": os.getcwd()}


@forked_when_warm
def fail(kind: str) -> None:
    if kind == "bad input":
        raise BadInputError("data.train: missing column 'target'")
    if kind == "unpicklable":
        raise Unpicklable("two", "parts")
    os._exit(3)  # dies without answering, as a segfault would


@forked_when_warm
def sleep_long(pid_file: str) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(120)


def main(argv: list[str]) -> int:
    """A stand-in for a model server's main: says where it runs, then waits for SIGTERM (exit 0) or crashes."""
    print(f"serving as {os.getpid()} for {os.environ.get('CANARYFLOW_TEST_VALUE')}", flush=True)
    if argv == ["--crash"]:
        os._exit(137)  # as the crash-after fault ends a server
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    time.sleep(120)
    return 5


@forked_when_warm
def start_server(log: str) -> int:
    """A step that starts a server, as the canary step does, and leaves it running."""
    process = popen(__name__, ["--serve"], open(log, "w"), {**os.environ, "CANARYFLOW_TEST_VALUE": "a step's server"})
    assert isinstance(process, WarmProcess)
    return process.pid


def _warm_pid(logs: Path) -> int:
    first = (logs / "warm-steps.log").read_text().splitlines()[0]
    return int(first.split()[1])


def _dead(pid: int) -> bool:
    """Gone, or a zombie its parent has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def _wait_dead(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _dead(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_step_runs_in_a_fork_on_the_callers_output_environment_and_folder(tmp_path, monkeypatch, capfd):
    logs = tmp_path / "logs"
    with warm_steps(logs):
        assert os.environ.get(SOCKET_ENV)
        # Set after the warm process started: the fork must take the caller's, not its own.
        monkeypatch.setenv("CANARYFLOW_TEST_VALUE", "the caller's")
        monkeypatch.chdir(tmp_path)
        result = report("hello")
        warm = _warm_pid(logs)
    assert result == {"pid": result["pid"], "value": "the caller's", "cwd": str(tmp_path)}
    assert result["pid"] not in (os.getpid(), warm)
    out, err = capfd.readouterr()
    assert "out: hello" in out and "err: hello" in err
    assert f"warm: {result['pid']} runs {__name__}.report" in (logs / "warm-steps.log").read_text()
    assert SOCKET_ENV not in os.environ
    assert _wait_dead(warm), "the warm process outlived its block"


@pytest.mark.slow  # several forks, each waiting for the import the warm process is in
def test_failures_reach_the_caller_as_the_step_raised_them(tmp_path, capfd):
    with warm_steps(tmp_path / "logs"):
        with pytest.raises(BadInputError, match="^data.train: missing column 'target'$"):
            fail("bad input")
        _, err = capfd.readouterr()
        assert 'raise BadInputError("data.train' in err  # the fork's own traceback, where it was raised
        with pytest.raises(RuntimeError, match="^Unpicklable: two parts$"):
            fail("unpicklable")
        with pytest.raises(RuntimeError, match=r"\(a fork of the warm process\) exited with 3 without an answer$"):
            fail("dies")
        assert report("still serving")["pid"] != os.getpid()  # a failed step does not take the warm process down


def test_the_fork_of_a_step_whose_process_is_killed_ends_too(tmp_path):
    pid_file = tmp_path / "pid"
    with warm_steps(tmp_path / "logs"):
        caller = subprocess.Popen(
            [sys.executable, "-c", f"from {__name__} import sleep_long; sleep_long({str(pid_file)!r})"],
            cwd=Path(__file__).resolve().parents[2],
        )
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and caller.poll() is None, "the step never started"
            time.sleep(0.05)
        fork = int(pid_file.read_text())
        assert fork != caller.pid and not _dead(fork)
        caller.kill()
        caller.wait()
        assert _wait_dead(fork), "the step's fork kept running after its process was killed"


def test_without_the_warm_process_a_step_runs_where_it_is_called(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv(SOCKET_ENV, str(tmp_path / "gone.sock"))
    assert report("here")["pid"] == os.getpid()
    assert "the warm process is not there" in capfd.readouterr().err
    monkeypatch.delenv(SOCKET_ENV)
    monkeypatch.setenv(ENABLE_ENV, "0")
    with warm_steps(tmp_path / "logs"):
        assert SOCKET_ENV not in os.environ
        assert report("here")["pid"] == os.getpid()
    assert not (tmp_path / "logs" / "warm-steps.log").exists()


def _wait_for_text(path: Path, text: str, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


@pytest.mark.slow  # several forks, each waiting for the import the warm process is in
def test_a_server_a_step_starts_is_forked_and_behaves_as_a_process(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "server.log"
    with warm_steps(logs), open(out, "w") as log:
        server = popen(__name__, ["--serve"], log, {**os.environ, "CANARYFLOW_TEST_VALUE": "the canary"})
        assert isinstance(server, WarmProcess) and server.pid != os.getpid()
        assert _wait_for_text(out, "serving as").strip() == f"serving as {server.pid} for the canary"
        assert server.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            server.wait(timeout=0.2)
        server.terminate()
        assert server.wait(timeout=10) == 0  # its SIGTERM handler's exit, as the process's own would be
        crashed = popen(__name__, ["--crash"], log, dict(os.environ))
        assert crashed.wait(timeout=10) == 137  # the status the warm process reaped, not a guess
        killed = popen(__name__, ["--serve"], log, dict(os.environ))
        _wait_for_text(out, f"serving as {killed.pid}")
        killed.kill()
        assert killed.wait(timeout=10) == -signal.SIGKILL
    assert f"warm: {server.pid} runs {__name__}.main" in (logs / "warm-steps.log").read_text()


def test_outside_a_warm_run_a_server_is_a_process_of_its_own(tmp_path, monkeypatch):
    monkeypatch.delenv(SOCKET_ENV, raising=False)
    with open(tmp_path / "server.log", "w") as log:
        server = popen(
            __name__, ["--crash"], log, {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        )
        assert isinstance(server, subprocess.Popen)
        assert server.wait(timeout=60) == 137


def test_a_server_ends_with_the_step_that_started_it(tmp_path):
    """A step that dies leaves no server behind: the server's own link to its step is its life line."""
    log = tmp_path / "server.log"
    with warm_steps(tmp_path / "logs"):
        pid = start_server(str(log))  # the step's fork returns, and exits, with the server still up
        assert _wait_dead(pid), "the server outlived the step that started it"


if __name__ == "__main__":  # what popen runs outside a warm run: python -m tests.unit.test_warm ARGS
    sys.exit(main(sys.argv[1:]))


def test_the_warm_process_ends_with_the_run_that_started_it(tmp_path):
    logs = tmp_path / "logs"
    run = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pathlib import Path; from canaryflow.warm import warm_steps\n"
            f"with warm_steps(Path({str(logs)!r})): time.sleep(120)",
        ]
    )
    try:
        warm = int(_wait_for_text(logs / "warm-steps.log", "listening").split()[1])
    finally:
        run.kill()  # no chance to clean up: the warm process must notice by itself
        run.wait()
    assert _wait_dead(warm), "the warm process outlived the run that started it"


def test_a_warm_process_that_hangs_up_costs_only_the_fork(tmp_path, monkeypatch, capfd):
    """Where the warm process takes the call and then fails to fork (out of processes, say), the step still
    runs, in its own process, and a server still starts, as a process of its own."""
    import socket
    import threading

    path = str(tmp_path / "hangs-up.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)

    def hang_up() -> None:
        for _ in range(2):
            listener.accept()[0].close()

    threading.Thread(target=hang_up, daemon=True).start()
    monkeypatch.setenv(SOCKET_ENV, path)
    assert report("anyway")["pid"] == os.getpid()
    assert "the warm process failed" in capfd.readouterr().err
    repo = str(Path(__file__).resolve().parents[2])
    with open(tmp_path / "server.log", "w") as log:
        server = popen(__name__, ["--crash"], log, {**os.environ, "PYTHONPATH": repo})
        assert isinstance(server, subprocess.Popen) and server.wait(timeout=60) == 137
    listener.close()
