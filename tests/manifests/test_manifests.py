"""The manifests, images and cluster set-up without a cluster (neither a cluster nor Docker can run here).

Every manifest parses; each kustomization's patches point at objects that exist; each kustomization is built by
kustomize itself (`kubectl kustomize`), and every object it builds validates: built-in kinds against the Kubernetes
schemas kubernetes-validate ships, KServe's kinds against KServe's own CRDs (vendored under tests/schemas). Then
what ties the pieces together: the MLflow server's args parse with mlflow's own CLI and allow every name of its
Service; the config the CronJob submits names the namespace, bucket and claim it runs with; no secret value is in
the repo, and every Secret used is one the README says how to create; every image is one src/canaryflow/images.py
names, built by the Dockerfiles as the README says.
"""

import copy
import functools
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

MANIFESTS = REPO / "manifests"
DOCKER = REPO / "docker"
CRD = REPO / "tests" / "schemas" / "kserve" / "serving.kserve.io_inferenceservices.yaml"
RUNTIME_CRD = REPO / "tests" / "schemas" / "kserve" / "serving.kserve.io_clusterservingruntimes.yaml"
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests must apply to (CronJob timeZone is GA since 1.27)
CUSTOM_GROUPS = {"serving.kserve.io"}  # CRDs: validated against their own schema, merged as kustomize does
# Everything applied per namespace: what GitOps may sync, and the InferenceService created once (serving/).
SYNCED = ["base", "overlays/dev", "overlays/prod"]
FOLDERS = [*SYNCED, "serving/base", "serving/dev", "serving/prod"]
NAMESPACES = {"dev": "canaryflow-dev", "prod": "canaryflow"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume"}


def _docs(path: Path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _merge(base, patch):
    """JSON merge patch (RFC 7386): what kustomize applies to a custom resource's patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def _group(obj: dict) -> str:
    return obj["apiVersion"].rpartition("/")[0]


def _ref(obj: dict) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def _kustomization(folder: Path) -> dict:
    return _docs(folder / "kustomization.yaml")[0]


@functools.cache
def _kustomized(folder: Path) -> tuple:
    if shutil.which("kubectl") is None:
        pytest.skip("no kubectl on PATH: its built-in kustomize builds the manifests")
    built = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, f"kubectl kustomize {folder}: {built.stderr.strip()}"
    return tuple(d for d in yaml.safe_load_all(built.stdout) if d)


def build(folder: str) -> list[dict]:
    """What `kubectl kustomize manifests/<folder>` prints (kustomize itself, v5 in kubectl 1.32), as objects."""
    return copy.deepcopy(list(_kustomized((MANIFESTS / folder).resolve())))


def _find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(hits) == 1, f"{len(hits)} {kind} {name or ''}"
    return hits[0]


@pytest.fixture(scope="session")
def isvc_schema():
    # The CRD is 2 MB: libyaml's loader parses it in a second where the pure-Python one takes several.
    crd = yaml.load(CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")["schema"]["openAPIV3Schema"]
    # Built once: jsonschema.validate() re-checks this very large schema on every call.
    return jsonschema.Draft7Validator(schema)


# --- structure: files parse, kustomizations point at what exists ---


def test_every_manifest_parses_and_has_a_kind():
    files = sorted(MANIFESTS.rglob("*.yaml"))
    assert files
    for path in files:
        for doc in _docs(path):
            assert "kind" in doc and "apiVersion" in doc, path


@pytest.mark.parametrize("folder", FOLDERS)
def test_kustomizations_reference_existing_files(folder):
    k = _kustomization(MANIFESTS / folder)
    for ref in k.get("resources", []) + [p["path"] for p in k.get("patches", [])]:
        assert (MANIFESTS / folder / ref).exists(), ref
    # A file the kustomization does not name is never applied: most likely a forgotten patch.
    named = set(k.get("resources", [])) | {p["path"] for p in k.get("patches", [])} | {"kustomization.yaml"}
    assert {p.name for p in (MANIFESTS / folder).glob("*.yaml")} <= named


@pytest.mark.parametrize("folder", FOLDERS)
def test_patches_target_objects_that_exist_in_the_resources(folder):
    k = _kustomization(MANIFESTS / folder)
    below = [o for ref in k.get("resources", []) for o in _objects_of(MANIFESTS / folder / ref)]
    for patch in k.get("patches", []):
        doc = _docs(MANIFESTS / folder / patch["path"])[0]
        target = patch.get("target") or {"kind": doc["kind"], "name": doc["metadata"]["name"]}
        assert sum(_ref(o) == (target["kind"], target["name"]) for o in below) == 1, (patch["path"], target)
        assert _ref(doc) == (target["kind"], target["name"]), patch["path"]
    objects = build(folder)  # and the patches apply
    assert len({(o["kind"], o["metadata"]["name"]) for o in objects}) == len(objects), "duplicate objects"


def _objects_of(path: Path) -> list[dict]:
    return build(str(path.resolve().relative_to(MANIFESTS.resolve()))) if path.is_dir() else _docs(path)


# --- schemas ---


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_built_object_validates_against_its_schema(folder, isvc_schema):
    import kubernetes_validate

    objects = build(folder)
    assert objects
    for obj in objects:
        if obj["kind"] == "InferenceService":
            isvc_schema.validate(obj)
            continue
        assert _group(obj) not in CUSTOM_GROUPS, f"{folder}: no vendored schema for {_ref(obj)}"
        # strict: an unknown field (a typo) fails instead of being dropped by the API server.
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{folder}: {obj['kind']}/{obj['metadata']['name']}: {where}: {exc.message}")


def test_the_kubernetes_schemas_refuse_a_misspelt_field():
    import kubernetes_validate

    deployment = _find(build("base"), "Deployment", "mlflow")
    deployment["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"periodSeconds": 20}
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def _base_isvc():
    return _find(_docs(MANIFESTS / "serving" / "base" / "inferenceservice.yaml"), "InferenceService")


@pytest.mark.parametrize("overlay", NAMESPACES)
def test_the_inferenceservice_is_created_apart_from_what_gitops_syncs(overlay):
    """The canary step moves storageUri, the version and the traffic split: a GitOps controller applying the
    synced overlays would undo each promotion, so the InferenceService is only in serving/, per namespace."""
    isvc = _find(build(f"serving/{overlay}"), "InferenceService")
    assert isvc["metadata"]["namespace"] == NAMESPACES[overlay]
    assert not [o for folder in SYNCED for o in build(folder) if o["kind"] == "InferenceService"]


def test_the_serving_runtime_validates_against_kserves_crd_and_stays_cluster_scoped():
    crd = yaml.safe_load(RUNTIME_CRD.read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")["schema"]["openAPIV3Schema"]
    # kustomize gives a kind it does not know the namespace of any kustomization that names one.
    (runtime,) = build("runtime")
    jsonschema.validate(runtime, schema)
    assert runtime["kind"] == "ClusterServingRuntime" and "namespace" not in runtime["metadata"]
    assert not any(o["kind"] == "ClusterServingRuntime" for folder in FOLDERS for o in build(folder))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(_merge(runtime, {"spec": {"supportedModelFormats": [{"autoSelect": "yes"}]}}), schema)


def test_schema_rejects_a_bad_canary_percent(isvc_schema):
    bad = _merge(_base_isvc(), {"spec": {"predictor": {"canaryTrafficPercent": "ten"}}})
    with pytest.raises(jsonschema.ValidationError):
        isvc_schema.validate(bad)


# --- the MLflow server ---


def _container(workload: dict, name: str | None = None) -> dict:
    spec = workload["spec"]
    pod = spec["jobTemplate"]["spec"]["template"]["spec"] if workload["kind"] == "CronJob" else spec["template"]["spec"]
    return next(c for c in pod["containers"] if name in (None, c["name"]))


def _env(container: dict, namespace: str) -> dict[str, str]:
    """The container's environment as the kubelet builds it, a Secret's value standing in as <secret/key>."""
    env = {}
    for var in container.get("env", []):
        source = var.get("valueFrom", {})
        if "value" in var:
            env[var["name"]] = _expand(var["value"], env)
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[var["name"]] = namespace
        elif "secretKeyRef" in source:
            env[var["name"]] = f"<{source['secretKeyRef']['name']}/{source['secretKeyRef']['key']}>"
        else:
            raise AssertionError(f"unexpected env source {var}")
    return env


def _expand(text: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion in env values, command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), text)


def _args(container: dict, namespace: str) -> list[str]:
    env = _env(container, namespace)
    return [_expand(arg, env) for arg in container.get("args", [])]


def _option(args: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in args if a.startswith(name + "=")]
    values += [args[i + 1] for i, a in enumerate(args[:-1]) if a == name]
    assert len(values) == 1, f"{name} given {len(values)} times in {args}"
    return values[0]


def _mlflow(overlay: str) -> tuple[list[dict], dict, dict]:
    objects = build(f"overlays/{overlay}")
    deployment = _find(objects, "Deployment", "mlflow")
    return objects, deployment, _container(deployment, "mlflow")


@pytest.mark.parametrize("overlay", NAMESPACES)
def test_mlflow_allows_every_name_of_its_service_and_no_other(overlay):
    from mlflow.server.security_utils import is_allowed_host_header

    namespace = NAMESPACES[overlay]
    objects, deployment, container = _mlflow(overlay)
    allowed = _option(_args(container, namespace), "--allowed-hosts").split(",")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = [o for o in objects if o["kind"] == "Service" and o["spec"]["selector"].items() <= pod_labels.items()]
    assert services
    for service in services:
        name = service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            for host in (
                name,
                f"{name}.{namespace}",
                f"{name}.{namespace}.svc",
                f"{name}.{namespace}.svc.cluster.local",
            ):
                host_header = host if port["port"] == 80 else f"{host}:{port['port']}"
                assert is_allowed_host_header(allowed, host_header), host_header
    assert is_allowed_host_header(allowed, "localhost:5000")  # kubectl port-forward
    for other in ("mlflow.attacker.example:5000", "mlflow.other-namespace:5000", "10.0.0.7:5000"):
        assert not is_allowed_host_header(allowed, other), other


@pytest.mark.parametrize("overlay", NAMESPACES)
def test_mlflow_server_args_parse_with_mlflow_cli(overlay, monkeypatch):
    from mlflow.cli import server

    namespace = NAMESPACES[overlay]
    objects, _, container = _mlflow(overlay)
    env = _env(container, namespace)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert container["command"] == ["mlflow", "server"]
    args = _args(container, namespace)
    params = server.make_context("mlflow server", args).params
    # The database URI reaches the server through the option's envvar: the password is not in its command line.
    assert not any(arg.startswith("--backend-store-uri") for arg in args)
    assert params["backend_store_uri"] == "<canaryflow-mlflow-db/backend-store-uri>"
    assert params["default_artifact_root"] == "mlflow-artifacts:/"
    assert params["serve_artifacts"] is True
    assert params["artifacts_destination"] == f"s3://canaryflow-mlflow/{namespace}"
    assert (params["host"], params["workers"]) == ("0.0.0.0", "1")
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env["AWS_ACCESS_KEY_ID"] == "<canaryflow-s3/access-key-id>"
    # The Service, the probes and the server agree on the port.
    port = next(p for p in container["ports"] if p["name"] == "http")
    assert port["containerPort"] == params["port"]
    service = _find(objects, "Service", "mlflow")
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http"}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe


@pytest.mark.parametrize("overlay", NAMESPACES)
def test_mlflow_requires_a_login_and_admits_only_the_pipelines_pods(overlay, tmp_path):
    """The server runs basic-auth with its settings and admin from a Secret the steps never get, and the
    NetworkPolicy lets only KFP's pipeline pods in (tests/pipelines/test_registry_auth.py starts the server)."""
    import configparser

    from mlflow.cli import server
    from mlflow.environment_variables import (
        MLFLOW_AUTH_ADMIN_PASSWORD,
        MLFLOW_AUTH_ADMIN_USERNAME,
        MLFLOW_AUTH_CONFIG_PATH,
        MLFLOW_FLASK_SERVER_SECRET_KEY,
    )

    namespace = NAMESPACES[overlay]
    objects, deployment, container = _mlflow(overlay)
    assert server.make_context("mlflow server", _args(container, namespace)).params["app_name"] == "basic-auth"
    env = _env(container, namespace)
    admin = "canaryflow-mlflow-admin"
    assert env[MLFLOW_AUTH_ADMIN_USERNAME.name] == f"<{admin}/username>"
    assert env[MLFLOW_AUTH_ADMIN_PASSWORD.name] == f"<{admin}/password>"
    assert env[MLFLOW_FLASK_SERVER_SECRET_KEY.name] == f"<{admin}/flask-secret-key>"
    # The settings file is the Secret's basic_auth.ini alone, readable by the server's group and nobody else.
    pod = deployment["spec"]["template"]["spec"]
    settings = Path(env[MLFLOW_AUTH_CONFIG_PATH.name])
    mount = next(m for m in container["volumeMounts"] if Path(m["mountPath"]) == settings.parent)
    secret = next(v for v in pod["volumes"] if v["name"] == mount["name"])["secret"]
    assert secret["secretName"] == admin
    assert secret["items"] == [{"key": "basic_auth.ini", "path": settings.name}]
    assert secret["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]
    # The template the README turns into that key: reviewers read, and users and grants live in PostgreSQL.
    template = configparser.ConfigParser()
    template.read(MANIFESTS / "base" / "mlflow-basic-auth.ini")
    assert template["mlflow"]["default_permission"] == "READ"
    assert template["mlflow"]["database_uri"].startswith("postgresql+psycopg2://")
    # The steps log in with canaryflow-mlflow-auth, never with the admin's Secret.
    steps = {s.secret for s in _submitted_config(objects, tmp_path).cluster.secrets}
    assert "canaryflow-mlflow-auth" in steps and admin not in steps

    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    guarding = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()]
    assert len(guarding) == 1 and guarding[0]["spec"]["policyTypes"] == ["Ingress"]
    [rule] = guarding[0]["spec"]["ingress"]
    assert rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert {p["name"] for p in container["ports"]} == {"http"}
    # This namespace's pods only (no namespaceSelector), and only those KFP v2 labels as a run's
    # (kubeflow/pipelines backend/src/v2/compiler/argocompiler/argo.go, wf.Spec.PodMetadata).
    assert rule["from"] == [{"podSelector": {"matchLabels": {"pipelines.kubeflow.org/v2_component": "true"}}}]
    admitted = rule["from"][0]["podSelector"]["matchLabels"].items()
    cronjob = _find(objects, "CronJob", "canaryflow-retrain")
    for labels in (cronjob["spec"]["jobTemplate"]["spec"]["template"]["metadata"].get("labels", {}), pod_labels):
        assert not admitted <= labels.items()


# --- the recurring run ---


def _submitted_config(objects: list[dict], tmp_path: Path):
    from canaryflow.config import load_config

    cronjob = _find(objects, "CronJob", "canaryflow-retrain")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = _container(cronjob)
    path = _option(container["args"], "--config")
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = _find(objects, "ConfigMap", volume["configMap"]["name"])
    (tmp_path / "config.yaml").write_text(configmap["data"][path[len(mount["mountPath"].rstrip("/")) + 1 :]])
    return load_config(tmp_path / "config.yaml")


@pytest.mark.parametrize("overlay", NAMESPACES)
def test_the_submitted_config_names_the_cluster_it_runs_on(overlay, tmp_path):
    namespace = NAMESPACES[overlay]
    objects = build(f"overlays/{overlay}")
    cfg = _submitted_config(objects, tmp_path)
    assert cfg.canary.backend == "kserve"
    assert cfg.canary.kserve.namespace == namespace
    isvc = _find(build(f"serving/{overlay}"), "InferenceService")
    assert (cfg.canary.kserve.service or cfg.registry.model_name) == isvc["metadata"]["name"]
    mlflow = _container(_find(objects, "Deployment", "mlflow"), "mlflow")
    assert cfg.canary.kserve.artifacts_destination == _option(_args(mlflow, namespace), "--artifacts-destination")
    assert cfg.train.checkpoint_pvc == _find(objects, "PersistentVolumeClaim")["metadata"]["name"]


@pytest.mark.parametrize("overlay", NAMESPACES)
def test_the_cronjob_submits_as_a_service_account_that_may(overlay):
    objects = build(f"overlays/{overlay}")
    cronjob = _find(objects, "CronJob", "canaryflow-retrain")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    container = _container(cronjob)
    assert container["command"] == ["canaryflow", "submit"]
    assert _option(container["args"], "--host").startswith("http")
    assert len(cronjob["spec"]["schedule"].split()) == 5  # Kubernetes cron; KFP's has a seconds field first
    account = _find(objects, "ServiceAccount", pod["serviceAccountName"])["metadata"]["name"]
    # kustomize gives a ServiceAccount subject the overlay's namespace, where the account is.
    subject = {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACES[overlay]}
    bindings = [b for b in objects if b["kind"] == "RoleBinding" and subject in b["subjects"]]
    rules = [r for b in bindings for r in _find(objects, "Role", b["roleRef"]["name"])["rules"]]
    grants = {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    kfp = "pipelines.kubeflow.org"
    assert grants == {(kfp, "experiments", "list"), (kfp, "experiments", "create"), (kfp, "runs", "create")}
    token = next(v for v in pod["volumes"] if "projected" in v)["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "pipelines.kubeflow.org"  # what multi-user KFP accepts
    assert bool(cronjob["spec"].get("suspend")) == (overlay == "dev")


def _cli_commands() -> dict:
    import typer

    from canaryflow.cli import app

    return typer.main.get_command(app).commands


@pytest.mark.parametrize("overlay", NAMESPACES)
def test_the_cronjob_args_parse_with_canaryflow_submit(overlay, monkeypatch):
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    cronjob = _find(build(f"overlays/{overlay}"), "CronJob", "canaryflow-retrain")
    args = _args(_container(cronjob), NAMESPACES[overlay])
    params = _cli_commands()["submit"].make_context("canaryflow submit", args).params
    assert params["namespace"] == NAMESPACES[overlay]  # where multi-user KFP runs it: beside the Secrets
    assert params["token"] is None  # the projected token, found through KF_PIPELINES_SA_TOKEN_PATH
    assert _env(_container(cronjob), NAMESPACES[overlay])["KF_PIPELINES_SA_TOKEN_PATH"].startswith(
        next(m["mountPath"] for m in _container(cronjob)["volumeMounts"] if m["name"] == "kfp-token")
    )


def test_the_readme_submit_and_schedule_commands_parse():
    from canaryflow.cluster import validate_cron

    commands = _cli_commands()
    seen = set()
    for tokens in _readme_commands():
        if tokens[:1] == ["canaryflow"] and tokens[1] in ("submit", "schedule"):
            params = commands[tokens[1]].make_context(f"canaryflow {tokens[1]}", tokens[2:]).params
            if tokens[1] == "schedule":
                validate_cron(params["cron"])
            seen.add(tokens[1])
    assert seen == {"submit", "schedule"}


# --- secrets ---


def test_no_secret_value_is_in_the_manifests():
    for folder in FOLDERS:
        k = _kustomization(MANIFESTS / folder)
        assert not any("literals" in g for g in k.get("secretGenerator", [])), folder
        for obj in build(folder):
            assert not (obj["kind"] == "Secret" and (obj.get("data") or obj.get("stringData"))), (folder, _ref(obj))
    for path in MANIFESTS.rglob("*.yaml"):  # not even in a file no kustomization names
        assert not any(d["kind"] == "Secret" for d in _docs(path)), path


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _secret_refs(objects: list[dict]) -> set[tuple[str, str | None]]:
    refs: set[tuple[str, str | None]] = set()
    for node in _walk(objects):
        if "secretKeyRef" in node:
            refs.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
        if "secretRef" in node:
            refs.add((node["secretRef"]["name"], None))
        if isinstance(node.get("secret"), dict) and "secretName" in node["secret"]:
            refs.add((node["secret"]["secretName"], None))
    return refs


def _readme_commands() -> list[list[str]]:
    """The shell commands in the README's cluster section, one token list per command."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## On a Kubeflow cluster\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(shlex.split(line))
    return commands


def _readme_secrets() -> dict[str, set[str]]:
    created: dict[str, set[str]] = {}
    for tokens in _readme_commands():
        if (
            tokens[:1] == ["kubectl"]
            and "create" in tokens
            and tokens[tokens.index("create") + 1 :][:2]
            == [
                "secret",
                "generic",
            ]
        ):
            name = tokens[tokens.index("create") + 3]
            keys = {t.split("=", 2)[1] for t in tokens if t.startswith(("--from-literal=", "--from-file="))}
            created[name] = keys
    return created


def test_every_secret_used_is_one_the_readme_creates(tmp_path):
    created = _readme_secrets()
    used = set().union(*(_secret_refs(build(f)) for f in FOLDERS))
    # The steps' Secrets too (cluster.secrets in the config the CronJob submits); optional ones may be left out.
    for overlay in NAMESPACES:
        cfg = _submitted_config(build(f"overlays/{overlay}"), tmp_path)
        used |= {(s.secret, key) for s in cfg.cluster.secrets if not s.optional for key in s.keys}
    assert {"canaryflow-mlflow-db", "canaryflow-s3", "canaryflow-mlflow"} <= {name for name, _ in used}
    for name, key in sorted(used, key=str):
        assert name in created and (key is None or key in created[name]), f"README creates no {name} {key or ''}"


def test_the_tracking_uri_the_readme_gives_the_steps_is_allowed_by_the_server():
    from urllib.parse import urlparse

    from mlflow.server.security_utils import is_allowed_host_header

    uris = [
        t.split("=", 2)[2]
        for tokens in _readme_commands()
        for t in tokens
        if t.startswith("--from-literal=tracking-uri=")
    ]
    assert uris
    for overlay, namespace in NAMESPACES.items():
        allowed = _option(_args(_mlflow(overlay)[2], namespace), "--allowed-hosts").split(",")
        for uri in uris:
            assert is_allowed_host_header(allowed, urlparse(uri).netloc), uri


# --- images ---


def test_every_image_is_one_images_py_names():
    from canaryflow.images import BASE_IMAGE, TRAIN_IMAGE

    for folder in SYNCED:
        # Every container, including one a patch added by misspelling the name of the container it meant.
        containers = [c for node in _walk(build(folder)) for c in node.get("containers", [])]
        images = {c.get("image") for c in containers}
        assert containers and images <= {BASE_IMAGE, TRAIN_IMAGE}, (folder, images)
        for entry in _kustomization(MANIFESTS / folder).get("images", []):
            assert entry["name"] in {BASE_IMAGE.rsplit(":", 1)[0], TRAIN_IMAGE.rsplit(":", 1)[0]}, entry


def test_the_readme_builds_and_pushes_the_images_images_py_names():
    from canaryflow.images import BASE_IMAGE, TRAIN_IMAGE

    builds, pushes = {}, set()
    for tokens in _readme_commands():
        if tokens[:2] == ["docker", "build"]:
            builds[_option(tokens, "-f")] = _option(tokens, "-t")
            assert tokens[-1] == "."  # the repository root is the context the Dockerfiles copy from
        if tokens[:2] == ["docker", "push"]:
            pushes.add(tokens[2])
    assert builds == {"docker/component.Dockerfile": BASE_IMAGE, "docker/train.Dockerfile": TRAIN_IMAGE}
    assert pushes == {BASE_IMAGE, TRAIN_IMAGE}


def _instructions(path: Path) -> list[tuple[str, str]]:
    """A Dockerfile's instructions, continuation lines joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def _pip_installs(instructions: list[tuple[str, str]]) -> list[list[str]]:
    """The argument lists of every `pip install` in the RUN instructions, in order."""
    installs = []
    for kind, rest in instructions:
        for command in rest.split("&&") if kind == "RUN" else []:
            tokens = shlex.split(command)
            if tokens[:2] == ["pip", "install"]:
                installs.append(tokens[2:])
    return installs


@pytest.mark.parametrize("dockerfile", ["component.Dockerfile", "train.Dockerfile"])
def test_the_dockerfiles_install_the_pinned_set_as_a_non_root_user(dockerfile):
    torch = _pins()["torch"]
    instructions = _instructions(DOCKER / dockerfile)
    args = dict(rest.split("=", 1) for kind, rest in instructions if kind == "ARG" and "=" in rest)
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], next(rest for kind, rest in instructions if kind == "FROM"))
    installs = _pip_installs(instructions)
    package = next(i for i, a in enumerate(installs) if "." in a)
    assert installs[package][installs[package].index("-c") + 1] == "constraints.txt"
    if dockerfile == "component.Dockerfile":
        assert base == "python:3.11-slim"
        # torch from the CPU index before anything asks for it: PyPI's torch is the CUDA build.
        first = installs[0]
        assert f"torch=={torch}" in first and "https://download.pytorch.org/whl/cpu" in first and package > 0
        (runtime,) = _docs(MANIFESTS / "runtime" / "servingruntime.yaml")
        served = {p["containerPort"] for c in runtime["spec"]["containers"] for p in c["ports"]}
        exposed = {int(p.split("/")[0]) for kind, rest in instructions if kind == "EXPOSE" for p in rest.split()}
        assert served <= exposed
    else:
        # The official image whose torch is the pinned one, so the install keeps it.
        assert re.fullmatch(rf"pytorch/pytorch:{re.escape(torch)}-cuda[\d.]+-cudnn\d+-runtime", base), base
        # ...and the build stops if a base of that tag ever holds another torch.
        assert any(kind == "RUN" and f"== '{torch}'" in rest for kind, rest in instructions)
    user = [rest for kind, rest in instructions if kind == "USER"][-1]
    assert user.split(":")[0].isdigit() and int(user.split(":")[0]) != 0  # numeric: runAsNonRoot can check it
    # What the image copies is what its .dockerignore lets through.
    ignore = (DOCKER / f"{dockerfile}.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = {src for kind, rest in instructions if kind == "COPY" for src in rest.split()[:-1]}
    assert copied == kept
    assert all((REPO / src).exists() for src in copied)
