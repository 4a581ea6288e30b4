"""What a reviewer reads off the registry: every version with its verdicts, metrics and aliases.

Used by the review notebook (and meant for `canaryflow registry list`), so both show the same thing.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from canaryflow.config import Config, load_config
from canaryflow.errors import BadInputError
from canaryflow.registry.models import aliases
from canaryflow.registry.tracking import configure, sqlite_uri

DEFAULT_WORKDIR = ".canaryflow"


def notebook_registry(start: Path | None = None) -> tuple[Config, str]:
    """The config and tracking URI a notebook reviews: $MLFLOW_TRACKING_URI, else $CANARYFLOW_WORKDIR's SQLite
    registry, else the nearest `.canaryflow` holding one in the working folder or a folder above it. A kernel
    opened the usual way starts in notebooks/, one below the workdir `make run` writes."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    workdir = os.environ.get("CANARYFLOW_WORKDIR")
    if not uri and workdir is None:
        here = (start or Path.cwd()).resolve()
        found = (d / DEFAULT_WORKDIR for d in (here, *here.parents) if (d / DEFAULT_WORKDIR / "mlflow.db").is_file())
        workdir = next(found, None)
        if workdir is None:
            raise BadInputError(
                f"no registry in {here / DEFAULT_WORKDIR} or any folder above it: run `make run` first, or set "
                "CANARYFLOW_WORKDIR (a workdir) or MLFLOW_TRACKING_URI (a tracking server)"
            )
    uri = uri or sqlite_uri(workdir)
    return load_config(overrides=[f"mlflow.tracking_uri={uri}"]), uri


def version_rows(cfg: Config) -> list[dict]:
    """One row per registered version, oldest first."""
    from mlflow import MlflowClient

    configure(cfg)
    held = {version: alias for alias, version in aliases(cfg).items() if version is not None}
    rows = []
    for mv in MlflowClient().search_model_versions(f"name='{cfg.registry.model_name}'"):
        tags = mv.tags
        row = {
            "version": int(mv.version),
            "registered": datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S"),
            "alias": held.get(str(mv.version), ""),
            "gate": {"true": "passed", "false": "failed"}.get(tags.get("gate.passed", ""), "-"),
            "canary": tags.get("canary.verdict", "not run"),
            "why": tags.get("canary.reason") or tags.get("gate.reasons", ""),
            "data_hash": tags.get("data_hash", "")[:12],
        }
        row.update({k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")})
        rows.append(row)
    return sorted(rows, key=lambda r: r["version"])


def plot_metric_history(rows: list[dict], metrics: tuple[str, ...] = ("bleu", "chrf"), ax=None):
    """Bars of each version's metrics, coloured by outcome: a glance shows what was promoted and why."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.5))
    colours = {"promoted": "tab:green", "rolled_back": "tab:red", "inconclusive": "tab:olive"}
    width = 0.8 / max(len(metrics), 1)
    for i, metric in enumerate(metrics):
        xs = [r["version"] + (i - (len(metrics) - 1) / 2) * width for r in rows]
        bars = ax.bar(xs, [r.get(metric, 0.0) for r in rows], width=width, label=metric, alpha=0.6 + 0.4 * (i == 0))
        for bar, row in zip(bars, rows):
            bar.set_edgecolor(colours.get(row["canary"], "tab:gray") if row["gate"] == "passed" else "black")
            bar.set_linewidth(2)
            if row["gate"] == "failed":
                bar.set_hatch("//")
    ax.set_xticks([r["version"] for r in rows], [f"v{r['version']}\n{r['alias'] or r['canary']}" for r in rows])
    ax.set_ylabel("score on the run's test set")
    ax.set_title("registered versions (hatched: gate failed; green edge: promoted; red: rolled back)")
    ax.legend()
    return ax


def pipeline_runs(cfg: Config, last: int = 10) -> list[dict]:
    """The last `last` pipeline runs, oldest first: when, how long, how far they got, the gate's and the
    canary's verdicts, and the challenger's metrics against the champion's on the same test set."""
    from mlflow import MlflowClient

    from canaryflow.registry.tracking import RUN_KEY_TAG

    experiment_id = configure(cfg)
    runs = MlflowClient().search_runs(
        [experiment_id], f"tags.`{RUN_KEY_TAG}` != ''", order_by=["attributes.start_time DESC"], max_results=last
    )
    rows = []
    for run in reversed(runs):
        tags, metrics, info = run.data.tags, run.data.metrics, run.info
        ended = info.end_time or info.start_time
        row = {
            "run": tags[RUN_KEY_TAG][:12],
            "started": datetime.fromtimestamp(info.start_time / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S"),
            "minutes": round((ended - info.start_time) / 60000, 1),
            "status": tags.get("canaryflow.status", info.status.lower()),
            "version": tags.get("registered_version", ""),
            "gate": {"true": "passed", "false": "failed"}.get(tags.get("gate.passed", ""), "-"),
            "canary": tags.get("canary.verdict", "not run"),
            "train_loss": metrics.get("final_loss"),
            "canary_requests": metrics.get("canary_requests"),
        }
        for side in ("challenger", "champion"):
            row.update({f"{side}.{k.split('.', 1)[1]}": v for k, v in metrics.items() if k.startswith(f"{side}.")})
        rows.append(row)
    return rows


def plot_run_comparison(rows: list[dict], metric: str = "bleu", ax=None):
    """Each run's challenger against the champion it faced on `metric`, marked by the verdicts, with the
    run's duration on a second axis: a drift in quality or in time shows at a glance."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 3.5))
    xs = list(range(len(rows)))
    challenger = [r.get(f"challenger.{metric}") for r in rows]
    champion = [r.get(f"champion.{metric}") for r in rows]
    ax.plot(xs, [float("nan") if v is None else v for v in champion], "s--", color="tab:gray", label="champion")
    ax.plot(xs, [float("nan") if v is None else v for v in challenger], "o-", color="tab:blue", label="challenger")
    for x, row, value in zip(xs, rows, challenger):
        if value is not None:
            mark = {"promoted": "promoted", "rolled_back": "rolled back", "inconclusive": "inconclusive"}.get(
                row["canary"], f"gate {row['gate']}"
            )
            ax.annotate(mark, (x, value), textcoords="offset points", xytext=(0, 8), ha="center", fontsize="small")
    ax.set_xticks(xs, [f"{r['started'][5:16]}\nv{r['version'] or '-'}" for r in rows], fontsize="small")
    ax.set_ylabel(metric)
    minutes = ax.twinx()
    minutes.bar(xs, [r["minutes"] for r in rows], alpha=0.15, color="tab:orange")
    minutes.set_ylabel("minutes per run")
    ax.set_zorder(minutes.get_zorder() + 1)  # the lines in front of the duration bars
    ax.patch.set_visible(False)
    ax.margins(y=0.15)
    ax.set_title(f"last {len(rows)} pipeline runs: {metric}, verdicts and duration")
    ax.legend(loc="lower left", fontsize="small")
    return ax
