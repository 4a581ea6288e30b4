"""The HTTP model server: /health, /predict, /metrics, with input limits.

Run as `canaryflow serve --model-uri URI` or `python -m canaryflow.serving.server`. The model is loaded
once at start-up through MLflow pyfunc (a `models:/` URI resolves its alias then, and a directory holding
an `MLmodel` file is read the same way), or from a saved transformers model directory. `--fault SPEC`
makes the server misbehave on purpose, for canary drills (see faults.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections import deque
from pathlib import Path

from canaryflow.config import ServingConfig
from canaryflow.errors import BadInputError, CanaryflowError
from canaryflow.evaluation.online import sentence_chrf
from canaryflow.serving.faults import Fault, parse_fault
from canaryflow.serving.http import LATENCY_BUCKETS, RequestError, ServiceHandler, serve_in_thread
from canaryflow.serving.inputlog import InputLog

MAX_INPUT_CHARS = 16_384  # checked before tokenizing: a megabyte string must not cost a tokenizer pass to refuse
TOKEN_BUCKETS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
CHRF_BUCKETS = tuple(range(10, 101, 10))


def load_generator(model_uri: str, num_threads: int):
    """(generator, input profile of its training data or None) from a `models:/` URI or an MLflow model
    directory (what KServe's storage initializer puts in /mnt/models) through pyfunc, or from a saved
    transformers directory, which carries no profile."""
    path = Path(model_uri)
    if path.is_dir() and not (path / "MLmodel").is_file():
        from canaryflow.inference.predictor import load_predictor

        return load_predictor(model_uri, num_threads=num_threads), None
    import mlflow.pyfunc
    import torch

    torch.set_num_threads(num_threads)
    python_model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    generator = getattr(python_model, "generator", None)
    if generator is None:
        raise BadInputError(f"{model_uri} is an MLflow model, but not one logged by canaryflow")
    return generator, getattr(python_model, "input_profile", None)


class DriftCollector:
    """Drift of the server's recent inputs against its model's training data, computed when /metrics is
    scraped (not per request): the same Jensen-Shannon distances the data card and `drift check` report."""

    def __init__(self, profile: dict, window: int, labels: dict[str, str]):
        self._profile = profile
        self._recent: deque[str] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._labels = labels

    def add(self, inputs: list[str]) -> None:
        with self._lock:
            self._recent.extend(inputs)

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from canaryflow.data.card import drift, profile_against

        with self._lock:
            recent = list(self._recent)
        names, values = list(self._labels), list(self._labels.values())
        size = GaugeMetricFamily(
            "canaryflow_server_drift_window_inputs", "Recent inputs the drift gauge is measured over.", labels=names
        )
        size.add_metric(values, len(recent))
        yield size
        if not recent:
            return
        distance = drift(profile_against(recent, self._profile), self._profile)
        gauge = GaugeMetricFamily(
            "canaryflow_server_input_drift",
            "Jensen-Shannon distance (0-1) of recent inputs against the model's training data, per feature.",
            labels=[*names, "feature"],
        )
        for feature, value in distance.items():
            gauge.add_metric([*values, feature], value)
        yield gauge


def make_handler(
    generator,
    variant: str,
    model_version: str,
    fault: Fault | None = None,
    *,
    serving: ServingConfig | None = None,
    profile: dict | None = None,
    input_log: InputLog | None = None,
):
    """The request handler class of one model server. `serving` sets the limits (the input-token limit
    defaults to the length the model was trained on), `profile` the training data's input profile behind the
    drift gauge (none: no gauge), `input_log` where sampled inputs go."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    serving = serving or ServingConfig()
    max_tokens = serving.max_input_tokens or getattr(generator, "max_source_length", None)
    tokenizer = getattr(generator, "tokenizer", None)
    metrics_registry = CollectorRegistry()
    labels = ("variant", "model_version")
    requests = Counter(
        "canaryflow_server_requests", "Predict requests by outcome.", (*labels, "code"), registry=metrics_registry
    )
    latency = Histogram(
        "canaryflow_server_latency_seconds",
        "Predict latency.",
        labels,
        buckets=LATENCY_BUCKETS,
        registry=metrics_registry,
    )
    input_tokens = Histogram(
        "canaryflow_server_input_tokens",
        "Tokens per input answered: long inputs drive memory.",
        labels,
        buckets=TOKEN_BUCKETS,
        registry=metrics_registry,
    )
    output_tokens = Histogram(
        "canaryflow_server_output_tokens",
        "Tokens per answer.",
        labels,
        buckets=TOKEN_BUCKETS,
        registry=metrics_registry,
    )
    refused = Counter(
        "canaryflow_server_refused",
        "Requests refused for their size: input_too_long, too_many_inputs, body_too_large.",
        (*labels, "reason"),
        registry=metrics_registry,
    )
    quality = Histogram(
        "canaryflow_server_quality_chrf",
        "chrF (0-100) of answers to requests that brought references: online quality where labels come back.",
        labels,
        buckets=CHRF_BUCKETS,
        registry=metrics_registry,
    )
    logged = Counter(
        "canaryflow_server_input_log_records",
        "Sampled requests written to the input log.",
        labels,
        registry=metrics_registry,
    )
    limit = Gauge(
        "canaryflow_server_max_input_tokens", "Longest input accepted, in tokens.", labels, registry=metrics_registry
    )
    # Every series exists from the start, so dashboards and alerts see 0 rather than "no data" before the first
    # request of its kind.
    for metric in (latency, input_tokens, output_tokens, quality, logged):
        metric.labels(variant, model_version)
    # Every code this server answers /predict with: Prometheus' increase() cannot count a series' first
    # value, so a 500 series born at 1 would hide the first error from the canary's queries.
    for code in ("200", "400", "413", "500"):
        requests.labels(variant, model_version, code)
    for reason in ("input_too_long", "too_many_inputs", "body_too_large"):
        refused.labels(variant, model_version, reason)
    if max_tokens:
        limit.labels(variant, model_version).set(max_tokens)
    drift = None
    if profile is not None:
        drift = DriftCollector(profile, serving.drift_window, {"variant": variant, "model_version": model_version})
        metrics_registry.register(drift)
    fault = fault or parse_fault("none")
    # One generation at a time: concurrent torch calls on a small CPU only thrash each other's caches.
    lock = threading.Lock()

    def token_counts(texts: list[str]) -> list[int]:
        if tokenizer is None:  # a generator without a tokenizer (none ships one) is measured in words
            return [len(t.split()) for t in texts]
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]

    class ModelHandler(ServiceHandler):
        registry = metrics_registry

        def health(self) -> dict:
            return {
                "status": "ok",
                "variant": variant,
                "model_version": model_version,
                "max_input_tokens": max_tokens,
                "max_inputs_per_request": serving.max_inputs_per_request,
            }

        def predict(self) -> None:
            fault.on_request()
            started = time.perf_counter()
            try:
                try:
                    body = self.read_json()
                except RequestError as exc:
                    if exc.status == 413:
                        refused.labels(variant, model_version, "body_too_large").inc()
                    raise
                inputs, references = self._inputs(body)
                lengths = self._check_lengths(inputs)
                if input_log is not None and input_log.record(body):
                    logged.labels(variant, model_version).inc()
                if drift is not None:
                    drift.add(inputs)
                if fault.before_predict():
                    raise RuntimeError(f"injected fault {fault}")
                with lock:
                    predictions = fault.after_predict(generator.generate(inputs))
                for n in lengths:
                    input_tokens.labels(variant, model_version).observe(n)
                for n in token_counts(predictions):
                    output_tokens.labels(variant, model_version).observe(n)
                for prediction, refs in zip(predictions, references):
                    score = sentence_chrf(prediction, refs)
                    if score is not None:
                        quality.labels(variant, model_version).observe(score)
                status, answer = 200, {"predictions": predictions, "model_version": model_version}
            except RequestError as exc:
                status, answer = exc.status, {"error": str(exc)}
            except Exception as exc:  # a model failure is a 500 for this request, never a dead server
                status, answer = 500, {"error": f"{type(exc).__name__}: {exc}"}
            requests.labels(variant, model_version, str(status)).inc()
            latency.labels(variant, model_version).observe(time.perf_counter() - started)
            self.send_json(status, answer, {"X-Model-Version": model_version})

        @staticmethod
        def _inputs(body: dict) -> tuple[list[str], list[list[str]]]:
            inputs = body.get("inputs")
            if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
                raise RequestError(400, "'inputs' must be a non-empty list of strings")
            if len(inputs) > serving.max_inputs_per_request:
                refused.labels(variant, model_version, "too_many_inputs").inc()
                raise RequestError(
                    413, f"{len(inputs)} inputs exceed the limit of {serving.max_inputs_per_request} per request"
                )
            references = body.get("references")
            if references is None:
                return inputs, [[] for _ in inputs]
            if not isinstance(references, list) or len(references) != len(inputs):
                raise RequestError(400, "'references', when given, must be a list with one entry per input")
            as_lists = [[r] if isinstance(r, str) else r for r in references]
            if not all(isinstance(r, list) and all(isinstance(x, str) for x in r) for r in as_lists):
                raise RequestError(400, "each entry of 'references' must be a string or a list of strings")
            return inputs, as_lists

        @staticmethod
        def _check_lengths(inputs: list[str]) -> list[int]:
            """Each input's token count; 413 naming the first input over the limit."""
            longest = max(len(x) for x in inputs)
            if longest > MAX_INPUT_CHARS:
                refused.labels(variant, model_version, "input_too_long").inc()
                raise RequestError(413, f"an input of {longest} characters exceeds the limit of {MAX_INPUT_CHARS}")
            lengths = token_counts(inputs)
            over = next(((i, n) for i, n in enumerate(lengths) if max_tokens and n > max_tokens), None)
            if over is not None:
                refused.labels(variant, model_version, "input_too_long").inc()
                i, n = over
                raise RequestError(
                    413,
                    f"input {i + 1} of {len(inputs)} is {n} tokens long; this model takes at most {max_tokens} "
                    "(serving.max_input_tokens): shorten or split it",
                )
            return lengths

    return ModelHandler


def _serving_config(text: str, max_input_tokens: int | None) -> ServingConfig:
    from pydantic import ValidationError

    try:
        serving = ServingConfig.model_validate_json(text)
        if max_input_tokens is not None:
            serving.max_input_tokens = max_input_tokens
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise BadInputError(f"--serving-config: serving.{where}: {first['msg']}") from None
    return serving


def _open_input_log(serving: ServingConfig, directory: str | None, variant: str, model_version: str):
    """The input log, or None; a directory that cannot be written (a read-only container filesystem) costs the
    log, with a warning, never the serving. A filter that would log what it must not stays an error."""
    log_dir = directory or serving.input_log.dir
    if not log_dir:
        return None
    try:
        return InputLog.open(serving.input_log, log_dir, variant, model_version)
    except BadInputError:
        raise
    except CanaryflowError as exc:
        print(f"warning: serving without an input log: {exc}", file=sys.stderr, flush=True)
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve one canaryflow model over HTTP on loopback.")
    parser.add_argument("--model-uri", required=True, help="models:/NAME/VERSION, models:/NAME@ALIAS or a directory")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 inside a container (KServe)")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the bound port here once the model is loaded")
    parser.add_argument("--variant", default="primary", help="label on metrics: champion, challenger, ...")
    parser.add_argument("--model-version", default="unknown", help="label on metrics and responses")
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument(
        "--fault", default="none", help="for drills: errors=P, latency_ms=N, quality=garbage, crash-after=N or none"
    )
    parser.add_argument("--fault-seed", type=int, default=0, help="seeds which requests errors=P fails")
    parser.add_argument(
        "--serving-config", default="{}", help="the config's serving section as JSON: limits, drift window, input log"
    )
    parser.add_argument("--max-input-tokens", type=int, help="overrides serving.max_input_tokens")
    parser.add_argument("--input-log-dir", help="write sampled inputs here (overrides serving.input_log.dir)")
    args = parser.parse_args(argv)
    try:
        fault = parse_fault(args.fault, args.fault_seed)
        serving = _serving_config(args.serving_config, args.max_input_tokens)
        input_log = _open_input_log(serving, args.input_log_dir, args.variant, args.model_version)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        generator, profile = load_generator(args.model_uri, args.num_threads)
    except Exception as exc:
        print(f"error: cannot load model {args.model_uri}: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    handler = make_handler(
        generator, args.variant, args.model_version, fault, serving=serving, profile=profile, input_log=input_log
    )
    server = serve_in_thread(handler, args.host, args.port)
    port = server.server_address[1]
    if args.port_file:
        tmp = Path(args.port_file + ".tmp")
        tmp.write_text(str(port))
        os.replace(tmp, args.port_file)  # atomic: a reader never sees a half-written port
    drill = f" with injected fault {fault}" if fault.kind != "none" else ""
    print(
        f"serving {args.model_uri} as {args.variant} on http://{args.host}:{port}{drill}", file=sys.stderr, flush=True
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
