"""What the model server and the canary router share: a threaded HTTP server with JSON I/O and limits."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_BODY_BYTES = 1 << 20
# An oversized body is read and thrown away in small chunks up to this much, so the client gets its 413
# instead of a reset connection; memory stays bounded either way.
DRAIN_LIMIT_BYTES = 64 << 20


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class JsonHandler(BaseHTTPRequestHandler):
    """Base handler: read a bounded JSON body, answer JSON, never a traceback to the client."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass  # request logs would drown the pipeline's output; metrics count requests instead

    def read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise RequestError(400, "bad Content-Length") from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            remaining = length if length <= DRAIN_LIMIT_BYTES else 0
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 1 << 16))
                if not chunk:
                    break
                remaining -= len(chunk)
            raise RequestError(413, f"body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}")
        return self.rfile.read(length)

    def read_json(self) -> dict:
        try:
            body = json.loads(self.read_body() or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "body must be a JSON object")
        return body

    def send_bytes(self, status: int, payload: bytes, content_type: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)

    def send_json(self, status: int, obj: object, headers: dict | None = None) -> None:
        self.send_bytes(status, json.dumps(obj).encode("utf-8"), "application/json", headers)


class ServiceHandler(JsonHandler):
    """The routes the model server and the router share: GET /health, GET /metrics, POST /predict."""

    registry = None  # the prometheus_client CollectorRegistry that /metrics exposes

    def health(self) -> dict:
        raise NotImplementedError

    def predict(self) -> None:
        """Answer one POST /predict (the subclass sends the response)."""
        raise NotImplementedError

    def do_GET(self):
        if self.path == "/health":
            self.send_json(200, self.health())
        elif self.path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

            self.send_bytes(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        else:
            self.send_json(404, {"error": f"no route {self.path}"})

    def do_POST(self):
        if self.path == "/predict":
            self.predict()
        else:
            self.send_json(404, {"error": f"no route {self.path}"})


def serve_in_thread(handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1", port: int = 0):
    """Start a threaded server on loopback in a daemon thread; return it (its port is server_address[1])."""
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name=f"http-{handler.__name__}", daemon=True).start()
    return server
