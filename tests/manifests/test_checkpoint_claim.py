"""The checkpoint claim's one-off prepare Job: it prepares the claim the pipeline clones, for the uid the steps
run as, without root, and runs canaryflow's own writable check there."""

import importlib.util
import re

import pytest

from canaryflow.config import Config
from canaryflow.pipelines.lifecycle import CHECKPOINT_MOUNT
from tests.manifests.test_manifests import DOCKER, SYNCED, _find, build


def _step_uid() -> int:
    users = {int(m) for f in DOCKER.glob("*.Dockerfile") for m in re.findall(r"^USER (\d+)$", f.read_text(), re.M)}
    assert len(users) == 1, users  # every step image runs as one uid, the one the Job prepares for
    return users.pop()


@pytest.mark.parametrize("folder", SYNCED)
def test_the_prepare_job_makes_the_cloned_claim_writable_for_the_steps_uid_without_root(folder):
    objects = build(folder)
    claim = _find(objects, "PersistentVolumeClaim")["metadata"]["name"]
    assert claim == Config().train.checkpoint_pvc  # the claim each run clones
    pod = _find(objects, "Job", "canaryflow-checkpoints-prepare")["spec"]["template"]["spec"]
    volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    assert volumes[mount["name"]] == claim
    uid = _step_uid()
    security = pod["securityContext"]
    assert security["fsGroup"] == security["runAsUser"] == security["runAsGroup"] == uid
    assert security["runAsNonRoot"] is True and container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["command"] == ["python", "-m", "canaryflow.training.checkpoints", mount["mountPath"]]
    assert importlib.util.find_spec("canaryflow.training.checkpoints") is not None
    assert mount["mountPath"] == CHECKPOINT_MOUNT  # the same path the steps see, in messages and in docs
