"""`canaryflow ...`: the command line (Typer + Rich).

Heavy libraries are imported inside commands, so `canaryflow --help` stays quick. With `--json`, stdout
holds one JSON object and nothing else; progress and logs go to stderr. Errors are one line; the exit
code is 2 for bad input or config and 1 for anything else.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.exceptions import TyperException

from canaryflow import progress
from canaryflow.cluster import AUTH_HELP
from canaryflow.errors import CanaryflowError

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Fine-tune, evaluate, register and canary-release a transformers model as one KFP DAG.",
)
data_app = typer.Typer(no_args_is_help=True, help="The data stage on its own.")
app.add_typer(data_app, name="data")
registry_app = typer.Typer(
    no_args_is_help=True, help="What the MLflow registry holds: versions, verdicts, aliases, the ledger."
)
app.add_typer(registry_app, name="registry")
canary_app = typer.Typer(no_args_is_help=True, help="Canary rehearsals.")
app.add_typer(canary_app, name="canary")
drift_app = typer.Typer(
    no_args_is_help=True, help="Drift of served inputs against the champion's training data, and retraining on it."
)
app.add_typer(drift_app, name="drift")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML config file (default: the demo task).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override a config field: KEY=VALUE, repeatable.")]
WorkdirOpt = Annotated[Path, typer.Option("--workdir", help="Where the SQLite registry, artifacts and logs live.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout; progress goes to stderr.")]
RowsJsonOpt = Annotated[bool, typer.Option("--json", help="Print a JSON array of rows on stdout.")]
TrackingOpt = Annotated[
    str | None, typer.Option("--tracking-uri", help="An MLflow server instead of the workdir's SQLite store.")
]

STEP_LABELS = {
    "prepare-data": "prepare data",
    "fine-tune": "fine-tune",
    "evaluate-model": "evaluate",
    "register-model": "register",
    "canary-rollout": "canary",
    "record-outcome": "record outcome",
}
_TASK_START = re.compile(r"Executing task '?([\w-]+)'?")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


# Piped into a CI log or `less` there is no terminal to fit: Rich would assume 80 columns and cut table cells
# ("2026-12…"). Lines keep their natural width up to this, unless COLUMNS says otherwise.
PIPED_WIDTH = 400


def _console() -> Console:
    # Bound to the real stderr now: while kfp.local runs, sys.stderr is redirected into the run log.
    console = Console(file=sys.stderr)
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(file=sys.stderr, width=PIPED_WIDTH)
    return console


def _load(config: Path | None, overrides: list[str] | None, tracking_uri: str | None = None):
    from canaryflow.config import load_config

    extra = [f"mlflow.tracking_uri={tracking_uri}"] if tracking_uri else []
    return load_config(config, [*(overrides or []), *extra])


def _progress_bars(console: Console, transient: bool):
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
    )


def _event_info(event: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in event.items() if k not in ("stage", "done", "total"))


@contextlib.contextmanager
def _reporter(console: Console, label: str, quiet: bool):
    """A progress reporter that draws one transient bar on stderr, only for a person at a terminal: scripts
    and logs get the result alone."""
    if quiet or not console.is_terminal:
        yield progress.ignore
        return
    with _progress_bars(console, transient=True) as bars:
        task = bars.add_task(label, total=None, info="")

        def report(stage: str, done: int, total: int, **info: object) -> None:
            bars.update(task, completed=done, total=total, info=_event_info(info))

        yield report


class RunProgress:
    """A Rich progress display fed by the lines kfp.local relays from the steps."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = _progress_bars(console, transient=False)
        self.current: int | None = None

        self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._finish_current()
        if self.started:
            self.progress.stop()

    def _start(self) -> None:
        # Started on the first event, so a run refused up front prints its error line and nothing else.
        if not self.started:
            self.progress.start()
            self.started = True

    def phase(self, text: str) -> None:
        self._finish_current()
        self._start()
        self.console.print(f"[cyan]{text}")

    def _finish_current(self) -> None:
        if self.current is not None:
            task = self.progress.tasks[self.current]
            self.progress.update(self.current, completed=task.total or 1, total=task.total or 1)
            self.current = None

    def line(self, raw: str) -> None:
        line = _ANSI.sub("", raw)
        event = progress.parse(line)
        if event is not None and self.current is not None:
            total = max(event["total"], 1)
            self.progress.update(self.current, completed=event["done"], total=total, info=_event_info(event))
            return
        started = _TASK_START.search(line)
        if started and started.group(1) in STEP_LABELS:
            self._finish_current()
            self._start()
            self.current = self.progress.add_task(STEP_LABELS[started.group(1)], total=None, info="")


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _canary_table(canary: dict) -> Table:
    table = Table(title=f"canary steps ({canary.get('mode')}): challenger vs champion")
    for column in ("traffic", "requests", "error rate", "p95 ms", "online chrF", "step"):
        table.add_column(column, justify="right")
    for step in canary["steps"]:
        new, old = step["challenger"], step.get("champion") or {}

        def pair(key: str, digits: int = 1, new=new, old=old) -> str:
            mine = _fmt(new.get(key), digits)
            return f"{mine} vs {_fmt(old.get(key), digits)}" if old.get("requests") else mine

        table.add_row(
            "shadow" if step.get("phase") == "shadow" else f"{step['weight']}%",
            f"{new['requests']} of {step['requests']}",
            pair("error_rate", 3),
            pair("p95_ms"),
            pair("mean_chrf"),
            "[green]pass" if step["passed"] else "[red]roll back",
        )
    return table


def print_gate_warnings(summary: dict, console: Console) -> None:
    """A margin finer than the test set resolves: the verdict alone would not say why equal models fail."""
    for warning in (summary.get("gate") or {}).get("warnings", []):
        console.print(f"warning: {warning}", style="yellow", markup=False, highlight=False)


STOPPED = {
    "plateau": "the validation loss stopped falling (train.early_stopping_patience)",
    "budget": "its step or epoch budget ran out (train.max_steps, train.epochs)",
    "time": "train.max_seconds ran out",
}


def render_summary(summary: dict, console: Console) -> None:
    data, train = summary.get("data") or {}, summary.get("train") or {}
    metrics = summary.get("metrics") or {}
    challenger, champion = metrics.get("challenger") or {}, metrics.get("champion") or {}
    if summary.get("bootstrap"):
        boot = summary["bootstrap"]
        console.print(
            f"Bootstrap: version {boot['version']} -> {(boot.get('canary') or {}).get('verdict')} "
            f"after a smoke check ({boot['duration_s']} s)"
        )
    table = Table(title=f"canaryflow run: version {summary.get('version')}", show_lines=False)
    table.add_column("what")
    table.add_column("value")
    counts = data.get("counts", {})
    table.add_row(
        "data",
        f"train {counts.get('train')}, validation {counts.get('validation')}, "
        f"test {data.get('test_inputs')} inputs / {counts.get('test')} references "
        f"(hash {data.get('content_hash', '')[:12]})",
    )
    drift = data.get("drift")
    if drift:
        distances = ", ".join(f"{name} {value:.3f}" for name, value in drift["distance"].items())
        table.add_row("drift", f"vs champion v{drift['champion_version']}'s data (Jensen-Shannon): {distances}")
    table.add_row(
        "training",
        f"loss {_fmt(train.get('first_loss'))} -> {_fmt(train.get('final_loss'))} (validation "
        f"{_fmt(train.get('val_loss'))}), {train.get('steps')} steps in {_fmt(train.get('train_seconds'), 1)} s"
        + (f"; stopped: {STOPPED.get(train['stopped'], train['stopped'])}" if train.get("stopped") else ""),
    )
    console.print(table)
    mt = Table(title="challenger vs champion (test set)")
    mt.add_column("metric")
    mt.add_column("challenger", justify="right")
    mt.add_column("champion", justify="right")
    for name, value in challenger.items():
        mt.add_row(name, _fmt(value), _fmt(champion.get(name)))
    console.print(mt)
    gate = summary.get("gate") or {}
    verdict = "[green]PASSED" if gate.get("passed") else "[red]FAILED"
    console.print(f"Gate: {verdict}[/]")
    for reason in gate.get("reasons", []):
        console.print(f"  {reason}")
    print_gate_warnings(summary, console)
    canary = summary.get("canary") or {}
    if canary.get("steps"):
        console.print(_canary_table(canary))
    console.print(
        f"Canary ({canary.get('mode', '-')}): [bold]{canary.get('verdict')}[/] "
        f"{canary.get('reason', '')} ({canary.get('requests', 0)} requests)"
    )
    aliases = (summary.get("registry") or {}).get("aliases") or {}
    at = Table(title=f"registry: {(summary.get('registry') or {}).get('model_name')}")
    at.add_column("alias")
    at.add_column("version")
    for alias, version in aliases.items():
        at.add_row(alias, _fmt(version))
    console.print(at)
    console.print(f"Done in {summary.get('duration_s')} s. Log: {summary.get('log')}")


@app.command()
def run(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path(".canaryflow"),
    json_out: JsonOpt = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Run the whole DAG locally (kfp.local), with MLflow on SQLite under the workdir."""
    from canaryflow.runner import run_lifecycle

    cfg = _load(config, set_, tracking_uri)
    console = _console()
    with RunProgress(console) as display:
        summary = run_lifecycle(cfg, workdir, on_line=display.line, on_phase=display.phase)
    if json_out:
        print_gate_warnings(summary, console)
        print(json.dumps(summary))
    else:
        render_summary(summary, console)


@app.command("compile")
def compile_(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the KFP IR YAML.")] = Path(
        "canaryflow-pipeline.yaml"
    ),
) -> None:
    """Write the DAG as KFP IR YAML, ready for `kfp.Client` or the KFP UI."""
    from canaryflow.pipelines.lifecycle import compile_pipeline

    compile_pipeline(_load(config, set_), str(output))
    _console().print(f"wrote {output}")


HostOpt = Annotated[
    str | None,
    typer.Option(
        "--host",
        help="The KFP API endpoint: on multi-user Kubeflow its gateway, https://kubeflow.example.com/pipeline, "
        "with --token; or http://localhost:8080 through `kubectl port-forward svc/ml-pipeline-ui 8080:80 -n "
        "kubeflow` (default: $KF_PIPELINES_ENDPOINT). Without one, KFP is reached as kubectl reaches the cluster: "
        "in a pod through its service, elsewhere through the kubeconfig's API server, whose proxy carries no user "
        "identity, so standalone KFP only.",
    ),
]
KubeContextOpt = Annotated[
    str | None,
    typer.Option("--kube-context", help="The kubeconfig context to use without --host (default: the current one)."),
]
ExperimentOpt = Annotated[
    str | None,
    typer.Option(
        "--experiment", help="KFP experiment, created when missing (default: the config's mlflow.experiment)."
    ),
]
NamespaceOpt = Annotated[
    str | None,
    typer.Option(
        "--namespace",
        help="The experiment's namespace on multi-user Kubeflow: a profile the token's identity may use "
        "(default: kfp's: the pod's own namespace, or the one saved in ~/.config/kfp/context.json).",
    ),
]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="KFP_TOKEN", help=AUTH_HELP)]


@app.command()
def submit(
    host: HostOpt = None,
    kube_context: KubeContextOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    experiment: ExperimentOpt = None,
    namespace: NamespaceOpt = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compile the DAG and start one run of it on a Kubeflow Pipelines cluster; print the run's URL.

    Authentication: see --token."""
    from canaryflow.cluster import submit as submit_run

    result = submit_run(
        _load(config, set_),
        host,
        kube_context=kube_context,
        experiment=experiment,
        namespace=namespace,
        token=token,
    )
    if json_out:
        print(json.dumps({k: result[k] for k in ("run_id", "url", "experiment_id", "experiment")}))
        return
    _console().print(f"submitted run {result['name']!r} to experiment {result['experiment']!r}")
    print(result["url"])


@app.command()
def schedule(
    cron: Annotated[
        str,
        typer.Option(
            "--cron",
            help='When, as KFP\'s 6-field cron, seconds first: "SEC MIN HOUR DOM MON DOW", e.g. "0 0 3 * * *" '
            '(03:00 daily) or "0 0 9 * * MON-FRI".',
        ),
    ],
    host: HostOpt = None,
    kube_context: KubeContextOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    experiment: ExperimentOpt = None,
    name: Annotated[
        str | None,
        typer.Option("--name", help="The recurring run's name (default: '<registry.model_name> retraining')."),
    ] = None,
    max_concurrency: Annotated[
        int, typer.Option("--max-concurrency", help="Runs of this schedule allowed at once (KFP takes 1 to 10).")
    ] = 1,
    catchup: Annotated[
        bool, typer.Option("--catchup", help="Backfill every interval missed while paused (default: only the latest).")
    ] = False,
    namespace: NamespaceOpt = None,
    token: TokenOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compile the DAG and create a KFP recurring run of it on a cron schedule; print its URL.

    A recurring run of the same name in the experiment is an error, not a second one. Authentication: see --token.
    """
    from canaryflow.cluster import schedule as schedule_run
    from canaryflow.cluster import validate_cron

    validate_cron(cron)  # a malformed --cron is the error to show, before the config is even read
    result = schedule_run(
        _load(config, set_),
        host,
        cron,
        kube_context=kube_context,
        experiment=experiment,
        name=name,
        max_concurrency=max_concurrency,
        catchup=catchup,
        namespace=namespace,
        token=token,
    )
    if json_out:
        print(json.dumps(result))
        return
    _console().print(
        f"scheduled {result['name']!r} on cron {result['cron']!r} in experiment {result['experiment']!r} "
        f"(at most {result['max_concurrency']} at once, {'with' if catchup else 'no'} catch-up)"
    )
    print(result["url"])


@data_app.command("check")
def data_check(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path(".canaryflow"),
    json_out: JsonOpt = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Load, validate, clean and split the data, and print its data card (with drift against the champion)."""
    from rich.markdown import Markdown

    from canaryflow.data.card import plot_input_lengths, render_markdown
    from canaryflow.data.prepare import prepare_data
    from canaryflow.registry.models import champion_data_card
    from canaryflow.runner import next_demo_drop, with_demo_drop, with_workdir

    workdir = workdir.resolve()
    cfg = _load(config, set_, tracking_uri)
    if cfg.uses_demo_data:
        cfg = with_demo_drop(cfg, workdir, next_demo_drop(workdir))
    # Only an existing registry is read: checking data must not create one.
    has_registry = bool(cfg.mlflow.tracking_uri) or (workdir / "mlflow.db").is_file()
    console = _console()
    with _reporter(console, "prepare data", json_out) as report:
        card = prepare_data(
            cfg,
            workdir / "data-check",
            reference=lambda: champion_data_card(with_workdir(cfg, workdir)) if has_registry else None,
            report=report,
        )
    if json_out:
        print(json.dumps(card))
        return
    plot = workdir / "data-check" / "input_lengths.png"
    plot_input_lengths(card).figure.savefig(plot, dpi=100)
    console.print(Markdown(render_markdown(card)))
    console.print(f"Prepared splits in {workdir / 'data-check'}; input lengths plotted in {plot}")


def _registry_config(config: Path | None, set_: list[str] | None, workdir: Path, tracking_uri: str | None):
    """The config pointed at an existing registry, with MLflow pointed there too (a bare MlflowClient
    would otherwise read, or create, a store in the current directory); reading must never create one."""
    from canaryflow.errors import BadInputError
    from canaryflow.registry.tracking import configure
    from canaryflow.runner import with_workdir

    cfg = _load(config, set_, tracking_uri)
    workdir = workdir.resolve()
    if not cfg.mlflow.tracking_uri and not (workdir / "mlflow.db").is_file():
        raise BadInputError(f"no registry in {workdir}: run `canaryflow run` there first, or give --tracking-uri")
    cfg = with_workdir(cfg, workdir)
    configure(cfg)
    return cfg


def _print_rows(rows: list[dict], title: str, json_out: bool) -> None:
    if json_out:
        print(json.dumps(rows))
        return
    table = Table(title=title)
    for key in rows[0] if rows else ["(empty)"]:
        table.add_column(key)
    for row in rows:
        table.add_row(*(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()))
    _console().print(table)


@registry_app.command("list")
def registry_list(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path(".canaryflow"),
    json_out: RowsJsonOpt = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Every registered version: alias, gate and canary verdicts, why, metrics."""
    from canaryflow.registry.review import version_rows

    cfg = _registry_config(config, set_, workdir, tracking_uri)
    _print_rows(version_rows(cfg), f"registry: {cfg.registry.model_name}", json_out)


@registry_app.command("show")
def registry_show(
    version: Annotated[int, typer.Argument(help="The version number.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path(".canaryflow"),
    json_out: RowsJsonOpt = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """One version: its lineage, verdicts with their statistics, and metrics (all its tags)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from canaryflow.errors import BadInputError
    from canaryflow.registry.tracking import not_found

    cfg = _registry_config(config, set_, workdir, tracking_uri)
    try:
        mv = MlflowClient().get_model_version(cfg.registry.model_name, str(version))
    except MlflowException as exc:
        if not not_found(exc):
            raise
        raise BadInputError(f"{cfg.registry.model_name} has no version {version}") from None
    _print_rows([{"tag": k, "value": v} for k, v in sorted(mv.tags.items())], f"version {version}", json_out)


@registry_app.command("history")
def registry_history(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path(".canaryflow"),
    json_out: RowsJsonOpt = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """The ledger: every alias move, who made it, when, from which version to which, and why."""
    from canaryflow.registry.ledger import history

    cfg = _registry_config(config, set_, workdir, tracking_uri)
    _print_rows(history(cfg), "alias moves, oldest first", json_out)


@app.command()
def rollback(
    reason: Annotated[str, typer.Option("--reason", help="Why: recorded in the ledger.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path(".canaryflow"),
    json_out: JsonOpt = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Put the previous champion back in service (through the promotion lock, recorded in the ledger); with
    canary.backend kserve, the InferenceService is made to serve it too."""
    from canaryflow.registry.models import rollback as roll_back

    cfg = _registry_config(config, set_, workdir, tracking_uri)
    result = roll_back(cfg, reason)
    if cfg.canary.backend == "kserve":
        result["backend"] = _serve_on_cluster(cfg, result["champion"])
    if json_out:
        print(json.dumps(result))
    else:
        served = f"; {result['backend']} serves it" if "backend" in result else ""
        _console().print(
            f"champion is now version {result['champion']} (previous: {result['previous-champion']}){served}"
        )


def _serve_on_cluster(cfg, version: str) -> str:
    """After the registry moved, make the InferenceService serve what it now calls the champion."""
    import getpass
    import socket

    from canaryflow.errors import CanaryflowError
    from canaryflow.rollout.controller import serve_champion

    try:
        return serve_champion(cfg, version, holder=f"canaryflow rollback by {getpass.getuser()}@{socket.gethostname()}")
    except CanaryflowError as exc:
        raise type(exc)(
            f"the registry's champion is now version {version}, but the InferenceService still serves the demoted "
            f"version: {exc}; the next canary rolls the champion out first"
        ) from None


@canary_app.command("drill")
def canary_drill(
    fault: Annotated[
        str,
        typer.Option(
            "--fault",
            help="How the challenger misbehaves: errors=P, latency_ms=N, quality=garbage, crash-after=N, none.",
        ),
    ],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path(".canaryflow"),
    json_out: JsonOpt = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Rehearse a canary whose challenger misbehaves as --fault says; report whether the gates caught it, and
    how fast. The champion serves both sides; no registry alias moves."""
    from canaryflow.rollout.drill import canary_drill as drill
    from canaryflow.serving.faults import parse_fault

    parse_fault(fault)  # a typo in the SPEC is the error to show, before any registry is looked for
    cfg = _registry_config(config, set_, workdir, tracking_uri)
    console = _console()
    with _reporter(console, f"drill {fault}", json_out) as report:
        result = drill(
            cfg,
            workdir.resolve(),
            fault,
            reporter=report,
            on_start=lambda urls: console.print(
                "Metrics while the drill runs: " + ", ".join(f"{name} {url}" for name, url in urls.items())
            ),
        )
    if json_out:
        print(json.dumps({k: v for k, v in result.items() if k != "timeline"}))
        return
    console.print(_canary_table(result))
    verdict = "[green]caught[/]" if result["caught"] else "[red]NOT caught[/]"
    console.print(
        f"Drill {fault}: {verdict}: {result['verdict']} after {result['requests_to_decision']} requests "
        f"({result['seconds']:.1f} s); {result['reason']}. Champion traffic now {result['router_weights']}; "
        f"registry aliases unchanged. Timeline: {result['artifacts']}/timeline.png"
    )


LogOpt = Annotated[
    str | None,
    typer.Option(
        "--log",
        help="The input log: a directory, or where servers ship it (default: serving.input_log.upload_uri, else "
        "serving.input_log.dir, else <workdir>/input-log).",
    ),
]
PlotOpt = Annotated[
    Path | None, typer.Option("--plot", help="Where to draw the drift picture (default: <workdir>/drift/latest.png).")
]


def _drift_table(result: dict):
    from rich.table import Table

    table = Table(
        title=f"last {result['inputs']} logged inputs vs champion v{result['champion_version']}'s training data"
    )
    for column in ("feature", "Jensen-Shannon distance", "threshold", ""):
        table.add_column(column)
    for feature, value in (result["distance"] or {}).items():
        over = value > result["threshold"]
        table.add_row(feature, f"{value:.3f}", f"{result['threshold']:.3f}", "[red]over[/]" if over else "[green]ok[/]")
    return table


def _drift_line(result: dict) -> str:
    if result["status"] == "too_few_inputs":
        verdict = f"too few inputs to judge ({result['inputs']} of the {result['min_inputs']} needed)"
    elif result["drifted"]:
        verdict = (
            f"[red]drifted[/]: {result['worst']} {result['distance'][result['worst']]:.3f} > {result['threshold']:g}"
        )
    else:
        verdict = "[green]within the threshold[/]"
    action = {
        "triggered": f"; retraining triggered: {json.dumps(result.get('run'))}",
        "cooling_down": f"; no retraining: cooling down until {result.get('next_trigger_after')}",
        "not_started": f"; retraining not started, the next check retries: {result.get('error')}",
    }.get(result.get("action", "none"), "")
    return f"Drift {verdict}{action}"


def _drift_setup(config, set_, workdir: Path, tracking_uri, log: str | None):
    """The config, and the input log's location: a resolved directory, or an upload URI as given."""
    from canaryflow.serving.inputlog import is_uri

    cfg = _registry_config(config, set_, workdir, tracking_uri)
    location = log or cfg.serving.input_log.upload_uri or cfg.serving.input_log.dir
    return cfg, location if is_uri(location) else Path(location).resolve()


@drift_app.command("check")
def drift_check(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path(".canaryflow"),
    log: LogOpt = None,
    plot: PlotOpt = None,
    json_out: JsonOpt = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Compare the most recent logged inputs with the champion's training data (its data card's profile).

    Exit 0 whatever the verdict; --json has `status` (drifted, within_threshold, too_few_inputs) and `distance`."""
    from canaryflow.data import drift

    cfg, log_dir = _drift_setup(config, set_, workdir, tracking_uri, log)
    result = drift.check(cfg, log_dir)
    if result["distance"] is not None:
        result["plot"] = str(drift.plot(result, plot or workdir.resolve() / "drift" / "latest.png"))
    if json_out:
        print(json.dumps(result))
        return
    console = _console()
    if result["distance"] is not None:
        console.print(_drift_table(result))
    console.print(_drift_line(result) + (f". Picture: {result['plot']}" if "plot" in result else ""))


@drift_app.command("watch")
def drift_watch(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path(".canaryflow"),
    log: LogOpt = None,
    submit: Annotated[
        bool,
        typer.Option(
            "--submit", help="On drift, start a retraining run (at most one per drift.cooldown_hours); else report."
        ),
    ] = False,
    local: Annotated[
        bool, typer.Option("--local", help="Run the retraining here (as `canaryflow run`) instead of on KFP.")
    ] = False,
    host: HostOpt = None,
    kube_context: KubeContextOpt = None,
    token: TokenOpt = None,
    experiment: ExperimentOpt = None,
    namespace: NamespaceOpt = None,
    checks: Annotated[
        int | None, typer.Option("--checks", min=1, help="Stop after this many checks (default: run until stopped).")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per check on stdout (JSON lines).")
    ] = False,
    tracking_uri: TrackingOpt = None,
) -> None:
    """Check for drift every drift.interval_s seconds; with --submit, retrain when it is over the threshold."""
    from canaryflow.data import drift
    from canaryflow.errors import BadInputError

    if local and (host or kube_context):
        raise BadInputError("--local runs the retraining here: it takes no --host or --kube-context")
    cfg, log_dir = _drift_setup(config, set_, workdir, tracking_uri, log)
    console = _console()
    trigger = None
    if submit and local:
        from canaryflow.runner import run_lifecycle

        def trigger(result: dict) -> dict:
            console.print("Drift over the threshold: running the retraining pipeline here")
            with RunProgress(console) as display:
                summary = run_lifecycle(cfg, workdir, on_line=display.line, on_phase=display.phase)
            return {
                "where": "local",
                "version": summary.get("version"),
                "status": summary.get("status"),
                "gate_passed": summary.get("gate", {}).get("passed"),
                "canary": summary.get("canary", {}).get("verdict"),
            }

    elif submit:
        from canaryflow.cluster import submit as submit_run

        as_given = _load(config, set_)  # not the workdir's local paths and store: the cluster has its own

        def trigger(result: dict) -> dict:
            worst = result["worst"]
            try:
                submitted = submit_run(
                    as_given,
                    host,
                    kube_context=kube_context,
                    experiment=experiment,
                    namespace=namespace,
                    token=token,
                    run_name=f"{cfg.registry.model_name} drift {worst} {result['distance'][worst]:.3f}",
                )
            except CanaryflowError as exc:  # the run was never created: nothing to cool down from
                raise drift.NothingStarted(exc) from exc
            return {"where": "kfp", "run_id": submitted["run_id"], "url": submitted["url"]}

    reported: list[dict] = []

    def report(result: dict) -> None:
        reported.append(result)
        if result["action"] == "not_started" and len(reported) == checks:
            return  # the watch ends on it: the error line below says it, once
        if json_out:
            print(json.dumps(result), flush=True)
        else:
            console.print(_drift_line(result))

    # Beside a log directory, as it always was; a log in a store gets its state under the workdir.
    state = (workdir.resolve() / "drift" if isinstance(log_dir, str) else log_dir) / "drift-watch.json"
    results = drift.watch(cfg, log_dir, drift.WatchState(state), trigger, checks=checks, on_check=report)
    if results and results[-1]["action"] == "not_started":  # --checks ran out with no retraining started
        raise CanaryflowError(results[-1]["error"])


@app.command()
def serve(
    model_uri: Annotated[
        str, typer.Option("--model-uri", help="models:/NAME/VERSION, models:/NAME@ALIAS or a directory.")
    ],
    port: Annotated[int, typer.Option("--port", help="Port to listen on; 0 picks a free one.")] = 8080,
    host: Annotated[str, typer.Option("--host", help="Address to bind; 0.0.0.0 inside a container.")] = "127.0.0.1",
    model_version: Annotated[
        str | None,
        typer.Option(
            "--model-version",
            envvar="CANARYFLOW_MODEL_VERSION",
            help="The model_version label on metrics (default: the version a models:/ URI resolves to).",
        ),
    ] = None,
    variant: Annotated[str, typer.Option("--variant", help="The variant label on metrics.")] = "primary",
    model_name: Annotated[
        str | None,
        typer.Option(
            "--model-name", help="The name KServe's V1 and v2 routes answer for (default: registry.model_name)."
        ),
    ] = None,
    serving_config: Annotated[
        str | None,
        typer.Option(
            "--serving-config",
            envvar="CANARYFLOW_SERVING_CONFIG",  # rollout/kserve.py SERVING_ENV
            help="The serving section as JSON, in place of the config's: what the canary step gives a KServe "
            "predictor. With it, inputs are logged only where its input_log sets dir or upload_uri.",
        ),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    workdir: WorkdirOpt = Path(".canaryflow"),
    tracking_uri: TrackingOpt = None,
) -> None:
    """Serve one model over HTTP: /predict, KServe's V1 (/v1/models/NAME:predict) and the Open Inference
    Protocol v2 (/v2/models/NAME/infer), /health and /metrics. The config's serving section sets the input
    limits, batching and the input log (default: under --workdir, which `drift check` reads; with
    --serving-config, only where that says)."""
    import mlflow

    from canaryflow.registry.tracking import sqlite_uri
    from canaryflow.runner import input_log_dir
    from canaryflow.serving.server import main as serve_main

    # Nothing is created under the workdir here: a predictor's filesystem may be read-only, and the server
    # then serves without its input log rather than not at all.
    cfg = _load(config, set_, tracking_uri)
    store = cfg.mlflow.tracking_uri or sqlite_uri(workdir)
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    if model_version is None and model_uri.startswith("models:/"):
        from canaryflow.registry.models import resolve_version

        model_version = resolve_version(model_uri)
    args = ["--model-uri", model_uri, "--host", host, "--port", str(port), "--variant", variant]
    args += ["--model-name", model_name or cfg.registry.model_name]
    args += ["--model-version", model_version or "unknown"]
    if serving_config is None:
        args += ["--serving-config", cfg.serving.model_dump_json()]
        args += ["--input-log-dir", cfg.serving.input_log.dir or str(input_log_dir(workdir))]
    else:  # a predictor's: its inputs stay in the pod unless the config says where they may go
        args += ["--serving-config", serving_config]
    code = serve_main(args)
    if code:
        raise typer.Exit(code)


def _quiet_libraries() -> None:
    """Keep the terminal for canaryflow's own output; the steps' full logs are in the run log."""
    import logging
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # mlflow sets its logger's level from this when it is imported, after anything set here.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("alembic").setLevel(logging.WARNING)


def main() -> None:
    """Entry point: one clear error line and a meaningful exit code, never a traceback for known failures."""
    _quiet_libraries()
    try:
        # Outside standalone mode, typer.Exit raised by a command comes back as a return value.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except TyperException as exc:  # usage errors: unknown option, missing value, bad type
        message = exc.format_message()
        if message:  # empty when help was shown for a bare command group
            print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except CanaryflowError as exc:
        summary = getattr(exc, "summary", None)
        if summary is not None and "--json" in sys.argv:
            print(json.dumps(summary))
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # the last resort: still one line, with the type to search for
        if type(exc).__name__ == "MlflowException":  # mlflow is imported only by the commands that need it
            from canaryflow.registry.tracking import refused_error, unavailable_error

            words = [word for word in sys.argv[1:3] if not word.startswith("-")]
            doing = f"running `canaryflow {' '.join(words)}`"
            down = unavailable_error(exc, doing) or refused_error(exc, doing)
            if down is not None:
                print(f"error: {down}", file=sys.stderr)
                sys.exit(down.exit_code)
        print(
            f"error: unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr
        )
        sys.exit(1)


def entry() -> None:
    """The `canaryflow` command: main(), in a process that ends with it. Its objects are frozen first, so that
    the interpreter's last collections do not walk all of MLflow's and kfp's (about 1 s of every command on 2
    cores; registry.tracking._exit_lightly does the same for the steps)."""
    try:
        main()
    finally:
        import gc

        gc.freeze()


if __name__ == "__main__":
    entry()
