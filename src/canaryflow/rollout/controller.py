"""The canary controller: shift traffic phase by phase, look after every batch of requests, then promote
or roll back through the registry.

Phases: an optional shadow phase (the challenger answers a mirror of every request; its answers are
compared, not returned), then the traffic steps of `canary.steps`. With no champion yet, the challenger
serves alone for a smoke check against absolute limits. After each batch the sequential tests of
rollout/analysis.py say promote this phase, roll back, or continue. `drive` is the loop itself, over any
`Traffic`: the local backend's replayed requests here, simulated variants in rollout/simulate.py.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import queue
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Protocol

from canaryflow import progress
from canaryflow.config import CanaryConfig, Config
from canaryflow.data.prepare import read_pairs
from canaryflow.errors import CanaryflowError
from canaryflow.evaluation.online import sentence_chrf
from canaryflow.registry import models
from canaryflow.rollout import analysis
from canaryflow.rollout.analysis import CONTINUE, INCONCLUSIVE, PROMOTE, ROLLBACK, Evidence, Observation, summarize
from canaryflow.rollout.local import LocalBackend, post_json
from canaryflow.stats import RunningPercentile

CHAMPION, CHALLENGER = "champion", "challenger"


class Traffic(Protocol):
    """What the controller needs from a backend: move the weights, and get the outcome of more requests."""

    def shift(self, weights: dict[str, int], mirror: bool = False) -> None:
        """Route by `weights`; with `mirror`, also copy every request to the challenger, whose answers are
        compared, not returned."""

    def send(self, count: int) -> list[Observation]: ...

    def send_mirrored(self, count: int) -> list[tuple[Observation, Observation]]: ...

    def settle(self) -> list:
        """The outcomes of requests still on their way (pairs in mirror mode), sending no more until the next
        `send`: the controller acts on a decision only with them in, as they are the slowest ones."""

    def elapsed(self) -> float: ...


def _timeline_point(started: float, sent: int, phase: str, weight: int, batch: list[Observation], found, look) -> dict:
    point = {"t_s": round(started, 3), "requests": sent, "phase": phase, "weight": weight, "action": look.action}
    for variant in (CHAMPION, CHALLENGER):
        stats = summarize(batch, variant)
        point[variant] = {"error_rate": stats.error_rate, "p95_ms": stats.p95_ms, "chrf": stats.mean_chrf}
    point["bounds"] = {b.sli: [round(b.low, 4), round(b.high, 4)] for b in found}
    return point


def drive(policy: CanaryConfig, traffic: Traffic, has_champion: bool, on_look=None) -> dict:
    """Run the rollout to a verdict over `traffic`; return the verdict (promoted, rolled_back or
    inconclusive), the evidence per phase and the timeline of every look. A promotion leaves the challenger
    with all the traffic; a rollback or an inconclusive canary leaves the champion with all of it."""
    evidence = Evidence(policy, has_champion)
    deciding = analysis.deciding_step(policy.steps)
    phases: list[tuple[str, int]] = []
    if has_champion and policy.shadow_requests:
        phases.append(("shadow", 0))
    phases += [("steps", w) for w in policy.steps] if has_champion else [("smoke", 100)]
    champion_latency = RunningPercentile()  # the champion's answers so far set the "slow" reference
    timeline: list[dict] = []
    results: list[dict] = []
    sent = 0
    step = 0
    for phase, weight in phases:
        mirrored = phase == "shadow"
        if mirrored:
            traffic.shift({CHAMPION: 100, CHALLENGER: 0}, mirror=True)
        else:
            traffic.shift({CHALLENGER: weight, CHAMPION: 100 - weight} if has_champion else {CHALLENGER: 100})
        if phase == "steps":
            evidence.new_step(step)
        phase_started, step_requests = traffic.elapsed(), 0
        seen: list[Observation] = []
        limit = policy.shadow_requests if mirrored else policy.max_requests_per_step
        limit_seconds, extensions = policy.max_step_seconds, 0
        settling = False
        while True:
            reference = policy.max_p95_ms if phase == "smoke" else champion_latency(95)
            if settling:
                got = traffic.settle()
                if not got:  # nothing was on its way: the decision stands
                    break
            else:
                got = traffic.send_mirrored(policy.batch_requests) if mirrored else traffic.send(policy.batch_requests)
            if mirrored:
                pairs = got
                batch = [o for pair in pairs for o in pair]
                for sli, values in analysis.paired_losses(pairs, reference).items():
                    evidence.add_pairs(sli, values)
                step_requests += len(pairs)
            else:
                batch = got
                losses = {}
                for variant in (CHAMPION, CHALLENGER):
                    losses[variant] = analysis.request_losses([o for o in batch if o.variant == variant], reference)
                    for sli, values in losses[variant].items():
                        evidence.add(variant, sli, values)
                served = sum(o.variant == CHALLENGER for o in batch)
                if has_champion:  # the router's weight for these requests, or on KServe the share they got
                    realized = getattr(traffic, "realized_shares", False)
                    evidence.add_events(losses, (served / len(batch) if batch else 0.0) if realized else weight / 100)
                step_requests += served
            sent += len(pairs) if mirrored else len(batch)
            for o in batch:
                if o.variant == CHAMPION and o.ok:
                    champion_latency.add(o.latency_ms)
            seen += batch
            found = analysis.bounds(evidence, policy, phase)
            decision = analysis.look(
                found, step_requests, traffic.elapsed() - phase_started, policy, limit, phase != "steps" or
                step == deciding, limit_seconds, weight < 100,
            )  # fmt: skip
            if decision.action == INCONCLUSIVE and mirrored:
                # The shadow phase ran its requests and found no harm: the traffic steps decide.
                decision = analysis.Look(PROMOTE, decision.checks[:-1])
            elif decision.action == INCONCLUSIVE and extensions < policy.undecided_extensions:
                extensions += 1
                limit += policy.max_requests_per_step
                limit_seconds += policy.max_step_seconds
                decision = analysis.Look(CONTINUE, decision.checks)
            timeline.append(_timeline_point(traffic.elapsed(), sent, phase, weight, batch, found, decision))
            if on_look is not None:
                on_look(phase, weight, step_requests, decision)
            if decision.action != CONTINUE and settling:
                break
            # A decision is looked at again with the requests still on their way: an answer the look could not
            # see is a slow one, or a timeout.
            settling = decision.action != CONTINUE
        results.append(
            {
                "phase": phase,
                "weight": weight,
                "requests": len(seen) // (2 if mirrored else 1),
                "challenger": summarize(seen, CHALLENGER).to_dict(),
                "champion": summarize(seen, CHAMPION).to_dict() if has_champion else None,
                "passed": decision.action == PROMOTE,
                **decision.to_dict(),
            }
        )
        if decision.action != PROMOTE:
            break
        step += phase == "steps"
    promoted = decision.action == PROMOTE
    if has_champion:  # in the smoke check there is no one else to give the traffic to
        traffic.shift({CHALLENGER: 100, CHAMPION: 0} if promoted else {CHAMPION: 100, CHALLENGER: 0})
    last = results[-1]
    where = "shadow phase" if last["phase"] == "shadow" else f"step at {last['weight']}%"
    failed = [reason for reason in last["reasons"] if reason.startswith("FAIL")]
    verdict = {PROMOTE: "promoted", ROLLBACK: "rolled_back", INCONCLUSIVE: "inconclusive"}[decision.action]
    reason = f"all {len(results)} phase(s) passed" if promoted else f"{where}: " + "; ".join(failed)
    if verdict == "inconclusive":
        reason += "; neither harm nor every margin shown: the champion keeps serving"
    return {
        "mode": "canary" if has_champion else "smoke",
        "verdict": verdict,
        "reason": reason,
        "requests": sent,
        "requests_to_decision": sent,
        "steps": results,
        "timeline": timeline,
    }


def send_one(url: str, text: str, references: list[str], timeout: float) -> tuple[Observation, str | None]:
    """One request through the router: its outcome, and the router's request id (to pair a mirrored answer)."""
    started = time.perf_counter()
    try:
        # The references ride along, as labels that came back would: the servers export online quality from them.
        payload = {"inputs": [text], "references": [references]} if references else {"inputs": [text]}
        status, body, headers = post_json(url + "/predict", json.dumps(payload).encode(), timeout)
    except OSError:
        # The router itself did not answer; count it against nobody rather than guess a variant.
        return Observation("unrouted", False, (time.perf_counter() - started) * 1000), None
    latency_ms = (time.perf_counter() - started) * 1000
    return score_answer(headers.get("X-Canary-Variant", "unrouted"), status, body, latency_ms, references), (
        headers.get("X-Request-Id")
    )


def score_answer(variant: str, status: int, body: bytes, latency_ms: float, references: list[str]) -> Observation:
    if status != 200:
        return Observation(variant, False, latency_ms)
    try:
        prediction = json.loads(body)["predictions"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return Observation(variant, False, latency_ms)
    return Observation(variant, True, latency_ms, sentence_chrf(prediction, references))


def _canary_state(weights: dict[str, int], mirror: bool) -> str:
    """What a shift means: drive's last shift gives all the traffic to one side, the verdict."""
    challenger = weights.get(CHALLENGER, 0)
    if mirror:
        return "shadow"
    if CHAMPION in weights and challenger in (0, 100):
        return "promoted" if challenger == 100 else "rolled_back"
    return "canary"


class ReplayedTraffic:
    """Traffic for the local backend: test inputs replayed (cycling) through the router by `concurrency`
    clients, each sending its next request as soon as the last is answered, as a load generator keeps its
    concurrency. `send(count)` returns the next `count` answers (in the order they came) while the clients go
    on with `concurrency` more, so the servers never wait for the controller's look: a batch that waited for
    its last answer left the servers short of requests at every look, and the canary took a third longer.
    `settle()` stops the clients and returns the answers still owed."""

    def __init__(self, backend: LocalBackend, inputs: list[str], references: list[list[str]], policy: CanaryConfig):
        self.backend = backend
        self._items = itertools.cycle(list(zip(inputs, references)))
        self._timeout = policy.request_timeout_s
        self._ahead = policy.concurrency
        self._permits = threading.Semaphore(0)  # one per request the clients may still send
        self._answers: queue.SimpleQueue = queue.SimpleQueue()
        self._owed = 0  # permits given whose answers the controller has not taken yet
        self._lock = threading.Lock()
        self._mirror = False
        self._closed = False
        self._clients = [
            threading.Thread(target=self._client, name=f"replay-{i}", daemon=True) for i in range(policy.concurrency)
        ]
        for client in self._clients:
            client.start()
        self._started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def shift(self, weights: dict[str, int], mirror: bool = False) -> None:
        # drive() settles before it shifts. Answers still owed here were routed at the old weights, so they
        # cannot count at the new ones: they are waited for and dropped.
        self.settle()
        router = self.backend.router
        router.set_weights({k: v for k, v in weights.items() if k in router.backends})
        router.set_mirror(CHAMPION, CHALLENGER) if mirror else router.set_mirror(None, None)
        router.set_canary_state(_canary_state(weights, mirror), router.versions[CHALLENGER])
        self._mirror = mirror

    def _client(self) -> None:
        while True:
            self._permits.acquire()
            if self._closed:
                return
            with self._lock:
                text, references = next(self._items)
            try:
                answer = self._ask(text, references, self._mirror)
            except BaseException as exc:  # the controller gets it, instead of waiting for an answer for ever
                answer = exc
            self._answers.put(answer)

    def _ask(self, text: str, references: list[str], mirror: bool):
        """One request's Observation, or in mirror mode the (champion, challenger) pair for it."""
        champion, request_id = send_one(self.backend.router.url, text, references, self._timeout)
        if not mirror:
            return champion
        shadow = self.backend.router.mirrored(request_id, self._timeout) if request_id else None
        if shadow is None:  # the mirror never came back: the challenger failed this request
            return champion, Observation(CHALLENGER, False, self._timeout * 1000)
        return champion, score_answer(CHALLENGER, shadow.status, shadow.body, shadow.latency_ms, references)

    def _take(self, count: int, ahead: int) -> list:
        """The next `count` answers, with `ahead` more requests left on their way."""
        more = count + ahead - self._owed
        if more > 0:
            self._owed += more
            self._permits.release(more)
        answers = []
        for _ in range(min(count, self._owed)):
            answer = self._answers.get()
            self._owed -= 1
            if isinstance(answer, BaseException):
                raise answer
            answers.append(answer)
        return answers

    def send(self, count: int) -> list[Observation]:
        return self._take(count, self._ahead)

    def send_mirrored(self, count: int) -> list[tuple[Observation, Observation]]:
        return self._take(count, self._ahead)

    def settle(self) -> list:
        return self._take(self._owed, 0)

    def close(self) -> None:
        """Stop the clients; a request on its way is answered (or times out) first."""
        self._closed = True
        self._permits.release(len(self._clients))
        for client in self._clients:
            client.join()


def _spread(count: int, marked: int) -> list[bool]:
    """`marked` of `count` flags spread evenly: a scrape window's counts carry no order within it."""
    return [(i + 1) * marked // count > i * marked // count for i in range(count)] if count else []


def _chrf_values(per_bucket: list[int]) -> list[float]:
    """One chrF per answer counted in a bucket of the server's chrF histogram, at the bucket's middle."""
    from canaryflow.serving.server import CHRF_BUCKETS

    values, low = [], 0
    for high, count in zip(CHRF_BUCKETS, per_bucket):
        values += [(low + high) / 2] * count
        low = high
    return values


class KServeTraffic:
    """Traffic for the KServe backend: live requests, read from Prometheus at every look as what each
    variant's counters gained since the look before (the backend reads increases since the canary began, and
    this keeps the largest value seen of each, so a count never goes back). "Slow" is one threshold for the
    whole canary, `threshold_ms`, so that counts read at different looks add up. Knative splits traffic by
    its own means, so the event tests take each look's realized share of requests (the count form)."""

    realized_shares = True

    def __init__(self, backend, policy: CanaryConfig, threshold_ms: float, sleep=time.sleep):
        from canaryflow.rollout.kserve import VariantCounts

        self.backend = backend
        self.policy = policy
        self.threshold_ms = threshold_ms
        self._sleep = sleep
        self._started = time.monotonic()
        self._looked = 0.0  # the sleeps: the elapsed time when `sleep` is not a real one
        self._seen = {variant: VariantCounts(0, 0, 0, None) for variant in (CHAMPION, CHALLENGER)}
        self._empty_looks = 0

    def elapsed(self) -> float:
        return max(self._looked, time.monotonic() - self._started)

    def shift(self, weights: dict[str, int], mirror: bool = False) -> None:
        self.backend.set_weight(weights.get(CHALLENGER, 0))

    def send(self, count: int) -> list[Observation]:
        from canaryflow.rollout.kserve import NoSeries, VariantCounts

        kserve = self.policy.kserve
        wait = kserve.look_interval_s
        if not self._looked:
            # The first look waits for four scrapes after the canary began: a shorter window would reach back
            # into the traffic before it (the champion's), counted once and then missing from the looks after.
            wait = max(wait, 4 * kserve.scrape_interval_s - self.backend.since_start())
        self._sleep(wait)
        self._looked += wait
        try:
            counts = self.backend.read(self.threshold_ms)
        except NoSeries as exc:
            self._empty_looks += 1
            if self._empty_looks >= kserve.max_empty_looks:
                raise CanaryflowError(
                    f"{exc}, at {self._empty_looks} looks in a row (canary.kserve.max_empty_looks): is the predictor "
                    "serving, and does Prometheus scrape it (manifests/observability/podmonitor.yaml)?"
                ) from None
            print(f"kserve: {exc}; looking again", file=sys.stderr, flush=True)
            return []
        self._empty_looks = 0
        batch = []
        for variant, now in counts.items():
            seen = self._seen[variant]
            new = max(0, now.requests - seen.requests)
            errors = min(new, max(0, now.errors - seen.errors))
            slow = min(new, max(0, now.slow - seen.slow))
            chrfs = _chrf_values([max(0, a - b) for a, b in zip(now.quality, seen.quality)])
            self._seen[variant] = VariantCounts(
                max(seen.requests, now.requests),
                max(seen.errors, now.errors),
                max(seen.slow, now.slow),
                now.p95_ms,
                tuple(max(a, b) for a, b in zip(now.quality, seen.quality)),
            )
            answered = iter(chrfs)
            for failed, slowed in zip(_spread(new, errors), _spread(new, slow)):
                chrf = None if failed else next(answered, None)
                batch.append(Observation(variant, not failed, now.p95_ms or 0.0, chrf, slowed))
        return batch

    def settle(self) -> list:
        return []  # a look reads what Prometheus counted: the controller waits for no request of its own

    def send_mirrored(self, count: int) -> list[tuple[Observation, Observation]]:
        raise CanaryflowError("KServe's canary does not mirror requests: the shadow phase needs the local backend")


def _kserve_parts(cfg: Config, versions: dict[str, str], holder: str, sleep, api, leases, prometheus):
    """The backend for `versions` (storage URI -> registered version) and the Lease it runs under."""
    from canaryflow.rollout.kserve import CanaryLease, KServeBackend, kubernetes_client

    kserve = cfg.canary.kserve
    if api is None or leases is None:
        from kubernetes import client

        api_client = kubernetes_client()
        api = api or client.CustomObjectsApi(api_client)
        leases = leases or client.CoordinationV1Api(api_client)
    backend = KServeBackend(cfg, api=api, prometheus=prometheus, sleep=sleep, versions=versions)
    backend.lease = CanaryLease(
        leases,
        backend.namespace,
        f"canaryflow-canary-{backend.name}",
        holder,
        kserve.lease_duration_s,
        kserve.lease_wait_s,
        sleep,
    )
    return backend


def _storage_uris(cfg: Config, versions: list[str]) -> dict[str, str]:
    """storage URI -> version, for each registered version."""
    from mlflow import MlflowClient

    from canaryflow.rollout.kserve import storage_uri

    client, name = MlflowClient(), cfg.registry.model_name
    destination = cfg.canary.kserve.artifacts_destination
    return {storage_uri(client.get_model_version_download_uri(name, v), destination): v for v in versions}


def serve_champion(cfg: Config, version: str, holder: str, sleep=time.sleep, api=None, leases=None) -> str:
    """Make the InferenceService serve `version` alone (creating it if missing), under the canary's Lease: for
    the first champion, and for `canaryflow rollback`. Returns where."""
    storages = _storage_uris(cfg, [version])
    backend = _kserve_parts(cfg, storages, holder, sleep, api, leases, prometheus=None)
    with backend.lease.held():
        backend.serve(next(iter(storages)))
    return backend.where


def run_kserve_canary(
    cfg: Config,
    version: str,
    champion_version: str,
    commit=None,
    holder: str = "",
    sleep=time.sleep,
    api=None,
    leases=None,
    prometheus=None,
):
    """The rollout on the InferenceService, under its Lease: deploy the challenger at 0 %, step it up on
    Prometheus' SLIs, then promote it (the canary percentage removed) or roll it back (the champion rolled out
    again). On a promotion `commit(result)` runs first (the registry's compare-and-set): serving changes for
    good only once the registry agrees, and a commit that fails rolls serving back. SIGTERM and SIGINT roll back
    too, before the process exits."""
    from canaryflow.rollout.kserve import LeaseLost, rollback_on_signals

    storage = {v: uri for uri, v in _storage_uris(cfg, [version, champion_version]).items()}
    backend = _kserve_parts(
        cfg, {uri: v for v, uri in storage.items()}, holder or f"canary of version {version}", sleep, api, leases,
        prometheus,
    )  # fmt: skip
    started = time.perf_counter()
    with rollback_on_signals(), backend.lease.held():
        try:
            backend.deploy(storage[champion_version], storage[version])
            baseline = backend.baseline_p95_ms(storage[champion_version])
            threshold = baseline or cfg.canary.max_p95_ms
            result = drive(cfg.canary, KServeTraffic(backend, cfg.canary, threshold, sleep=sleep), True)
            result["slow_threshold_ms"] = {"value": threshold, "from": "baseline" if baseline else "max_p95_ms"}
            if result["verdict"] == "promoted" and commit is not None:
                commit(result)
        except LeaseLost:
            raise  # another run steers the InferenceService now: rolling back would undo its work
        except BaseException:
            # Whatever failed, the champion gets all the traffic back; a rollback that fails too (the API server
            # is gone) must not hide the first error, which is the one to act on.
            with contextlib.suppress(Exception):
                backend.rollback()
            raise
        promoted = result["verdict"] == "promoted"
        if promoted:
            try:
                backend.promote()
            except CanaryflowError as exc:
                # The registry has moved and the challenger already takes all the traffic (the last step is
                # 100 %): the promotion stands, and the next deploy() drops the percentage left in the spec.
                result["warning"] = f"the challenger serves all the traffic, but {exc}"
                print(f"kserve: {result['warning']}", file=sys.stderr, flush=True)
        else:
            backend.rollback()
    result["router_weights"] = {CHALLENGER: 100, CHAMPION: 0} if promoted else {CHAMPION: 100, CHALLENGER: 0}
    result["seconds"] = round(time.perf_counter() - started, 2)
    result["backend"] = backend.where
    return result


def run_canary(
    cfg: Config,
    challenger: tuple[str, str],
    champion: tuple[str, str] | None,
    inputs: list[str],
    references: list[list[str]],
    log_dir: Path,
    faults: dict[str, str] | None = None,
    reporter=progress.emit,
    on_start=None,
) -> dict:
    """Run the rollout on the local backend; return verdict (promoted, rolled_back, inconclusive) and evidence, and
    the weights the router was left with (`router_weights`). `on_start` gets the /metrics URLs of the router
    and each server once they are up."""
    servers = {CHALLENGER: challenger}
    if champion is not None:
        servers[CHAMPION] = champion
    policy = cfg.canary
    started = time.perf_counter()
    # The servers resolve models:/ URIs themselves, so they get the same store explicitly.
    env = {"MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri} if cfg.mlflow.tracking_uri else {}

    def report(phase: str, weight: int, requests: int, decision) -> None:
        target = policy.min_requests_per_step
        reporter("canary", min(requests, target), target, weight=weight, phase=phase, action=decision.action)

    with LocalBackend(
        servers,
        policy.num_threads,
        policy.server_start_timeout_s,
        policy.request_timeout_s,
        log_dir,
        env,
        faults=faults,
        serving=cfg.serving,
    ) as backend:
        if on_start is not None:
            on_start(backend.metrics_urls())
        traffic = ReplayedTraffic(backend, inputs, references, policy)
        try:
            result = drive(policy, traffic, champion is not None, on_look=report)
            result["router_weights"] = dict(backend.router.weights)
            if result["verdict"] == "inconclusive":  # the last shift, back to the champion, read as a rollback
                backend.router.set_canary_state("inconclusive", backend.router.versions[CHALLENGER])
        finally:
            traffic.close()
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def plot_timeline(result: dict):
    """The traffic weight and each SLI per look over time, with the decision points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = result["timeline"]
    t = [p["t_s"] for p in timeline]
    fig, axes = plt.subplots(4, 1, figsize=(9, 9), sharex=True)
    axes[0].step(t, [p["weight"] if p["phase"] != "shadow" else 0 for p in timeline], where="post", color="black")
    axes[0].set_ylabel("challenger\ntraffic %")
    panels = (("error_rate", "error rate"), ("p95_ms", "p95 ms (batch)"), ("chrf", "online chrF"))
    for ax, (key, label) in zip(axes[1:], panels):
        for variant, colour in ((CHAMPION, "tab:blue"), (CHALLENGER, "tab:orange")):
            ys = [p[variant][key] for p in timeline]
            ax.plot(t, [float("nan") if y is None else y for y in ys], marker=".", color=colour, label=variant)
        ax.set_ylabel(label)
    axes[1].legend(loc="upper left", fontsize="small")
    for point in timeline:
        if point["action"] != CONTINUE:
            colour = {PROMOTE: "tab:green", INCONCLUSIVE: "tab:gray"}.get(point["action"], "tab:red")
            for ax in axes:
                ax.axvline(point["t_s"], color=colour, linestyle="--", linewidth=1)
            axes[0].annotate(point["action"], (point["t_s"], 102), fontsize="small", color=colour, rotation=90)
    axes[-1].set_xlabel("seconds since the canary began")
    title = f"canary: {result['verdict']} after {result['requests_to_decision']} requests ({result['reason']})"
    # Two lines of the width the figure holds: one line was cut at both edges.
    fig.suptitle("\n".join(textwrap.wrap(title, 95)[:2]), fontsize="medium")
    fig.tight_layout()
    return fig


def save_timeline(result: dict, out: Path) -> Path:
    import matplotlib.pyplot as plt

    fig = plot_timeline(result)
    path = out / "timeline.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def canary_rollout(cfg: Config, data_dir: str | Path, version: str, run_key: str, out_dir: str | Path) -> dict:
    """Canary `version` against the current champion, then promote it or roll it back in the registry."""
    import mlflow

    from canaryflow.registry.tracking import pipeline_run

    champion_version = models.alias_version(cfg, models.CHAMPION)
    if champion_version == version:
        raise CanaryflowError(f"version {version} is already the champion")
    test = read_pairs(data_dir, "test")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        # With no champion even a cluster smoke-checks the first version on a model server in the step's
        # own pod: there is nothing for KServe to split traffic with yet.
        if cfg.canary.backend == "kserve" and champion_version is not None:

            def commit(result: dict) -> None:
                result["aliases"] = models.promote(cfg, version, champion_version, result["reason"], run_key)

            result = run_kserve_canary(cfg, version, champion_version, commit, holder=f"pipeline run {run_key}")
        else:
            result = run_canary(
                cfg,
                (models.model_uri(cfg, version), version),
                (models.model_uri(cfg, champion_version), champion_version) if champion_version else None,
                list(test["input"]),
                [list(refs) for refs in test["references"]],
                out / "logs",
            )
    except Exception as exc:
        # No verdict is a rollback: the challenger must not keep its alias as if it were still in canary.
        models.reject(cfg, version, f"canary failed: {exc}")
        raise
    result["champion_version"] = champion_version
    result["challenger_version"] = version
    if result["verdict"] == "promoted":
        if "aliases" not in result:  # the KServe canary commits before it promotes serving
            result["aliases"] = models.promote(cfg, version, champion_version, result["reason"], run_key)
        if cfg.canary.backend == "kserve" and champion_version is None:
            # The smoke check ran in this pod: the cluster serves the first champion only from here on.
            try:
                result["backend"] = serve_champion(cfg, version, holder=f"pipeline run {run_key}")
            except CanaryflowError as exc:
                raise CanaryflowError(
                    f"version {version} is the champion in the registry, but the InferenceService does not serve it "
                    f"yet: {exc}; the next canary rolls it out first"
                ) from None
    else:
        result["aliases"] = models.reject(cfg, version, result["reason"], run_key, result["verdict"])
    (out / "canary.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    timeline = save_timeline(result, out)
    with pipeline_run(cfg, run_key):
        mlflow.log_dict(result, "canary/canary.json")
        mlflow.log_artifact(str(timeline), "canary")
        mlflow.log_metrics({"canary_requests": result["requests"], "canary_seconds": result["seconds"]})
        mlflow.set_tag("canary.verdict", result["verdict"])
    return result
