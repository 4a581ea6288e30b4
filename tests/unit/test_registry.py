"""Registration, idempotency and alias moves against a real MLflow SQLite store."""

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from canaryflow.config import load_config
from canaryflow.errors import BadInputError
from canaryflow.registry import ledger, models
from canaryflow.registry.ledger import PromotionConflict
from canaryflow.registry.tracking import find_run, pipeline_run, sqlite_uri
from tests.conftest import demo_config


def _evaluation(passed: bool) -> dict:
    return {
        "metrics": {"challenger": {"bleu": 31.5, "chrf": 45.0}, "champion": None},
        "champion_version": None,
        "gate": {"passed": passed, "reasons": ["ok bleu floor: 31.50 >= floor 15.00"]},
    }


@pytest.fixture(scope="module")
def registry(tmp_path_factory, trained):
    workdir = tmp_path_factory.mktemp("registry")
    cfg = load_config(overrides=[f"mlflow.tracking_uri={sqlite_uri(workdir)}", "registry.model_name=unit"])
    first = models.register_candidate(cfg, "run-a", trained[0], _evaluation(True), {"data_hash": "abc"})
    return cfg, first


def test_register_tags_lineage_and_sets_challenger(registry):
    cfg, version = registry
    mv = MlflowClient().get_model_version("unit", version)
    assert mv.tags["data_hash"] == "abc"
    assert mv.tags["gate.passed"] == "true"
    assert mv.tags["metric.bleu"] == "31.5000"
    assert mv.tags["canaryflow.run_key"] == "run-a"
    assert mv.tags["data_card"] == f"runs:/{mv.run_id}/data/data_card.json"
    assert mv.tags["canaryflow.idempotency_key"] == "run-a"
    assert mv.description.startswith("# unit: candidate of pipeline run run-a") and "Gate: passed." in mv.description
    assert len(mv.tags["git_commit"]) in (7, 40) or mv.tags["git_commit"] == "unknown"
    assert models.aliases(cfg)["challenger"] == version
    assert (models.model_uri(cfg, version)) == f"models:/unit/{version}"


def test_a_retried_step_registers_nothing_twice(registry, trained):
    cfg, version = registry
    again = models.register_candidate(cfg, "run-a", trained[0], _evaluation(True), {"data_hash": "abc"})
    assert again == version
    assert len(MlflowClient().search_model_versions("name='unit'")) == 1


def test_a_version_is_found_by_its_idempotency_key_whichever_run_logged_it(tmp_path, trained):
    cfg = load_config(overrides=[f"mlflow.tracking_uri={sqlite_uri(tmp_path)}", "registry.model_name=idem"])
    client = MlflowClient()
    other = client.create_run(models.configure(cfg))
    client.create_registered_model("idem")
    by_hand = client.create_model_version(
        "idem", f"runs:/{other.info.run_id}/model", other.info.run_id, tags={"canaryflow.idempotency_key": "run-z"}
    )
    assert models.register_candidate(cfg, "run-z", trained[0], _evaluation(False), {}) == str(by_hand.version)
    assert len(client.search_model_versions("name='idem'")) == 1


def test_failed_gate_is_registered_without_alias(registry, trained):
    cfg, first = registry
    version = models.register_candidate(cfg, "run-b", trained[0], _evaluation(False), {"data_hash": "abc"})
    assert version != first
    assert MlflowClient().get_model_version("unit", version).tags["gate.passed"] == "false"
    assert models.aliases(cfg)["challenger"] == first


def test_registered_model_loads_and_generates(registry):
    cfg, version = registry
    generator = models.load_generator(cfg, version)
    assert isinstance(generator.generate(["name: Ada | job: baker"], max_new_tokens=5)[0], str)
    pyfunc = mlflow.pyfunc.load_model(models.model_uri(cfg, "challenger").replace("/challenger", "@challenger"))
    assert len(pyfunc.predict(["name: Ada", "name: Bo"])) == 2


def test_promotion_is_compare_and_set_and_rollback_keeps_champion(registry, trained):
    cfg, first = registry
    second = models.register_candidate(cfg, "run-c", trained[0], _evaluation(True), {"data_hash": "abc"})
    aliases = models.promote(cfg, first, None, "smoke ok")
    assert aliases["champion"] == first and aliases["previous-champion"] is None
    with pytest.raises(PromotionConflict, match="champion is version .*, not none as the decision saw"):
        models.promote(cfg, second, None, "stale decision")  # the decision saw no champion
    aliases = models.promote(cfg, second, first, "canary ok")
    assert aliases == {"champion": second, "challenger": None, "previous-champion": first}
    third = models.register_candidate(cfg, "run-d", trained[0], _evaluation(True), {"data_hash": "abc"})
    aliases = models.reject(cfg, third, "error rate")
    assert aliases["champion"] == second and aliases["challenger"] is None
    assert MlflowClient().get_model_version("unit", third).tags["canary.verdict"] == "rolled_back"
    # An inconclusive canary leaves the champion as it was too, and says so in the tag and the ledger.
    fourth = models.register_candidate(cfg, "run-e", trained[0], _evaluation(True), {"data_hash": "abc"})
    aliases = models.reject(cfg, fourth, "undecided after 6000 requests", verdict="inconclusive")
    assert aliases["champion"] == second and aliases["challenger"] is None
    assert MlflowClient().get_model_version("unit", fourth).tags["canary.verdict"] == "inconclusive"
    from canaryflow.registry.ledger import history

    assert history(cfg, "challenger")[-1]["reason"].startswith("inconclusive: undecided")


def test_steps_of_one_pipeline_run_share_one_mlflow_run(registry):
    cfg, _ = registry
    with pipeline_run(cfg, "shared-key") as first:
        mlflow.log_metric("a", 1)
    with pipeline_run(cfg, "shared-key") as second:
        mlflow.log_metric("b", 2)
    assert first.info.run_id == second.info.run_id
    assert set(find_run(cfg, "shared-key").data.metrics) == {"a", "b"}


def test_review_rows_show_verdicts_and_aliases(registry):
    from canaryflow.registry.review import plot_metric_history, version_rows

    cfg, _ = registry
    rows = version_rows(cfg)
    assert [r["version"] for r in rows] == sorted(r["version"] for r in rows) and len(rows) >= 2
    held = {r["alias"]: r["version"] for r in rows if r["alias"]}
    assert {alias: str(v) for alias, v in held.items()} == {
        alias: v for alias, v in models.aliases(cfg).items() if v is not None
    }
    assert {r["gate"] for r in rows} <= {"passed", "failed"} and rows[0]["bleu"] == 31.5
    ax = plot_metric_history(rows)
    assert len(ax.patches) == 2 * len(rows)


def test_fine_tune_continues_from_a_registered_model(registry, trained, prepared, demo_files, tmp_path):
    from canaryflow.training.fine_tune import fine_tune

    cfg, version = registry
    base_dir = models.download_model_dir(cfg, f"models:/unit/{version}", tmp_path / "download")
    assert (base_dir / "model.safetensors").is_file() and (base_dir / "tokenizer.json").is_file()
    uri = f"mlflow.tracking_uri={cfg.mlflow.tracking_uri}"
    continued = demo_config(demo_files, uri, "registry.model_name=unit", f"model.base=models:/unit/{version}")
    continued.train.max_steps, continued.train.min_loss_ratio = 10, None
    metrics = fine_tune(continued, prepared[0], tmp_path / "model")
    assert metrics["base"] == f"models:/unit/{version}"
    assert metrics["parameters"] == trained[1]["parameters"]
    # It starts where the registered model left off, far below a fresh model's first loss.
    assert metrics["first_loss"] < trained[1]["first_loss"] - 1.0
    with pytest.raises(BadInputError, match="model.base models:/unit@nobody"):
        models.download_model_dir(cfg, "models:/unit@nobody", tmp_path / "nothing")


def test_rollback_returns_to_the_previous_champion_and_the_ledger_records_every_move(registry, trained):
    cfg, _ = registry
    before = models.aliases(cfg)
    assert before["previous-champion"] is not None  # the promotion test above made two champions
    after = models.rollback(cfg, "p99 latency page at 03:10")
    assert after["champion"] == before["previous-champion"] and after["previous-champion"] == before["champion"]
    moves = ledger.history(cfg, "champion")
    assert [m["to_version"] for m in moves][-3:] == [before["previous-champion"], before["champion"], after["champion"]]
    last = moves[-1]
    assert last["reason"] == "p99 latency page at 03:10" and last["from_version"] == before["champion"]
    assert "@" in last["who"] and last["pipeline_run"] == "manual"
    from datetime import UTC, datetime

    assert ledger.serving_at(cfg, datetime.now(UTC)) == after["champion"]
    assert ledger.serving_at(cfg, datetime(2000, 1, 1, tzinfo=UTC)) is None


@pytest.mark.slow
def test_two_processes_racing_to_promote_exactly_one_wins(tmp_path):
    from tests.racing import race

    uri = sqlite_uri(tmp_path / "wd")
    race(load_config(overrides=[f"mlflow.tracking_uri={uri}", "registry.model_name=race"]), tmp_path)


def test_a_lock_named_by_an_environment_variable(tmp_path, monkeypatch):
    """On a cluster the lock's target is a Secret's value: env:NAME reads it when the move happens."""
    lock_file = tmp_path / "promotion.lock"
    cfg = load_config(overrides=["registry.lock=env:CANARYFLOW_TEST_LOCK"])
    monkeypatch.setenv("CANARYFLOW_TEST_LOCK", f"file:{lock_file}")
    with ledger.promotion_lock(cfg, timeout=1):
        assert lock_file.is_file()
        # A second mover waits on the same file, and gives up with one line when the first holds on.
        with pytest.raises(ledger.CanaryflowError, match="another promotion held"):
            with ledger.promotion_lock(cfg, timeout=0.2):
                pass
    monkeypatch.delenv("CANARYFLOW_TEST_LOCK")
    with ledger.promotion_lock(cfg, timeout=1):  # unset: no lock, the re-read alone guards
        pass


# A process where the installed canaryflow cannot be imported: a meta path finder ahead of all others turns away
# any `canaryflow` module found where the package is installed, whatever installed it (editable or a wheel).
_WITHOUT_CANARYFLOW = """
import importlib.abc, importlib.machinery, json, sys
from pathlib import Path

installed = [Path(p).resolve() for p in sys.argv[2:]]

class Elsewhere(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "canaryflow" and not name.startswith("canaryflow."):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.origin:
                if not any(Path(spec.origin).resolve().is_relative_to(p) for p in installed):
                    return spec
        raise ModuleNotFoundError(f"No module named {name!r} (the installed one is hidden)", name=name)

sys.meta_path.insert(0, Elsewhere())
try:
    import canaryflow
except ModuleNotFoundError:
    pass
else:
    sys.exit(f"canaryflow still importable from {canaryflow.__file__}")
import mlflow.pyfunc

model = mlflow.pyfunc.load_model(sys.argv[1])
answers = model.predict(["an example input", "another one"], params={"max_new_tokens": 8})
print(json.dumps({"answers": list(answers), "origin": sys.modules["canaryflow"].__file__}))
"""


def test_a_registered_version_answers_where_canaryflow_is_not_installed(registry, tmp_path):
    """The model carries its code, its requirements install from the public index, and its generation
    parameters and an input example are logged with it."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys

    cfg, version = registry
    models.configure(cfg)  # the module's registry: other tests point MLflow elsewhere
    uri = models.model_uri(cfg, version)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path)))
    installed = importlib.util.find_spec("canaryflow").submodule_search_locations
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_CANARYFLOW, str(local), *installed],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(found["answers"]) == 2 and all(isinstance(a, str) for a in found["answers"])
    assert Path(found["origin"]).resolve().is_relative_to(local.resolve())  # the model's own copy of the code
    requirements = (local / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in requirements) and not any("+" in r for r in requirements)
    signature = mlflow.models.get_model_info(uri).signature
    assert {p.name: p.default for p in signature.params.params} == {"num_beams": 1, "max_new_tokens": 64}
    assert (local / "input_example.json").is_file()


def test_a_notebook_finds_the_workdir_from_its_own_folder(tmp_path, monkeypatch):
    from canaryflow.errors import BadInputError
    from canaryflow.registry.review import notebook_registry

    for name in ("MLFLOW_TRACKING_URI", "CANARYFLOW_WORKDIR"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".canaryflow").mkdir()
    (tmp_path / "notebooks").mkdir()
    with pytest.raises(BadInputError, match=r"no registry in .*notebooks/\.canaryflow or any folder above it"):
        notebook_registry(tmp_path / "notebooks")  # a workdir with no registry in it is not one
    (tmp_path / ".canaryflow" / "mlflow.db").touch()
    cfg, uri = notebook_registry(tmp_path / "notebooks")
    assert uri == f"sqlite:///{tmp_path.resolve() / '.canaryflow' / 'mlflow.db'}" == cfg.mlflow.tracking_uri
    monkeypatch.setenv("CANARYFLOW_WORKDIR", str(tmp_path / "elsewhere"))  # named: taken as it is
    assert notebook_registry(tmp_path / "notebooks")[1].endswith("elsewhere/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert notebook_registry(tmp_path)[1] == "http://mlflow:5000"


def test_a_fresh_workdir_is_known_to_hold_no_champion_without_mlflow(tmp_path):
    from canaryflow.registry.tracking import unborn_store

    cfg = load_config(overrides=[f"mlflow.tracking_uri={sqlite_uri(tmp_path / 'fresh')}", "registry.model_name=unit"])
    assert unborn_store(cfg)
    assert models.alias_version(cfg, models.CHAMPION) is None  # what the lookup it saves would have said
    assert not unborn_store(cfg)  # the lookup made the store, and its answer counts from now on
    server = load_config(overrides=["mlflow.tracking_uri=http://127.0.0.1:9/", "registry.model_name=unit"])
    assert not unborn_store(server)  # a server is asked, whatever it holds
