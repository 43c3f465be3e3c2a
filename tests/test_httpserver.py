"""Every HTTP server rankwatch runs (node exporter, probe, detector /metrics, simulated Slack and
Grafana) is one shared server (rankwatch.httpserver): a burst of scrapers fits its listen
backlog (no SYN is retransmitted), connections cost no thread while idle, and idle, slow or
half-open clients are dropped after the timeouts, measured by thread counts and closed
connections, never by the clock."""

from __future__ import annotations

import http.client
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rankwatch import Probe, promserver
from rankwatch.detectors.metrics import DetectorMetrics, MetricsServer
from rankwatch.exporters import probe as probe_module
from rankwatch.exporters.efa import EfaCollector
from rankwatch.exporters.identity import RankIdentity
from rankwatch.exporters.node import NodeExporter
from rankwatch.httpserver import HttpServer, Limits
from rankwatch.sim.grafana import FakeGrafana
from rankwatch.sim.slack import SlackServer

SYSFS = Path(__file__).parent / "fixtures" / "sysfs"
IDENT = RankIdentity(rank=0, local_rank=0, world_size=1, local_world_size=1, node="node-a")
BURST = 200


@dataclass
class Running:
    port: int
    path: str
    stop: Callable[[], None]
    http: Callable[[], HttpServer]  # the shared server behind it (for connection counts)


def start_node_exporter(limits: Limits | None = None) -> Running:
    exporter = NodeExporter([EfaCollector(SYSFS)], "node-h", process_metrics=False)
    server = exporter.serve("127.0.0.1", 0, **({"limits": limits} if limits else {}))

    def stop() -> None:
        server.stop()
        exporter.close()
    return Running(server.port, "/metrics", stop, lambda: server.http)


def start_probe(limits: Limits | None = None) -> Running:
    saved = probe_module.SERVER_LIMITS
    probe_module.SERVER_LIMITS = limits or saved
    try:
        p = Probe(run="http", port=promserver.free_port(), identity=IDENT, wandb_run=None)
    finally:
        probe_module.SERVER_LIMITS = saved
    assert p.port is not None
    return Running(p.port, "/metrics", p.close, lambda: p._httpd)  # type: ignore[return-value]


def start_detector(limits: Limits | None = None) -> Running:
    server = MetricsServer(DetectorMetrics(15.0), "127.0.0.1:0", **({"limits": limits} if limits else {}))
    return Running(server.port, "/metrics", server.close, lambda: server.httpd)


def start_slack_sim(limits: Limits | None = None) -> Running:
    s = SlackServer().start()
    return Running(int(s.url.rsplit(":", 1)[1]), "/api/auth.test", s.stop, lambda: s._server)  # type: ignore[return-value]


def start_grafana_sim(limits: Limits | None = None) -> Running:
    g = FakeGrafana(token="t").__enter__()
    return Running(int(g.url.rsplit(":", 1)[1]), "/api/folders", lambda: g.__exit__(None, None, None),
                   lambda: g._server)  # type: ignore[return-value]


EVERY_SERVER = {"node-exporter": start_node_exporter, "probe": start_probe, "detector": start_detector,
                "slack-sim": start_slack_sim, "grafana-sim": start_grafana_sim}
SCRAPED = {k: EVERY_SERVER[k] for k in ("node-exporter", "probe", "detector")}


@pytest.fixture(params=list(EVERY_SERVER), ids=list(EVERY_SERVER))
def any_server(request: pytest.FixtureRequest) -> Iterator[Running]:
    running = EVERY_SERVER[request.param]()
    yield running
    running.stop()


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=120)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def request(sock: socket.socket, path: str, *, close: bool = True) -> http.client.HTTPResponse:
    connection = "Connection: close\r\n" if close else ""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{connection}\r\n".encode())
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    resp.read()
    return resp


def closed_by_server(sock: socket.socket) -> bool:
    """Blocks until the server closes the connection (EOF or reset) or sends something."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


class _OneFile:
    """A socket stand-in whose makefile() always returns the same buffered reader (which
    HTTPResponse may not close: the next response is read from it)."""

    def __init__(self, sock: socket.socket) -> None:
        self._file = sock.makefile("rb")

    def makefile(self, mode: str) -> object:
        return self

    def __getattr__(self, name: str) -> object:
        return getattr(self._file, name)

    def close(self) -> None:
        pass


def syn_retransmits(sock: socket.socket) -> int:
    # struct tcp_info: 8 one-byte fields, then 32-bit fields; tcpi_total_retrans is the 24th.
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return struct.unpack_from("I", info, 100)[0]


def listen_backlog(port: int) -> int:
    ss = shutil.which("ss")
    if ss is None:
        pytest.skip("ss (iproute2) not installed")
    out = subprocess.run([ss, "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    (line,) = out.splitlines()
    return int(line.split()[2])  # Send-Q of a listening socket: its backlog


# ------------------------------------------------------------------ every server
def test_listen_backlog_holds_a_burst_of_scrapers(any_server: Running) -> None:
    assert listen_backlog(any_server.port) >= BURST


def test_a_burst_of_connections_is_answered_without_a_thread_each(any_server: Running) -> None:
    warm = connect(any_server.port)
    request(warm, any_server.path)  # starts the first worker
    warm.close()
    threads_before = threading.active_count()
    # as many as the server keeps open (beyond that it drops the longest-waiting: tested below)
    burst = min(BURST, any_server.http().limits.max_connections - 1)
    clients = [connect(any_server.port) for _ in range(burst)]
    try:
        # The accept queue is FIFO: once a later connection is answered, all are accepted.
        last = connect(any_server.port)
        assert request(last, any_server.path).status < 500
        last.close()
        idle_threads = threading.active_count() - threads_before
        for c in clients:
            c.sendall(f"GET {any_server.path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        statuses = []
        for c in clients:
            resp = http.client.HTTPResponse(c)
            resp.begin()
            resp.read()
            statuses.append(resp.status)
        busy_threads = threading.active_count() - threads_before
        assert all(s < 500 for s in statuses) and len(statuses) == burst
        assert [syn_retransmits(c) for c in clients] == [0] * burst, "a SYN was dropped: the backlog overflowed"
        workers = any_server.http().limits.workers
        assert idle_threads <= workers, f"{burst} idle connections hold {idle_threads} threads"
        assert busy_threads <= workers
    finally:
        for c in clients:
            c.close()


# ------------------------------------------------------------------ timeouts (the scraped servers)
SHORT = Limits(workers=2, idle_timeout=0.2, request_timeout=0.5, write_timeout=5.0)


@pytest.fixture(params=list(SCRAPED), ids=list(SCRAPED))
def short_server(request: pytest.FixtureRequest) -> Iterator[Running]:
    running = SCRAPED[request.param](SHORT)
    yield running
    running.stop()


def test_idle_and_slow_clients_are_dropped_and_hold_no_thread(short_server: Running) -> None:
    warm = connect(short_server.port)
    assert request(warm, short_server.path, close=False).status == 200
    threads_before = threading.active_count()
    idle = [connect(short_server.port) for _ in range(10)] + [warm]  # never send / sent one request, then idle
    slow = [connect(short_server.port) for _ in range(10)]
    for s in slow:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\n")  # a head that is never finished
        s.setblocking(False)
    # Trickle a byte to every slow client until the server drops it: the request deadline holds
    # however slowly bytes keep coming. (Bounded by iterations, as a guard against a hang.)
    open_slow = set(slow)
    for _ in range(20_000):
        if not open_slow:
            break
        for s in list(open_slow):
            try:
                if s.recv(1) == b"":
                    open_slow.discard(s)
                continue
            except BlockingIOError:
                pass
            except ConnectionResetError:
                open_slow.discard(s)
                continue
            try:
                s.send(b"X")
            except OSError:
                open_slow.discard(s)
        threading.Event().wait(0.01)
    assert not open_slow, "slow clients were never dropped"
    assert all(closed_by_server(s) for s in idle)
    http_server = short_server.http()
    assert http_server.connections() == 0
    assert http_server.timed_out >= len(idle) + len(slow)
    assert threading.active_count() <= threads_before
    fresh = connect(short_server.port)  # and the server still answers
    assert request(fresh, short_server.path).status == 200
    for s in idle + slow + [fresh]:
        s.close()


def test_a_client_that_never_finishes_its_request_holds_no_worker() -> None:
    running = start_node_exporter(Limits(workers=1, request_timeout=600, idle_timeout=600))
    try:
        stuck = connect(running.port)
        stuck.sendall(b"GET /metrics HTTP/1.1\r\nHost: t\r\nX-Slow: ")  # and then nothing
        other = connect(running.port)
        assert request(other, "/metrics").status == 200  # the only worker was free
        assert running.http().workers == 1
        stuck.setblocking(False)
        with pytest.raises(BlockingIOError):
            stuck.recv(1)  # still open: the long request deadline has not passed
        stuck.close()
        other.close()
    finally:
        running.stop()


def test_beyond_max_connections_the_longest_waiting_is_dropped() -> None:
    running = start_detector(Limits(workers=1, max_connections=10, idle_timeout=600))
    try:
        idle = [connect(running.port) for _ in range(30)]
        last = connect(running.port)
        assert request(last, "/metrics").status == 200
        assert all(closed_by_server(s) for s in idle[:21])  # the oldest, to make room
        assert running.http().connections() <= 10
        assert running.http().evicted >= 21
        for s in idle + [last]:
            s.close()
    finally:
        running.stop()


# ------------------------------------------------------------------ HTTP behaviour
def test_keep_alive_and_pipelined_requests() -> None:
    running = start_node_exporter()
    try:
        s = connect(running.port)
        for _ in range(3):  # one connection, several scrapes (what Prometheus does)
            assert request(s, "/healthz", close=False).status == 200
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /nope HTTP/1.1\r\nHost: t\r\n\r\n")
        stream = _OneFile(s)  # both responses may arrive in one segment: read them from one buffer
        statuses = []
        for _ in range(2):
            resp = http.client.HTTPResponse(stream)  # type: ignore[arg-type]
            resp.begin()
            resp.read()
            statuses.append(resp.status)
        assert statuses == [200, 404]
        s.close()
    finally:
        running.stop()


@pytest.mark.parametrize("head,answer", [
    (b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", b" 414 Request-URI Too Long"),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n", b" 431 "),
    # a TLS hello: http.server answers it as HTTP/0.9, with an error page and no status line
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"<p>Error code: 400</p>"),
], ids=["uri-too-long", "header-too-long", "tls-hello"])
def test_malformed_requests_get_an_error_and_cost_nothing_else(head: bytes, answer: bytes) -> None:
    running = start_node_exporter()
    try:
        s = connect(running.port)
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):  # the server answers, then closes
            data += chunk
        assert answer in data, data[:200]
        s.close()
        ok = connect(running.port)
        assert request(ok, "/metrics").status == 200
        ok.close()
    finally:
        running.stop()


def test_limits_reject_nonsense() -> None:
    for bad in ({"idle_timeout": float("nan")}, {"request_timeout": 0}, {"write_timeout": float("inf")},
                {"workers": 0}):
        with pytest.raises(ValueError):
            Limits(**bad)


def test_stop_closes_kept_alive_connections() -> None:
    running = start_probe()
    s = connect(running.port)
    assert request(s, "/metrics", close=False).status == 200
    running.stop()
    assert closed_by_server(s)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", running.port), timeout=5)
