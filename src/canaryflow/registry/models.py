"""Register candidates in the MLflow Model Registry and move the aliases that say what serves.

Aliases: `champion` (serving), `challenger` (in canary), `previous-champion` (one-command rollback).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from canaryflow.config import Config
from canaryflow.errors import BadInputError
from canaryflow.registry.tracking import (
    DATA_CARD,
    RUN_KEY_TAG,
    configure,
    load_artifact_dict,
    not_found,
    pipeline_run,
)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
ALIASES = (CHAMPION, CHALLENGER, PREVIOUS)
DATA_CARD_TAG = "data_card"  # the artifact URI of the data card the version was trained on
IDEMPOTENCY_TAG = "canaryflow.idempotency_key"  # one version per pipeline run, whatever retries happen
PYFUNC_ENTRY = Path(__file__).resolve().parent / "pyfunc_entry.py"


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def git_commit() -> str:
    """The commit of the canaryflow source that ran, for lineage; 'unknown' in an image without .git."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def alias_version(cfg: Config, alias: str) -> str | None:
    """The version an alias points at, as a string (SQLite gives ints, a server strings), or None."""
    from mlflow.exceptions import MlflowException

    configure(cfg)
    try:
        return str(_client().get_model_version_by_alias(cfg.registry.model_name, alias).version)
    except MlflowException as exc:
        if not_found(exc, cfg.registry.model_name):
            return None
        raise


def aliases(cfg: Config) -> dict[str, str | None]:
    return {alias: alias_version(cfg, alias) for alias in ALIASES}


# The part of canaryflow a registered model runs (the pyfunc entry's imports, transitively), logged inside it as
# code_paths: a serving process without canaryflow installed (mlflow models serve, a plain pyfunc load) needs no
# more. A test loads a version where canaryflow is not importable.
PYFUNC_CODE = (
    "__init__.py",
    "registry/__init__.py",
    "registry/pyfunc_model.py",
    "inference/__init__.py",
    "inference/predictor.py",
)
PYFUNC_EXAMPLE_INPUTS = ["an example input"]


def _requirements() -> list[str]:
    """Pinned from the running environment, so a serving image can reproduce it, as public versions: a local
    one such as torch's `2.13.0+cpu` is no version the public index serves."""
    from packaging.version import Version

    return [
        f"{dist}=={Version(metadata.version(dist)).public}"
        for dist in ("mlflow", "torch", "transformers", "tokenizers")
    ]


def _pyfunc_code(into: Path) -> Path:
    """A copy of the PYFUNC_CODE files, as the package `canaryflow` under `into`."""
    import shutil

    source = Path(__file__).resolve().parents[1]
    for name in PYFUNC_CODE:
        target = into / "canaryflow" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, target)
    return into / "canaryflow"


def register_candidate(
    cfg: Config,
    run_key: str,
    model_dir: str | Path,
    evaluation: dict,
    lineage: dict[str, str],
    input_profile: dict | None = None,
) -> str:
    """Log the model as pyfunc, register it with lineage, the gate verdict and a model card; return its version.

    Every candidate is registered, passing or not, so reviewers can see what was rejected and why. Only a
    passing candidate gets the `challenger` alias. The version is created with all its tags and its
    description in one request, so no version is ever left without its lineage, whatever fails when.
    Registering is idempotent per pipeline run: a KFP retry or a rerun after a crash finds the version by
    its idempotency key (or by the MLflow run that logged it) and registers nothing new.
    """
    import mlflow

    configure(cfg)
    client = _client()
    name = cfg.registry.model_name
    with pipeline_run(cfg, run_key) as run:
        tags = _version_tags(cfg, run_key, run.info.run_id, evaluation, lineage)
        existing = client.search_model_versions(
            f"name='{name}' and tags.`{IDEMPOTENCY_TAG}` = '{run_key}'"
        ) or client.search_model_versions(f"name='{name}' and run_id='{run.info.run_id}'")
        if existing:
            version = str(existing[0].version)
            # A version registered by hand or by an older canaryflow may lack some of them.
            for key, value in tags.items():
                if existing[0].tags.get(key) != value:
                    client.set_model_version_tag(name, version, key, value)
        else:
            with tempfile.TemporaryDirectory(prefix="canaryflow-profile-") as tmp:
                artifacts = {"model_dir": str(model_dir)}
                if input_profile is not None:
                    # Inside the model, so that a server (KServe's included) measures drift with no registry access.
                    artifacts["input_profile"] = str(Path(tmp) / "input_profile.json")
                    Path(artifacts["input_profile"]).write_text(json.dumps(input_profile), encoding="utf-8")
                # The generation parameters are the model's params schema, with the evaluation's defaults.
                params = {"num_beams": cfg.eval.num_beams, "max_new_tokens": cfg.eval.max_new_tokens}
                info = mlflow.pyfunc.log_model(
                    name="model",
                    python_model=str(PYFUNC_ENTRY),
                    artifacts=artifacts,
                    # Every loader of the version generates as it was evaluated (inference/predictor.py GENERATION).
                    model_config={"max_source_length": cfg.data.max_source_length, **params},
                    code_paths=[str(_pyfunc_code(Path(tmp) / "code"))],
                    pip_requirements=_requirements(),
                    input_example=(PYFUNC_EXAMPLE_INPUTS, params),
                )
            _ensure_registered_model(client, name)
            version = str(
                client.create_model_version(
                    name,
                    source=info.model_uri,
                    run_id=run.info.run_id,
                    tags={IDEMPOTENCY_TAG: run_key, **tags},
                    description=model_card(cfg, tags, evaluation),
                    model_id=info.model_id,
                ).version
            )
    if evaluation["gate"]["passed"]:
        client.set_registered_model_alias(name, CHALLENGER, version)
    return version


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


def _version_tags(cfg: Config, run_key: str, run_id: str, evaluation: dict, lineage: dict[str, str]) -> dict:
    gate = evaluation["gate"]
    tags = {
        RUN_KEY_TAG: run_key,
        "git_commit": git_commit(),
        DATA_CARD_TAG: f"runs:/{run_id}/{DATA_CARD}",
        **lineage,
        "gate.passed": str(gate["passed"]).lower(),
        "gate.reasons": "; ".join(gate["reasons"]),
        "champion_at_evaluation": str(evaluation.get("champion_version") or "none"),
    }
    for metric, value in (evaluation["metrics"]["challenger"] or {}).items():
        tags[f"metric.{metric}"] = f"{value:.4f}"
    # The verdict's statistics, so a reviewer reads why from the version itself, not only from the run.
    for metric, c in (evaluation.get("comparisons") or {}).items():
        tags[f"gate.{metric}.diff"] = f"{c['diff']:+.4f}"
        tags[f"gate.{metric}.ci"] = f"[{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] at {c['confidence']:.0%}"
        tags[f"gate.{metric}.p_value"] = f"{c['p_value']:.6f}"
        tags[f"gate.{metric}.threshold"] = f"{c['threshold']:+.4f}"
        tags[f"gate.{metric}.resolution"] = f"{c['resolution']:.4f}"
    return tags


def model_card(cfg: Config, tags: dict[str, str], evaluation: dict) -> str:
    """The version's description in the registry: what it is, what it was trained on, how it scored, and
    what the gate said, for a reviewer who opens the registry and nothing else. Written before the version
    exists (it is created with it), so the title names the pipeline run, not the version number."""
    metrics = evaluation["metrics"]["challenger"] or {}
    lines = [
        f"# {cfg.registry.model_name}: candidate of pipeline run {tags.get(RUN_KEY_TAG, '')[:12]}",
        "",
        f"- Task: {cfg.model.task}; base model: {cfg.model.base}.",
        f"- Pipeline run: {tags.get(RUN_KEY_TAG, '')}; git commit {tags.get('git_commit', 'unknown')[:12]}.",
        f"- Data hash: {tags.get('data_hash', '')[:16]}; config hash: {tags.get('config_hash', '')}.",
    ]
    train = {k.removeprefix("train."): v for k, v in tags.items() if k.startswith("train.")}
    if train:
        lines.append("- Training: " + ", ".join(f"{k} {v}" for k, v in sorted(train.items())) + ".")
    lines += ["", "| metric | value |", "| --- | ---: |"] + [f"| {k} | {v:.2f} |" for k, v in metrics.items()]
    gate = evaluation["gate"]
    lines += ["", f"Gate: {'passed' if gate['passed'] else 'failed'}.", ""] + [f"- {r}" for r in gate["reasons"]]
    lines += [f"- warning: {w}" for w in gate.get("warnings", [])]
    return "\n".join(lines) + "\n"


def champion_data_card(cfg: Config) -> tuple[str, dict] | None:
    """The serving champion's version and the data card it was trained on, found through the version's
    `data_card` tag; None when there is no champion or its card cannot be found."""
    version = alias_version(cfg, CHAMPION)
    if version is None:
        return None
    mv = _client().get_model_version(cfg.registry.model_name, version)
    # A version registered without the tag (by hand) may still have been logged by a run holding a card.
    card = load_artifact_dict(mv.tags.get(DATA_CARD_TAG) or f"runs:/{mv.run_id}/{DATA_CARD}")
    return (version, card) if card is not None else None


def load_generator(cfg: Config, ref: str):
    """Load a registered version (`ref` is an alias or a version number) for in-process generation."""
    import mlflow.pyfunc

    configure(cfg)
    sep = "@" if not ref.isdigit() else "/"
    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}{sep}{ref}")
    return model.unwrap_python_model().generator


def download_model_dir(cfg: Config, uri: str, dest: Path) -> Path:
    """The saved transformers directory inside a registered model (models:/NAME@ALIAS or /VERSION), downloaded
    under dest: what fine_tune continues from when model.base names the registry."""
    import mlflow
    import yaml
    from mlflow.exceptions import MlflowException

    configure(cfg)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except MlflowException as exc:
        raise BadInputError(f"model.base {uri}: {str(exc).splitlines()[0]}") from None
    flavor = yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8"))["flavors"]["python_function"]
    return local / flavor["artifacts"]["model_dir"]["path"]


def resolve_version(uri: str) -> str | None:
    """The version number a models:/NAME/VERSION or models:/NAME@ALIAS URI stands for now; None if not found."""
    from mlflow.exceptions import MlflowException

    name, sep, ref = uri.removeprefix("models:/").rpartition("@" if "@" in uri else "/")
    if not sep or not name:
        return None
    if sep == "/":
        return ref
    try:
        return str(_client().get_model_version_by_alias(name, ref).version)
    except MlflowException as exc:
        if not_found(exc, name):
            return None
        raise


def model_uri(cfg: Config, version: str) -> str:
    return f"models:/{cfg.registry.model_name}/{version}"


def promote(
    cfg: Config, version: str, expected_champion: str | None, reason: str, run_key: str = ""
) -> dict[str, str | None]:
    """Make `version` the champion, if the champion is still the one the decision saw (under the
    promotion lock, recorded in the ledger: see ledger.move_aliases). The old champion becomes
    previous-champion, the one `rollback` returns to."""
    from canaryflow.registry.ledger import move_aliases

    moves: dict[str, str | None] = {CHAMPION: version}
    if expected_champion is not None:
        moves[PREVIOUS] = expected_champion
    if alias_version(cfg, CHALLENGER) == version:
        moves[CHALLENGER] = None
    result = move_aliases(cfg, moves, {CHAMPION: expected_champion}, f"promoted: {reason}", run_key)
    client = _client()
    client.set_model_version_tag(cfg.registry.model_name, version, "canary.verdict", "promoted")
    client.set_model_version_tag(cfg.registry.model_name, version, "canary.reason", reason)
    return result


def rollback(cfg: Config, reason: str, run_key: str = "") -> dict[str, str | None]:
    """The champion returns to the previous champion, through the same lock, recorded in the ledger. The
    demoted version becomes previous-champion, so a mistaken rollback is undone by another."""
    from canaryflow.registry.ledger import move_aliases

    champion, previous = alias_version(cfg, CHAMPION), alias_version(cfg, PREVIOUS)
    if previous is None:
        raise BadInputError("nothing to roll back to: no version holds the previous-champion alias")
    return move_aliases(
        cfg, {CHAMPION: previous, PREVIOUS: champion}, {CHAMPION: champion, PREVIOUS: previous}, reason, run_key
    )


def reject(
    cfg: Config, version: str, reason: str, run_key: str = "", verdict: str = "rolled_back"
) -> dict[str, str | None]:
    """Roll the challenger back, or end its canary inconclusive (`verdict`): it loses the `challenger` alias,
    through the promotion lock and recorded in the ledger like every alias move, and keeps the verdict as
    a tag; the champion is untouched."""
    from canaryflow.registry.ledger import move_aliases

    name = cfg.registry.model_name
    held = alias_version(cfg, CHALLENGER)
    if held == version:
        said = verdict.replace("_", " ")
        result = move_aliases(cfg, {CHALLENGER: None}, {CHALLENGER: version}, f"{said}: {reason}", run_key)
    else:
        result = aliases(cfg)
    client = _client()
    client.set_model_version_tag(name, version, "canary.verdict", verdict)
    client.set_model_version_tag(name, version, "canary.reason", reason)
    return result
