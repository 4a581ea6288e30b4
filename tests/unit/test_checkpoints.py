"""fine_tune's checkpoint folder is checked for writing before training, and refused in one line naming the claim.

On a cluster the steps run as uid 1000 on a volume whose root is root-owned 0755. These tests make such a
folder and run the check as uid 1000 in a forked child (when they run as root, where mode bits bind nobody),
or as themselves on a 0555 folder (otherwise), so that it fails for the cluster's reason: permission denied.
"""

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from canaryflow.config import Config
from canaryflow.errors import BadInputError
from canaryflow.training import checkpoints
from canaryflow.training.checkpoints import PREPARE_JOB, ensure_writable

STEP_UID = 1000  # docker/train.Dockerfile: USER 1000, whose group is 1000
ROOT = os.geteuid() == 0


@pytest.fixture
def volume_root():
    """A folder shaped like a fresh block volume's root: owned by root (or by us), 0755, reachable by uid 1000
    (pytest's tmp_path lies under a 0700 folder, which would refuse uid 1000 for another reason)."""
    parent = Path(tempfile.mkdtemp(prefix="canaryflow-volume-"))
    parent.chmod(0o755)
    root = parent / "mnt"
    root.mkdir()
    root.chmod(0o755 if ROOT else 0o555)  # not root: 0555 on our own folder binds us as 0755 binds uid 1000
    yield root
    root.chmod(0o755)
    shutil.rmtree(parent)


def _as_step(call, gid: int = STEP_UID) -> str:
    """What call() prints or raises, run as the steps' uid: in a forked child that drops root (an exec would need
    an interpreter uid 1000 can reach), or in this process when we are not root."""
    if not ROOT:
        return _outcome(call)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe and never returns
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(STEP_UID)
            os.write(write, _outcome(call).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        said = pipe.read()
    os.waitpid(pid, 0)
    return said


def _outcome(call) -> str:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = call()
    except BadInputError as exc:
        return f"BadInputError: {exc}"
    return f"{code}: {out.getvalue().strip()}"


def _cluster_config(volume_root: Path) -> Config:
    return Config.model_validate({"train": {"checkpoint_dir": str(volume_root), "checkpoint_pvc": "ckpt-template"}})


def test_a_root_owned_volume_is_refused_in_one_line_naming_the_claim_and_the_fix(volume_root):
    cfg = _cluster_config(volume_root)
    said = _as_step(lambda: ensure_writable(volume_root / "run-key", cfg))
    assert said.startswith("BadInputError: ") and "\n" not in said, said
    assert "Permission denied" in said and f"{volume_root}/run-key" in said
    assert "PVC ckpt-template" in said and PREPARE_JOB in said and "kubectl apply -k" in said
    assert not (volume_root / "run-key").exists()


def test_the_folder_as_the_prepare_job_leaves_it_passes(volume_root):
    # The kubelet's fsGroup 1000: group 1000, group-writable, setgid. Not root: a folder of our own.
    if ROOT:
        os.chown(volume_root, 0, STEP_UID)
    volume_root.chmod(0o2775)
    cfg = _cluster_config(volume_root)
    assert _as_step(lambda: ensure_writable(volume_root / "run-key", cfg)) == "None: "
    assert (volume_root / "run-key").is_dir() and not list((volume_root / "run-key").iterdir())  # no probe left


def test_the_prepare_jobs_own_check_tells_an_unprepared_volume_from_a_prepared_one(volume_root):
    said = _as_step(lambda: checkpoints.main([str(volume_root / "run-key")]))
    assert said.startswith("2: error: ") and "Permission denied" in said and "fsGroup" in said, said
    if ROOT:
        os.chown(volume_root, 0, STEP_UID)
    volume_root.chmod(0o2775)
    said = _as_step(lambda: checkpoints.main([str(volume_root / "run-key")]))
    assert said == f"0: {volume_root / 'run-key'} is writable by uid {STEP_UID if ROOT else os.getuid()}", said


def test_a_folder_that_cannot_exist_is_refused_in_process(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    with pytest.raises(BadInputError, match=r"checkpoint folder .*not-a-folder/run-key is not writable .*PVC ckpt-"):
        ensure_writable(blocker / "run-key", _cluster_config(blocker))
    local = Config.model_validate({"train": {"checkpoint_dir": None}})
    with pytest.raises(BadInputError, match=r"point train.checkpoint_dir or --workdir"):
        ensure_writable(blocker / "run-key", local)
