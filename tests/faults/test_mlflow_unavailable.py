"""An MLflow server that is briefly unwell, or stays down, while a step writes to it.

A fault-injecting proxy (tests/faults/proxy.py) stands between the step and a real `mlflow server` on
loopback: transient 503s are retried with backoff and the step succeeds; a server that keeps failing,
or does not answer at all, fails the step with one clear line and leaves no version behind.
"""

from __future__ import annotations

import json
import subprocess
import uuid

import pytest
from mlflow import MlflowClient

from canaryflow.config import load_config
from canaryflow.registry import models
from canaryflow.registry.tracking import MlflowUnavailableError
from canaryflow.steps import register_model_step
from tests.conftest import cli_command
from tests.faults.proxy import FaultProxy

pytestmark = pytest.mark.slow  # real MLflow servers behind a faulty proxy

CREATE_VERSION = "/model-versions/create"


@pytest.fixture
def proxy(sqlite_server):
    proxy = FaultProxy(sqlite_server.url)
    yield proxy
    proxy.stop()


def _step_inputs(tmp_path, prepared, passed: bool = True):
    evaluation_dir = tmp_path / "evaluation"
    evaluation_dir.mkdir()
    evaluation = {
        "metrics": {"challenger": {"bleu": 30.0}, "champion": None},
        "champion_version": None,
        "gate": {"passed": passed, "reasons": ["ok bleu floor: 30.00 >= floor 15.00"]},
    }
    (evaluation_dir / "evaluation.json").write_text(json.dumps(evaluation))
    return str(prepared[0]), str(evaluation_dir)


def _config(url: str, name: str, *extra: str):
    return load_config(overrides=[f"mlflow.tracking_uri={url}", f"registry.model_name={name}", *extra])


def _versions(server_url: str, name: str) -> list:
    models.configure(_config(server_url, name))
    return MlflowClient().search_model_versions(f"name='{name}'")


def test_transient_server_errors_are_retried_with_backoff(proxy, sqlite_server, prepared, trained, tmp_path):
    name = f"flaky-{uuid.uuid4().hex[:6]}"
    cfg = _config(proxy.url, name, "mlflow.retries=3", "mlflow.backoff_s=1")
    data_dir, evaluation_dir = _step_inputs(tmp_path, prepared)
    proxy.fail(CREATE_VERSION, times=2)
    version = register_model_step(cfg.model_dump_json(), "flaky-run", data_dir, str(trained[0]), evaluation_dir)
    answers = [status for _, path, status in proxy.seen if path.endswith(CREATE_VERSION)]
    assert answers == [503, 503, 200]
    assert [str(v.version) for v in _versions(sqlite_server.url, name)] == [version]


def test_a_server_that_stays_down_fails_the_step_in_one_line_and_leaves_no_version(
    proxy, sqlite_server, prepared, trained, tmp_path
):
    name = f"down-{uuid.uuid4().hex[:6]}"
    cfg = _config(proxy.url, name, "mlflow.retries=2", "mlflow.backoff_s=0")
    data_dir, evaluation_dir = _step_inputs(tmp_path, prepared)
    proxy.fail(CREATE_VERSION)
    with pytest.raises(MlflowUnavailableError) as failed:
        register_model_step(cfg.model_dump_json(), "down-run", data_dir, str(trained[0]), evaluation_dir)
    message = str(failed.value)
    assert message == (
        f"MLflow at {proxy.url} did not answer while registering the candidate: "
        "it kept answering with server errors, after 2 retries with backoff"
    )
    assert _versions(sqlite_server.url, name) == []
    assert models.aliases(_config(sqlite_server.url, name)) == {
        "champion": None,
        "challenger": None,
        "previous-champion": None,
    }
    # The server recovers and the step is retried: nothing was lost, nothing is registered twice.
    proxy.heal()
    version = register_model_step(cfg.model_dump_json(), "down-run", data_dir, str(trained[0]), evaluation_dir)
    assert [str(v.version) for v in _versions(sqlite_server.url, name)] == [version]
    assert _versions(sqlite_server.url, name)[0].tags["gate.passed"] == "true"


def test_an_unreachable_server_is_one_line_from_the_cli(proxy):
    proxy.stop()  # nothing listens on its port any more: connection refused
    for argv, command in ((["registry", "list"], "registry list"), (["rollback", "--reason", "drill"], "rollback")):
        done = subprocess.run(
            cli_command(*argv, "--tracking-uri", proxy.url, "--set", "mlflow.retries=1"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 1 and done.stdout == ""
        assert done.stderr.splitlines() == [
            f"error: MLflow at {proxy.url} did not answer while running `canaryflow {command}`: "
            "connection refused, after 1 retry with backoff"
        ], done.stderr
