"""The Grafana dashboard and the Prometheus rules (manifests/observability), read for tests: their PromQL, the
metrics it asks for, and which of those a scrape of the real servers lacks. A dashboard or alert over a metric
no process exports shows "no data" or never fires, and nothing else would say so.
"""

from __future__ import annotations

import functools
import json
import re

import yaml

from tests.conftest import REPO

OBSERVABILITY = REPO / "manifests" / "observability"
DASHBOARD = OBSERVABILITY / "grafana-dashboard.json"
RULES = OBSERVABILITY / "prometheusrule.yaml"

# canaryflow's exported metrics are canaryflow_*; recording rules are named canaryflow:* by Prometheus'
# level:metric:operations convention, but either prefix is read so that a rule named otherwise is still resolved.
_NAME = re.compile(r"(?<![\w:])canaryflow[_:][A-Za-z0-9_:]*")
# A name inside a string literal (a label value, a regex) is not a metric.
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_COMMENT = re.compile(r"#[^\n]*")


@functools.cache
def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@functools.cache
def _rules() -> dict:
    return yaml.safe_load(RULES.read_text())


def dashboard() -> dict:
    """The parsed Grafana dashboard (a fresh copy: callers may change it)."""
    return json.loads(json.dumps(_dashboard()))


def rules() -> dict:
    """The parsed PrometheusRule (a fresh copy)."""
    return json.loads(json.dumps(_rules()))


def panels(board: dict | None = None) -> list[dict]:
    """Every panel but rows, including those inside collapsed rows."""
    out = []
    for panel in (board or dashboard())["panels"]:
        if panel.get("type") == "row":
            out += panel.get("panels", [])
        else:
            out.append(panel)
    return out


def rule_list(doc: dict | None = None) -> list[dict]:
    return [rule for group in (doc or rules())["spec"]["groups"] for rule in group["rules"]]


RUNBOOKS = REPO / "docs" / "runbooks"


def runbook_queries() -> dict[str, str]:
    """The PromQL an on-call engineer pastes from the runbooks' promql blocks, keyed "runbook: <file> [<n>]".
    An expression starts at a line's first column; indented lines continue it."""
    out: dict[str, str] = {}
    for path in sorted(RUNBOOKS.glob("*.md")):
        for block in re.findall(r"^```promql\n(.*?)^```", path.read_text(), flags=re.M | re.S):
            exprs: list[str] = []
            for line in block.splitlines():
                if line[:1].isspace() and exprs:
                    exprs[-1] += "\n" + line
                elif line.strip():
                    exprs.append(line)
            for expr in exprs:
                out[f"runbook: {path.name} [{len(out) + 1}]"] = expr
    return out


def queries() -> dict[str, str]:
    """Every PromQL expression, keyed by where it is: "dashboard: <panel title> [<refId>]", "alert: <name>",
    "record: <name>", "runbook: <file> [<n>]"."""
    out: dict[str, str] = dict(runbook_queries())
    for panel in panels():
        for target in panel.get("targets", []):
            if target.get("expr"):
                out[f"dashboard: {panel['title']} [{target.get('refId', '?')}]"] = target["expr"]
    for rule in rule_list():
        key = f"alert: {rule['alert']}" if "alert" in rule else f"record: {rule['record']}"
        assert key not in out, f"{key} is defined twice"
        out[key] = rule["expr"]
    return out


def names_in(expr: str) -> set[str]:
    """The canaryflow metric and recording-rule names an expression reads (not label values or comments)."""
    return set(_NAME.findall(_COMMENT.sub("", _STRING.sub('""', expr))))


def queried_metrics() -> dict[str, set[str]]:
    """Exported metric name (as a sample name: _total, _bucket, _sum, _count included) -> the places whose
    expressions read it, directly or through the recording rules defined beside them."""
    recorded = {rule["record"]: rule["expr"] for rule in rule_list() if "record" in rule}

    @functools.cache
    def resolve(name: str, seen: frozenset = frozenset()) -> frozenset:
        if name not in recorded:
            return frozenset({name})
        assert name not in seen, f"recording rule {name} refers to itself"
        return frozenset().union(*(resolve(n, seen | {name}) for n in names_in(recorded[name])))

    out: dict[str, set[str]] = {}
    for where, expr in queries().items():
        for name in names_in(expr):
            for metric in resolve(name):
                # A canaryflow:* name no rule records is not exported by anything: leave it out here, and
                # let a test on undefined names say so.
                if metric.startswith("canaryflow_"):
                    out.setdefault(metric, set()).add(where)
    return out


def undefined_recorded_names() -> dict[str, set[str]]:
    """canaryflow:* names used but recorded by no rule in the file (a typo, or a rule someone removed)."""
    recorded = {rule["record"] for rule in rule_list() if "record" in rule}
    out: dict[str, set[str]] = {}
    for where, expr in queries().items():
        for name in names_in(expr):
            if not name.startswith("canaryflow_") and name not in recorded:
                out.setdefault(name, set()).add(where)
    return out


def sample_names(scrape_text: str) -> set[str]:
    """The sample names in a Prometheus text-format scrape (several scrapes may be concatenated)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {sample.name for family in text_string_to_metric_families(scrape_text) for sample in family.samples}


def missing_from_scrape(scrape_text: str, prefix: str = "canaryflow_") -> dict[str, set[str]]:
    """The queried metrics whose names start with `prefix` and that the scrape holds no sample of, each with
    the places that query it. `prefix` narrows the check to one process's metrics, e.g. "canaryflow_server_"
    for a model server's /metrics (the router's and the canary's are elsewhere)."""
    present = sample_names(scrape_text)
    return {
        metric: places
        for metric, places in queried_metrics().items()
        if metric.startswith(prefix) and metric not in present
    }
