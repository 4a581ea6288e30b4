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
from pathlib import Path

from canaryflow.errors import BadInputError
from canaryflow.serving.faults import Fault, parse_fault
from canaryflow.serving.http import LATENCY_BUCKETS, RequestError, ServiceHandler, serve_in_thread

MAX_INPUTS = 64
MAX_INPUT_CHARS = 4096


def load_generator(model_uri: str, num_threads: int):
    """A `models:/` URI or an MLflow model directory (what KServe's storage initializer puts in /mnt/models)
    through pyfunc; any other directory as a saved transformers model."""
    path = Path(model_uri)
    if path.is_dir() and not (path / "MLmodel").is_file():
        from canaryflow.evaluation.generate import load_predictor

        return load_predictor(model_uri, num_threads=num_threads)
    import mlflow.pyfunc
    import torch

    torch.set_num_threads(num_threads)
    python_model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    generator = getattr(python_model, "generator", None)
    if generator is None:
        raise BadInputError(f"{model_uri} is an MLflow model, but not one logged by canaryflow")
    return generator


def make_handler(generator, variant: str, model_version: str, fault: Fault | None = None):
    from prometheus_client import CollectorRegistry, Counter, Histogram

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
    fault = fault or parse_fault("none")
    # One generation at a time: concurrent torch calls on a small CPU only thrash each other's caches.
    lock = threading.Lock()

    class ModelHandler(ServiceHandler):
        registry = metrics_registry

        def health(self) -> dict:
            return {"status": "ok", "variant": variant, "model_version": model_version}

        def predict(self) -> None:
            fault.on_request()
            started = time.perf_counter()
            try:
                inputs = self._inputs(self.read_json())
                if fault.before_predict():
                    raise RuntimeError(f"injected fault {fault}")
                with lock:
                    predictions = fault.after_predict(generator.generate(inputs))
                status, body = 200, {"predictions": predictions, "model_version": model_version}
            except RequestError as exc:
                status, body = exc.status, {"error": str(exc)}
            except Exception as exc:  # a model failure is a 500 for this request, never a dead server
                status, body = 500, {"error": f"{type(exc).__name__}: {exc}"}
            requests.labels(variant, model_version, str(status)).inc()
            latency.labels(variant, model_version).observe(time.perf_counter() - started)
            self.send_json(status, body, {"X-Model-Version": model_version})

        @staticmethod
        def _inputs(body: dict) -> list[str]:
            inputs = body.get("inputs")
            if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
                raise RequestError(400, "'inputs' must be a non-empty list of strings")
            if len(inputs) > MAX_INPUTS:
                raise RequestError(413, f"{len(inputs)} inputs exceed the limit of {MAX_INPUTS} per request")
            longest = max(len(x) for x in inputs)
            if longest > MAX_INPUT_CHARS:
                raise RequestError(413, f"an input of {longest} characters exceeds the limit of {MAX_INPUT_CHARS}")
            return inputs

    return ModelHandler


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
    args = parser.parse_args(argv)
    try:
        fault = parse_fault(args.fault, args.fault_seed)
    except BadInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        generator = load_generator(args.model_uri, args.num_threads)
    except Exception as exc:
        print(f"error: cannot load model {args.model_uri}: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    handler = make_handler(generator, args.variant, args.model_version, fault)
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
