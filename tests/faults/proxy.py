"""A fault-injecting HTTP proxy on loopback, in front of a real MLflow server.

It forwards every request unchanged, except that requests whose path contains a configured fragment are
answered with 503 a set number of times (or forever): a server that is briefly, or lastingly, unwell at
exactly the moment a step writes. Stopping the proxy makes the server unreachable (connection refused).
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FOREVER = 10**9


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = urlsplit(upstream)
        self.failures: dict[str, int] = {}  # path fragment -> how many more requests get a 503
        self.seen: list[tuple[str, str, int]] = []  # (method, path, status answered), in order
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes | None:
                # requests streams a file it cannot size (an empty one included) with chunked encoding, as
                # HTTP/1.1 allows (RFC 9112 section 7.1); the body goes upstream whole, with its length.
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = b""
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailer fields
                    return body
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else None

            def _any(self) -> None:
                body = self._body()
                if proxy._should_fail(self.path):
                    proxy._note(self.command, self.path, 503)
                    self._answer(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE"}', "application/json")
                    return
                connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                hop = ("host", "connection", "transfer-encoding", "content-length")
                headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
                if body is not None:
                    headers["Content-Length"] = str(len(body))
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                connection.close()
                proxy._note(self.command, self.path, response.status)
                self._answer(response.status, payload, response.getheader("Content-Type") or "application/json")

            def _answer(self, status: int, payload: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def fail(self, fragment: str, times: int = FOREVER) -> None:
        with self._lock:
            self.failures[fragment] = times

    def heal(self) -> None:
        with self._lock:
            self.failures.clear()

    def _should_fail(self, path: str) -> bool:
        with self._lock:
            for fragment, left in self.failures.items():
                if fragment in path and left > 0:
                    self.failures[fragment] = left - 1
                    return True
        return False

    def _note(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.seen.append((method, path.split("?")[0], status))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
