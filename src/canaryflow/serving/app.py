"""The model server's HTTP side: an ASGI app (Starlette, served by uvicorn) that speaks the protocols KServe users
call models with, all over one ModelService (serving/server.py):

- canaryflow's own `POST /predict` ({"inputs": [...], "references": [...]}), `GET /health`, `GET /metrics`;
- KServe's V1 protocol: `GET /v1/models/<name>` and `POST /v1/models/<name>:predict` with `instances`
  (kserve/kserve python/kserve/kserve/protocol/rest/v1_endpoints.py);
- the Open Inference Protocol v2 over REST: `/v2/health/live`, `/v2/health/ready`, `/v2/models/<name>`,
  `/v2/models/<name>/ready` and `POST /v2/models/<name>/infer`, with BYTES tensors (the protocol's
  specification, kserve/open-inference-protocol specification/protocol/inference_rest.md).

Errors keep each protocol's shape, `{"error": "..."}`, with 400 for a bad request, 404 for another model's name,
413 for what is too large, 503 past `serving.max_in_flight` (with Retry-After) and 500 for a model failure.
Predictions run on a thread pool as large as that bound; the ModelService batches them.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from canaryflow.serving.http import DRAIN_LIMIT_BYTES, MAX_BODY_BYTES, RequestError, parse_json_object

TEXT, REFERENCES = "text", "references"  # the v2 tensors: inputs to answer, and labels that came back


def make_app(service, model_name: str):
    """The ASGI app over `service` (a ModelService), answering for the model `model_name`."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    bound = service.serving.max_in_flight
    pool = ThreadPoolExecutor(max_workers=bound, thread_name_prefix="predict")
    in_flight = 0

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def body_of(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            raise RequestError(400, "bad Content-Length")
        if length is not None and int(length) > MAX_BODY_BYTES:
            service.refused_body()
            # Read and thrown away, so that the client sees the 413 rather than a reset; past the drain limit
            # the connection is closed instead.
            if int(length) <= DRAIN_LIMIT_BYTES:
                async for _ in request.stream():
                    pass
            raise RequestError(413, f"body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                service.refused_body()
                raise RequestError(413, f"body exceeds the limit of {MAX_BODY_BYTES} bytes")
        return parse_json_object(bytes(raw))

    def check_name(request: Request) -> None:
        name = request.path_params["name"]
        if name != model_name:
            raise RequestError(404, f"model {name!r} is not served here; this server serves {model_name!r}")

    def predicting(parse, reply):
        """A prediction route: bound in flight, the drill's crash, the body parsed by `parse` into (inputs,
        references, record to log), the answer shaped by `reply`, every outcome counted."""

        async def route(request: Request) -> Response:
            nonlocal in_flight
            if in_flight >= bound:
                service.count(503, time.perf_counter())
                return error(503, f"{bound} requests in flight (serving.max_in_flight); retry", {"Retry-After": "1"})
            in_flight += 1
            started = time.perf_counter()
            try:
                service.fault.on_request()
                if "name" in request.path_params:
                    check_name(request)
                body = await body_of(request)
                inputs, references, logged = parse(body)
                loop = asyncio.get_running_loop()
                predictions = await loop.run_in_executor(pool, service.answer, inputs, references, logged)
                status, response = 200, JSONResponse(reply(body, predictions), headers=_version(service))
            except RequestError as exc:
                status, response = exc.status, error(exc.status, str(exc))
            except Exception as exc:  # a model failure is a 500 for this request, never a dead server
                status, response = 500, error(500, f"{type(exc).__name__}: {exc}")
            finally:
                in_flight -= 1
            service.count(status, started)
            return response

        return route

    def predict_reply(body: dict, predictions: list[str]) -> dict:
        return {"predictions": predictions, "model_version": service.model_version}

    def v1_reply(body: dict, predictions: list[str]) -> dict:
        return {"predictions": predictions}

    def v2_reply(body: dict, predictions: list[str]) -> dict:
        answer = {
            "model_name": model_name,
            "model_version": service.model_version,
            "outputs": [{"name": TEXT, "datatype": "BYTES", "shape": [len(predictions)], "data": predictions}],
        }
        if "id" in body:
            answer["id"] = body["id"]
        return answer

    def about_this_model(describe):
        """A GET route about the model: 404 in the protocol's shape for another model's name."""

        def route(request: Request) -> JSONResponse:
            try:
                check_name(request)
            except RequestError as exc:
                return error(exc.status, str(exc))
            return JSONResponse(describe())

        return route

    def ready() -> dict:
        return {"name": model_name, "ready": True}

    def metadata() -> dict:
        tensor = {"datatype": "BYTES", "shape": [-1]}
        return {
            "name": model_name,
            "versions": [service.model_version],
            "platform": "canaryflow",
            "inputs": [{"name": TEXT, **tensor}, {"name": REFERENCES, **tensor, "optional": True}],
            "outputs": [{"name": TEXT, **tensor}],
        }

    routes = [
        Route("/health", lambda request: JSONResponse(service.health())),
        Route("/metrics", lambda request: Response(generate_latest(service.registry), media_type=CONTENT_TYPE_LATEST)),
        Route("/predict", predicting(_own_request, predict_reply), methods=["POST"]),
        Route("/v1/models/{name}", about_this_model(ready)),
        Route("/v1/models/{name}:predict", predicting(_v1_request, v1_reply), methods=["POST"]),
        Route("/v2/health/live", lambda request: JSONResponse({"live": True})),
        Route("/v2/health/ready", lambda request: JSONResponse({"ready": True})),
        Route("/v2/models/{name}", about_this_model(metadata)),
        Route("/v2/models/{name}/ready", about_this_model(ready)),
        Route("/v2/models/{name}/infer", predicting(_v2_request, v2_reply), methods=["POST"]),
    ]

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return error(404, f"no route {request.url.path}")

    async def wrong_method(request: Request, exc: Exception) -> JSONResponse:
        return error(405, f"{request.method} is not allowed on {request.url.path}")

    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: wrong_method})
    app.state.pool = pool
    return app


def _version(service) -> dict[str, str]:
    return {"X-Model-Version": service.model_version}


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
        raise RequestError(400, f"{what} must be a non-empty list of strings")
    return value


def _reference_lists(references: Any, count: int) -> list[list[str]] | None:
    """One list of reference strings per input, from a string or a list of strings each."""
    if references is None:
        return None
    if not isinstance(references, list) or len(references) != count:
        raise RequestError(400, "'references', when given, must be a list with one entry per input")
    as_lists = [[r] if isinstance(r, str) else r for r in references]
    if not all(isinstance(r, list) and all(isinstance(x, str) for x in r) for r in as_lists):
        raise RequestError(400, "each entry of 'references' must be a string or a list of strings")
    return as_lists


def _own_request(body: dict) -> tuple[list[str], list[list[str]] | None, dict]:
    inputs = _strings(body.get("inputs"), "'inputs'")
    return inputs, _reference_lists(body.get("references"), len(inputs)), body


def _v1_request(body: dict) -> tuple[list[str], list[list[str]] | None, dict]:
    inputs = _strings(body.get("instances"), "'instances'")
    references = _reference_lists(body.get("references"), len(inputs))
    return inputs, references, {"inputs": inputs, **({"references": body["references"]} if references else {})}


def _v2_request(body: dict) -> tuple[list[str], list[list[str]] | None, dict]:
    tensors = body.get("inputs")
    if not isinstance(tensors, list) or not all(isinstance(t, dict) for t in tensors):
        raise RequestError(400, "'inputs' must be a list of tensors")
    by_name = {t.get("name"): t for t in tensors}
    unknown = sorted(str(name) for name in by_name if name not in (TEXT, REFERENCES))
    if unknown or TEXT not in by_name:
        raise RequestError(400, f"this model takes the BYTES tensors {TEXT!r} and optionally {REFERENCES!r}; "
                                f"got {sorted(str(n) for n in by_name)}")  # fmt: skip
    inputs = _tensor_strings(by_name[TEXT])
    references = None
    if REFERENCES in by_name:
        references = [[r] for r in _tensor_strings(by_name[REFERENCES])]
        if len(references) != len(inputs):
            raise RequestError(400, f"{REFERENCES!r} must have one element per element of {TEXT!r}")
    record = {"inputs": inputs, **({"references": [r[0] for r in references]} if references else {})}
    return inputs, references, record


def _tensor_strings(tensor: dict) -> list[str]:
    name, datatype = tensor.get("name"), tensor.get("datatype")
    if datatype != "BYTES":
        raise RequestError(400, f"input {name!r} has datatype {datatype}; this model takes BYTES")
    data, shape = tensor.get("data"), tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise RequestError(400, f"input {name!r} needs a shape, a list of sizes")
    if isinstance(data, list) and len(shape) == 2 and all(isinstance(row, list) for row in data):
        data = [x for row in data for x in row]  # row-major, as the protocol allows nested data
    count = 1
    for n in shape:
        count *= n
    strings = _strings(data, f"the data of input {name!r}")
    if len(strings) != count:
        raise RequestError(400, f"input {name!r} has shape {shape} but {len(strings)} elements")
    return strings


def _listening(host: str, port: int):
    """A bound, listening socket whose connections send without Nagle's delay. uvicorn writes a response's
    headers and body apart; with Nagle on, the body waits for the client's delayed ACK of the headers, 40 ms
    on Linux, on every keep-alive answer (measured: /health took 44 ms, 0.25 ms with this). Linux gives
    accepted sockets the listener's TCP_NODELAY."""
    import socket

    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def serve(app, host: str, port: int, drain_s: float, on_bound=None) -> None:
    """Run `app` with uvicorn until SIGTERM or SIGINT; then stop taking connections and give requests in flight
    up to `drain_s` to finish. `on_bound(port)` runs once the socket is bound (port 0 picks one)."""

    import uvicorn

    sock = _listening(host, port)
    if on_bound is not None:
        on_bound(sock.getsockname()[1])
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=drain_s
    )
    # uvicorn drains on SIGTERM, then raises the signal again under the handler it found (uvicorn/server.py,
    # capture_signals): a SIGTERM that ends a pod's life after a clean drain is an exit 0, not a kill.
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
        app.state.pool.shutdown(wait=False)


def serve_in_thread(app, host: str = "127.0.0.1", port: int = 0):
    """The app on a uvicorn server in a daemon thread, for tests and the local canary's in-process uses; the
    returned server has `server_address` and `shutdown()` like the standard library's."""
    import threading

    import uvicorn

    sock = _listening(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()

    class Running:
        server_address = sock.getsockname()

        @staticmethod
        def shutdown() -> None:
            server.should_exit = True
            thread.join(timeout=10)
            app.state.pool.shutdown(wait=False)

    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    return Running
