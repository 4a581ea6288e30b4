"""`canaryflow submit` and `canaryflow schedule` against a fake KFP API server on loopback.

No KFP API server can run here, so a stdlib HTTP server answers the v2beta1 REST calls kfp.Client makes
(healthz, experiments by display_name, runs, recurring runs) as KFP does, and records every request.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from canaryflow import cluster
from canaryflow.config import load_config
from canaryflow.errors import BadInputError, CanaryflowError
from tests.conftest import run_cli
from tests.servers import free_port

API = "/apis/v2beta1"


class FakeKFP:
    """Answers as the KFP v2beta1 REST API does, from memory. `refuse` answers every request with that HTTP
    status (Istio's plain-text RBAC denial for 403); `redirect` answers every request with a login redirect.

    `users` makes it multi-user ml-pipeline (MULTIUSER=true), which knows these bearer tokens as
    {token: (user, namespaces the user may use)}: the TokenReview and the SubjectAccessReview it would ask the
    Kubernetes API for. Behind `prefix` (an API server's service proxy) it never sees Authorization."""

    def __init__(
        self,
        experiments: tuple[str, ...] = (),
        refuse: int | None = None,
        redirect: bool = False,
        prefix: str = "",
        users: dict[str, tuple[str, set[str]]] | None = None,
    ):
        self.prefix = prefix  # where the API is mounted: "" as ml-pipeline serves it, or an API server's proxy path
        self.users = users
        self.requests: list[dict] = []
        self.experiments = [
            {"experiment_id": f"exp-existing-{i}", "display_name": n, "namespace": ""}
            for i, n in enumerate(experiments)
        ]
        self.recurring: list[dict] = []
        self.refuse, self.redirect = refuse, redirect
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_GET(self):
                fake.handle(self)

            def do_POST(self):
                fake.handle(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def calls(self) -> list[tuple[str, str]]:
        return [(r["method"], r["path"]) for r in self.requests]

    def body(self, method: str, path: str) -> dict:
        return next(r["body"] for r in self.requests if (r["method"], r["path"]) == (method, path))

    def handle(self, handler: BaseHTTPRequestHandler) -> None:
        url = urllib.parse.urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        query = {k: v[0] for k, v in urllib.parse.parse_qs(url.query).items()}
        self.requests.append(
            {
                "method": handler.command,
                "path": url.path.removeprefix(self.prefix),
                "full_path": url.path,
                "query": query,
                "headers": {k.lower(): v for k, v in handler.headers.items()},
                "body": json.loads(raw) if raw else None,
            }
        )
        if self.redirect:
            return self.send(handler, 302, b"", {"Location": "/oauth2/start?rd=%2Fpipeline"}, "text/html")
        if self.refuse:
            return self.send(handler, self.refuse, b"RBAC: access denied", content_type="text/plain")
        path = url.path.removeprefix(self.prefix) if url.path.startswith(self.prefix + "/") else "(outside prefix)"
        body = json.loads(raw) if raw else {}
        # The API server deletes Authorization once it has authenticated the caller, before proxying
        # (kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/endpoints/filters/authentication.go, v1.32).
        seen = None if self.prefix else handler.headers.get("Authorization")
        refused = self.multi_user_refusal(handler.command, path, query, body, seen) if self.users is not None else None
        status, answer = refused or self.answer(handler.command, path, query, body)
        self.send(handler, status, json.dumps(answer).encode())

    # --- multi-user ml-pipeline, as kubeflow/pipelines tag 2.17.0 answers ---------------------------------

    def multi_user_refusal(self, method: str, path: str, query: dict, body: dict, authorization: str | None):
        """Why multi-user ml-pipeline refuses the request, as (status, gateway error body), or None.

        The order is upstream's: experiment_server.go canAccessExperiment (and run_server.go / recurring_run
        alike) refuses an empty namespace before resource_manager.go IsAuthorized looks for an identity; that
        tries auth/auth.go GetAuthenticators in turn (the kubeflow-userid header, then a bearer token through
        a TokenReview), then asks a SubjectAccessReview for the namespace."""
        if path == f"{API}/healthz":
            return None
        doing = {
            ("GET", f"{API}/experiments"): "List experiments failed",
            ("POST", f"{API}/experiments"): "Failed to create a experiment",
            ("POST", f"{API}/runs"): "Failed to create a run",
            ("GET", f"{API}/recurringruns"): "Failed to list recurring runs",
            ("POST", f"{API}/recurringruns"): "Failed to create a recurring run",
        }.get((method, path))
        if doing is None:
            return None
        experiment_id = query.get("experiment_id") or body.get("experiment_id")
        if experiment_id:
            namespace = next(e.get("namespace", "") for e in self.experiments if e["experiment_id"] == experiment_id)
        else:
            namespace = query.get("namespace") or (body or {}).get("namespace") or ""
        if not namespace:
            message = "An experiment cannot have an empty namespace in multi-user mode"
            return _grpc_error(
                400, 3, f"{doing}: Failed to authorize with API: Invalid input error: {message}", message
            )
        if authorization is None:
            # auth.go IdentityHeaderMissingError from both authenticators; k8s' aggregate error prints the two
            # identical messages once.
            missing = "Request header error: there is no user identity header."
            outer = "Failed to check authorization. User identity is empty in the request header"
            chain = f"Unauthenticated: {outer}: Unauthenticated: {missing}: {missing}"
            return _grpc_error(401, 16, f"{doing}: Failed to authorize with API: {chain}", outer)
        token = authorization.removeprefix("Bearer ")
        if token not in self.users:
            outer = "Review.Status.Authenticated is false. Error "
            missing = "Request header error: there is no user identity header."
            chain = f"[Unauthenticated: {missing}: {missing}, Authentication failure: Unauthenticated: {outer}]"
            return _grpc_error(401, 16, f"{doing}: Failed to authorize with API: Unauthenticated: {chain}", outer)
        user, namespaces = self.users[token]
        if namespace not in namespaces:
            outer = f"User '{user}' is not authorized with reason:  (request: namespace:{namespace})"
            return _grpc_error(403, 7, f"{doing}: PermissionDenied: {outer}: Unauthorized access", outer)
        return None

    def namespace(self, given: str | None) -> str:
        # resource_manager.go ReplaceNamespace: standalone KFP keeps everything in one namespace, ""
        return (given or "") if self.users is not None else ""

    def answer(self, method: str, path: str, query: dict, body: dict) -> tuple[int, dict]:
        def named(items: list[dict]) -> list[dict]:
            wanted = json.loads(query.get("filter") or '{"predicates": []}')["predicates"]
            return [item for item in items if all(item["display_name"] == p["stringValue"] for p in wanted)]

        if (method, path) == ("GET", f"{API}/healthz"):
            return 200, {"commit_sha": "0123abc", "tag_name": "2.17.0", "multi_user": self.users is not None}
        if (method, path) == ("GET", f"{API}/experiments"):
            wanted = self.namespace(query.get("namespace"))
            found = [e for e in named(self.experiments) if e.get("namespace", "") == wanted]
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if (method, path) == ("POST", f"{API}/experiments"):
            experiment = {**body, "namespace": self.namespace(body.get("namespace"))}
            experiment |= {"experiment_id": f"exp-new-{len(self.experiments)}", "storage_state": "AVAILABLE"}
            self.experiments.append(experiment)
            return 200, experiment
        if (method, path) == ("POST", f"{API}/runs"):
            return 200, {"run_id": "run-0001", "experiment_id": body["experiment_id"], "state": "PENDING"}
        if (method, path) == ("GET", f"{API}/recurringruns"):
            found = [r for r in named(self.recurring) if r["experiment_id"] == query.get("experiment_id")]
            return 200, {"recurringRuns": found, "total_size": len(found)} if found else {}
        if (method, path) == ("POST", f"{API}/recurringruns"):
            created = {k: body[k] for k in ("display_name", "experiment_id")}
            created |= {"recurring_run_id": f"rr-{len(self.recurring)}", "status": "ENABLED"}
            self.recurring.append(created)
            return 200, created
        return 404, {"error": "Not Found", "code": 5, "message": "Not Found"}

    @staticmethod
    def send(handler, status: int, payload: bytes, headers: dict | None = None, content_type="application/json"):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.end_headers()
        handler.wfile.write(payload)


def _grpc_error(status: int, code: int, message: str, external: str) -> tuple[int, dict]:
    """An error as ml-pipeline's grpc-gateway (v2) writes it: the status message is the whole chain of wrapped
    errors, the detail only the outermost words (backend/src/common/util/error.go UserError.GRPCStatus, 2.17.0)."""
    detail = {"@type": "type.googleapis.com/google.rpc.Status", "code": code, "message": external}
    return status, {"code": code, "message": message, "details": [detail]}


def _use_kubeconfig(monkeypatch, path) -> None:
    # The CLI's process reads $KUBECONFIG when it imports kubernetes; this process imported it long ago.
    from kubernetes.config import kube_config

    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))


@pytest.fixture(autouse=True)
def _no_saved_kfp_context(tmp_path, monkeypatch):
    # kfp.Client reads a saved namespace and auth cookie from ~/.config/kfp/context.json: none here. Nor a
    # kubeconfig or a pod's environment, unless a test writes one.
    from kfp.client.client import Client

    monkeypatch.setattr(Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    monkeypatch.setenv("HOME", str(tmp_path))
    _use_kubeconfig(monkeypatch, tmp_path / "no-kubeconfig")
    for name in (
        "KFP_TOKEN",
        "KF_PIPELINES_SA_TOKEN_PATH",
        "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID",
        "KF_PIPELINES_ENDPOINT",
        "KUBERNETES_SERVICE_HOST",
    ):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def kfp():
    server = FakeKFP()
    yield server
    server.close()


@pytest.fixture(scope="module")
def cfg():
    return load_config()


@pytest.fixture(scope="module")
def compiled(cfg, tmp_path_factory):
    """The package `canaryflow compile` writes for this config, once for the module: what runs must carry."""
    from canaryflow.pipelines.lifecycle import compile_pipeline, for_cluster

    path = compile_pipeline(cfg, str(tmp_path_factory.mktemp("compiled") / "pipeline.yaml"))
    with open(path) as f:
        spec = next(yaml.safe_load_all(f))
    return {"spec": spec, "config_json": for_cluster(cfg).model_dump_json()}


def _pipeline_spec(body: dict) -> dict:
    # kfp sends the platform spec beside the pipeline spec when there is one (the steps' Kubernetes secrets).
    spec = body["pipeline_spec"]
    return spec.get("pipeline_spec", spec)


def _assert_carries_the_pipeline(body: dict, compiled: dict) -> None:
    spec = _pipeline_spec(body)
    assert spec["pipelineInfo"]["name"] == "canaryflow-lifecycle"
    assert spec["root"]["dag"] == compiled["spec"]["root"]["dag"]
    assert spec["deploymentSpec"] == compiled["spec"]["deploymentSpec"]
    assert "platform_spec" in body["pipeline_spec"]
    parameters = body["runtime_config"]["parameters"]
    assert parameters == {"config_json": compiled["config_json"]}
    assert (
        parameters["config_json"]
        == compiled["spec"]["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"]
    )


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


# --- the cron check, a pure function -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression",
    [
        "0 0 3 * * *",
        "0 */15 * * * ?",
        "0 0 9 * * MON-FRI",
        "0 0 9 ? * 2-6",  # kfp.Client's own docstring example
        "30 5,35 8-18/2 1,15 JAN-jun,dec sun",
        "59 59 23 31 12 6",
        "0 0 0 1 1 0",
        "*/10 * * * * *",
        "5/20 0 0 ? * *",
        "  0   0  3 * * *  ",
    ],
)
def test_valid_cron_expressions_pass(expression):
    assert cluster.validate_cron(expression) == " ".join(expression.split())


@pytest.mark.parametrize(
    "expression, message",
    [
        ("60 0 3 * * *", 'seconds "60": 60 is out of range 0-59'),
        ("0 60 3 * * *", 'minutes "60": 60 is out of range 0-59'),
        ("0 0 24 * * *", 'hours "24": 24 is out of range 0-23'),
        ("0 0 3 0 * *", 'day of month "0": 0 is out of range 1-31'),
        ("0 0 3 * 13 *", 'month "13": 13 is out of range 1-12'),
        ("0 0 3 * * 7", 'day of week "7": 7 is out of range 0-6'),
        ("0 0 3 * * FUNDAY", "day of week \"FUNDAY\": 'FUNDAY' is not a number or a three-letter name"),
        ("0 0 3 * JANUARY *", "'JANUARY' is not a number or a three-letter name"),
        ("0 0 MON * * *", "hours \"MON\": 'MON' is not a number"),
        ("0 0 3 * * * 2026", 'has 7 fields; KFP\'s cron has 6: "SEC MIN HOUR DOM MON DOW"'),
        ("0 0 3 *", "has 4 fields"),
        ("", "--cron is empty"),
        ("0 */0 * * * *", "step '0' is not a positive number"),
        ("0 */x * * * *", "step 'x' is not a positive number"),
        ("0 0 3/2/1 * * *", "has more than one '/'"),
        ("0 0 18-8 * * *", "range 18-8 runs backwards"),
        ("0 0 1-2-3 * * *", "has more than one '-'"),
        ("0 0 3,,4 * * *", "an empty item in a list"),
        ("? 0 3 * * *", "'?' is only for day of month and day of week"),
        ("0 0 3 L * *", "'L' is not a number"),
        ("0 0 3 * * 1#2", "is not a number"),
        ("0 0 -1 * * *", "'' is not a number"),
    ],
)
def test_invalid_cron_expressions_are_refused_with_the_reason(expression, message):
    with pytest.raises(BadInputError) as raised:
        cluster.validate_cron(expression)
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "five, meant",
    [("0 3 * * *", "0 0 3 * * *"), ("*/15 * * * *", "0 */15 * * * *"), ("30 9 * * MON-FRI", "0 30 9 * * MON-FRI")],
)
def test_a_five_field_crontab_line_gets_the_six_field_expression_meant(five, meant):
    with pytest.raises(BadInputError) as raised:
        cluster.validate_cron(five)
    assert str(raised.value) == (
        f'--cron "{five}" has 5 fields; KFP\'s cron has 6, seconds first: did you mean "{meant}"?'
    )


def test_a_five_field_line_that_stays_invalid_with_seconds_says_why():
    with pytest.raises(BadInputError) as raised:
        cluster.validate_cron("0 3 * * 7")  # crontab's Sunday as 7: robfig/cron takes 0-6 only
    assert str(raised.value).startswith('--cron "0 3 * * 7" has 5 fields; KFP\'s cron has 6, seconds first')
    assert 'day of week "7": 7 is out of range 0-6' in str(raised.value)


@pytest.mark.parametrize("host", ["kfp.example.com", "ftp://kfp.example.com", "http://", "http://kfp:port", ""])
def test_a_host_that_is_not_an_http_url_is_bad_input(host):
    with pytest.raises(BadInputError, match="is not an http:// or https:// URL"):
        cluster.validate_host(host)
    assert cluster.validate_host("https://kubeflow.example.com/pipeline/") == "https://kubeflow.example.com/pipeline"


# --- submit --------------------------------------------------------------------------------------------------


def test_submit_creates_the_missing_experiment_and_sends_the_compiled_pipeline(kfp, cfg, compiled):
    result = cluster.submit(cfg, kfp.url, experiment="nightly", token="s3cret")

    assert kfp.calls() == [
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/experiments"),
        ("POST", f"{API}/experiments"),
        ("POST", f"{API}/runs"),
    ]
    lookup = json.loads(kfp.requests[1]["query"]["filter"])
    assert lookup["predicates"] == [{"operation": 1, "key": "display_name", "stringValue": "nightly"}]  # EQUALS
    assert kfp.body("POST", f"{API}/experiments")["display_name"] == "nightly"
    run = kfp.body("POST", f"{API}/runs")
    assert run["experiment_id"] == "exp-new-0"
    assert run["service_account"] == cfg.cluster.service_account == "canaryflow-runner"
    assert run["display_name"].startswith(f"{cfg.registry.model_name} ")
    _assert_carries_the_pipeline(run, compiled)
    assert {r["headers"].get("authorization") for r in kfp.requests} == {"Bearer s3cret"}
    assert result == {
        "run_id": "run-0001",
        "url": f"{kfp.url}/#/runs/details/run-0001",
        "experiment_id": "exp-new-0",
        "experiment": "nightly",
        "name": run["display_name"],
    }


def test_submit_reuses_an_existing_experiment_named_as_the_config_says(cfg):
    kfp = FakeKFP(experiments=("other", cfg.mlflow.experiment))
    try:
        result = cluster.submit(cfg, kfp.url + "/")
    finally:
        kfp.close()
    assert ("POST", f"{API}/experiments") not in kfp.calls()
    assert kfp.body("POST", f"{API}/runs")["experiment_id"] == "exp-existing-1"
    assert result["experiment"] == cfg.mlflow.experiment
    assert result["url"] == f"{kfp.url}/#/runs/details/run-0001"
    assert all("authorization" not in r["headers"] for r in kfp.requests)  # no token, not in a pod: none sent


def test_submit_in_a_pod_sends_the_projected_service_account_token(kfp, cfg, tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("pod-token\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    cluster.submit(cfg, kfp.url)
    assert {r["headers"].get("authorization") for r in kfp.requests} == {"Bearer pod-token"}


def test_submit_from_the_command_line_prints_one_json_object_and_sends_the_token(kfp, monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", "from-env")
    result = run_cli("submit", "--host", kfp.url, "--experiment", "by-hand", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "run_id": "run-0001",
        "url": f"{kfp.url}/#/runs/details/run-0001",
        "experiment_id": "exp-new-0",
        "experiment": "by-hand",
    }
    assert {r["headers"].get("authorization") for r in kfp.requests} == {"Bearer from-env"}
    body = kfp.body("POST", f"{API}/runs")
    assert json.loads(body["runtime_config"]["parameters"]["config_json"])["canary"]["backend"] == "kserve"


def test_submit_from_the_command_line_prints_the_run_url(kfp):
    result = run_cli("submit", "--host", kfp.url, "--token", "t0k", "--set", "train.max_steps=7", timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{kfp.url}/#/runs/details/run-0001\n"
    assert "submitted run" in result.stderr
    config = json.loads(kfp.body("POST", f"{API}/runs")["runtime_config"]["parameters"]["config_json"])
    assert config["train"]["max_steps"] == 7


# --- without --host: through the kubeconfig, as kubectl ------------------------------------------------------

PROXY = "/api/v1/namespaces/kubeflow/services/ml-pipeline:http/proxy"
UI_PROXY = "/api/v1/namespaces/kubeflow/services/ml-pipeline-ui:80/proxy"


def _write_kubeconfig(path, server: str, contexts: dict[str, str]) -> None:
    """A kubeconfig as `kubectl config` writes it: one cluster, one token user per context, the first current."""
    names = list(contexts)
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "loopback", "cluster": {"server": server}}],
                "users": [{"name": f"user-{n}", "user": {"token": token}} for n, token in contexts.items()],
                "contexts": [{"name": n, "context": {"cluster": "loopback", "user": f"user-{n}"}} for n in names],
                "current-context": names[0],
            }
        )
    )


@pytest.fixture
def api_server(tmp_path, monkeypatch):
    """A loopback "Kubernetes API server" that serves only KFP, under the service-proxy path, and a kubeconfig
    that points at it."""
    yield from _behind_the_api_server(tmp_path, monkeypatch, FakeKFP(prefix=PROXY))


@pytest.fixture
def multi_user_api_server(tmp_path, monkeypatch):
    """The same, with multi-user KFP behind the proxy: its users' tokens never reach it that way."""
    yield from _behind_the_api_server(tmp_path, monkeypatch, FakeKFP(prefix=PROXY, users=USERS))


def _behind_the_api_server(tmp_path, monkeypatch, server: FakeKFP):
    kubeconfig = tmp_path / "kubeconfig"
    _write_kubeconfig(kubeconfig, server.url, {"dev": "kube-token-dev", "prod": "kube-token-prod"})
    _use_kubeconfig(monkeypatch, kubeconfig)
    yield server
    server.close()


def test_submit_without_a_host_goes_through_the_api_server_with_the_kubeconfig_token(api_server, cfg, compiled):
    result = cluster.submit(cfg, None)

    assert all(r["full_path"].startswith(PROXY + API) for r in api_server.requests), api_server.requests
    assert ("POST", f"{API}/runs") in api_server.calls()
    assert {r["headers"].get("authorization") for r in api_server.requests} == {"Bearer kube-token-dev"}
    _assert_carries_the_pipeline(api_server.body("POST", f"{API}/runs"), compiled)
    assert result["url"] == f"{api_server.url}{UI_PROXY}/#/runs/details/run-0001"


def test_schedule_from_the_command_line_takes_another_kubeconfig_context(api_server):
    result = run_cli("schedule", "--cron", "0 0 3 * * *", "--kube-context", "prod", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["url"] == f"{api_server.url}{UI_PROXY}/#/recurringrun/details/rr-0"
    assert {r["headers"].get("authorization") for r in api_server.requests} == {"Bearer kube-token-prod"}
    assert ("POST", f"{API}/recurringruns") in api_server.calls()


def test_without_a_host_or_a_kubeconfig_it_is_one_line_and_exit_2(kfp):
    result = run_cli("submit", "--json", timeout=120)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert "no --host given and the kubeconfig" in line and "give --host URL" in line
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--token", "t0k"], "a token (--token or KFP_TOKEN) needs --host"),
        (["--host", "http://127.0.0.1:1", "--kube-context", "prod"], "--kube-context applies only without --host"),
    ],
)
def test_kubeconfig_and_explicit_host_credentials_do_not_mix(api_server, args, message):
    result = run_cli("submit", *args, timeout=120)
    assert result.returncode == 2
    assert message in _one_line(result.stderr)
    assert api_server.requests == []  # in particular, the kubeconfig's token went nowhere


def test_an_unknown_kubeconfig_context_is_one_line(api_server):
    result = run_cli("submit", "--kube-context", "staging", timeout=120)
    assert result.returncode == 2
    assert "staging" in _one_line(result.stderr)


# --- schedule ------------------------------------------------------------------------------------------------


def test_schedule_creates_a_recurring_run_one_at_a_time_without_catch_up(kfp, cfg, compiled):
    result = cluster.schedule(cfg, kfp.url, "0 0 3 * * *", experiment="nightly", token="s3cret")

    assert kfp.calls() == [
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/experiments"),
        ("POST", f"{API}/experiments"),
        ("GET", f"{API}/recurringruns"),
        ("POST", f"{API}/recurringruns"),
    ]
    body = kfp.body("POST", f"{API}/recurringruns")
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert int(body["max_concurrency"]) == 1
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["experiment_id"] == "exp-new-0"
    assert body["display_name"] == f"{cfg.registry.model_name} retraining"
    assert body["service_account"] == cfg.cluster.service_account == "canaryflow-runner"
    _assert_carries_the_pipeline(body, compiled)
    assert {r["headers"].get("authorization") for r in kfp.requests} == {"Bearer s3cret"}
    assert result["url"] == f"{kfp.url}/#/recurringrun/details/rr-0"
    assert result["recurring_run_id"] == "rr-0"
    assert (result["cron"], result["max_concurrency"], result["no_catchup"]) == ("0 0 3 * * *", 1, True)


def test_schedule_passes_on_concurrency_catch_up_and_name(kfp, cfg):
    cluster.schedule(
        cfg, kfp.url, "0 */15 * * * ?", name="quarter-hourly", max_concurrency=3, catchup=True, experiment="e"
    )
    body = kfp.body("POST", f"{API}/recurringruns")
    assert (body["display_name"], int(body["max_concurrency"]), body["no_catchup"]) == ("quarter-hourly", 3, False)
    assert body["trigger"]["cron_schedule"]["cron"] == "0 */15 * * * ?"


def test_a_second_schedule_of_the_same_name_is_refused(kfp, cfg):
    cluster.schedule(cfg, kfp.url, "0 0 9 * * MON-FRI")
    with pytest.raises(CanaryflowError, match=r"already has a recurring run .* delete or disable it first"):
        cluster.schedule(cfg, kfp.url, "0 0 9 * * MON-FRI")
    assert kfp.calls().count(("POST", f"{API}/recurringruns")) == 1


@pytest.mark.parametrize("value", [0, 11])
def test_max_concurrency_outside_what_kfp_takes_is_bad_input_before_any_request(kfp, cfg, value):
    with pytest.raises(BadInputError, match="KFP takes 1 to 10"):
        cluster.schedule(cfg, kfp.url, "0 0 3 * * *", max_concurrency=value)
    assert kfp.requests == []


def test_a_five_field_cron_on_the_command_line_is_one_line_exit_2_and_sends_nothing(kfp):
    result = run_cli("schedule", "--host", kfp.url, "--cron", "0 3 * * *", timeout=120)
    assert result.returncode == 2
    assert _one_line(result.stderr) == (
        'error: --cron "0 3 * * *" has 5 fields; KFP\'s cron has 6, seconds first: did you mean "0 0 3 * * *"?'
    )
    assert result.stdout == ""
    assert kfp.requests == []


def test_an_invalid_six_field_cron_on_the_command_line_is_one_line_exit_2(kfp):
    result = run_cli("schedule", "--host", kfp.url, "--cron", "0 0 3 * 13 *", "--json", timeout=120)
    assert result.returncode == 2
    assert _one_line(result.stderr) == 'error: --cron "0 0 3 * 13 *": month "13": 13 is out of range 1-12'
    assert result.stdout == ""
    assert kfp.requests == []


# --- an unreachable host, refused credentials --------------------------------------------------------------

COMMANDS = {"submit": [], "schedule": ["--cron", "0 0 3 * * *"]}


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unreachable_host_is_one_line_and_exit_1(command):
    host = f"http://127.0.0.1:{free_port()}"
    result = run_cli(command, "--host", host, *COMMANDS[command], "--json", timeout=120)
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert line.startswith(f"error: cannot reach KFP at {host} while connecting")
    assert line.endswith(": connection refused")
    assert result.stdout == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_a_403_is_one_line_naming_the_host(command):
    kfp = FakeKFP(refuse=403)
    try:
        result = run_cli(command, "--host", kfp.url, *COMMANDS[command], "--token", "wrong", timeout=120)
    finally:
        kfp.close()
    assert result.returncode == 1
    line = _one_line(result.stderr)
    assert line.startswith(f"error: KFP at {kfp.url} refused connecting")
    assert "(HTTP 403 Forbidden: RBAC: access denied)" in line
    assert "the bearer token (--token or KFP_TOKEN) was refused or may not do this" in line
    assert len(kfp.requests) == 1  # one health check, no retries of a refusal


@pytest.mark.parametrize(
    "token, hint",
    [(None, "no credentials were sent: give --token or set KFP_TOKEN"), ("stale", "was not accepted")],
)
def test_a_401_says_whether_a_token_was_sent(cfg, token, hint):
    kfp = FakeKFP(refuse=401)
    try:
        with pytest.raises(CanaryflowError) as raised:
            cluster.submit(cfg, kfp.url, token=token)
    finally:
        kfp.close()
    assert str(raised.value).startswith(f"KFP at {kfp.url} refused connecting (GET /apis/v2beta1/healthz) (HTTP 401")
    assert str(raised.value).endswith(hint)


def test_a_redirect_to_a_login_page_is_reported_not_followed(cfg):
    kfp = FakeKFP(redirect=True)
    try:
        with pytest.raises(CanaryflowError, match=r"redirected .* to /oauth2/start\?rd=%2Fpipeline \(HTTP 302"):
            cluster.submit(cfg, kfp.url)
    finally:
        kfp.close()
    assert kfp.calls() == [("GET", f"{API}/healthz")]


def test_an_api_error_later_on_names_the_host_and_the_step(kfp, cfg, monkeypatch):
    original = kfp.answer

    def no_runs(method, path, query, body):
        if (method, path) == ("POST", f"{API}/runs"):
            return 400, {"error": "bad spec", "code": 3, "message": "Invalid input error: pipeline spec is invalid"}
        return original(method, path, query, body)

    monkeypatch.setattr(kfp, "answer", no_runs)
    with pytest.raises(CanaryflowError) as raised:
        cluster.submit(cfg, kfp.url)
    assert str(raised.value) == (
        f"KFP at {kfp.url} answered HTTP 400 Bad Request: Invalid input error: pipeline spec is invalid "
        "while creating the run (POST /apis/v2beta1/runs)"
    )


def test_an_experiment_created_meanwhile_by_another_submission_is_used(kfp, cfg, monkeypatch):
    original = kfp.answer

    def racing(method, path, query, body):
        if (method, path) == ("POST", f"{API}/experiments") and not kfp.experiments:
            kfp.experiments.append({"experiment_id": "exp-theirs", "display_name": body["display_name"]})
            return 409, {"error": "exists", "code": 6, "message": "Already exists error: experiment name is taken"}
        return original(method, path, query, body)

    monkeypatch.setattr(kfp, "answer", racing)
    assert cluster.submit(cfg, kfp.url)["experiment_id"] == "exp-theirs"
    assert kfp.body("POST", f"{API}/runs")["experiment_id"] == "exp-theirs"


def test_two_experiments_of_one_name_are_an_error_not_a_guess(cfg):
    kfp = FakeKFP(experiments=("twin", "twin"))
    try:
        with pytest.raises(CanaryflowError, match="has more than one experiment named 'twin'"):
            cluster.submit(cfg, kfp.url, experiment="twin")
    finally:
        kfp.close()
    assert ("POST", f"{API}/runs") not in kfp.calls()


def test_a_host_that_never_answers_times_out(cfg):
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(CanaryflowError) as raised:
            cluster.submit(cfg, host, timeout=(1, 1))
    assert str(raised.value) == f"cannot reach KFP at {host} while connecting (GET /apis/v2beta1/healthz): " + (
        "no answer within 1 s"
    )


def test_a_host_name_that_does_not_resolve_says_so(cfg):
    with pytest.raises(CanaryflowError) as raised:
        cluster.submit(cfg, "http://kfp.invalid:8888", timeout=(2, 2))
    assert str(raised.value).startswith("cannot reach KFP at http://kfp.invalid:8888 while connecting")
    assert str(raised.value).endswith("cannot resolve kfp.invalid")


# --- drift watch --submit: a retraining run on KFP, at most one per cool-down ----------------------------------


@pytest.fixture
def drifted_log(tmp_path):
    from canaryflow.config import InputLogConfig
    from canaryflow.serving.inputlog import InputLog

    log = InputLog.open(InputLogConfig(sample_rate=1.0), tmp_path / "log", "primary", "1")
    for i in range(0, 240, 12):
        log.record(
            {"inputs": [f"Order {n} was lost in transit, mail returns{n}@shop.example" for n in range(i, i + 12)]}
        )
    log.close()
    return tmp_path / "log"


def test_drift_watch_submits_one_retraining_run_per_cool_down(kfp, champion_workdir, drifted_log, monkeypatch, capsys):
    from tests.pipelines.test_cli_data import _cli

    args = ("drift", "watch", "--submit", "--host", kfp.url, "--checks", "1", "--json", "--log", str(drifted_log))
    args += ("--workdir", str(champion_workdir), "--set", "drift.min_inputs=100")
    code, out, err = _cli(monkeypatch, capsys, *args)
    assert code == 0, err
    first = json.loads(out)
    assert first["action"] == "triggered" and first["status"] == "drifted"
    assert first["run"] == {"where": "kfp", "run_id": "run-0001", "url": f"{kfp.url}/#/runs/details/run-0001"}
    body = kfp.body("POST", f"{API}/runs")
    assert body["display_name"].startswith("canaryflow-demo drift vocabulary ")
    sent = json.loads(body["runtime_config"]["parameters"]["config_json"])
    # The cluster gets the config as given, not this machine's store and paths.
    assert sent["mlflow"]["tracking_uri"] is None and sent["serving"]["input_log"]["dir"] is None
    assert str(champion_workdir) not in body["runtime_config"]["parameters"]["config_json"]

    code, out, err = _cli(monkeypatch, capsys, *args)
    assert code == 0, err
    again = json.loads(out)
    assert again["action"] == "cooling_down" and again["last_trigger"]["run"]["run_id"] == "run-0001"
    assert [call for call in kfp.calls() if call == ("POST", f"{API}/runs")] == [("POST", f"{API}/runs")]


def test_drift_check_without_a_log_or_with_mixed_targets_is_one_line_exit_2(
    champion_workdir, tmp_path, monkeypatch, capsys
):
    from tests.pipelines.test_cli_data import _cli

    code, out, err = _cli(
        monkeypatch, capsys, "drift", "check", "--workdir", str(champion_workdir), "--log", str(tmp_path / "none")
    )
    assert code == 2 and out == "" and _one_line(err).startswith("error: no input log at")
    args = ("drift", "watch", "--submit", "--local", "--host", "http://127.0.0.1:1", "--workdir", str(champion_workdir))
    code, out, err = _cli(monkeypatch, capsys, *args)
    assert code == 2 and "--local runs the retraining here" in _one_line(err)


def test_drift_watch_with_kfp_unreachable_is_one_line_and_tries_again_next_time(
    champion_workdir, drifted_log, monkeypatch, capsys
):
    from tests.pipelines.test_cli_data import _cli

    host = f"http://127.0.0.1:{free_port()}"
    args = ("drift", "watch", "--submit", "--host", host, "--checks", "1", "--log", str(drifted_log))
    code, out, err = _cli(
        monkeypatch, capsys, *args, "--workdir", str(champion_workdir), "--set", "drift.min_inputs=100"
    )
    assert code == 1 and _one_line(err).startswith(f"error: cannot reach KFP at {host}")
    assert not (drifted_log / "drift-watch.json").exists()  # no run began, so no cool-down either


# --- the identity runs execute as -----------------------------------------------------------------------------


def test_runs_and_recurring_runs_take_the_configured_service_account(kfp):
    args = ("--host", kfp.url, "--set", "cluster.service_account=team-runner", "--json")
    assert run_cli("submit", *args, timeout=120).returncode == 0
    assert run_cli("schedule", "--cron", "0 0 3 * * *", *args, timeout=120).returncode == 0
    assert kfp.body("POST", f"{API}/runs")["service_account"] == "team-runner"
    assert kfp.body("POST", f"{API}/recurringruns")["service_account"] == "team-runner"


def test_without_a_service_account_kfp_chooses_its_default(kfp, cfg):
    # KFP then runs the steps as pipeline-runner, or default-editor on multi-user Kubeflow
    # (backend/src/apiserver/template/template.go setDefaultServiceAccount, tag 2.17.0).
    unnamed = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"service_account": None})})
    cluster.submit(unnamed, kfp.url)
    cluster.schedule(unnamed, kfp.url, "0 0 3 * * *")
    assert "service_account" not in kfp.body("POST", f"{API}/runs")
    assert "service_account" not in kfp.body("POST", f"{API}/recurringruns")


def test_a_service_account_that_is_no_kubernetes_name_is_one_line_exit_2_and_sends_nothing(kfp):
    result = run_cli("submit", "--host", kfp.url, "--set", "cluster.service_account=Team_Runner", timeout=120)
    assert result.returncode == 2
    assert "cluster.service_account" in _one_line(result.stderr)
    assert "'Team_Runner' is not a Kubernetes name" in result.stderr
    assert kfp.requests == []


# --- multi-user Kubeflow ---------------------------------------------------------------------------------------

USERS = {"alice-token": ("alice@example.com", {"team-a"})}


@pytest.fixture
def multi_user():
    server = FakeKFP(users=USERS)
    yield server
    server.close()


def _assert_created_in(kfp: FakeKFP, namespace: str, token: str) -> None:
    assert kfp.body("POST", f"{API}/experiments")["namespace"] == namespace
    run = kfp.body("POST", f"{API}/runs")
    assert next(e for e in kfp.experiments if e["experiment_id"] == run["experiment_id"])["namespace"] == namespace
    assert {r["headers"].get("authorization") for r in kfp.requests} == {f"Bearer {token}"}


def test_multi_user_kfp_takes_a_run_with_the_token_and_checks_its_namespace(multi_user, cfg):
    cluster.submit(cfg, multi_user.url, namespace="team-a", token="alice-token")
    _assert_created_in(multi_user, "team-a", "alice-token")
    assert multi_user.body("POST", f"{API}/runs")["service_account"] == "canaryflow-runner"

    with pytest.raises(CanaryflowError) as raised:
        cluster.submit(cfg, multi_user.url, namespace="team-b", token="alice-token")
    message = str(raised.value)
    assert message.startswith(f"KFP at {multi_user.url} refused looking up or creating experiment")
    assert "(HTTP 403 Forbidden: List experiments failed: PermissionDenied: User 'alice@example.com' is not" in message
    assert message.endswith("is --namespace a profile this identity may use?)")
    assert multi_user.calls().count(("POST", f"{API}/runs")) == 1


def test_multi_user_kfp_takes_the_token_from_kfp_token(multi_user, monkeypatch):
    monkeypatch.setenv("KFP_TOKEN", "alice-token")
    result = run_cli("submit", "--host", multi_user.url, "--namespace", "team-a", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    _assert_created_in(multi_user, "team-a", "alice-token")


def test_multi_user_kfp_takes_the_pods_projected_token(multi_user, cfg, tmp_path, monkeypatch):
    token_file = tmp_path / "token"
    token_file.write_text("alice-token\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token_file))
    cluster.schedule(cfg, multi_user.url, "0 0 3 * * *", namespace="team-a")
    assert multi_user.body("POST", f"{API}/recurringruns")["service_account"] == "canaryflow-runner"
    assert {r["headers"].get("authorization") for r in multi_user.requests} == {"Bearer alice-token"}


@pytest.mark.parametrize(
    "namespace, token, expected",
    [
        (
            "team-a",
            None,
            "is multi-user and got no user identity while looking up or creating experiment EXPERIMENT "
            '(HTTP 401 Unauthorized: "there is no user identity header"): no credentials were sent: give --token '
            "or set KFP_TOKEN",
        ),
        ("team-a", "stolen", "(HTTP 401 Unauthorized: List experiments failed: Failed to authorize with API"),
        (
            None,
            "alice-token",
            "is multi-user and needs a namespace while looking up or creating experiment EXPERIMENT "
            "(HTTP 400 Bad Request): give --namespace, your Kubeflow profile's namespace",
        ),
    ],
)
def test_multi_user_kfp_refusals_say_what_to_give(multi_user, cfg, namespace, token, expected):
    with pytest.raises(CanaryflowError) as raised:
        cluster.submit(cfg, multi_user.url, namespace=namespace, token=token)
    assert expected.replace("EXPERIMENT", repr(cfg.mlflow.experiment)) in str(raised.value)
    assert "\n" not in str(raised.value)
    if token == "stolen":
        assert str(raised.value).endswith("the bearer token (--token or KFP_TOKEN) was not accepted")
    assert ("POST", f"{API}/runs") not in multi_user.calls()


@pytest.mark.parametrize("namespace", [["--namespace", "team-a"], []])
def test_the_kubeconfig_route_to_multi_user_kfp_says_it_is_standalone_only_and_names_the_fix(
    multi_user_api_server, namespace
):
    result = run_cli("submit", *namespace, timeout=120)
    assert result.returncode == 1
    line = _one_line(result.stderr)
    said = "there is no user identity header" if namespace else "cannot have an empty namespace in multi-user mode"
    assert f'is multi-user Kubeflow and said "{said}" while looking up or creating experiment' in line
    assert "the API server's service proxy, which drops Authorization and adds no user identity" in line
    assert line.endswith(
        "serves standalone KFP only; give --host https://<kubeflow>/pipeline (the Kubeflow gateway) and --token or "
        "KFP_TOKEN"
    )
    # The API server got the kubeconfig's token; ml-pipeline behind it got none, and no run was created.
    assert {r["headers"].get("authorization") for r in multi_user_api_server.requests} == {"Bearer kube-token-dev"}
    assert ("POST", f"{API}/runs") not in multi_user_api_server.calls()
