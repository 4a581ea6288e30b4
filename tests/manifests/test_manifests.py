"""Manifests parse, kustomizations reference real files, and InferenceServices (base and each overlay's
patch applied) validate against KServe's own CRD schema. (kustomize itself cannot be installed here.)"""

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.conftest import REPO

MANIFESTS = REPO / "manifests"
CRD = REPO.parent / "shared" / "schemas" / "kserve" / "serving.kserve.io_inferenceservices.yaml"


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


@pytest.fixture(scope="module")
def isvc_schema():
    if not CRD.is_file():
        pytest.skip(f"KServe CRD not found at {CRD} (it lives in the shared/ folder beside the repo)")
    crd = yaml.safe_load(CRD.read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1beta1")["schema"]["openAPIV3Schema"]
    # Built once: jsonschema.validate() re-checks this very large schema on every call.
    return jsonschema.Draft7Validator(schema)


def test_every_manifest_parses_and_has_a_kind():
    files = sorted(MANIFESTS.rglob("*.yaml"))
    assert files
    for path in files:
        for doc in _docs(path):
            assert "kind" in doc and "apiVersion" in doc, path


@pytest.mark.parametrize("folder", ["base", "overlays/dev", "overlays/prod"])
def test_kustomizations_reference_existing_files(folder):
    k = _docs(MANIFESTS / folder / "kustomization.yaml")[0]
    for ref in k.get("resources", []) + [p["path"] for p in k.get("patches", [])]:
        assert (MANIFESTS / folder / ref).exists(), ref


def _base_isvc():
    return next(d for d in _docs(MANIFESTS / "base" / "inferenceservice.yaml") if d["kind"] == "InferenceService")


def test_base_inferenceservice_validates(isvc_schema):
    isvc_schema.validate(_base_isvc())


@pytest.mark.parametrize("overlay", ["dev", "prod"])
def test_overlay_inferenceservice_validates(isvc_schema, overlay):
    patch = _docs(MANIFESTS / "overlays" / overlay / "inferenceservice-patch.yaml")[0]
    isvc_schema.validate(_merge(_base_isvc(), patch))


def test_schema_rejects_a_bad_canary_percent(isvc_schema):
    bad = _merge(_base_isvc(), {"spec": {"predictor": {"canaryTrafficPercent": "ten"}}})
    with pytest.raises(jsonschema.ValidationError):
        isvc_schema.validate(bad)
