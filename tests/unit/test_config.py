import pytest

from canaryflow.config import Config, load_config
from canaryflow.errors import BadInputError
from tests.conftest import REPO


def test_defaults_are_the_shipped_demo_config():
    assert load_config(REPO / "configs" / "demo.yaml") == Config()


def _keys(section, written, prefix=""):
    """Every field of a config section, as dotted keys, missing from `written` (its YAML mapping)."""
    from pydantic import BaseModel

    missing = []
    for name in type(section).model_fields:
        value = getattr(section, name)
        if not isinstance(written, dict) or name not in written:
            missing.append(prefix + name)
        elif isinstance(value, BaseModel):
            missing += _keys(value, written[name], f"{prefix}{name}.")
    return missing


def test_the_demo_config_spells_out_every_key():
    import yaml

    written = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    # The SLIs' PromQL: five long expressions over canaryflow's own metrics; the file says where they are.
    assert _keys(Config(), written) == ["canary.kserve.queries"]


def test_set_overrides_keep_yaml_types():
    cfg = load_config(overrides=["train.max_steps=50", "canary.steps=[5, 100]", "data.train=a.jsonl"])
    assert cfg.train.max_steps == 50
    assert cfg.canary.steps == [5, 100]
    assert cfg.data.train == ["a.jsonl"]  # one path is accepted where a list is expected


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_stepz=5", "train.max_stepz: Extra inputs are not permitted"),
        ("train.batch_size=zero", "train.batch_size"),
        ("model.task=translation", "model.task"),
        ("canary.steps=[50, 10]", "canary.steps"),
        ("canary.steps=[10, 50]", "end at 100"),
        ("novalue", "expected KEY=VALUE"),
        ("registry.lock=redis://x", "must be auto, none, file:PATH, a postgresql+psycopg2:// URI or env:NAME"),
        ("mlflow.retries=-1", "mlflow.retries"),
        ("canary.shadow_requests=10", "canary.shadow_requests must be 0 or at least"),
        ("canary.error_margin=0", "canary.error_margin"),
        # A config from before margins were ratios: the message says where the absolute share goes now.
        ("canary.error_margin=0.05", "an absolute share goes in canary.error_floor"),
        ("canary.steps=[100]", "needs a step below 100"),
        ("gate.confidence=0.999", "gate.resamples 1000 cannot pass any challenger at level 0.0005"),
    ],
)
def test_bad_overrides_are_one_clear_error(override, message):
    with pytest.raises(BadInputError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(BadInputError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(BadInputError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(BadInputError, match="mapping"):
        load_config(scalar)


def test_config_round_trips_through_json():
    cfg = load_config(overrides=["gate.floors={bleu: 3.5}", "mlflow.tracking_uri=sqlite:///x.db"])
    assert Config.from_json(cfg.model_dump_json()) == cfg


def test_cluster_versions_and_sizes_read_as_text_from_set():
    cfg = load_config(overrides=["cluster.kfp_backend_version=2.16", "train.checkpoint_size=40", "train.shm_size=8Gi"])
    assert cfg.cluster.kfp_backend == (2, 16) and cfg.train.checkpoint_size == "40"
    assert load_config(overrides=["cluster.kfp_backend_version=2.15.1"]).cluster.kfp_backend == (2, 15, 1)
    with pytest.raises(BadInputError, match="cluster.kfp_backend_version"):
        load_config(overrides=["cluster.kfp_backend_version=latest"])
    for key in ("train.checkpoint_size", "train.shm_size"):  # the KFP driver would panic parsing these
        with pytest.raises(BadInputError, match=key.replace(".", r"\.")):
            load_config(overrides=[f"{key}=16 GB"])


@pytest.mark.parametrize(("gpus", "shm"), [(2, "4Gi"), (8, "16Gi")])
def test_dev_shm_grows_with_the_accelerators_unless_set(gpus, shm):
    assert load_config(overrides=[f"train.accelerator_limit={gpus}"]).train.shm == shm
    assert load_config(overrides=[f"train.accelerator_limit={gpus}", "train.shm_size=1Gi"]).train.shm == "1Gi"


def test_only_the_database_secret_is_scoped_by_default():
    scoped = {s.secret: s.steps for s in Config().cluster.secrets if s.steps is not None}
    assert scoped == {"canaryflow-mlflow-lock": ["canary_rollout"]}
    with pytest.raises(BadInputError, match=r"cluster.secrets.0.steps.0"):
        load_config(overrides=["cluster.secrets=[{secret: s, keys: {k: K}, steps: [deploy]}]"])


def test_the_dags_config_parameter_never_holds_the_text_kfp_local_rewrites():
    """kfp.local replaces `python3` in executor arguments with its interpreter's path (kubeflow/pipelines#14459):
    the JSON the DAG gets spells it otherwise, and reads back as it was."""
    from canaryflow.config import Config

    paths = ["model.base=/srv/venv/lib/python3.11/site-packages/m", "data.train=/data/python3/train.jsonl"]
    cfg = load_config(overrides=paths)
    text = cfg.to_json()
    assert "python3" not in text
    assert Config.from_json(text) == cfg and Config.from_json(text).model.base.endswith("python3.11/site-packages/m")


def test_the_gate_follows_the_task_unless_the_config_names_one():
    from canaryflow.config import TASK_GATES

    classifier = load_config(overrides=["model.task=classification"]).gate
    assert (classifier.floors, classifier.non_inferiority) == (
        TASK_GATES["classification"]["floors"], TASK_GATES["classification"]["non_inferiority"]
    )  # fmt: skip
    named = load_config(overrides=["model.task=classification", "gate.floors={accuracy: 60}"]).gate
    assert named.floors == {"accuracy": 60} and named.non_inferiority == {"macro_f1": 1.0, "accuracy": 1.0}
    # A metric that must improve takes no default margin beside it (which would be refused as two rules).
    improving = load_config(overrides=["gate.improvement={bleu: 0.5}"]).gate
    assert improving.improvement == {"bleu": 0.5} and improving.non_inferiority == {"chrf": 2.0}
    assert load_config(REPO / "configs" / "classification.yaml").gate == classifier


def test_a_workdir_whose_path_spells_python3_reaches_kfp_local_through_a_link(tmp_path, monkeypatch):
    import tempfile

    from canaryflow.errors import BadInputError
    from canaryflow.runner import local_pipeline_root

    plain = tmp_path / "work"
    assert local_pipeline_root(plain) == plain / "pipeline_root"  # nothing to avoid: as it always was
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    workdir = tmp_path / "venv" / "lib" / "python3.11" / "project" / ".canaryflow"
    root = local_pipeline_root(workdir)
    assert "python3" not in str(root) and root.parent == tmp_path / "tmp"
    (root / "step").mkdir()  # what kfp.local writes there lands in the workdir
    assert (workdir / "pipeline_root" / "step").is_dir()
    assert local_pipeline_root(workdir) == root  # the next run finds the link
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "python3-tmp"))
    with pytest.raises(BadInputError, match="give another --workdir, or set TMPDIR elsewhere"):
        local_pipeline_root(workdir)


def test_the_cli_imports_mlflow_while_the_first_fine_tune_trains():
    import subprocess
    import sys

    # A fresh interpreter, as `canaryflow run` is: this one imported mlflow long ago.
    script = """
import sys
from canaryflow.runner import _importing_while_training
relayed = []
relay = _importing_while_training(relayed.append)
relay("09:13:30.315 - INFO - Executing task \\x1b[96m'prepare-data'\\x1b[0m")
relay("    [KFP Executor 2026-12-03 09:13:31,001 INFO]: Got executor_input:")
print("mlflow" in sys.modules)
relay("09:13:33.089 - INFO - Executing task \\x1b[96m'fine-tune'\\x1b[0m")
print("mlflow" in sys.modules)  # kfp.local starts the step after this line: nothing may hold it up
relay("    [KFP Executor 2026-12-03 09:13:33,201 INFO]: Looking for component `fine_tune`")
print("mlflow" in sys.modules, "mlflow.store.tracking.sqlalchemy_store" in sys.modules, len(relayed))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[:3] == ["False", "False", "True True 4"]
