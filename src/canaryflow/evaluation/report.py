"""The evaluation report a reviewer reads: Markdown (KFP's Markdown viewer, MLflow) and HTML (KFP's HTML
viewer, with the plot inline), built from one list of sections so the two always say the same thing.

It holds the metric table with the paired bootstrap's differences and confidence intervals, the gate's
reasons, a plot of per-example score differences, the examples the challenger won and lost most, and how the
challenger's training went: why it stopped, and its learning curve.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field

EXAMPLES = 3  # best and worst examples shown


@dataclass
class Example:
    input: str
    challenger: str
    champion: str | None
    reference: str
    diff: float  # sentence chrF, challenger minus champion (or the challenger's own without a champion)


@dataclass
class Report:
    result: dict
    per_example: list[float] = field(default_factory=list)
    unit: str = "chrF"  # what per_example measures
    best: list[Example] = field(default_factory=list)
    worst: list[Example] = field(default_factory=list)
    training: dict | None = None  # the challenger's train_metrics.json, where its model folder has one


def sentence_chrf(predictions: list[str], references: list[list[str]]) -> list[float]:
    from sacrebleu.metrics import CHRF

    chrf = CHRF()
    return [chrf.sentence_score(p, refs).score for p, refs in zip(predictions, references)]


def correctness(predictions: list[str], references: list[list[str]]) -> list[float]:
    return [100.0 * (p == refs[0]) for p, refs in zip(predictions, references)]


def build(
    result: dict,
    inputs: list[str],
    references: list[list[str]],
    predictions: dict[str, list[str]],
    task: str = "seq2seq",
) -> Report:
    """Per-example score differences (sentence chrF; for a classifier, right minus wrong), and the
    examples at both ends of them."""
    per_item = correctness if task == "classification" else sentence_chrf
    mine = per_item(predictions["challenger"], references)
    theirs = per_item(predictions["champion"], references) if "champion" in predictions else None
    diffs = [a - b for a, b in zip(mine, theirs)] if theirs else mine
    order = sorted(range(len(diffs)), key=lambda i: diffs[i])

    def example(i: int) -> Example:
        champion = predictions["champion"][i] if theirs else None
        return Example(inputs[i], predictions["challenger"][i], champion, references[i][0], round(diffs[i], 2))

    return Report(
        result,
        diffs,
        "correct" if task == "classification" else "chrF",
        best=[example(i) for i in reversed(order[-EXAMPLES:])],
        worst=[example(i) for i in order[:EXAMPLES]],
    )


def plot(report: Report):
    """Every test example's sentence-chrF difference, sorted: the share of wins and losses at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=(7, 3))
    values = sorted(report.per_example)
    compared = report.result["metrics"]["champion"] is not None
    colours = ["tab:green" if v > 0 else "tab:red" if v < 0 else "tab:gray" for v in values] if compared else None
    ax.bar(range(len(values)), values, width=1.0, color=colours or "tab:blue")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("test examples, sorted")
    if compared:
        wins, losses = sum(v > 0 for v in values), sum(v < 0 for v in values)
        ax.set_ylabel(f"{report.unit}: challenger - champion")
        ax.set_title(f"per-example differences: {wins} better, {losses} worse, {len(values) - wins - losses} tied")
    else:
        ax.set_ylabel(f"challenger {report.unit}")
        ax.set_title("per-example scores (no champion to compare with)")
    ax.figure.tight_layout()
    return ax


def _metric_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    challenger, champion = result["metrics"]["challenger"], result["metrics"]["champion"]
    comparisons = result.get("comparisons") or {}
    header = ["metric", "challenger", "champion", "difference", "confidence interval", "p-value"]
    rows = []
    for name, value in challenger.items():
        c = comparisons.get(name)
        rows.append(
            [
                name,
                f"{value:.2f}",
                f"{champion[name]:.2f}" if champion and name in champion else "-",
                f"{c['diff']:+.2f}" if c else "-",
                f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] ({c['confidence']:.0%})" if c else "-",
                f"{c['p_value']:.4f} (H0: diff <= {c['threshold']:+.2f})" if c else "-",
            ]
        )
    return header, rows


def _example_rows(examples: list[Example], compared: bool, unit: str) -> tuple[list[str], list[list[str]]]:
    header = [
        "input",
        "challenger",
        *(["champion"] if compared else []),
        "reference",
        f"{unit} diff" if compared else unit,
    ]
    rows = [
        [e.input, e.challenger, *([e.champion or ""] if compared else []), e.reference, f"{e.diff:+.1f}"]
        for e in examples
    ]
    return header, rows


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return lines + ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _sections(report: Report) -> list[tuple[str, tuple[list[str], list[list[str]]] | list[str]]]:
    result = report.result
    compared = result["metrics"]["champion"] is not None
    gate = result["gate"]
    latency = result.get("latency_ms", {}).get("challenger") or {}
    summary = [
        f"Gate: {'PASSED' if gate['passed'] else 'FAILED'} on {result['test_inputs']} test inputs"
        + (f", against champion version {result['champion_version']}." if compared else ", with no champion yet."),
    ]
    if latency:
        summary.append(f"Challenger latency per example: p50 {latency['p50']:.0f} ms, p95 {latency['p95']:.0f} ms.")
    sections: list[tuple[str, tuple[list[str], list[list[str]]] | list[str]]] = [
        ("Summary", summary),
        ("Metrics", _metric_rows(result)),
        ("Gate reasons", [*gate["reasons"], *(f"warning: {w}" for w in gate.get("warnings", []))]),
        (
            "Examples the challenger did best on" if compared else "Best examples",
            _example_rows(report.best, compared, report.unit),
        ),
        (
            "Examples the challenger did worst on" if compared else "Worst examples",
            _example_rows(report.worst, compared, report.unit),
        ),
    ]
    if report.training:
        sections.append(("Training", _training_lines(report.training)))
    return sections


def _training_lines(train: dict) -> list[str]:
    """Why training stopped, and where its losses ended: a budget that stopped it long before the validation
    loss did shows here."""
    lines = [
        f"Stopped: {train.get('stopped', 'unknown')}, after {train['steps']} steps (at most "
        f"{train.get('max_steps', train['steps'])}) in {train.get('train_seconds', 0):.0f} s.",
        f"Training loss {train['first_loss']:.3f} at the first logged step, {train['final_loss']:.3f} at the last.",
    ]
    validation = (train.get("learning_curve") or {}).get("validation") or []
    if validation:
        step, best = min(validation, key=lambda point: point[1])
        lines.append(
            f"Validation loss {validation[-1][1]:.3f} at step {validation[-1][0]:.0f}; lowest {best:.3f} at step "
            f"{step:.0f}, of {len(validation)} evaluations."
        )
    return lines


def _learning_curve_png(train: dict) -> bytes | None:
    if not (train.get("learning_curve") or {}).get("train"):
        return None
    from canaryflow.training.health import plot_learning_curve

    buffer = io.BytesIO()
    plot_learning_curve(train["learning_curve"], train.get("stopped", "unknown"), buffer)
    return buffer.getvalue()


def write_learning_curve(report: Report, path) -> bool:
    """The learning curve as a PNG at `path`, for the Markdown report to show; False where there is none."""
    image = _learning_curve_png(report.training or {})
    if image is not None:
        with open(path, "wb") as handle:
            handle.write(image)
    return image is not None


def markdown(report: Report, plot_file: str | None = None, curve_file: str | None = None) -> str:
    lines = ["# Evaluation", ""]
    for title, content in _sections(report):
        lines += [f"## {title}", ""]
        lines += _md_table(*content) if isinstance(content, tuple) else [f"- {item}" for item in content]
        lines.append("")
        if title == "Gate reasons" and plot_file:
            lines += ["## Per-example differences", "", f"![per-example differences]({plot_file})", ""]
        if title == "Training" and curve_file:
            lines += [f"![learning curve]({curve_file})", ""]
    return "\n".join(lines)


def to_html(report: Report) -> str:
    buffer = io.BytesIO()
    plot(report).figure.savefig(buffer, format="png", dpi=100)
    image = base64.b64encode(buffer.getvalue()).decode()
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>Evaluation</title>", _STYLE, "</head><body>"]
    parts.append("<h1>Evaluation</h1>")
    for title, content in _sections(report):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if isinstance(content, tuple):
            parts.append(_html_table(*content))
        else:
            parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in content) + "</ul>")
        if title == "Gate reasons":
            parts.append(
                "<h2>Per-example differences</h2>"
                f"<img alt='per-example differences' src='data:image/png;base64,{image}'>"
            )
        curve = _learning_curve_png(report.training) if title == "Training" and report.training else None
        if curve is not None:
            parts.append(f"<img alt='learning curve' src='data:image/png;base64,{base64.b64encode(curve).decode()}'>")
    parts.append("</body></html>")
    return "".join(parts)


_STYLE = (
    "<style>body{font-family:sans-serif;max-width:70em;margin:1em auto}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:0.2em 0.5em;text-align:left}</style>"
)
