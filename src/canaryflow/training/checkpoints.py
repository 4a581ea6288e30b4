"""Is the checkpoint folder writable? Asked before training, so a claim the steps cannot write fails the step
in one line that says what to do, not with a PermissionError from deep inside the Trainer at its first save.

On a cluster the steps run as uid 1000 with no fsGroup, so a block volume's root-owned 0755 root refuses them;
manifests/base/pvc-checkpoints.yaml holds the one-off Job that prepares the claim.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from canaryflow.config import Config
from canaryflow.errors import BadInputError, first_line

PREPARE_JOB = "canaryflow-checkpoints-prepare"


def _write_error(folder: Path) -> str | None:
    """Why uid N cannot create folder and a file in it, or None if it can.

    Only an attempt answers the question: os.access says yes to root whatever the mode bits, and a read-only
    mount or a full volume is no permission bit at all."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".canaryflow-write-check-"):
            pass
    except OSError as exc:
        return f"checkpoint folder {folder} is not writable by uid {os.getuid()} ({first_line(exc)})"
    return None


def ensure_writable(folder: str | Path, cfg: Config) -> None:
    """Raise BadInputError, naming the claim and the fix, unless this process can write in folder."""
    error = _write_error(Path(folder))
    if error is None:
        return
    pvc = cfg.train.checkpoint_pvc
    if cfg.train.checkpoint_dir and pvc:
        raise BadInputError(
            f"{error}: its claim comes from PVC {pvc}, which the Job {PREPARE_JOB} makes writable for uid 1000; "
            "apply manifests/base (kubectl apply -k) before the first run, or set train.checkpoint_pvc to a claim "
            "it prepared"
        )
    raise BadInputError(f"{error}: point train.checkpoint_dir or --workdir at a folder it can write")


def main(argv: list[str] | None = None) -> int:
    """`python -m canaryflow.training.checkpoints FOLDER`: the prepare Job's proof that the claim is ready."""
    import sys

    (folder,) = argv if argv is not None else sys.argv[1:]
    error = _write_error(Path(folder))
    if error is not None:
        # The kubelet applied fsGroup 1000 and still: the volume's CSI driver manages no ownership
        # (CSIDriver fsGroupPolicy None, as NFS drivers often are).
        print(f"error: {error}: its CSI driver applies no fsGroup; make the volume root writable for uid 1000")
        return 2
    print(f"{folder} is writable by uid {os.getuid()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
