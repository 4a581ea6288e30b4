"""The dashboards, alerts and runbooks for operating the served model (manifests/observability, docs/runbooks),
checked without Prometheus or Grafana.

PrometheusRule and PodMonitor are the Prometheus Operator's CRDs, whose schemas kubernetes-validate does not
ship: their shape is checked by hand here, field names included (the API server prunes an unknown field, so a
misspelt `anotations` would vanish without an error). The ConfigMap the kustomization generates is a built-in
kind and is validated like the other manifests.
"""

import re

import pytest
import yaml

from tests.conftest import REPO
from tests.manifests.test_manifests import K8S_VERSION, MANIFESTS, NAMESPACES, build
from tests.observability import (
    OBSERVABILITY,
    dashboard,
    missing_from_scrape,
    names_in,
    panels,
    queried_metrics,
    queries,
    rule_list,
    rules,
    undefined_recorded_names,
)

RUNBOOKS = REPO / "docs" / "runbooks"
RUNBOOK_URL = "https://github.com/canaryflow/canaryflow/blob/main/docs/runbooks/"
SECTIONS = ["## What it means", "## Confirm it", "## Roll back", "## Retrain"]
ANNOTATIONS = {"summary", "description", "runbook_url", "dashboard"}
# The fields of a rule in the PrometheusRule CRD (monitoring.coreos.com/v1 Rule).
RULE_FIELDS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
GROUP_FIELDS = {"name", "rules", "interval", "limit", "partial_response_strategy", "query_offset", "labels"}
ENDPOINT_FIELDS = {"port", "portNumber", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "params",
                   "honorLabels", "honorTimestamps", "relabelings", "metricRelabelings", "filterRunning"}  # fmt: skip
DURATION = re.compile(r"(\d+(ms|s|m|h|d|w|y))+")
ISVC_LABEL = "serving.kserve.io/inferenceservice"  # KServe's label on every predictor pod of an InferenceService


def _alerts() -> list[dict]:
    return [r for r in rule_list() if "alert" in r]


def _kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def _resolved(expr: str) -> str:
    """The expression with every recording rule it reads replaced by that rule's own expression."""
    recorded = {r["record"]: r["expr"] for r in rule_list() if "record" in r}
    for _ in range(len(recorded) + 1):
        names = names_in(expr) & recorded.keys()
        if not names:
            return expr
        for name in names:
            expr = re.sub(rf"(?<![\w:]){re.escape(name)}(?![\w:])", f"({recorded[name]})", expr)
    raise AssertionError("recording rules refer to each other in a loop")


def _isvc() -> dict:
    from tests.manifests.test_manifests import _base_isvc

    return _base_isvc()


def _kustomization() -> dict:
    return yaml.safe_load((OBSERVABILITY / "kustomization.yaml").read_text())


# --- the dashboard ---


def test_dashboard_loads_with_its_variables():
    board = dashboard()
    assert board["uid"] == "canaryflow"
    assert board["schemaVersion"] == 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    version = variables["model_version"]
    assert version["type"] == "query"
    query = version["query"]["query"] if isinstance(version["query"], dict) else version["query"]
    assert re.fullmatch(r"label_values\(\s*canaryflow_server_requests_total\s*,\s*model_version\s*\)", query)
    assert version["datasource"]["uid"] == "${datasource}"


def test_every_panel_has_a_title_a_description_and_queries_over_the_chosen_versions():
    board = dashboard()
    found = panels(board)
    assert len(found) >= 12
    ids = [p["id"] for p in board["panels"]] + [p["id"] for r in board["panels"] for p in r.get("panels", [])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in found:
        title = panel.get("title", "")
        assert title.strip(), panel
        assert panel.get("description", "").strip(), title
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr", "").strip() for t in targets), title
        assert len({t["refId"] for t in targets}) == len(targets), title
        # The Prometheus picked in the datasource variable, not one Grafana happens to have as its default.
        assert all(t["datasource"]["uid"] == "${datasource}" for t in targets), title
        assert any("$model_version" in t["expr"] for t in targets), f"{title} ignores the model_version variable"


def test_the_panels_fit_the_grid_without_overlapping():
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def _rows() -> dict[str, list[dict]]:
    """Row title -> the panels under it (rows hold their panels only when collapsed)."""
    rows: dict[str, list[dict]] = {}
    current = None
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            current = panel["title"]
            rows[current] = list(panel.get("panels", []))
        else:
            assert current is not None, f"{panel['title']} is above the first row"
            rows[current].append(panel)
    return rows


def test_an_on_call_row_and_a_model_row():
    rows = _rows()
    assert len(rows) == 2
    (on_call, on_call_panels), (model, model_panels) = rows.items()
    assert "on call" in on_call.lower() and "model" in model.lower()

    def exprs(found: list[dict]) -> str:
        return "\n".join(t["expr"] for p in found for t in p["targets"])

    on_call_exprs, model_exprs = exprs(on_call_panels), exprs(model_panels)
    for quantile in ("0.5", "0.95", "0.99"):
        assert re.search(
            rf"histogram_quantile\({quantile},[^\n]*canaryflow_server_latency_seconds_bucket", on_call_exprs
        )
    for needle in ('code=~"5..', "canaryflow_router_weight_percent", "canaryflow_canary_state", "refused_total"):
        assert needle in on_call_exprs, needle
    assert re.search(r"canaryflow_server_quality_chrf_sum.*\n?.*/.*canaryflow_server_quality_chrf_count", model_exprs)
    for needle in (
        "canaryflow_server_input_drift",
        "canaryflow_server_drift_window_inputs",
        "canaryflow_server_input_tokens_bucket",
        "canaryflow_server_output_tokens_bucket",
    ):
        assert needle in model_exprs, needle
    drift_panel = next(p for p in model_panels if "canaryflow_server_input_drift" in p["targets"][0]["expr"])
    steps = drift_panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert _drift_defaults()[0] in {s["value"] for s in steps}, "the drift panel's threshold line"


def test_the_dashboard_fits_in_a_configmap_applied_client_side():
    # kubectl apply (client side) copies the whole object into an annotation, and annotations are limited to
    # 256 KiB in all.
    assert (OBSERVABILITY / "grafana-dashboard.json").stat().st_size < 200_000


# --- the rules ---


def test_the_prometheusrule_has_the_operators_shape():
    doc = rules()
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert doc["kind"] == "PrometheusRule"
    assert doc["metadata"]["name"] == "canaryflow-slo"
    assert doc["metadata"]["namespace"] == "canaryflow"
    groups = doc["spec"]["groups"]
    assert groups and len({g["name"] for g in groups}) == len(groups)
    for group in groups:
        assert set(group) <= GROUP_FIELDS, group["name"]
        assert group["rules"], group["name"]
        if "interval" in group:
            assert DURATION.fullmatch(group["interval"]), group["name"]
    names = [r.get("alert") or r.get("record") for r in rule_list(doc)]
    assert len([r for r in rule_list(doc) if "alert" in r]) == len({r["alert"] for r in rule_list(doc) if "alert" in r})
    for rule, name in zip(rule_list(doc), names):
        assert set(rule) <= RULE_FIELDS, f"{name}: unknown fields {set(rule) - RULE_FIELDS}"
        assert ("alert" in rule) != ("record" in rule), name
        assert isinstance(rule["expr"], str) and rule["expr"].strip(), name
        if "record" in rule:
            # Prometheus' level:metric:operations, which also keeps them apart from exported names.
            assert re.fullmatch(r"canaryflow:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), name
            assert not {"for", "annotations"} & set(rule), name
            continue
        assert re.fullmatch(r"Canaryflow[A-Z][A-Za-z]+", rule["alert"]), name
        assert rule["labels"]["severity"] in {"page", "ticket"}, name
        assert DURATION.fullmatch(rule["for"]), name
        assert set(rule["annotations"]) >= ANNOTATIONS, f"{name} lacks {ANNOTATIONS - set(rule['annotations'])}"
        assert all(str(v).strip() for v in rule["annotations"].values()), name
        assert rule["annotations"]["dashboard"] == dashboard()["uid"], name
    assert undefined_recorded_names() == {}


def test_page_alerts_burn_both_slos_over_both_window_pairs():
    pages = {a["alert"]: _resolved(a["expr"]) for a in _alerts() if a["labels"]["severity"] == "page"}
    errors = [n for n, e in pages.items() if 'code=~"5.."' in e and "canaryflow_server_requests_total" in e]
    slow = [n for n, e in pages.items() if "canaryflow_server_latency_seconds_bucket" in e and "le=" in e]
    assert len(errors) == 1 and len(slow) == 1, pages
    for name, budget in ((errors[0], 0.005), (slow[0], 0.01)):
        expr = re.sub(r"\s+", " ", pages[name])
        # The workbook's pairs: 14.4x over 1h and 5m, 6x over 6h and 30m, each pair joined by `and`.
        for factor, windows in (("14.4", ("1h", "5m")), ("6", ("6h", "30m"))):
            threshold = rf"> \({factor} \* {budget}\)"
            assert len(re.findall(threshold, expr)) == 2, (name, factor)
            for window in windows:
                assert re.search(rf"\[{window}\]\)\)[^>]*\)? {threshold}", expr), (name, window)
        assert " or " in expr and expr.count(" and ") >= 2, name


def test_the_latency_slo_counts_the_1s_bucket_however_prometheus_spells_it():
    from prometheus_client.utils import floatToGoString

    from canaryflow.serving.http import LATENCY_BUCKETS

    assert 1 in LATENCY_BUCKETS, "the latency SLO needs a bucket bound at 1 s"
    matchers = set()
    for where, expr in queries().items():
        matchers |= set(re.findall(r'canaryflow_server_latency_seconds_bucket\{[^}]*le=~"([^"]+)"', expr))
        assert not re.search(r'le="1"', expr), f'{where}: le="1" misses the client\'s and Prometheus 3\'s le="1.0"'
    assert matchers
    for matcher in matchers:
        # Prometheus anchors label regexes at both ends.
        assert re.fullmatch(matcher, floatToGoString(1.0)) and re.fullmatch(matcher, "1"), matcher
        for other in ("10", "0.1", "1.5", "+Inf"):
            assert not re.fullmatch(matcher, other), (matcher, other)


def _drift_defaults() -> tuple[float, int]:
    from canaryflow.config import DriftConfig

    defaults = DriftConfig()
    return defaults.threshold, defaults.min_inputs


def test_ticket_alerts_for_quality_drift_and_refusals():
    tickets = {a["alert"]: _resolved(a["expr"]) for a in _alerts() if a["labels"]["severity"] == "ticket"}

    def reading(*metrics: str) -> str:
        hits = [n for n, e in tickets.items() if all(m in e for m in metrics)]
        assert len(hits) == 1, (metrics, tickets)
        return hits[0]

    quality = tickets[reading("canaryflow_server_quality_chrf_sum", "canaryflow_server_quality_chrf_count")]
    assert "[6h]" in quality and "[7d]" in quality and re.search(r"- 5\b", quality)
    assert re.search(r"canaryflow_server_quality_chrf_count\[6h\]\)\)\)? >= \d+", quality), "enough observations"
    drift = tickets[reading("canaryflow_server_input_drift", "canaryflow_server_drift_window_inputs")]
    threshold, min_inputs = _drift_defaults()
    # The alert judges as `canaryflow drift check` does by default.
    assert float(re.search(r"canaryflow_server_input_drift\s*>\s*([\d.]+)", drift)[1]) == threshold
    assert int(re.search(r"canaryflow_server_drift_window_inputs\s*>=\s*(\d+)", drift)[1]) == min_inputs
    refused = tickets[reading("canaryflow_server_refused_total")]
    assert "input_too_long" in refused and "[1h]" in refused and re.search(r"> 0\.01\b", refused)


# --- the runbooks ---


def test_every_alert_links_a_runbook_with_the_four_sections():
    for alert in _alerts():
        url = alert["annotations"]["runbook_url"]
        assert url.startswith(RUNBOOK_URL), url
        name = url.removeprefix(RUNBOOK_URL)
        assert name == f"{_kebab(alert['alert'])}.md", (alert["alert"], name)
        path = RUNBOOKS / name
        assert path.is_file(), path
        text = path.read_text()
        headings = [line for line in text.splitlines() if line.startswith("## ")]
        assert headings == SECTIONS, (name, headings)
        for section, body in zip(SECTIONS, re.split(r"^## .*$", text, flags=re.M)[1:]):
            assert body.strip(), (name, section)
        confirm = text.split("## Confirm it")[1].split("## Roll back")[0]
        assert "```promql" in confirm and "canaryflow_" in confirm, f"{name}: no PromQL to confirm with"
        assert "canaryflow rollback" in text.split("## Roll back")[1], name
        assert re.search(r"canaryflow (submit|drift watch)", text.split("## Retrain")[1]), name


def test_no_runbook_is_an_orphan():
    linked = {a["annotations"]["runbook_url"].removeprefix(RUNBOOK_URL) for a in _alerts()}
    present = {p.name for p in RUNBOOKS.glob("*.md")} - {"README.md"}
    assert present == linked
    index = (RUNBOOKS / "README.md").read_text()
    for name in linked:
        assert f"]({name})" in index, f"README.md does not link {name}"
    for alert in _alerts():
        assert alert["alert"] in index, alert["alert"]


def test_runbooks_use_the_inferenceservice_and_commands_that_exist():
    from tests.manifests.test_manifests import _cli_commands

    name = _isvc()["metadata"]["name"]
    commands = _cli_commands()
    for path in RUNBOOKS.glob("*.md"):
        text = path.read_text()
        for isvc in re.findall(r"inferenceservice ([a-z0-9-]+)", text):
            assert isvc == name, f"{path.name} names InferenceService {isvc}, the manifests {name}"
        for command in re.findall(r"^canaryflow ([a-z-]+)", text, flags=re.M):
            assert command in commands, f"{path.name}: canaryflow {command}"


# --- the kustomization and the PodMonitor ---


def test_the_kustomization_names_files_that_exist_and_nothing_else_includes_it():
    k = _kustomization()
    assert k["namespace"] == NAMESPACES["prod"]
    for ref in k["resources"]:
        assert (OBSERVABILITY / ref).is_file(), ref
    generator = next(g for g in k["configMapGenerator"] if g["name"] == "canaryflow-dashboard")
    files = [f.split("=", 1)[-1] for f in generator["files"]]
    assert files == ["grafana-dashboard.json"]
    assert all((OBSERVABILITY / f).is_file() for f in files)
    assert generator["options"]["labels"] == {"grafana_dashboard": "1"}
    assert k["generatorOptions"]["disableNameSuffixHash"] is True
    named = set(k["resources"]) | set(files) | {"kustomization.yaml"}
    assert {p.name for p in OBSERVABILITY.iterdir()} <= named, "a file no kustomization applies"
    # Applied on its own, after the CRDs exist: an overlay that included it would fail without them.
    for other in MANIFESTS.rglob("kustomization.yaml"):
        if other.parent != OBSERVABILITY:
            assert "observability" not in other.read_text(), other


def test_the_built_objects_and_the_generated_configmap():
    import kubernetes_validate

    objects = build("observability")
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "PodMonitor", "PrometheusRule"]
    for obj in objects:
        assert obj["metadata"]["namespace"] == "canaryflow"
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "canaryflow"
    generator = _kustomization()["configMapGenerator"][0]
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    kubernetes_validate.validate(configmap, K8S_VERSION, strict=True)
    # The name the sidecar's users look for, no hash suffix; the label it watches; the dashboard as it is.
    assert configmap["metadata"]["name"] == generator["name"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["data"] == {f: (OBSERVABILITY / f).read_text() for f in generator["files"]}
    for kind, plural in (("PodMonitor", "podmonitors"), ("PrometheusRule", "prometheusrules")):
        _crd_schema(plural).validate(next(o for o in objects if o["kind"] == kind))


def test_the_podmonitor_scrapes_the_inferenceservices_predictors():
    from canaryflow.rollout import kserve

    monitor = yaml.safe_load((OBSERVABILITY / "podmonitor.yaml").read_text())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    _crd_schema("podmonitors").validate(monitor)
    isvc = _isvc()
    assert monitor["spec"]["selector"] == {"matchLabels": {ISVC_LABEL: isvc["metadata"]["name"]}}
    # Its own namespace (no namespaceSelector), which is the InferenceService's in prod.
    assert "namespaceSelector" not in monitor["spec"]
    assert monitor["metadata"]["namespace"] == NAMESPACES["prod"]
    (runtime,) = yaml.safe_load_all((MANIFESTS / "runtime" / "servingruntime.yaml").read_text())
    container = next(c for c in runtime["spec"]["containers"] if c["name"] == kserve.CONTAINER)
    ports = {p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert int(args[args.index("--port") + 1]) in ports
    own, queue_proxy = monitor["spec"]["podMetricsEndpoints"]
    for endpoint in (own, queue_proxy):
        assert set(endpoint) <= ENDPOINT_FIELDS and endpoint["path"] == "/metrics"
        assert DURATION.fullmatch(endpoint["interval"])
    assert own["portNumber"] == kserve.PORT and kserve.PORT in ports
    # Knative's user-metrics port on the queue-proxy container (knative/serving UserQueueMetricsPortName).
    assert queue_proxy["port"] == "http-usermetric"


def test_the_podmonitor_gives_the_labels_the_canary_queries_select_on():
    from canaryflow.config import load_config
    from canaryflow.rollout.kserve import KNATIVE_QUERIES

    monitor = yaml.safe_load((OBSERVABILITY / "podmonitor.yaml").read_text())
    own, queue_proxy = monitor["spec"]["podMetricsEndpoints"]
    added = {e["portNumber" if "portNumber" in e else "port"]: {r["targetLabel"] for r in e["relabelings"]}
             for e in (own, queue_proxy)}  # fmt: skip
    operator = {"namespace", "pod", "container"}  # promcfg.go adds these to every PodMonitor target
    kserve = load_config().canary.kserve
    for template in kserve.queries.values():
        selected = set(re.findall(r"(\w+)=~?\"\{(?:namespace|service|revision)\}", template))
        assert selected <= operator | added[8080], template
    for generation, spec in KNATIVE_QUERIES.items():
        for template in spec["queries"].values():
            selected = set(re.findall(r"(\w+)=~?\"\{(?:namespace|revision)\}", template))
            # legacy series carry namespace_name and revision_name themselves
            assert selected <= operator | added["http-usermetric"] | {"namespace_name"}, (generation, template)
    # The canary reads no count over less than four scrapes of the interval it is told.
    assert own["interval"] == f"{kserve.scrape_interval_s:g}s"


def _crd_schema(plural: str):
    import jsonschema

    crd = yaml.safe_load((REPO / "tests" / "schemas" / "prometheus-operator" /
                          f"monitoring.coreos.com_{plural}.yaml").read_text())  # fmt: skip
    return jsonschema.Draft7Validator(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


# --- the helper the end-to-end tests use ---

# What a model server and the local router export, by hand: one sample or more of every family.
SERVER_SCRAPE = """\
# HELP canaryflow_server_requests_total Predict requests by outcome.
# TYPE canaryflow_server_requests_total counter
canaryflow_server_requests_total{variant="champion",model_version="3",code="200"} 41.0
canaryflow_server_requests_total{variant="champion",model_version="3",code="500"} 1.0
# TYPE canaryflow_server_latency_seconds histogram
canaryflow_server_latency_seconds_bucket{variant="champion",model_version="3",le="1.0"} 40.0
canaryflow_server_latency_seconds_bucket{variant="champion",model_version="3",le="+Inf"} 42.0
canaryflow_server_latency_seconds_count{variant="champion",model_version="3"} 42.0
canaryflow_server_latency_seconds_sum{variant="champion",model_version="3"} 12.5
# TYPE canaryflow_server_input_tokens histogram
canaryflow_server_input_tokens_bucket{variant="champion",model_version="3",le="64.0"} 40.0
canaryflow_server_input_tokens_bucket{variant="champion",model_version="3",le="+Inf"} 42.0
canaryflow_server_input_tokens_count{variant="champion",model_version="3"} 42.0
canaryflow_server_input_tokens_sum{variant="champion",model_version="3"} 900.0
# TYPE canaryflow_server_output_tokens histogram
canaryflow_server_output_tokens_bucket{variant="champion",model_version="3",le="+Inf"} 41.0
canaryflow_server_output_tokens_count{variant="champion",model_version="3"} 41.0
canaryflow_server_output_tokens_sum{variant="champion",model_version="3"} 700.0
# TYPE canaryflow_server_refused_total counter
canaryflow_server_refused_total{variant="champion",model_version="3",reason="input_too_long"} 1.0
# TYPE canaryflow_server_max_input_tokens gauge
canaryflow_server_max_input_tokens{variant="champion",model_version="3"} 128.0
# TYPE canaryflow_server_quality_chrf histogram
canaryflow_server_quality_chrf_bucket{variant="champion",model_version="3",le="+Inf"} 20.0
canaryflow_server_quality_chrf_count{variant="champion",model_version="3"} 20.0
canaryflow_server_quality_chrf_sum{variant="champion",model_version="3"} 1100.0
# TYPE canaryflow_server_input_drift gauge
canaryflow_server_input_drift{variant="champion",model_version="3",feature="input_length"} 0.05
canaryflow_server_input_drift{variant="champion",model_version="3",feature="vocabulary"} 0.12
# TYPE canaryflow_server_drift_window_inputs gauge
canaryflow_server_drift_window_inputs{variant="champion",model_version="3"} 42.0
# TYPE canaryflow_server_input_log_records_total counter
canaryflow_server_input_log_records_total{variant="champion",model_version="3"} 4.0
"""
ROUTER_SCRAPE = """\
# TYPE canaryflow_router_weight_percent gauge
canaryflow_router_weight_percent{variant="champion",model_version="3"} 90.0
canaryflow_router_weight_percent{variant="challenger",model_version="4"} 10.0
# TYPE canaryflow_canary_state gauge
canaryflow_canary_state{variant="challenger",model_version="4",state="canary"} 1.0
canaryflow_canary_state{variant="challenger",model_version="4",state="shadow"} 0.0
"""


def _without(text: str, family: str) -> str:
    """The scrape without any sample or comment of `family`."""
    return "".join(line for line in text.splitlines(keepends=True) if family not in line)


def test_queried_metrics_are_exported_names_resolved_through_the_recording_rules():
    found = queried_metrics()
    assert found
    assert all(name.startswith("canaryflow_") for name in found)
    # The page alerts read recording rules only: their metrics come through them.
    assert any(place.startswith("alert: ") for place in found["canaryflow_server_requests_total"])
    assert any(place.startswith("alert: ") for place in found["canaryflow_server_latency_seconds_bucket"])
    assert any(place.startswith("dashboard: ") for place in found["canaryflow_router_weight_percent"])
    assert names_in('sum(rate(canaryflow_a_total{job="canaryflow_b"}[5m])) # canaryflow_c') == {"canaryflow_a_total"}


def test_missing_from_scrape_reports_exactly_what_a_scrape_leaves_out():
    assert missing_from_scrape(SERVER_SCRAPE + ROUTER_SCRAPE) == {}
    # One server's scrape holds none of the router's: the prefix narrows the check to the server's own.
    assert set(missing_from_scrape(SERVER_SCRAPE)) == {"canaryflow_router_weight_percent", "canaryflow_canary_state"}
    assert missing_from_scrape(SERVER_SCRAPE, prefix="canaryflow_server_") == {}

    partial = _without(_without(SERVER_SCRAPE, "canaryflow_server_output_tokens"), "canaryflow_server_refused")
    missing = missing_from_scrape(partial + ROUTER_SCRAPE)
    assert set(missing) == {"canaryflow_server_output_tokens_bucket", "canaryflow_server_refused_total"}
    assert "alert: CanaryflowInputsRefusedForLength" in missing["canaryflow_server_refused_total"]
    assert all(
        place.startswith(("dashboard: ", "runbook: ")) for place in missing["canaryflow_server_output_tokens_bucket"]
    )
    # A histogram's _count alone does not stand in for the _bucket series a quantile needs.
    only_count = _without(SERVER_SCRAPE, "canaryflow_server_latency_seconds_bucket")
    assert set(missing_from_scrape(only_count, prefix="canaryflow_server_")) == {
        "canaryflow_server_latency_seconds_bucket"
    }


@pytest.mark.parametrize("where", [("dashboard: ",), ("alert: ", "record: ")])
def test_every_expression_reads_some_canaryflow_metric(where):
    # Not the runbooks': they also give Knative's and the kubelet's view.
    found = {k: v for k, v in queries().items() if k.startswith(where)}
    assert found
    for key, expr in found.items():
        assert names_in(expr), key


def _synopses() -> dict[str, str]:
    """README's Commands block: each command ("registry list", "drift watch", ...) and its synopsis text, the
    continuation lines included."""
    block = (REPO / "README.md").read_text().split("\n## Commands\n", 1)[1].split("```")[1]
    found: dict[str, str] = {}
    names: list[str] = []
    for line in block.splitlines():
        text = line.split("#", 1)[0]
        if line.startswith("canaryflow "):
            words = text.split()
            if words[1] in ("registry", "canary", "drift", "data"):
                subs = [w for w in text.split("[", 1)[0].split()[2:] if w.isalpha() and w.islower()]
                names = [f"{words[1]} {s}" for s in subs]
            else:
                names = [words[1]]
            for name in names:
                found[name] = text
        elif names:
            for name in names:
                found[name] += " " + text
    return found


def test_every_flag_a_runbook_uses_is_in_the_readmes_synopsis_and_parses():
    """An on-call engineer reads the runbook's command, then the README: both must agree, and the CLI take it."""
    import shlex

    import typer

    from canaryflow.cli import app

    synopses = _synopses()
    cf = re.search(r'^CF="([^"]+)"', (RUNBOOKS / "README.md").read_text(), flags=re.M).group(1)
    root = typer.main.get_command(app)
    checked = 0
    for path in RUNBOOKS.glob("*.md"):
        for line in re.findall(r"^\s*(canaryflow [a-z].*)$", path.read_text(), flags=re.M):
            # N stands for a version number in the runbooks.
            words = ["2" if w == "N" else w for w in shlex.split(line.split("  #", 1)[0].replace("$CF", cf))]
            command = root.commands[words[1]]
            name = words[1]
            if words[1] in ("registry", "canary", "drift", "data"):
                command, name = command.commands[words[2]], f"{words[1]} {words[2]}"
            flags = {w.split("=", 1)[0] for w in words if w.startswith("--")}
            for flag in flags:
                assert flag in synopses[name], f"{path.name}: `canaryflow {name} {flag}` is not in README's synopsis"
            command.make_context(f"canaryflow {name}", words[2 + (" " in name) :])
            checked += 1
    assert checked >= 10
