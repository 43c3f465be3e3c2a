"""The common part of rankwatch's local stand-ins for JSON HTTP APIs (Grafana, AMP): a server
(rankwatch.httpserver) on 127.0.0.1 and a free port, started and stopped as a context manager, and one handler
that reads the request and writes what the subclass's :meth:`LocalJsonApi.respond` returns."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from http.server import BaseHTTPRequestHandler
from typing import Any

from rankwatch.httpserver import SIM_LIMITS, HttpServer

METHODS = ("GET", "POST", "PUT", "DELETE")


class LocalJsonApi(ABC):
    """Subclasses implement ``respond(method, path, headers, raw_body) -> (status, payload,
    extra_headers)``; every request is recorded as ``(method, path, status)`` (no headers, so no
    secrets, in the record)."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, int]] = []
        self._handler_class = self._handler()
        self._server: HttpServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "use the fake as a context manager"
        return self._server.url

    def __enter__(self) -> Any:
        # rankwatch's own server (rankwatch.httpserver), as every endpoint rankwatch runs
        self._server = HttpServer("127.0.0.1", 0, self._handler_class, limits=SIM_LIMITS,
                                  name=f"rankwatch-sim-{type(self).__name__.lower()}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.stop()

    @abstractmethod
    def respond(self, method: str, path: str, headers: dict[str, str],
                raw: bytes) -> tuple[int, Any, dict[str, str]]:
        """The API's answer to one request: status, JSON payload, extra headers."""

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, payload, extra = api.respond(self.command, self.path, dict(self.headers), raw)
                api.requests.append((self.command, self.path, status))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in extra.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        for method in METHODS:
            setattr(Handler, f"do_{method}", Handler._serve)
        return Handler
