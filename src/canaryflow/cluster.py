"""Submit the DAG to a Kubeflow Pipelines cluster, once (`submit`) or on a cron schedule (`schedule`).

Both go through kfp.Client on the KFP v2beta1 REST API. Whatever goes wrong is turned into one
CanaryflowError line: bad input (a malformed --cron or --host) before any request, and an unreachable
host, refused credentials or an API error naming the host and what was being done.

kfp is imported only inside the functions that talk to the cluster, so the cron check stays plain Python.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import tempfile
import time
import urllib.parse
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from canaryflow.errors import BadInputError, CanaryflowError

if TYPE_CHECKING:
    from canaryflow.config import Config

# A slow cluster answers within seconds; a black-holed host must not hang a CI job for ever.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
# KFP's API server refuses a recurring run outside this range.
MAX_CONCURRENCY_RANGE = (1, 10)
# Where a pod finds its projected KFP service-account token (kfp.client.KF_PIPELINES_SA_TOKEN_PATH).
SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"
SA_TOKEN_PATH = "/var/run/secrets/kubeflow/pipelines/token"

AUTH_HELP = (
    "Bearer token for the KFP API at --host (default: $KFP_TOKEN). Without one: inside a pod, the projected KFP "
    "service-account token ($KF_PIPELINES_SA_TOKEN_PATH or /var/run/secrets/kubeflow/pipelines/token); "
    "elsewhere what kfp.Client sends for an explicit host (the cookie or header saved in "
    "~/.config/kfp/context.json, a Google token for a *.googleusercontent.com host), else nothing, "
    "as through `kubectl port-forward`. Without --host the kubeconfig's credentials are used instead, which "
    "multi-user Kubeflow never sees: the API server's proxy drops them."
)
# Without --host, kfp.Client reaches the ml-pipeline service through the Kubernetes API server's service proxy
# (or its in-cluster DNS name inside a pod), in the namespace KFP is installed in. That route serves standalone KFP
# only: the API server deletes Authorization once it has authenticated the caller
# (kubernetes/kubernetes staging/src/k8s.io/apiserver/pkg/endpoints/filters/authentication.go, v1.32) and adds no
# kubeflow-userid, so multi-user ml-pipeline finds no identity at all.
KFP_NAMESPACE = "kubeflow"
KUBE_UI_PROXY_PATH = "api/v1/namespaces/{}/services/ml-pipeline-ui:80/proxy"
IN_CLUSTER_UI = "http://ml-pipeline-ui.{}.svc.cluster.local"

# What multi-user ml-pipeline says when a request carries neither kubeflow-userid nor a bearer token
# (kubeflow/pipelines backend/src/apiserver/auth/auth.go, IdentityHeaderMissingError, tag 2.17.0), and when a
# multi-user request names no namespace (backend/src/apiserver/server/experiment_server.go, canAccessExperiment).
NO_IDENTITY = "there is no user identity header"
NO_NAMESPACE = "cannot have an empty namespace in multi-user mode"
MULTI_USER_FIX = "give --host https://<kubeflow>/pipeline (the Kubeflow gateway) and --token or KFP_TOKEN"

CRON_SHAPE = "SEC MIN HOUR DOM MON DOW"
_MONTHS = {name: i for i, name in enumerate("jan feb mar apr may jun jul aug sep oct nov dec".split(), start=1)}
_DAYS = {name: i for i, name in enumerate("sun mon tue wed thu fri sat".split())}
# KFP parses cron with robfig/cron: seconds first, these bounds, three-letter names for months and days.
_CRON_FIELDS = (
    ("seconds", 0, 59, {}),
    ("minutes", 0, 59, {}),
    ("hours", 0, 23, {}),
    ("day of month", 1, 31, {}),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 6, _DAYS),
)
_QUESTION_MARK_FIELDS = ("day of month", "day of week")


# --- cron ---------------------------------------------------------------------------------------------------


def _cron_value(token: str, low: int, high: int, names: dict[str, int]) -> int:
    if token.isdigit():
        value = int(token)
    elif token.lower() in names:
        value = names[token.lower()]
    else:
        kind = "a number or a three-letter name" if names else "a number"
        raise ValueError(f"{token!r} is not {kind}")
    if not low <= value <= high:
        raise ValueError(f"{value} is out of range {low}-{high}")
    return value


def _check_cron_field(field: str, name: str, low: int, high: int, names: dict[str, int]) -> None:
    for item in field.split(","):
        if not item:
            raise ValueError("an empty item in a list")
        base, *step = item.split("/")
        if len(step) > 1:
            raise ValueError(f"{item!r} has more than one '/'")
        if step and not (step[0].isdigit() and int(step[0]) > 0):
            raise ValueError(f"step {step[0]!r} is not a positive number")
        if base == "?" and name not in _QUESTION_MARK_FIELDS:
            raise ValueError("'?' is only for day of month and day of week")
        if base in ("*", "?"):
            continue
        bounds = base.split("-")
        if len(bounds) > 2:
            raise ValueError(f"{base!r} has more than one '-'")
        start = _cron_value(bounds[0], low, high, names)
        end = _cron_value(bounds[-1], low, high, names)
        if start > end:
            raise ValueError(f"range {base} runs backwards")


def _cron_problem(fields: list[str]) -> str | None:
    for field, (name, low, high, names) in zip(fields, _CRON_FIELDS, strict=True):
        try:
            _check_cron_field(field, name, low, high, names)
        except ValueError as exc:
            return f'{name} "{field}": {exc}'
    return None


def validate_cron(expression: str) -> str:
    """The expression with its fields single-spaced, if KFP will take it as a 6-field cron (seconds first);
    otherwise BadInputError with one line that says what is wrong, and for the common 5-field crontab line,
    the 6-field expression meant."""
    fields = expression.split()
    shown = " ".join(fields)
    if not fields:
        raise BadInputError(f'--cron is empty; KFP\'s cron has 6 fields, seconds first: "{CRON_SHAPE}"')
    if len(fields) == 5:
        # KFP would take these 5 as SEC MIN HOUR DOM MON, "0 3 * * *" as hourly at minute 3: never pass it on.
        meant = ["0", *fields]
        problem = _cron_problem(meant)
        if problem is None:
            raise BadInputError(
                f'--cron "{shown}" has 5 fields; KFP\'s cron has 6, seconds first: did you mean "{" ".join(meant)}"?'
            )
        raise BadInputError(
            f'--cron "{shown}" has 5 fields; KFP\'s cron has 6, seconds first ("{CRON_SHAPE}"), '
            f'and "{" ".join(meant)}" would be invalid too: {problem}'
        )
    if len(fields) != 6:
        raise BadInputError(f'--cron "{shown}" has {len(fields)} fields; KFP\'s cron has 6: "{CRON_SHAPE}"')
    problem = _cron_problem(fields)
    if problem is not None:
        raise BadInputError(f'--cron "{shown}": {problem}')
    return shown


def validate_host(host: str) -> str:
    """The KFP API endpoint without a trailing slash, or BadInputError."""
    text = host.strip()
    parsed = urllib.parse.urlsplit(text)
    try:
        valid = parsed.scheme in ("http", "https") and bool(parsed.hostname) and (parsed.port or 1) > 0
    except ValueError:  # a port that is not a number
        valid = False
    if not valid:
        raise BadInputError(
            f"--host {host!r} is not an http:// or https:// URL, e.g. https://kubeflow.example.com/pipeline "
            "or http://localhost:8080"
        )
    return text.rstrip("/")


def _check_max_concurrency(value: int) -> None:
    low, high = MAX_CONCURRENCY_RANGE
    if not low <= value <= high:
        raise BadInputError(f"--max-concurrency {value}: KFP takes {low} to {high} concurrent runs")


# --- the client ---------------------------------------------------------------------------------------------


def _credentials(token: str | None) -> tuple[dict, str | None]:
    """kfp.Client's auth arguments, and what they are called when the server refuses them."""
    if token:
        return {"existing_token": token}, "the bearer token (--token or KFP_TOKEN)"
    path = os.environ.get(SA_TOKEN_ENV) or SA_TOKEN_PATH
    if Path(path).is_file():
        from kfp.client import ServiceAccountTokenVolumeCredentials

        return {"credentials": ServiceAccountTokenVolumeCredentials(path)}, f"the pod's KFP token ({path})"
    return {}, None


@functools.cache
def _bounded_client_class():
    """kfp.Client with every request bounded in time, tried at most three times, and never redirected.

    kfp's own requests wait without a timeout, and its health check tries 5 times, 5 s apart, logging a
    traceback each time: an unreachable host would hang, or print screens of tracebacks, before failing.
    """
    import copy

    import kfp
    import urllib3
    from kfp_server_api.rest import RESTClientObject

    class NoRedirects:
        """Behind Kubeflow's gateway a redirect leads to the login page, whose HTML kfp would read as an
        empty answer and carry on with; the redirect itself is what is worth reporting."""

        def __init__(self, manager):
            self.manager = manager

        def request(self, *args, **kwargs):
            return self.manager.request(*args, redirect=False, **kwargs)

    class BoundedREST(RESTClientObject):
        def __init__(self, configuration, timeout: tuple[float, float]):
            configuration = copy.copy(configuration)
            # A failed connection is retried (the request never left); a failed read is not, so a create
            # is never sent twice.
            configuration.retries = urllib3.Retry(total=2, read=0, status=0, backoff_factor=0.5)
            super().__init__(configuration)
            self.pool_manager = NoRedirects(self.pool_manager)
            self.timeout = timeout

        def request(self, *args, _request_timeout=None, **kwargs):
            # kfp_server_api takes a number or a (connect, read) tuple here; anything else means no limit.
            return super().request(*args, _request_timeout=_request_timeout or self.timeout, **kwargs)

    class BoundedClient(kfp.Client):
        def __init__(self, timeout: tuple[float, float], **kwargs):
            self._timeout = timeout
            self.healthz = None
            super().__init__(**kwargs)
            if self.healthz is None:  # kfp asks only when it has no namespace saved: ask anyway, to fail early
                self.get_kfp_healthz()

        def _load_config(self, *args, **kwargs):
            config = super()._load_config(*args, **kwargs)
            # kfp's proxy path ends in "/", and every API path starts with one: "proxy//apis/..." is not a
            # path the API server's proxy is documented to take.
            config.host = config.host.rstrip("/")
            hook, host = config.refresh_api_key_hook, config.host
            if hook is not None:
                # kubernetes' kubeconfig loader refreshes the token before every request, and sets the API
                # server's bare address back as the host, dropping kfp's service-proxy path
                # (kubeflow/pipelines#8313), and itself back as the hook: undo both after each refresh.
                def refresh(configuration):
                    hook(configuration)
                    configuration.host = host
                    configuration.refresh_api_key_hook = refresh

                config.refresh_api_key_hook = refresh
            return config

        def get_kfp_healthz(self, sleep_duration: int = 5):
            api_client = self._healthz_api.api_client
            if not isinstance(api_client.rest_client, BoundedREST):
                api_client.rest_client = BoundedREST(api_client.configuration, self._timeout)
            self.healthz = self._healthz_api.healthz_service_get_healthz()
            return self.healthz

    return BoundedClient


def _kubeconfig_route(context: str | None) -> tuple[str, str, str, bool]:
    """Where kfp.Client goes without a host, as (API endpoint, UI address, credentials in words, whether through
    the API server's proxy): inside a pod the in-cluster service, else the kubeconfig's API server and user. A
    missing or unusable kubeconfig is BadInputError here, before kfp would print "Failed to load kube config." and
    try localhost."""
    from kubernetes import client as k8s_client
    from kubernetes import config as k8s_config

    try:
        k8s_config.load_incluster_config(client_configuration=k8s_client.Configuration())
    except k8s_config.ConfigException:
        pass
    else:
        return (
            f"http://ml-pipeline.{KFP_NAMESPACE}.svc.cluster.local:8888",
            IN_CLUSTER_UI.format(KFP_NAMESPACE),
            "the pod's service account",
            False,
        )
    from kubernetes.config import kube_config

    # kubernetes reads $KUBECONFIG once, at import; kfp loads that same file, so this names it.
    where = kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    loaded = k8s_client.Configuration()
    try:
        k8s_config.load_kube_config(client_configuration=loaded, context=context)
    except (k8s_config.ConfigException, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BadInputError(
            f"no --host given and the kubeconfig ({where}) cannot be used: {reason}; give --host URL, or "
            "point KUBECONFIG at a cluster's config"
        ) from None
    server = loaded.host.rstrip("/")
    proxy = f"{server}/api/v1/namespaces/{KFP_NAMESPACE}/services/ml-pipeline:http/proxy"
    user = f"context {context!r}" if context else "current context"
    ui = f"{server}/{KUBE_UI_PROXY_PATH.format(KFP_NAMESPACE)}"
    return proxy, ui, f"the kubeconfig's credentials ({user})", True


class Connection:
    """A kfp.Client on one host, and the words its errors need.

    With `host`, kfp talks to it directly and sends `token` or the pod's projected token. Without one, kfp
    authenticates as kubectl does (its documented default): through the API server with the kubeconfig, or
    in-cluster. A kubeconfig's credentials are never sent to an explicit host, which may not be the cluster's.
    """

    def __init__(
        self, host: str | None, token: str | None, timeout: tuple[float, float], kube_context: str | None = None
    ):
        self.timeout = timeout
        self.through_proxy = False
        host = host or os.environ.get("KF_PIPELINES_ENDPOINT")  # kfp.Client's own fallback, kept in view here
        if host:
            if kube_context:
                raise BadInputError("--kube-context applies only without --host (through the kubeconfig)")
            self.host = self.ui = validate_host(host)
            kwargs, self.credentials = _credentials(token)
            kwargs["host"] = self.host
        else:
            if token:
                raise BadInputError(
                    "a token (--token or KFP_TOKEN) needs --host: without one the kubeconfig's credentials are used"
                )
            self.host, self.ui, self.credentials, self.through_proxy = _kubeconfig_route(kube_context)
            kwargs = {"host": None, "kube_context": kube_context, "namespace": KFP_NAMESPACE, "ui_host": self.ui}
        with self.calling("connecting (GET /apis/v2beta1/healthz)"):
            self.client = _bounded_client_class()(timeout=tuple(timeout), **kwargs)

    @contextlib.contextmanager
    def calling(self, doing: str):
        """Run kfp calls, turning what can go wrong into one line. kfp prints links on stdout, which --json
        keeps for its one object, so they go nowhere: the caller reports the run's own."""
        from kfp_server_api import ApiException
        from urllib3.exceptions import HTTPError

        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # kfp.Client warns on every construction
                yield
        except ApiException as exc:
            raise self._api_error(exc, doing) from None
        except HTTPError as exc:
            raise CanaryflowError(f"cannot reach KFP at {self.host} while {doing}: {self._cause(exc)}") from None
        except OSError as exc:
            raise CanaryflowError(f"cannot reach KFP at {self.host} while {doing}: {exc}") from None

    def _cause(self, exc: Exception) -> str:
        from urllib3.exceptions import (
            MaxRetryError,
            NameResolutionError,
            NewConnectionError,
            ProtocolError,
            SSLError,
            TimeoutError,
        )

        reason = exc.reason if isinstance(exc, MaxRetryError) and exc.reason is not None else exc
        # NewConnectionError subclasses urllib3's TimeoutError, so the order of these matters.
        if isinstance(reason, NameResolutionError):
            return f"cannot resolve {urllib.parse.urlsplit(self.host).hostname}"
        if isinstance(reason, NewConnectionError):
            text = str(reason)
            return "connection refused" if "refused" in text.lower() else text.split("connection: ")[-1]
        if isinstance(reason, TimeoutError):
            if "connect" in type(reason).__name__.lower():
                return f"no connection within {self.timeout[0]:g} s"
            return f"no answer within {self.timeout[1]:g} s"
        if isinstance(reason, SSLError):
            return f"TLS failed: {str(reason).splitlines()[0]}"
        if isinstance(reason, ProtocolError):
            return f"the connection broke: {str(reason).splitlines()[0]}"
        return str(reason).splitlines()[0] if str(reason) else type(reason).__name__

    def _api_error(self, exc, doing: str) -> CanaryflowError:
        status = exc.status or 0
        if status == 0:  # kfp_server_api's own wrapping of a TLS failure
            reason = str(exc.reason or "").replace("\n", ": ")
            return CanaryflowError(f"cannot reach KFP at {self.host} while {doing}: {reason}")
        what = f"HTTP {status} {exc.reason or ''}".strip()
        detail = _detail(exc.body)
        said = f"{what}: {detail}" if detail else what
        body = exc.body.decode("utf-8", "replace") if isinstance(exc.body, bytes) else str(exc.body or "")
        multi_user = next((words for words in (NO_IDENTITY, NO_NAMESPACE) if words in body), None)
        if multi_user and self.through_proxy:
            # Whatever multi-user ml-pipeline says first (no namespace comes before no identity), this route can
            # never carry an identity, so that is the one fix worth naming.
            return CanaryflowError(
                f'KFP at {self.host} is multi-user Kubeflow and said "{multi_user}" while {doing} ({what}): '
                "the kubeconfig route goes through the API server's service proxy, which drops Authorization and "
                f"adds no user identity, so it serves standalone KFP only; {MULTI_USER_FIX}"
            )
        if multi_user == NO_IDENTITY and self.credentials is None:
            # ml-pipeline's own chain of wrapped errors says nothing more than this, and runs over a line.
            return CanaryflowError(
                f'KFP at {self.host} is multi-user and got no user identity while {doing} ({what}: "{NO_IDENTITY}"'
                "): no credentials were sent: give --token or set KFP_TOKEN"
            )
        if multi_user == NO_NAMESPACE:
            return CanaryflowError(
                f"KFP at {self.host} is multi-user and needs a namespace while {doing} ({what}): give --namespace, "
                "your Kubeflow profile's namespace"
            )
        if status in (401, 403):
            if self.credentials is None:
                hint = "no credentials were sent: give --token or set KFP_TOKEN"
            elif status == 401:
                hint = f"{self.credentials} was not accepted"
            else:  # a gateway's RBAC says 403 for an unknown identity too, so both readings are given
                hint = (
                    f"{self.credentials} was refused or may not do this (on multi-user Kubeflow: is --namespace "
                    "a profile this identity may use?)"
                )
            return CanaryflowError(f"KFP at {self.host} refused {doing} ({said}); {hint}")
        if 300 <= status < 400:
            location = (exc.headers or {}).get("Location") or "elsewhere"
            return CanaryflowError(
                f"KFP at {self.host} redirected {doing} to {location} ({what}), a login page rather than the "
                "API: give --token or set KFP_TOKEN"
            )
        if status == 404 and "healthz" in doing:
            return CanaryflowError(
                f"KFP at {self.host} has no KFP v2 API ({said} while {doing}): --host should be the pipelines "
                "endpoint, e.g. https://kubeflow.example.com/pipeline"
            )
        return CanaryflowError(f"KFP at {self.host} answered {said} while {doing}")

    def experiment(self, name: str, namespace: str | None) -> str:
        """The id of the experiment of this name, created when missing (kfp.Client.create_experiment looks
        it up by display_name first)."""
        from kfp_server_api import ApiException

        with self.calling(f"looking up or creating experiment {name!r}"):
            try:
                return self._get_or_create(name, namespace)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                # Another submission created it between kfp's look-up and its create: look again.
                return self._get_or_create(name, namespace)

    def _get_or_create(self, name: str, namespace: str | None) -> str:
        try:
            return self.client.create_experiment(name=name, namespace=namespace).experiment_id
        except ValueError:  # kfp will not pick one of several experiments of the name
            raise CanaryflowError(
                f"KFP at {self.host} has more than one experiment named {name!r}: give --experiment another"
            ) from None


def _detail(body) -> str:
    """The server's own words from an error body: KFP's JSON `message`/`error`, or a short plain-text line
    (Istio says "RBAC: access denied"); an HTML page says nothing useful on one line."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    text = (body or "").strip()
    if not text:
        return ""
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        text = str(parsed.get("message") or parsed.get("error") or "")
    elif text.startswith("<"):
        return ""
    line = " ".join(text.split())
    return line if len(line) <= 300 else line[:297] + "..."


# --- submit and schedule ------------------------------------------------------------------------------------


def _compiled(cfg: Config, directory: str) -> tuple[str, dict]:
    """The pipeline package compiled as `canaryflow compile` writes it, and the parameters to run it with:
    the config (as the cluster gets it) passed explicitly, so the KFP UI shows what each run was given."""
    from canaryflow.pipelines.lifecycle import compile_pipeline, for_cluster

    path = compile_pipeline(cfg, str(Path(directory) / "pipeline.yaml"))
    return path, {"config_json": for_cluster(cfg).to_json()}


def run_url(host: str, run_id: str) -> str:
    return f"{host}/#/runs/details/{run_id}"


def recurring_run_url(host: str, recurring_run_id: str) -> str:
    return f"{host}/#/recurringrun/details/{recurring_run_id}"


def submit(
    cfg: Config,
    host: str | None,
    *,
    kube_context: str | None = None,
    experiment: str | None = None,
    namespace: str | None = None,
    token: str | None = None,
    run_name: str | None = None,
    timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
) -> dict:
    """Compile the DAG and start one run of it on the cluster at `host`, in the experiment `experiment`
    (default: the config's mlflow.experiment, so KFP and MLflow group runs alike), created when missing."""
    experiment = experiment or cfg.mlflow.experiment
    connection = Connection(host, token, timeout, kube_context)
    experiment_id = connection.experiment(experiment, namespace)
    run_name = run_name or f"{cfg.registry.model_name} {time.strftime('%Y-%m-%d %H:%M:%S')}"
    with tempfile.TemporaryDirectory(prefix="canaryflow-submit-") as tmp:
        package, parameters = _compiled(cfg, tmp)
        with connection.calling("creating the run (POST /apis/v2beta1/runs)"):
            result = connection.client.create_run_from_pipeline_package(
                package,
                arguments=parameters,
                run_name=run_name,
                experiment_id=experiment_id,
                service_account=cfg.cluster.service_account,
            )
    return {
        "run_id": result.run_id,
        "url": run_url(connection.ui, result.run_id),
        "experiment_id": experiment_id,
        "experiment": experiment,
        "name": run_name,
    }


def schedule(
    cfg: Config,
    host: str | None,
    cron: str,
    *,
    kube_context: str | None = None,
    experiment: str | None = None,
    name: str | None = None,
    max_concurrency: int = 1,
    catchup: bool = False,
    namespace: str | None = None,
    token: str | None = None,
    timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
) -> dict:
    """Compile the DAG and create a KFP recurring run of it on `cron` (6 fields, seconds first).

    One run at a time by default, and no catch-up: a schedule paused for a week resumes with one run, not
    seven retrainings racing for the champion. A recurring run of the same name in the experiment is an
    error rather than a second schedule, so running this twice does not retrain twice as often.
    """
    cron = validate_cron(cron)
    _check_max_concurrency(max_concurrency)
    experiment = experiment or cfg.mlflow.experiment
    name = name or f"{cfg.registry.model_name} retraining"
    connection = Connection(host, token, timeout, kube_context)
    experiment_id = connection.experiment(experiment, namespace)
    same_name = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})
    with connection.calling("listing recurring runs (GET /apis/v2beta1/recurringruns)"):
        existing = connection.client.list_recurring_runs(experiment_id=experiment_id, filter=same_name, page_size=1)
    if existing.recurring_runs:
        found = existing.recurring_runs[0]
        raise CanaryflowError(
            f"KFP at {connection.host} already has a recurring run {name!r} in experiment {experiment!r} "
            f"({recurring_run_url(connection.ui, found.recurring_run_id)}): delete or disable it first, "
            "or give --name"
        )
    with tempfile.TemporaryDirectory(prefix="canaryflow-schedule-") as tmp:
        package, parameters = _compiled(cfg, tmp)
        with connection.calling("creating the recurring run (POST /apis/v2beta1/recurringruns)"):
            created = connection.client.create_recurring_run(
                experiment_id=experiment_id,
                job_name=name,
                description=f"canaryflow lifecycle of {cfg.registry.model_name} on cron {cron!r}",
                cron_expression=cron,
                max_concurrency=max_concurrency,
                no_catchup=not catchup,
                params=parameters,
                pipeline_package_path=package,
                service_account=cfg.cluster.service_account,
            )
    return {
        "recurring_run_id": created.recurring_run_id,
        "url": recurring_run_url(connection.ui, created.recurring_run_id),
        "experiment_id": experiment_id,
        "experiment": experiment,
        "name": name,
        "cron": cron,
        "max_concurrency": max_concurrency,
        "no_catchup": not catchup,
    }
