"""The registry behind a login: a real `mlflow server --app-name basic-auth` on loopback, started as
manifests/base/mlflow.yaml starts it (its app, its environment, the settings file manifests/base/
mlflow-basic-auth.ini with the auth database on SQLite instead of PostgreSQL). Only a login that may move
`champion` moves it; canaryflow's own alias moves go through with the pipeline's login, and without one a
step or the CLI fails in one line naming the Secret that holds it."""

from __future__ import annotations

import base64
import json
import urllib.request
import uuid

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from canaryflow.config import load_config
from canaryflow.registry import models
from canaryflow.registry.tracking import MlflowRefusedError, configure, mlflow_step
from tests.conftest import run_cli
from tests.servers import ADMIN_SECRET

pytestmark = pytest.mark.slow  # a real MLflow server with basic auth

# The logins the admin creates, as the README says.
PIPELINE = ("canaryflow-pipeline", "pipeline-Passw0rd-for-tests")
REVIEWER = ("reviewer", "reviewer-Passw0rd-for-tests")


def _login(monkeypatch, login: tuple[str, str] | None) -> None:
    # MLflow's client reads these on every request (mlflow/utils/credentials.py, read_mlflow_creds).
    for variable, value in zip(("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"), login or (None, None)):
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, value)


@pytest.fixture(scope="module")
def logins(auth_server):
    """The pipeline's login and a reviewer's, created by the admin as the README does it: one POST to MLflow's
    user API with the admin's basic-auth login."""
    admin = base64.b64encode(f"{ADMIN_SECRET['username']}:{ADMIN_SECRET['password']}".encode()).decode()
    for username, password in (PIPELINE, REVIEWER):
        request = urllib.request.Request(
            f"{auth_server.url}/api/2.0/mlflow/users/create",
            data=json.dumps({"username": username, "password": password}).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Basic {admin}"},
        )
        with urllib.request.urlopen(request, timeout=30) as answer:
            assert json.load(answer)["user"]["username"] == username
    return auth_server


def _config(server, tmp_path, name: str):
    return load_config(
        overrides=[
            f"mlflow.tracking_uri={server.url}",
            f"registry.model_name={name}",
            f"registry.lock=file:{tmp_path / 'promotion.lock'}",
            "mlflow.retries=0",  # a refusal is final; retrying it only slows the test
        ]
    )


def _two_versions(cfg) -> tuple[str, str]:
    """Two versions of a new model, created by whoever is logged in (who then owns the model)."""
    experiment = configure(cfg)
    client = MlflowClient()
    client.create_registered_model(cfg.registry.model_name)
    versions = []
    for _ in range(2):
        run = client.create_run(experiment).info.run_id
        version = client.create_model_version(cfg.registry.model_name, f"runs:/{run}/model", run_id=run)
        versions.append(str(version.version))
    return versions[0], versions[1]


def test_only_a_login_that_may_move_champion_moves_it(logins, tmp_path, monkeypatch):
    cfg = _config(logins, tmp_path, f"auth-{uuid.uuid4().hex[:6]}")
    _login(monkeypatch, PIPELINE)
    first, second = _two_versions(cfg)
    assert models.promote(cfg, first, None, "gate passed")["champion"] == first

    # No login: refused, whether through canaryflow's promotion or MLflow's client directly.
    _login(monkeypatch, None)
    with pytest.raises(MlflowException) as refused:
        models.promote(cfg, second, first, "gate passed")
    assert refused.value.error_code == "UNAUTHENTICATED"
    with pytest.raises(MlflowException) as refused:
        MlflowClient().set_registered_model_alias(cfg.registry.model_name, models.CHAMPION, second)
    assert refused.value.error_code == "UNAUTHENTICATED"

    # A reviewer's login reads the registry (default_permission READ) but may not move an alias.
    _login(monkeypatch, REVIEWER)
    assert models.aliases(cfg)["champion"] == first
    with pytest.raises(MlflowException) as refused:
        MlflowClient().set_registered_model_alias(cfg.registry.model_name, models.CHAMPION, second)
    assert refused.value.error_code == "PERMISSION_DENIED"
    assert models.aliases(cfg)["champion"] == first

    # The pipeline's login, which created the model and so manages it, promotes.
    _login(monkeypatch, PIPELINE)
    after = models.promote(cfg, second, first, "gate passed")
    assert (after["champion"], after["previous-champion"]) == (second, first)


def test_a_step_without_the_pipelines_login_fails_in_one_line_naming_the_secret(logins, tmp_path, monkeypatch):
    cfg = _config(logins, tmp_path, f"auth-{uuid.uuid4().hex[:6]}")
    read_aliases = mlflow_step("reading the aliases")(models.aliases)
    _login(monkeypatch, None)
    with pytest.raises(MlflowRefusedError, match="no login was given; set MLFLOW_TRACKING_USERNAME") as refused:
        read_aliases(cfg)
    assert "canaryflow-mlflow-auth" in str(refused.value) and logins.url in str(refused.value)
    _login(monkeypatch, (PIPELINE[0], "not-the-password"))
    with pytest.raises(MlflowRefusedError, match=f"the login of '{PIPELINE[0]}' was not accepted"):
        read_aliases(cfg)
    # A model nobody registered yet: basic-auth answers PERMISSION_DENIED for its aliases, which must still read
    # as "none", or a first run on an empty registry would fail.
    _login(monkeypatch, PIPELINE)
    assert read_aliases(cfg) == {alias: None for alias in models.ALIASES}


def test_a_rollback_without_a_login_exits_2_with_one_line(logins, tmp_path, monkeypatch):
    _login(monkeypatch, None)
    done = run_cli(
        "rollback", "--reason", "pager", "--tracking-uri", logins.url,
        "--set", f"registry.model_name=auth-{uuid.uuid4().hex[:6]}",
        "--set", f"registry.lock=file:{tmp_path / 'promotion.lock'}",
        "--set", "mlflow.retries=0",
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: MLflow at {logins.url} refused"), done.stderr
    assert "MLFLOW_TRACKING_PASSWORD" in lines[0]
