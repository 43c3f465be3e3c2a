"""The one small HTTP server behind every endpoint rankwatch serves: the node exporter, each
training rank's probe, the detector's ``/metrics``, and the simulated Slack and Grafana.

Not ``http.server.ThreadingHTTPServer``: its listen backlog is 5, so a burst of scrapers
overflows the accept queue and waits for the kernel's SYN retransmits (1 s, 3 s, …); it starts
one thread per connection, and an idle or slow client holds that thread until the handler's
socket timeout. Here:

* one event-loop thread accepts connections (backlog 1024; the kernel caps it at
  ``net.core.somaxconn``) and reads each request's head without blocking. Idle keep-alive
  connections and clients still sending their head cost a file descriptor, never a thread;
* a request whose head has arrived goes to a bounded pool of worker threads that run an
  ordinary ``BaseHTTPRequestHandler`` subclass, so handlers are written as for http.server;
* deadlines: a connection that sends no request for ``idle_timeout`` is closed; a request must
  arrive whole (head and body) within ``request_timeout`` of its first byte; a response may
  take ``write_timeout`` to send. Beyond ``max_connections`` the longest-waiting connection is
  closed to make room, so a flood of idle clients cannot lock out Prometheus.

Every thread is a daemon: a worker stuck in a handler must never keep a training process or
an exporter from exiting.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any

from rankwatch.daemonpool import DaemonPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """How much one server may take. The defaults suit a metrics endpoint scraped every
    15-60 s by one or two Prometheus servers."""

    workers: int = 4
    backlog: int = 1024
    idle_timeout: float = 30.0  # longer than a 15 s scrape interval: Prometheus keeps its connection
    request_timeout: float = 10.0  # Prometheus' default scrape timeout
    write_timeout: float = 10.0
    max_connections: int = 256
    max_head_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for name in ("idle_timeout", "request_timeout", "write_timeout"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("workers", "backlog", "max_connections", "max_head_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")


# The simulated Slack and Grafana: a test may hold a few slow requests open at once.
SIM_LIMITS = Limits(workers=8)


class _Conn:
    __slots__ = ("sock", "addr", "buf", "since", "deadline")

    def __init__(self, sock: socket.socket, addr: Any, now: float, idle_timeout: float) -> None:
        self.sock = sock
        self.addr = addr
        self.buf = bytearray()
        self.since = now  # start of the current wait (idle, or the request's first byte)
        self.deadline = now + idle_timeout


class _Reader:
    """The handler's ``rfile``: the bytes the event loop already read, then the socket, with
    one deadline for the whole request (a client trickling a byte at a time cannot stretch
    it). What is left after the request (a pipelined next one) goes back to the loop."""

    def __init__(self, sock: socket.socket, buf: bytearray, deadline: float) -> None:
        self._sock = sock
        self._buf = buf
        self._deadline = deadline

    def _fill(self) -> bool:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received within the request timeout")
        self._sock.settimeout(left)
        data = self._sock.recv(65536)
        if not data:
            return False
        self._buf += data
        return True

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def readline(self, limit: int = -1) -> bytes:
        start = 0
        while True:
            i = self._buf.find(b"\n", start)
            if i >= 0 and (limit < 0 or i < limit):
                return self._take(i + 1)
            if 0 <= limit <= len(self._buf):
                return self._take(limit)
            start = len(self._buf)
            if not self._fill():
                return self._take(len(self._buf))

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            while self._fill():
                pass
            return self._take(len(self._buf))
        while len(self._buf) < n and self._fill():
            pass
        return self._take(min(n, len(self._buf)))

    def leftover(self) -> bytearray:
        return self._buf

    def close(self) -> None:
        pass


class _Writer:
    """The handler's ``wfile``: buffered, sent with one ``sendall`` per response (headers and
    body in one segment: no Nagle / delayed-ACK stall between them), bounded by the write
    timeout (since Python 3.5 a socket timeout bounds the whole ``sendall``)."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self._sock = sock
        self._timeout = timeout
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        if self._parts:
            data = b"".join(self._parts)
            self._parts.clear()
            self._sock.settimeout(self._timeout)
            self._sock.sendall(data)

    def close(self) -> None:
        pass


_LISTEN = object()
_WAKE = object()


class HttpServer:
    """Serves ``handler`` (a ``BaseHTTPRequestHandler`` subclass) on ``host:port`` from a
    background thread; returns once listening. Port 0 picks a free port. Handlers reach
    anything the caller attaches to the server object (``server.exporter = …``) through
    ``self.server``, as with http.server. Raises ``OSError`` when it cannot listen."""

    def __init__(self, host: str, port: int, handler: type[BaseHTTPRequestHandler], *,
                 limits: Limits = Limits(), name: str = "rankwatch-http") -> None:
        self.limits = limits
        self.handler = handler
        self.host = host or "0.0.0.0"
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, port))
            sock.listen(limits.backlog)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.socket = sock
        self.server_address = sock.getsockname()
        self.port = int(self.server_address[1])
        self._name = name
        self._pool = DaemonPool(limits.workers, f"{name}-worker")
        self._sel = selectors.DefaultSelector()
        self._sel.register(sock, selectors.EVENT_READ, _LISTEN)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._lock = threading.Lock()
        self._waiting: dict[socket.socket, _Conn] = {}  # owned by the loop thread
        self._busy: set[socket.socket] = set()  # in a worker
        self._returned: list[_Conn] = []  # keep-alive connections back from a worker
        self._stopping = False
        self.evicted = 0  # connections closed to stay under max_connections
        self.timed_out = 0  # connections closed by the idle or request timeout
        self._thread = threading.Thread(target=self._loop, name=f"{name}-{self.port}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public
    @property
    def url(self) -> str:
        """Base URL a local client can use (a wildcard address becomes loopback)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://{join_host_port(host, self.port)}"

    def connections(self) -> int:
        """Open client connections (idle, reading a request, or in a worker)."""
        with self._lock:
            return len(self._waiting) + len(self._busy) + len(self._returned)

    @property
    def workers(self) -> int:
        """Worker threads started so far (never more than ``limits.workers``)."""
        return self._pool.live

    def stop(self) -> None:
        """Stop accepting, close every connection (idle ones at once, busy ones as soon as
        their handler returns) and the listening socket. Idempotent."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            busy = list(self._busy)
            returned, self._returned = self._returned, []
        self._wake()
        self._thread.join(timeout=10)
        for conn in returned:
            _close(conn.sock)
        for sock in busy:  # a stopped server must look down at once, not finish on an old connection
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._pool.close()
        os.close(self._wake_w)

    close = stop

    def __enter__(self) -> HttpServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ event loop
    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _loop(self) -> None:
        try:
            while not self._stopping:
                timeout = None
                if self._waiting:
                    timeout = max(0.0, min(c.deadline for c in self._waiting.values()) - time.monotonic())
                for key, _ in self._sel.select(timeout):
                    if key.data is _LISTEN:
                        self._accept()
                    elif key.data is _WAKE:
                        self._take_returned()
                    else:
                        self._on_readable(key.data)
                self._expire()
        except Exception:
            log.exception("%s: event loop failed; the endpoint stops answering", self._name)
        finally:
            for conn in list(self._waiting.values()):
                _close(conn.sock)
            self._waiting.clear()
            self._sel.close()
            self.socket.close()
            os.close(self._wake_r)

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: leave it in the backlog, try later
                log.warning("%s: cannot accept a connection: %s", self._name, exc.strerror or exc)
                return
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._make_room()
            conn = _Conn(sock, addr, time.monotonic(), self.limits.idle_timeout)
            self._waiting[sock] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _make_room(self) -> None:
        if self.connections() < self.limits.max_connections or not self._waiting:
            return
        oldest = min(self._waiting.values(), key=lambda c: c.since)
        self._drop(oldest)
        self.evicted += 1

    def _take_returned(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            returned, self._returned = self._returned, []
        now = time.monotonic()
        for conn in returned:
            conn.since, conn.deadline = now, now + self.limits.idle_timeout
            while conn.buf[:1] in (b"\r", b"\n"):
                del conn.buf[:1]
            if conn.buf:  # a pipelined request already arrived
                conn.deadline = now + self.limits.request_timeout
                if self._head_complete(conn.buf):
                    self._dispatch(conn)
                    continue
            self._waiting[conn.sock] = conn
            self._sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        if not conn.buf:
            # RFC 9112 2.2: ignore empty lines before a request (some clients send CRLF after
            # a POST body); then the request's first byte starts its deadline.
            data = data.lstrip(b"\r\n")
            if not data:
                return
            conn.since = time.monotonic()
            conn.deadline = conn.since + self.limits.request_timeout
        conn.buf += data
        if len(conn.buf) > self.limits.max_head_bytes or self._head_complete(conn.buf):
            # (an oversized head goes to the handler too: http.server answers 414/431)
            self._sel.unregister(conn.sock)
            del self._waiting[conn.sock]
            self._dispatch(conn)

    @staticmethod
    def _head_complete(buf: bytearray) -> bool:
        return b"\r\n\r\n" in buf or b"\n\n" in buf

    def _dispatch(self, conn: _Conn) -> None:
        with self._lock:
            self._busy.add(conn.sock)
        self._pool.submit(self._serve, conn)

    def _expire(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self._waiting.values() if c.deadline <= now]:
            self._drop(conn)
            self.timed_out += 1

    def _drop(self, conn: _Conn) -> None:
        self._sel.unregister(conn.sock)
        del self._waiting[conn.sock]
        _close(conn.sock)

    # ------------------------------------------------------------------ worker side
    def _serve(self, conn: _Conn) -> None:
        sock = conn.sock
        keep = False
        try:
            reader = _Reader(sock, conn.buf, conn.since + self.limits.request_timeout)
            writer = _Writer(sock, self.limits.write_timeout)
            # The handler's __init__ would run handle() (a loop over one connection); here the
            # connection goes back to the event loop between requests, so set it up by hand.
            h = self.handler.__new__(self.handler)
            h.request = h.connection = sock
            h.client_address = conn.addr
            h.server = self  # type: ignore[assignment]
            h.rfile, h.wfile = reader, writer  # type: ignore[assignment]
            h.close_connection = True
            h.handle_one_request()
            writer.flush()
            keep = not h.close_connection
            conn.buf = reader.leftover()
        except OSError as exc:  # the client went away, or a timeout
            log.debug("%s: connection from %s dropped: %s", self._name, conn.addr, exc)
        except Exception:
            log.exception("%s: handler failed", self._name)
        with self._lock:
            self._busy.discard(sock)
            if keep and not self._stopping:
                try:
                    sock.setblocking(False)
                except OSError:
                    keep = False
            if keep and not self._stopping:
                self._returned.append(conn)
            else:
                keep = False
        if keep:
            self._wake()
        else:
            _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with IPv6 addresses in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_listen_address(text: str, flag: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``[IPv6]:PORT`` → (host, port); ``ValueError`` naming
    ``flag`` otherwise."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{flag} {text!r}: expected HOST:PORT with a port from 0 to 65535, "
                         f"e.g. {default_host}:9410")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or default_host, int(port_text)
