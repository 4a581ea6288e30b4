"""Throwaway servers for the server-mode tests: a real `mlflow server` on loopback, over SQLite or over a
PostgreSQL 15 cluster started in a temporary directory.

An MLflow server takes about 20 s to come up on 2 cores, so conftest starts the ones the selected tests
need as soon as collection ends, and the fixtures only wait for /health when a test first asks.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PG_USER = "canaryflow"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_server(generator, variant: str, version: str, fault=None, name: str = "demo", **options):
    """A model server on loopback, as `canaryflow serve` runs one, answering for the model `name`: `.shutdown()`
    and `.server_address`."""
    from canaryflow.serving.app import make_app, serve_in_thread
    from canaryflow.serving.server import ModelService

    return serve_in_thread(make_app(ModelService(generator, variant, version, fault, **options), name))


class Unavailable(Exception):
    """This machine cannot run the server; the message says why (it becomes the skip reason)."""


class Postgres:
    """A PostgreSQL cluster in a temporary directory, trusting local connections, gone after stop()."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="canaryflow-pg-"))
        self.port = free_port()
        self.started = False
        self.error = ""

    def _as_owner(self, *argv: str) -> list[str]:
        # initdb and postgres refuse to run as root; the distribution's postgres user owns the cluster.
        if os.geteuid() != 0:
            return list(argv)
        if not shutil.which("runuser"):
            raise Unavailable("running as root without runuser, and PostgreSQL refuses to run as root")
        return ["runuser", "-u", "postgres", "--", *argv]

    def start(self) -> None:
        try:
            for tool in ("initdb", "pg_ctl"):
                if not shutil.which(tool):
                    raise Unavailable(f"no {tool} on PATH (the PostgreSQL 15 server binaries)")
            if os.geteuid() == 0:
                shutil.chown(self.root, user="postgres")
            data = self.root / "data"
            self._run("initdb", "-D", str(data), "-U", PG_USER, "--auth=trust", "-E", "UTF8", "--no-sync")
            options = f"-k {self.root} -h 127.0.0.1 -p {self.port} -F"
            self._run("pg_ctl", "-D", str(data), "-o", options, "-l", str(self.root / "log"), "-w", "start")
            self.started = True
        except Unavailable as exc:
            self.error = str(exc)

    def _run(self, *argv: str) -> None:
        try:
            done = subprocess.run(self._as_owner(*argv), capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise Unavailable(f"{argv[0]} failed: {exc}") from None
        if done.returncode != 0:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise Unavailable(f"{argv[0]} failed: {last[0]}")

    def uri(self, database: str = "postgres", user: str = PG_USER) -> str:
        return f"postgresql+psycopg2://{user}@127.0.0.1:{self.port}/{database}"

    def create_role(self, name: str) -> None:
        """A role that may log in and nothing more: no table of any database is granted to it."""
        self._sql(f'CREATE ROLE "{name}" LOGIN')

    def create_database(self, name: str) -> str:
        self._sql(f'CREATE DATABASE "{name}"')
        return self.uri(name)

    def _sql(self, statement: str) -> None:
        import sqlalchemy

        engine = sqlalchemy.create_engine(self.uri(), isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(statement))
        engine.dispose()

    def stop(self) -> None:
        if self.started:
            subprocess.run(
                self._as_owner("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "stop"),
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(self.root, ignore_errors=True)


# The values of the Secret canaryflow-mlflow-admin, by key, for the basic-auth server of the tests.
ADMIN_SECRET = {"username": "platform-admin", "password": "admin-Passw0rd-for-tests", "flask-secret-key": "k" * 32}


def basic_auth_server(workdir: Path, manifests: Path) -> MlflowServer:
    """`mlflow server` as manifests/base/mlflow.yaml starts it: its app, its environment with the Secret's values
    (ADMIN_SECRET) filled in, and the settings file mlflow-basic-auth.ini with the auth database on SQLite instead
    of PostgreSQL. A renamed variable or key in the manifest fails the start."""
    import configparser

    import yaml

    workdir.mkdir(parents=True, exist_ok=True)
    settings = configparser.ConfigParser()
    settings.read(manifests / "mlflow-basic-auth.ini")
    settings["mlflow"]["database_uri"] = f"sqlite:///{workdir / 'basic_auth.db'}"
    with open(workdir / "basic_auth.ini", "w") as out:
        settings.write(out)
    deployment = next(yaml.safe_load_all((manifests / "mlflow.yaml").read_text()))
    container = next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "mlflow")
    app = next(a.split("=", 1)[1] for a in container["args"] if a.startswith("--app-name="))
    env = {}
    for var in container["env"]:
        ref = var.get("valueFrom", {}).get("secretKeyRef", {})
        if ref.get("name") == "canaryflow-mlflow-admin":
            env[var["name"]] = ADMIN_SECRET[ref["key"]]
        elif var["name"] == "MLFLOW_AUTH_CONFIG_PATH":
            env[var["name"]] = str(workdir / "basic_auth.ini")
    return MlflowServer(None, workdir, app_name=app, env=env)


class MlflowServer:
    """`mlflow server` on a free loopback port over `backend`, proxying artifacts to a temporary directory."""

    def __init__(
        self, backend: str | None, workdir: Path, app_name: str | None = None, env: dict[str, str] | None = None
    ) -> None:
        """`app_name` and `env` as `mlflow server --app-name` and its environment (e.g. basic-auth's settings)."""
        self.backend = backend or f"sqlite:///{workdir / 'server.db'}"
        self.app_name, self.env = app_name, env or {}
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = workdir / "server.log"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Probed: one worker and no job execution bring start-up from ~50 s to ~20 s on 2 cores.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **self.env}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mlflow",
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    self.backend,
                    "--default-artifact-root",
                    "mlflow-artifacts:/",
                    "--artifacts-destination",
                    str(self.workdir / "artifacts"),
                    *(["--app-name", self.app_name] if self.app_name else []),
                ],  # fmt: skip
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
                start_new_session=True,  # so stop() takes its workers down with it
            )

    def wait(self, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                tail = self.log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
                raise Unavailable(f"mlflow server exited: {tail[0]}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self.url
            except OSError:
                time.sleep(0.5)
        raise Unavailable(f"mlflow server did not answer /health within {timeout:.0f} s")

    def stop(self) -> None:
        # A throwaway server: kill rather than wait the 10-15 s it takes to exit on SIGTERM.
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
