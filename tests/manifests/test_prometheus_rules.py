"""The PrometheusRule run through Prometheus' own tools: `promtool check rules` parses its groups as the
Prometheus that the Operator configures would, and `promtool test rules` evaluates them over synthetic series
shaped like what the PodMonitor scrapes off canaryflow's model servers. Each alert is shown to fire on its
cause, with its labels and rendered annotations, and to stay quiet on a healthy service and below its floors.

test_observability.py reads the same rules as text; only an evaluation shows that, say, a ratio's `or ... * 0`
or an `ignoring (feature)` match does what its comment says.
"""

from __future__ import annotations

import math
import re
import subprocess
from dataclasses import dataclass, field

import pytest
import yaml

from canaryflow.serving.http import LATENCY_BUCKETS
from tests.observability import rule_list, rules, runbook_queries
from tests.prometheus import Prometheus, binary

RULES_FILE = "canaryflow-slo.rules.yaml"


def _pod(variant: str, model_version: str, revision: int, ip: str) -> dict[str, str]:
    """The labels of one predictor pod's series: the server's own, and those its PodMonitor's scrape adds."""
    return {
        "namespace": "canaryflow",
        "pod": f"canaryflow-demo-predictor-{revision:05d}-deployment-5d8c7b9f4-x{revision}q7z",
        "container": "kserve-container",
        "job": "canaryflow/canaryflow-predictor",
        "instance": f"{ip}:8080",
        "variant": variant,
        "model_version": model_version,
    }


CHAMPION = _pod("champion", "3", 1, "10.42.0.17")
CHALLENGER = _pod("challenger", "4", 2, "10.42.0.23")
SERVICE = {"namespace": "canaryflow"}  # what the ratios summed by namespace keep
# The rules' own labels, spelt here rather than read from the rule, so that a page turned ticket is caught.
AVAILABILITY_PAGE = {"severity": "page", "slo": "availability"}
LATENCY_PAGE = {"severity": "page", "slo": "latency"}
TICKET = {"severity": "ticket"}
FAST_S, SLOW_S = 0.3, 2.0  # observed latencies on either side of the 1 s SLO bound


def _selector(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


def _number(x: float) -> str:
    # Exact, unlike :g, which would round a week's counter to 6 digits.
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def counter(*segments: tuple[float, int]) -> str:
    """promtool's notation for a counter from 0 that grows by `step` per interval for `n` intervals, then by
    the next segment's step, and so on."""
    parts, value = [], 0.0
    for i, (step, n) in enumerate(segments):
        # "a+bxn" is n+1 values from a: only the first segment has its own starting point.
        start, count = (value, n) if i == 0 else (value + step, n - 1)
        parts.append(f"{_number(start)}+{_number(step)}x{count}")
        value = start + step * count
    return " ".join(parts)


def gauge(value: float, n: int) -> str:
    return f"{_number(value)}x{n}"


# The codes whose requests series a server creates at start (serving/server.py): one it never answered is a
# flat 0, not absent.
CODES = ("200", "400", "413", "500")


def requests(pod: dict, *segments: tuple[dict[str, float], int], created: tuple[str, ...] = CODES) -> dict[str, str]:
    """Predict requests answered per interval by code, segment after segment: ({code: count}, n)."""
    codes = sorted({*created, *(code for per_code, _ in segments for code in per_code)})
    return {
        _selector("canaryflow_server_requests_total", {**pod, "code": code}): counter(
            *((per_code.get(code, 0), n) for per_code, n in segments)
        )
        for code in codes
    }


def refused(pod: dict, n: int, **per_reason: float) -> dict[str, str]:
    # The server creates all three reasons' series at start, so a reason nobody hit is a flat 0, not absent.
    return {
        _selector("canaryflow_server_refused_total", {**pod, "reason": reason}): counter((per_reason.get(reason, 0), n))
        for reason in ("input_too_long", "too_many_inputs", "body_too_large")
    }


def latency(pod: dict, fast: int, slow: int, n: int) -> dict[str, str]:
    """The latency histogram of `fast` answers under 1 s and `slow` over it per interval, with every bucket the
    server exports, its bound spelt as the Python client writes it (le="1.0")."""
    from prometheus_client.utils import floatToGoString

    out = {}
    for bound in (*LATENCY_BUCKETS, math.inf):
        step = fast * (FAST_S <= bound) + slow * (SLOW_S <= bound)
        out[_selector("canaryflow_server_latency_seconds_bucket", {**pod, "le": floatToGoString(bound)})] = counter(
            (step, n)
        )
    out[_selector("canaryflow_server_latency_seconds_count", pod)] = counter((fast + slow, n))
    out[_selector("canaryflow_server_latency_seconds_sum", pod)] = counter((fast * FAST_S + slow * SLOW_S, n))
    return out


def quality(pod: dict, *segments: tuple[int, float, int]) -> dict[str, str]:
    """chrF of `answers` scored answers per interval at `mean`, segment after segment: (answers, mean, n)."""
    return {
        _selector("canaryflow_server_quality_chrf_count", pod): counter(*((a, n) for a, _, n in segments)),
        _selector("canaryflow_server_quality_chrf_sum", pod): counter(*((a * m, n) for a, m, n in segments)),
    }


def drift(pod: dict, window: int, n: int, **per_feature: float) -> dict[str, str]:
    out = {_selector("canaryflow_server_drift_window_inputs", pod): gauge(window, n)}
    for feature, distance in per_feature.items():
        out[_selector("canaryflow_server_input_drift", {**pod, "feature": feature})] = gauge(distance, n)
    return out


@dataclass
class Case:
    """Series over `interval`, and the alerts firing at `eval_time`: alert -> [(its labels, the rule's included,
    its $value)]. Every other alert of the file is expected not to fire. `samples`: what some expressions
    (recording rules) give at `eval_time`, expression -> [(labels, value)]."""

    name: str
    series: dict[str, str]
    eval_time: str
    firing: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)
    interval: str = "1m"
    evaluation_interval: str = "1m"
    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)


def _merge(*parts: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in parts:
        assert not out.keys() & part.keys(), out.keys() & part.keys()
        out.update(part)
    return out


HOUR = 60  # intervals of 1m

# Errors and slowness come mostly from the challenger: the SLOs are the service's, so its share of the traffic
# weighs in, and the alerts carry the namespace only.
FIRING = [
    Case(
        "errors-fast-burn",
        _merge(
            requests(CHAMPION, ({"200": 80}, 2 * HOUR)),
            requests(CHALLENGER, ({"200": 10, "500": 10}, 2 * HOUR)),
        ),
        "1h",
        {"CanaryflowErrorBudgetBurn": [({**SERVICE, **AVAILABILITY_PAGE}, 0.10)]},
    ),
    # 4% is under the fast burn's 7.2% and over the slow burn's 3%: only the 6h/30m pair can page.
    Case(
        "errors-slow-burn",
        _merge(
            requests(CHAMPION, ({"200": 86}, 7 * HOUR)),
            requests(CHALLENGER, ({"200": 10, "500": 4}, 7 * HOUR)),
        ),
        "6h",
        {"CanaryflowErrorBudgetBurn": [({**SERVICE, **AVAILABILITY_PAGE}, 0.04)]},
    ),
    Case(
        "latency-fast-burn",
        _merge(latency(CHAMPION, 76, 4, 2 * HOUR), latency(CHALLENGER, 4, 16, 2 * HOUR)),
        "1h",
        {"CanaryflowLatencyBudgetBurn": [({**SERVICE, **LATENCY_PAGE}, 0.20)]},
    ),
    Case(
        "latency-slow-burn",
        _merge(latency(CHAMPION, 85, 5, 7 * HOUR), latency(CHALLENGER, 5, 5, 7 * HOUR)),
        "6h",
        {"CanaryflowLatencyBudgetBurn": [({**SERVICE, **LATENCY_PAGE}, 0.10)]},
    ),
    # A week at chrF 60, then 8 hours at 40 on both revisions. Samples every 10 minutes, evaluated every 5 as
    # the group is, keep a week of history cheap to evaluate.
    Case(
        "quality-decline",
        _merge(
            quality(CHAMPION, (10, 60, 7 * 24 * 6), (10, 40, 8 * 6)),
            quality(CHALLENGER, (10, 60, 7 * 24 * 6), (10, 40, 8 * 6)),
        ),
        "176h",
        {"CanaryflowQualityDecline": [({**SERVICE, **TICKET}, 40.0)]},
        interval="10m",
        evaluation_interval="5m",
    ),
    # Drift is judged per server and per feature: only the champion's input lengths are over 0.5.
    Case(
        "input-drift",
        _merge(
            drift(CHAMPION, 500, 2 * HOUR, input_length=0.7, vocabulary=0.1),
            drift(CHALLENGER, 500, 2 * HOUR, input_length=0.2, vocabulary=0.3),
        ),
        "2h",
        {"CanaryflowInputDrift": [({**CHAMPION, "feature": "input_length", **TICKET}, 0.7)]},
    ),
    # 5 of 100 requests a minute refused for length, counted as 413s too as the server does.
    Case(
        "inputs-refused-for-length",
        _merge(
            requests(CHAMPION, ({"200": 85, "413": 5}, 2 * HOUR)),
            requests(CHALLENGER, ({"200": 10}, 2 * HOUR)),
            refused(CHAMPION, 2 * HOUR, input_too_long=3, body_too_large=2),
            refused(CHALLENGER, 2 * HOUR),
        ),
        "1h",
        {"CanaryflowInputsRefusedForLength": [({**SERVICE, **TICKET}, 0.05)]},
    ),
]

QUIET = [
    # No 5xx series at all, as from a server that creates only the series of codes it has answered: the error
    # ratios must still read 0 rather than vanish, which a panel would show as "no data".
    Case(
        "no-5xx-series",
        _merge(
            requests(CHAMPION, ({"200": 90}, 2 * HOUR), created=("200",)),
            requests(CHALLENGER, ({"200": 10}, 2 * HOUR), created=("200",)),
        ),
        "2h",
        samples={
            f"canaryflow:server_request_errors:ratio_rate{window}": [(SERVICE, 0)]
            for window in ("5m", "30m", "1h", "6h")
        },
    ),
    # Every series the alerts read, at a healthy service's values: 0.1% errors, 0.6% slow, 0.1% refused,
    # steady quality, low drift.
    Case(
        "healthy",
        _merge(
            requests(CHAMPION, ({"200": 798, "413": 1}, 8 * HOUR)),
            requests(CHALLENGER, ({"200": 200, "500": 1}, 8 * HOUR)),
            refused(CHAMPION, 8 * HOUR, input_too_long=1),
            refused(CHALLENGER, 8 * HOUR),
            latency(CHAMPION, 795, 4, 8 * HOUR),
            latency(CHALLENGER, 199, 2, 8 * HOUR),
            quality(CHAMPION, (10, 60, 8 * HOUR)),
            quality(CHALLENGER, (10, 58, 8 * HOUR)),
            drift(CHAMPION, 500, 8 * HOUR, input_length=0.1, vocabulary=0.2),
            drift(CHALLENGER, 500, 8 * HOUR, input_length=0.15, vocabulary=0.25),
        ),
        "8h",
    ),
    # Six healthy hours, 30 minutes at 20% errors, 10 minutes healthy again: the 1h burn is still over 14.4x,
    # but the 5m window that confirms it is back to 0 and the 6h burn never reached 6x, so the page has cleared.
    Case(
        "error-burst-over",
        _merge(
            requests(CHAMPION, ({"200": 80}, 6 * HOUR + 40)),
            requests(CHALLENGER, ({"200": 20}, 6 * HOUR), ({"500": 20}, 30), ({"200": 20}, 10)),
        ),
        "6h40m",
    ),
    # A decline as steep as in quality-decline, but on 72 scored answers in 6 hours: under the floor of 100.
    Case(
        "quality-decline-on-few-answers",
        _merge(
            quality(CHAMPION, (1, 60, 7 * 24 * 6), (1, 40, 8 * 6)),
            quality(CHALLENGER, (1, 60, 7 * 24 * 6), (1, 40, 8 * 6)),
        ),
        "176h",
        interval="10m",
        evaluation_interval="5m",
    ),
    Case("drift-on-a-small-window", drift(CHAMPION, 150, 2 * HOUR, input_length=0.7, vocabulary=0.6), "2h"),
    # 10% refused, but 60 requests in the hour: under the volume floor of 100.
    Case(
        "refusals-on-little-traffic",
        _merge(
            requests(CHAMPION, ({"200": 9, "413": 1}, 12)),
            refused(CHAMPION, 12, input_too_long=1),
        ),
        "1h",
        interval="10m",
    ),
    # Too many inputs per request is refused with 413 too, but is not about length.
    Case(
        "refusals-for-the-number-of-inputs",
        _merge(
            requests(CHAMPION, ({"200": 90, "413": 10}, 2 * HOUR)),
            refused(CHAMPION, 2 * HOUR, too_many_inputs=10),
        ),
        "1h",
    ),
]

# Go template actions the annotations use, rendered as Prometheus does (humanizePercentage is %.4g of v*100).
_ACTION = re.compile(r"\{\{\s*(.*?)\s*\}\}")
_LABEL = re.compile(r"\$labels\.(\w+)")
_PRINTF = re.compile(r'\$value \| printf "([^"]*)"')


def render(template: str, labels: dict[str, str], value: float) -> str:
    def action(match: re.Match) -> str:
        expr = match[1]
        if found := _LABEL.fullmatch(expr):
            return labels.get(found[1], "")
        if expr == "$value | humanizePercentage":
            return f"{value * 100:.4g}%"
        if found := _PRINTF.fullmatch(expr):
            return found[1] % value
        raise AssertionError(f"render() does not know {{{{ {expr} }}}}: teach it, as Prometheus renders it")

    return _ACTION.sub(action, template)


def _alerts() -> dict[str, dict]:
    return {r["alert"]: r for r in rule_list() if "alert" in r}


def expected(alert: dict, labels: dict[str, str], value: float) -> dict:
    # Annotations see the series' labels only, without the rule's own (severity...).
    series = {k: v for k, v in labels.items() if k not in alert.get("labels", {})}
    return {
        "exp_labels": labels,
        "exp_annotations": {k: render(v, series, value) for k, v in alert.get("annotations", {}).items()},
    }


def write_rules_file(path) -> None:
    # The Operator hands Prometheus the spec's groups as they are, less Thanos' partial_response_strategy.
    groups = [{k: v for k, v in g.items() if k != "partial_response_strategy"} for g in rules()["spec"]["groups"]]
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))


def unit_test_file(case: Case) -> dict:
    alerts = _alerts()
    unknown = case.firing.keys() - alerts.keys()
    assert not unknown, f"{case.name} expects alerts the PrometheusRule lacks: {unknown}"
    return {
        "rule_files": [RULES_FILE],
        "evaluation_interval": case.evaluation_interval,
        "tests": [
            {
                "name": case.name,
                "interval": case.interval,
                "input_series": [{"series": s, "values": v} for s, v in case.series.items()],
                "alert_rule_test": [
                    {
                        "eval_time": case.eval_time,
                        "alertname": name,
                        "exp_alerts": [expected(alert, *firing) for firing in case.firing.get(name, [])],
                    }
                    for name, alert in alerts.items()
                ],
                "promql_expr_test": [
                    {
                        "expr": expr,
                        "eval_time": case.eval_time,
                        "exp_samples": [{"labels": _selector(expr, labels), "value": v} for labels, v in samples],
                    }
                    for expr, samples in case.samples.items()
                ],
            }
        ],
    }


@pytest.fixture(scope="module")
def promtool() -> str:
    return binary("promtool")


def _run(*argv: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=300)


def test_promtool_accepts_the_rules(promtool, tmp_path):
    write_rules_file(tmp_path / RULES_FILE)
    done = _run(promtool, "check", "rules", RULES_FILE, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rule_list())} rules found" in done.stdout, done.stdout


def test_promtool_parses_every_expression_the_runbooks_give(promtool, tmp_path):
    # promtool checks PromQL inside rule files: each runbook expression becomes one recording rule.
    found = runbook_queries()
    assert len(found) >= 10
    records = [{"record": f"runbook:check_{i}", "expr": expr} for i, expr in enumerate(found.values())]
    (tmp_path / "runbooks.yaml").write_text(yaml.safe_dump({"groups": [{"name": "runbooks", "rules": records}]}))
    done = _run(promtool, "check", "rules", "runbooks.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(records)} rules found" in done.stdout, done.stdout


def _seconds(duration: str) -> int:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(int(n) * units[unit] for n, unit in re.findall(r"(\d+)([smhd])", duration))


def test_a_prometheus_server_loads_the_rules_with_their_group_intervals(tmp_path):
    # promtool evaluates every group at the test file's interval: only a server shows a group's own applies.
    write_rules_file(tmp_path / RULES_FILE)
    default = "30s"
    with Prometheus({}, rule_files=[tmp_path / RULES_FILE], evaluation_interval=default, root=tmp_path) as server:
        loaded = {g["name"]: g for g in server.api("rules")["groups"]}
    spec = rules()["spec"]["groups"]
    assert loaded.keys() == {g["name"] for g in spec}
    for want in spec:
        group = loaded[want["name"]]
        assert group["interval"] == _seconds(want.get("interval", default)), group["name"]
        assert [r["name"] for r in group["rules"]] == [r.get("alert") or r.get("record") for r in want["rules"]]
        assert all(r["health"] != "err" for r in group["rules"]), group["rules"]


@pytest.mark.slow
@pytest.mark.parametrize("case", FIRING + QUIET, ids=lambda c: c.name)
def test_the_alerts_evaluate_as_expected(promtool, tmp_path, case):
    write_rules_file(tmp_path / RULES_FILE)
    (tmp_path / "test.yaml").write_text(yaml.safe_dump(unit_test_file(case), sort_keys=False, width=1000))
    done = _run(promtool, "test", "rules", "test.yaml", cwd=tmp_path)
    assert done.returncode == 0, f"promtool test rules ({tmp_path / 'test.yaml'}):\n{done.stdout}{done.stderr}"


def test_every_alert_is_shown_firing_and_quiet():
    alerts = _alerts()
    shown = {name for case in FIRING for name, firing in case.firing.items() if firing}
    assert shown == alerts.keys(), f"alerts without a case that makes them fire: {alerts.keys() - shown}"
    assert all(not case.firing for case in QUIET)
    assert "healthy" in {case.name for case in QUIET}
    for case in FIRING:
        for name, firing in case.firing.items():
            assert all(labels.get("severity") in {"page", "ticket"} for labels, _ in firing), (case.name, name)


def test_render_follows_prometheus():
    labels = {"namespace": "canaryflow", "feature": "vocabulary"}
    assert render("{{ $labels.namespace }}/{{$labels.feature}}", labels, 0) == "canaryflow/vocabulary"
    assert render("{{ $value | humanizePercentage }}", {}, 0.1) == "10%"
    assert render("{{ $value | humanizePercentage }}", {}, 5 / 110) == "4.545%"
    assert render('{{ $value | printf "%.2f" }}', {}, 0.7) == "0.70"
    with pytest.raises(AssertionError, match="humanize"):
        render("{{ $value | humanize }}", {}, 1)
