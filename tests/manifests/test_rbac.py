"""The ServiceAccount runs execute as, and its Role: what the pods of a canaryflow run call, and no more.

The canary step's calls are recorded from the KServe backend itself (tests/manifests/test_kserve_backend.py,
test_role_grants_exactly_what_the_runs_pods_call). What KFP's driver and launcher and Argo's executor call cannot
run here, so it is read from their source into the table below; which of their conditional calls apply is read
from the compiled pipeline.
"""

from __future__ import annotations

import functools
import importlib.util
import textwrap

import pytest
import yaml

from tests.conftest import REPO
from tests.manifests.test_manifests import _submitted_config, build

MANIFESTS = REPO / "manifests"

# (apiGroup, resource, verb, resourceName or None for any name)
Call = tuple[str, str, str, str | None]

# kubeflow/pipelines at tag 2.17.0; the same calls at 2.15.0 and 2.16.0, the backends canaryflow supports.
KFP_BACKEND_CALLS: dict[Call, str] = {
    ("", "configmaps", "get", "kfp-launcher"): (
        "the root driver reads the pipeline root: backend/src/v2/driver/root_dag.go -> backend/src/v2/config/env.go "
        "FromConfigMap (configMapName); NotFound means defaults, Forbidden fails the run"
    ),
    ("", "secrets", "get", "mlpipeline-minio-artifact"): (
        "the launcher opens the artifact store with the Secret's keys: backend/src/v2/objectstore/object_store.go "
        "getS3BucketCredential, the name from backend/src/v2/config/env.go minioArtifactSecretName, the Secret "
        "every profile gets (manifests/kustomize/base/installs/multi-user/pipelines-profile-controller/sync.py)"
    ),
    # Argo's executor, in each pod's wait container: argo-workflows docs/workflow-rbac.md, "the minimum for the
    # executor", v3.4 and later; KFP's go.mod pins argo-workflows v3.7.3 at 2.15.0 and v4.0.5 at 2.17.0.
    ("argoproj.io", "workflowtaskresults", "create", None): "Argo's executor reports the step's outputs",
    ("argoproj.io", "workflowtaskresults", "patch", None): "Argo's executor reports the step's outputs",
}
# Calls the backend makes only for what a pipeline uses, keyed by how the compiled pipeline shows it.
KFP_BACKEND_CALLS_IF: dict[str, set[Call]] = {
    # backend/src/v2/driver/k8s.go: createPVC, then publishDriverExecution gets the driver's own pod.
    "argostub/createpvc": {("", "persistentvolumeclaims", "create", None), ("", "pods", "get", None)},
    # backend/src/v2/driver/k8s.go: deletePVC gets the claim and deletes it, then publishDriverExecution.
    "argostub/deletepvc": {
        ("", "persistentvolumeclaims", "get", None),
        ("", "persistentvolumeclaims", "delete", None),
        ("", "pods", "get", None),
    },
    # backend/src/v2/cmd/driver/main.go getCurrentWorkflowMetadata reads the schedule time off the Workflow.
    "{{$.pipeline_job_schedule_time_utc}}": {("argoproj.io", "workflows", "get", None)},
}
# fine_tune with train.nodes > 1 (src/canaryflow/training/trainjob.py), recorded from the step itself against a fake
# Kubernetes API in tests/manifests/test_trainjob.py. Granted whatever train.nodes is: the Role is one manifest for
# every run, and on a cluster without Kubeflow Trainer the grant names a resource that does not exist.
TRAINJOB_CALLS: dict[Call, str] = {
    ("trainer.kubeflow.org", "trainjobs", "create", None): "TrainJobRun.start creates the run's TrainJob",
    ("trainer.kubeflow.org", "trainjobs", "watch", None): (
        "TrainJobRun._watch follows its status: GET on the collection with watch=true, fieldSelector metadata.name"
    ),
    ("trainer.kubeflow.org", "trainjobs", "get", None): (
        "TrainJobRun._get looks for an earlier attempt's before creating it, and reads it after a quiet watch"
    ),
    ("trainer.kubeflow.org", "trainjobs", "delete", None): (
        "TrainJobRun._delete on timeout (train.max_wall_seconds), when the step is stopped, and an earlier "
        "attempt's failed one"
    ),
}
# Not listed: backend/src/v2/component/launcher_v2.go retryIndexFromPodAnnotation gets its pod only where the API
# server set no KFP_RETRY_INDEX (older than the compiler that ships with it), and only warns when refused.


def kfp_backend_calls(compiled: str) -> set[Call]:
    """What KFP's driver and launcher and Argo's executor call for this compiled pipeline (its YAML text)."""
    calls = set(KFP_BACKEND_CALLS)
    for shown, more in KFP_BACKEND_CALLS_IF.items():
        if shown in compiled:
            calls |= more
    return calls


def role_grants(role: dict) -> set[Call]:
    return {
        (group, resource, verb, name)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames") or [None]
    }


@functools.cache
def compiled_pipeline() -> str:
    """The pipeline `canaryflow submit` sends for the default config, as YAML text."""
    import tempfile
    from pathlib import Path

    from canaryflow.config import load_config
    from canaryflow.pipelines.lifecycle import compile_pipeline

    with tempfile.TemporaryDirectory() as tmp:
        return Path(compile_pipeline(load_config(), str(Path(tmp) / "pipeline.yaml"))).read_text()


def test_the_backends_conditional_calls_follow_what_the_compiled_pipeline_uses(tmp_path):
    # canaryflow's pipeline makes and drops each run's checkpoint claim, and never reads its schedule time.
    claims = KFP_BACKEND_CALLS_IF["argostub/createpvc"] | KFP_BACKEND_CALLS_IF["argostub/deletepvc"]
    assert kfp_backend_calls(compiled_pipeline()) == set(KFP_BACKEND_CALLS) | claims

    # A pipeline that makes and drops its own claim, and reads its schedule time, needs each of the rest.
    source = tmp_path / "volumes.py"
    source.write_text(
        textwrap.dedent(
            """
            from kfp import compiler, dsl, kubernetes

            @dsl.component(base_image="python:3.11")
            def echo(text: str) -> str:
                return text

            @dsl.pipeline(name="volumes")
            def volumes():
                claim = kubernetes.CreatePVC(pvc_name_suffix="-x", access_modes=["ReadWriteOnce"], size="1Gi")
                task = echo(text=dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER).after(claim)
                kubernetes.DeletePVC(pvc_name=claim.outputs["name"]).after(task)
            """
        )
    )
    spec = importlib.util.spec_from_file_location("volumes", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # kfp reads a component's source from its file
    from kfp import compiler

    compiler.Compiler().compile(module.volumes, str(tmp_path / "volumes.yaml"))
    extra = kfp_backend_calls((tmp_path / "volumes.yaml").read_text()) - set(KFP_BACKEND_CALLS)
    assert extra == set().union(*KFP_BACKEND_CALLS_IF.values())


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_runs_execute_as_a_service_account_the_overlay_creates_and_binds(overlay, tmp_path):
    from canaryflow.config import load_config

    objects = build(f"overlays/{overlay}")
    named = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    # The config the overlay's CronJob submits with, and the default `canaryflow submit` uses by hand.
    accounts = {_submitted_config(objects, tmp_path).cluster.service_account, load_config().cluster.service_account}
    assert len(accounts) == 1
    account = accounts.pop()
    assert ("ServiceAccount", account) in named
    # kustomize writes the overlay's namespace into the subject, which must stay the binding's own.
    subject = {
        "kind": "ServiceAccount",
        "name": account,
        "namespace": named[("ServiceAccount", account)]["metadata"]["namespace"],
    }
    bindings = [b for b in objects if b["kind"] == "RoleBinding" and subject in b.get("subjects", [])]
    assert {b["metadata"]["namespace"] for b in bindings} == {subject["namespace"]}
    assert [b["roleRef"] for b in bindings] == [
        {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account}
    ]
    base = {d["kind"]: d for d in yaml.safe_load_all((MANIFESTS / "base" / "rbac.yaml").read_text())}
    assert named[("Role", account)]["rules"] == base["Role"]["rules"]
    assert role_grants(named[("Role", account)]) >= kfp_backend_calls(compiled_pipeline())
