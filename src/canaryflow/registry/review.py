"""What a reviewer reads off the registry: every version with its verdicts, metrics and aliases.

Used by the review notebook (and meant for `canaryflow registry list`), so both show the same thing.
"""

from __future__ import annotations

from datetime import UTC, datetime

from canaryflow.config import Config
from canaryflow.registry.models import aliases
from canaryflow.registry.tracking import configure


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
    colours = {"promoted": "tab:green", "rolled_back": "tab:red"}
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
