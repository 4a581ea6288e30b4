"""The model server: one model behind /predict, KServe's V1 and the Open Inference Protocol v2 (serving/app.py),
with input limits, dynamic batching, drift and per-version metrics.

Run as `canaryflow serve --model-uri URI` or `python -m canaryflow.serving.server`. The model is loaded
once at start-up through MLflow pyfunc (a `models:/` URI resolves its alias then, and a directory holding
an `MLmodel` file is read the same way), or from a saved transformers model directory. `--fault SPEC`
makes the server misbehave on purpose, for canary drills (see faults.py).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from canaryflow.config import ServingConfig
from canaryflow.errors import BadInputError, CanaryflowError
from canaryflow.evaluation.online import sentence_chrf
from canaryflow.serving.faults import Fault, parse_fault
from canaryflow.serving.http import LATENCY_BUCKETS, RequestError
from canaryflow.serving.inputlog import InputLog

MAX_INPUT_CHARS = 16_384  # checked before tokenizing: a megabyte string must not cost a tokenizer pass to refuse
TOKEN_BUCKETS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
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


class Batcher:
    """Dynamic batching: inputs that arrive from concurrent requests within `max_latency_ms` of the first are
    generated as one batch of at most `max_size` (the generator sorts a batch by length itself), one batch at a
    time: concurrent torch calls on one device only fight over it.

    No thread of its own: submit() blocks its caller until its own answers are back, and the caller that finds
    the device free generates, its own batch and any queued before it, then hands the device straight to the
    oldest request still queued, waking that one thread alone. A lone request so costs no hop to another thread
    and back (with a batching thread, its p50 was 1.1x to 1.2x the one-at-a-time server's), and a queue under
    load keeps one wake-up per batch. Any number of request threads (an ASGI app's thread pool) can share one
    Batcher."""

    def __init__(self, generate, max_size: int, max_latency_ms: float, on_batch=None):
        self._generate = generate
        self.max_size, self.max_latency_s = max_size, max_latency_ms / 1000
        self._on_batch = on_batch or (lambda size, waits: None)
        self._queue: deque[_Pending] = deque()
        self._arriving = 0  # requests on their way to submit() (checking limits, logging): worth waiting for
        self._generating = False  # a caller holds the device
        self._demand = 1  # requests in the last batch: how many to expect in the next one
        self._ready = threading.Condition()  # only the caller holding the device waits on it, for arrivals

    @contextmanager
    def arriving(self):
        """Around a request's way to submit(): while one is on its way, a batch waits for it (within the window);
        with none, a lone request starts at once instead of waiting out the window for nobody. The ticket it
        yields goes to submit(), which stops counting the request as it queues it, in one step."""
        ticket = _Ticket()
        with self._ready:
            self._arriving += 1
        try:
            yield ticket
        finally:
            with self._ready:
                if not ticket.queued:
                    self._arriving -= 1
                    self._ready.notify()

    def submit(self, inputs: list[str], ticket: _Ticket | None = None) -> list[str]:
        pending = _Pending(inputs)
        with self._ready:
            self._queue.append(pending)
            if ticket is not None and not ticket.queued:
                ticket.queued = True
                self._arriving -= 1
            self._ready.notify()
            pending.leads = not self._generating
            self._generating = True
        while not pending.leads:
            pending.wake.wait()
            if pending.done:
                break
        else:
            try:
                while not pending.done:
                    self._run(self._take())
            finally:
                with self._ready:
                    if self._queue:
                        self._queue[0].leads = True
                        self._queue[0].wake.set()
                    else:
                        self._generating = False
        if pending.error is not None:
            raise pending.error
        return pending.answers

    def _take(self) -> list[_Pending]:
        """The next batch: the oldest request, then whatever else fits before the window closes."""
        with self._ready:
            batch = [self._queue.popleft()]
            size = len(batch[0].inputs)
            deadline = batch[0].arrived + self.max_latency_s
            while size < self.max_size:
                if self._queue:
                    if size + len(self._queue[0].inputs) > self.max_size:
                        break
                    batch.append(self._queue.popleft())
                    size += len(batch[-1].inputs)
                    continue
                left = deadline - time.monotonic()
                # Worth waiting for: a request already on its way in, or as many requests as the last batch had.
                # Under load, the first request after a batch otherwise ran alone while the rest queued behind
                # it (measured at concurrency 4: 40 % more throughput this way); one at a time, nothing waits.
                if left <= 0 or not (self._arriving or len(batch) < self._demand):
                    break
                self._ready.wait(left)
            self._demand = len(batch)
            return batch

    def _run(self, batch: list[_Pending]) -> None:
        started = time.monotonic()
        inputs = [text for pending in batch for text in pending.inputs]
        try:
            self._on_batch(len(inputs), [started - pending.arrived for pending in batch])
            answers = self._generate(inputs)
        except Exception as exc:  # every request of the batch gets the failure; the next batch runs on
            for pending in batch:
                pending.error = exc
        else:
            for pending in batch:
                pending.answers, answers = answers[: len(pending.inputs)], answers[len(pending.inputs) :]
        for pending in batch:
            pending.done = True
            pending.wake.set()


class _Pending:
    def __init__(self, inputs: list[str]):
        self.inputs = inputs
        self.arrived = time.monotonic()
        self.answers: list[str] = []
        self.error: Exception | None = None
        self.done = False
        self.leads = False  # this request's thread holds the device
        self.wake = threading.Event()  # set once done, or once handed the device


class _Ticket:
    """A request on its way to Batcher.submit(); `queued` once submit() has taken it off the arrivals."""

    queued = False


class ModelService:
    """One model behind every protocol the server speaks: the limits, the input log, drift, the drill faults,
    dynamic batching and the per-version metrics live here, so that /predict, KServe V1 and the Open Inference
    Protocol all get them alike. `serving` sets the limits (the input-token limit defaults to the length the
    model was trained on), `profile` the training data's input profile behind the drift gauge (none: no gauge),
    `input_log` where sampled inputs go."""

    def __init__(
        self,
        generator,
        variant: str,
        model_version: str,
        fault: Fault | None = None,
        *,
        serving: ServingConfig | None = None,
        profile: dict | None = None,
        input_log: InputLog | None = None,
    ):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.generator, self.variant, self.model_version = generator, variant, model_version
        self.serving = serving = serving or ServingConfig()
        self.max_tokens = serving.max_input_tokens or getattr(generator, "max_source_length", None)
        # A copy for counting tokens in the request threads: a fast tokenizer keeps its padding and truncation
        # settings in one shared Rust object that every call rewrites, so counting (no padding) beside the
        # batcher's padded generation on the same object made some batches fail to build their tensors.
        tokenizer = getattr(generator, "tokenizer", None)
        self.tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self.fault = fault or parse_fault("none")
        self.input_log = input_log
        self.registry = registry = CollectorRegistry()
        labels = ("variant", "model_version")
        self._requests = Counter(
            "canaryflow_server_requests", "Predict requests by outcome.", (*labels, "code"), registry=registry
        )
        self._latency = Histogram(
            "canaryflow_server_latency_seconds", "Predict latency.", labels, buckets=LATENCY_BUCKETS, registry=registry
        )
        self._input_tokens = Histogram(
            "canaryflow_server_input_tokens",
            "Tokens per input answered: long inputs drive memory.",
            labels,
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self._output_tokens = Histogram(
            "canaryflow_server_output_tokens", "Tokens per answer.", labels, buckets=TOKEN_BUCKETS, registry=registry
        )
        self._refused = Counter(
            "canaryflow_server_refused",
            "Requests refused for their size: input_too_long, too_many_inputs, body_too_large.",
            (*labels, "reason"),
            registry=registry,
        )
        self._quality = Histogram(
            "canaryflow_server_quality_chrf",
            "chrF (0-100) of answers to requests that brought references: online quality where labels come back.",
            labels,
            buckets=CHRF_BUCKETS,
            registry=registry,
        )
        self._logged = Counter(
            "canaryflow_server_input_log_records", "Sampled requests written to the input log.", labels,
            registry=registry,
        )  # fmt: skip
        self._batch_size = Histogram(
            "canaryflow_server_batch_size", "Inputs generated together in one batch.", labels,
            buckets=BATCH_BUCKETS, registry=registry,
        )  # fmt: skip
        self._queue_wait = Histogram(
            "canaryflow_server_queue_wait_seconds", "Time a request waited for its batch to start.", labels,
            buckets=LATENCY_BUCKETS, registry=registry,
        )  # fmt: skip
        limit = Gauge(
            "canaryflow_server_max_input_tokens", "Longest input accepted, in tokens.", labels, registry=registry
        )
        # Every series exists from the start, so dashboards and alerts see 0 rather than "no data" before the first
        # request of its kind.
        for metric in (self._latency, self._input_tokens, self._output_tokens, self._quality, self._logged,
                       self._batch_size, self._queue_wait):  # fmt: skip
            metric.labels(variant, model_version)
        # Every code this server answers a prediction with: Prometheus' increase() cannot count a series' first
        # value, so a 500 series born at 1 would hide the first error from the canary's queries.
        for code in ("200", "400", "404", "413", "500", "503"):
            self._requests.labels(variant, model_version, code)
        for reason in ("input_too_long", "too_many_inputs", "body_too_large"):
            self._refused.labels(variant, model_version, reason)
        if self.max_tokens:
            limit.labels(variant, model_version).set(self.max_tokens)
        self.drift = None
        if profile is not None:
            self.drift = DriftCollector(
                profile, serving.drift_window, {"variant": variant, "model_version": model_version}
            )
            registry.register(self.drift)
        if _cuda_available():
            registry.register(_GpuMemory({"variant": variant, "model_version": model_version}))
        self.batcher = Batcher(generator.generate, serving.batch.max_size, serving.batch.max_latency_ms, self._batched)

    def _batched(self, size: int, waits: list[float]) -> None:
        self._batch_size.labels(self.variant, self.model_version).observe(size)
        for wait in waits:
            self._queue_wait.labels(self.variant, self.model_version).observe(wait)

    def health(self) -> dict:
        return {
            "status": "ok",
            "variant": self.variant,
            "model_version": self.model_version,
            "max_input_tokens": self.max_tokens,
            "max_inputs_per_request": self.serving.max_inputs_per_request,
        }

    def refused_body(self) -> None:
        self._refused.labels(self.variant, self.model_version, "body_too_large").inc()

    def count(self, status: int, started: float) -> None:
        self._requests.labels(self.variant, self.model_version, str(status)).inc()
        self._latency.labels(self.variant, self.model_version).observe(time.perf_counter() - started)

    def answer(self, inputs: list[str], references: list[list[str]] | None, logged: dict) -> list[str]:
        """Predictions for `inputs`, after the limits (RequestError 413), the input log (`logged` is the record
        written, protocol aside) and the drill faults; then the token and quality metrics. Blocks while its batch
        runs: call it from a worker thread."""
        with self.batcher.arriving() as ticket:
            lengths = self._admit(inputs, references, logged)
            answers = self.batcher.submit(inputs, ticket)
        predictions = self.fault.after_predict(answers)
        for n in lengths:
            self._input_tokens.labels(self.variant, self.model_version).observe(n)
        for n in self._token_counts(predictions):
            self._output_tokens.labels(self.variant, self.model_version).observe(n)
        for prediction, refs in zip(predictions, references or [[] for _ in inputs]):
            score = sentence_chrf(prediction, refs)
            if score is not None:
                self._quality.labels(self.variant, self.model_version).observe(score)
        return predictions

    def _admit(self, inputs: list[str], references: list[list[str]] | None, logged: dict) -> list[int]:
        """The limits (RequestError), the input log, drift and the drill's injected failure or delay; each
        input's token count."""
        if not inputs:
            raise RequestError(400, "no inputs: give at least one string")
        if len(inputs) > self.serving.max_inputs_per_request:
            self._refused.labels(self.variant, self.model_version, "too_many_inputs").inc()
            raise RequestError(
                413, f"{len(inputs)} inputs exceed the limit of {self.serving.max_inputs_per_request} per request"
            )
        lengths = self._check_lengths(inputs)
        if self.input_log is not None and self.input_log.record(logged):
            self._logged.labels(self.variant, self.model_version).inc()
        if self.drift is not None:
            self.drift.add(inputs)
        if self.fault.before_predict():
            raise RuntimeError(f"injected fault {self.fault}")
        return lengths

    def _token_counts(self, texts: list[str]) -> list[int]:
        if self.tokenizer is None:  # a generator without a tokenizer (none ships one) is measured in words
            return [len(t.split()) for t in texts]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]

    def _check_lengths(self, inputs: list[str]) -> list[int]:
        """Each input's token count; 413 naming the first input over the limit."""
        longest = max(len(x) for x in inputs)
        if longest > MAX_INPUT_CHARS:
            self._refused.labels(self.variant, self.model_version, "input_too_long").inc()
            raise RequestError(413, f"an input of {longest} characters exceeds the limit of {MAX_INPUT_CHARS}")
        lengths = self._token_counts(inputs)
        over = next(((i, n) for i, n in enumerate(lengths) if self.max_tokens and n > self.max_tokens), None)
        if over is not None:
            self._refused.labels(self.variant, self.model_version, "input_too_long").inc()
            i, n = over
            raise RequestError(
                413,
                f"input {i + 1} of {len(inputs)} is {n} tokens long; this model takes at most {self.max_tokens} "
                "(serving.max_input_tokens): shorten or split it",
            )
        return lengths


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class _GpuMemory:
    """GPU memory in use, read when /metrics is scraped: what a batch too large for the device shows first."""

    def __init__(self, labels: dict[str, str]):
        self._labels = labels

    def collect(self):
        import torch
        from prometheus_client.core import GaugeMetricFamily

        gauge = GaugeMetricFamily(
            "canaryflow_server_gpu_memory_bytes", "GPU memory allocated by the model server.",
            labels=[*self._labels, "device"],
        )  # fmt: skip
        for index in range(torch.cuda.device_count()):
            gauge.add_metric([*self._labels.values(), str(index)], torch.cuda.memory_allocated(index))
        yield gauge


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
    if not log_dir and serving.input_log.upload_uri:
        # Shipped as each file closes, so the pod's own temp is only where a file fills before it leaves.
        log_dir = str(Path(tempfile.gettempdir()) / "canaryflow-input-log")
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
    parser.add_argument(
        "--model-name", default="model", help="the name KServe's V1 and v2 routes answer for (/v1/models/NAME)"
    )
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
    from canaryflow.serving.app import make_app, serve

    # What is loaded now lives as long as the server: frozen, no collection walks it again, neither while
    # requests wait on one nor at exit, where torch's and transformers' objects cost the stop a second or two.
    gc.freeze()
    service = ModelService(
        generator, args.variant, args.model_version, fault, serving=serving, profile=profile, input_log=input_log
    )
    drill = f" with injected fault {fault}" if fault.kind != "none" else ""

    def bound(port: int) -> None:
        if args.port_file:
            tmp = Path(args.port_file + ".tmp")
            tmp.write_text(str(port))
            os.replace(tmp, args.port_file)  # atomic: a reader never sees a half-written port
        print(
            f"serving {args.model_uri} as {args.variant} ({args.model_name}) on http://{args.host}:{port}{drill}",
            file=sys.stderr,
            flush=True,
        )

    try:
        serve(make_app(service, args.model_name), args.host, args.port, serving.drain_s, on_bound=bound)
    except KeyboardInterrupt:
        pass
    finally:
        if input_log is not None:  # after the drain: what the last requests logged is shipped too
            input_log.close(timeout=serving.drain_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
