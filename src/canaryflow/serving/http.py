"""What the model server and the canary router share: a threaded HTTP server with JSON I/O and limits, and a
keep-alive client for talking to such a server."""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

MAX_BODY_BYTES = 1 << 20
# An oversized body is read and thrown away in small chunks up to this much, so the client gets its 413
# instead of a reset connection; memory stays bounded either way.
DRAIN_LIMIT_BYTES = 64 << 20
# Seconds; one set of buckets for the server's and the router's histograms, so their quantiles compare.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise RequestError(400, "body must be a JSON object")
    return body


class JsonHandler(BaseHTTPRequestHandler):
    """Base handler: read a bounded JSON body, answer JSON, never a traceback to the client."""

    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's delayed ACK of the
    # headers, 40 ms on Linux, on every keep-alive answer.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002 - the stdlib's signature
        pass  # request logs would drown the pipeline's output; metrics count requests instead

    def read_body(self) -> bytes:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise RequestError(400, "bad Content-Length") from None
        if length > MAX_BODY_BYTES:
            self.discard_body(length)
            raise RequestError(413, f"body of {length} bytes exceeds the limit of {MAX_BODY_BYTES}")
        return self.rfile.read(length)

    def discard_body(self, length: int | None = None) -> None:
        """Read a body we will not use and close the connection after the answer: the client then sees our
        status rather than a reset, and memory stays at one chunk."""
        self.close_connection = True
        if length is None:
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                return
        remaining = length if length <= DRAIN_LIMIT_BYTES else 0
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)

    def read_json(self) -> dict:
        return parse_json_object(self.read_body())

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
    # shutdown() waits up to one poll interval; the default half second adds up where servers come and go.
    threading.Thread(target=server.serve_forever, args=(0.1,), name=f"http-{handler.__name__}", daemon=True).start()
    return server


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to one server, shared by threads.

    A new TCP connection per request costs a handshake and, on a threading server, a thread start; a pooled
    one costs neither. An idle connection the server has closed meanwhile is found out on the next request,
    which is then sent again on another connection (predict has no side effects to duplicate).
    """

    def __init__(self, url: str, timeout: float, max_idle: int = 64, max_response_bytes: int = 64 << 20):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.timeout = timeout
        self.max_idle = max_idle
        self.max_response_bytes = max_response_bytes
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, bytes, dict]:
        """Return (status, body, headers); an HTTP error status is a result. A server that cannot be reached or
        breaks off raises OSError or http.client.HTTPException."""
        headers = {"Content-Type": "application/json", **(headers or {})}
        while True:
            conn, reused = self._take()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                payload = resp.read(self.max_response_bytes + 1)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                conn.close()
                if reused:
                    continue  # the server closed it while it sat idle: the next one, or a new one
                raise  # a new connection that breaks off is the server's answer
            except BaseException:
                conn.close()
                raise
            if len(payload) > self.max_response_bytes:
                conn.close()
                raise http.client.HTTPException(f"response over {self.max_response_bytes} bytes")
            if resp.will_close:
                conn.close()
            else:
                self._give(conn)
            return resp.status, payload, dict(resp.headers)

    def _take(self) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout), False

    def _give(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
