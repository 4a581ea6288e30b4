"""Canary drills: the champion against itself, with a challenger that misbehaves on purpose.

Each fault must end in a rollback with the champion taking all the traffic and the registry untouched;
a healthy challenger must be promoted. They run against the registry the shared lifecycle run built.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest
from mlflow import MlflowClient

from canaryflow.config import load_config
from canaryflow.registry import ledger, models
from canaryflow.rollout.drill import canary_drill
from canaryflow.runner import with_workdir
from tests.conftest import QUICK_CANARY, quick_canary_args, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def drill_registry(lifecycle_run):
    workdir, _ = lifecycle_run
    cfg = with_workdir(load_config(overrides=QUICK_CANARY), workdir)
    return cfg, workdir


def _registry_state(cfg) -> tuple[dict, int]:
    return models.aliases(cfg), len(ledger.history(cfg))


# 1 s of added latency: gross against a champion whose p95 reaches a few hundred ms while the suite's other
# worker keeps both cores busy; the unit simulations measure how fine a regression the tests resolve.
@pytest.mark.parametrize("fault", ["errors=0.1", "latency_ms=1000", "crash-after=15"])
def test_a_faulty_challenger_is_rolled_back_and_the_champion_keeps_the_traffic(drill_registry, fault):
    cfg, workdir = drill_registry
    before = _registry_state(cfg)
    result = canary_drill(cfg, workdir, fault)
    assert result["verdict"] == "rolled_back" and result["caught"] is True, result["reason"]
    assert result["router_weights"] == {"champion": 100, "challenger": 0}
    assert _registry_state(cfg) == before  # no alias moved, nothing written to the ledger
    assert result["requests_to_decision"] <= 1200  # a healthy challenger needs about as many to be promoted
    assert result["steps"][-1]["action"] == "rollback" and result["steps"][-1]["weight"] == 50
    run = MlflowClient().get_run(result["mlflow_run_id"])
    assert run.data.tags["fault"] == fault and run.data.tags["verdict"] == "rolled_back"
    assert run.info.artifact_uri.startswith((workdir / "mlartifacts").resolve().as_uri())  # not the cwd's mlruns/
    assert (workdir / result["artifacts"] / "timeline.png").stat().st_size > 10_000


def test_a_healthy_challenger_is_promoted_beside_a_cpu_hog_and_every_dashboard_metric_is_scraped(drill_registry):
    """A busy process per core runs beside the drill, as other jobs do on a shared node: the servers are
    starved, yet the healthy challenger is promoted at the product's slow_tolerance (1), because slow requests
    are judged against the champion serving at the same time, a look at a time: a stall that slows all of one
    server's requests at once counts once (rollout/analysis.py, LookTest). Meanwhile the acceptance
    check of the dashboards and alerts: every metric they query is in a real /metrics scrape of the router and
    both model servers."""
    from tests.observability import missing_from_scrape, queried_metrics

    cfg, workdir = drill_registry
    before = _registry_state(cfg)
    urls: dict[str, str] = {}
    scraped: list[str] = []

    def scrape_at_first_look(stage, done, total, **info):
        if not scraped:  # one batch has gone through both variants by the first look
            scraped.extend(urllib.request.urlopen(url, timeout=10).read().decode() for url in urls.values())

    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        result = canary_drill(cfg, workdir, "none", reporter=scrape_at_first_look, on_start=urls.update)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert set(urls) == {"router", "champion", "challenger"}
    assert queried_metrics(), "the dashboards and alerts query no canaryflow metric at all"
    assert missing_from_scrape("\n".join(scraped)) == {}
    assert 'canaryflow_canary_state{model_version="' in scraped[0] and 'state="canary"} 1.0' in scraped[0]
    assert result["verdict"] == "promoted" and result["caught"] is True, result["reason"]
    assert result["router_weights"] == {"champion": 0, "challenger": 100}
    assert [step["weight"] for step in result["steps"]] == [50, 100]
    assert _registry_state(cfg) == before


def test_the_drill_command_reports_json_and_a_shadow_phase_catches_garbage_before_users_see_it(drill_registry):
    cfg, workdir = drill_registry
    before = _registry_state(cfg)
    args = ("canary", "drill", "--fault", "quality=garbage", "--json", "--workdir", str(workdir))
    done = run_cli(*args, *quick_canary_args(), "--set", "canary.shadow_requests=300")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["verdict"] == "rolled_back" and isinstance(result["requests_to_decision"], int)
    assert "online chrF" in result["reason"] and result["reason"].startswith("shadow phase")
    # Mirrored, not routed: every answer users got came from the champion.
    (shadow,) = result["steps"]
    assert shadow["phase"] == "shadow" and shadow["champion"]["requests"] == shadow["requests"]
    assert shadow["challenger"]["requests"] == shadow["requests"]  # and each was mirrored to the challenger
    assert result["router_weights"] == {"champion": 100, "challenger": 0}
    assert _registry_state(cfg) == before
