"""A simulated fleet of scrape targets on one loopback port: N p5 node exporters and 8 N rank
probes, for measuring what Prometheus and VictoriaMetrics need to scrape a cluster live.

Every body is a real one: one ``SimulatedNode`` (the real node exporter over simulated NVML
with 8 GPUs and a fake sysfs with 32 EFA devices) and one real ``Probe`` recording steps with
the usual five sections. Each body is re-rendered at most once a second, so values move between
scrapes as on a real cluster; per target, only the identity is rewritten (the node's host name
and GPU UUIDs; the rank, local rank, GPU and node of a probe), so every target's series are
distinct with realistic label values. Serving ~2 300 targets from one process costs a fraction
of a core at a 15 s interval, where starting that many exporters would not fit on this machine.

Scrapers address targets by their realistic instance names (``node-0007:9410``,
``node-0007:9423``) through ``scrape_config``: relabeling keeps those as ``instance`` and sends
the request to this server with the target in the path — standard Prometheus configuration
that VictoriaMetrics' scraper reads too."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import yaml
from prometheus_client import generate_latest

from rankwatch.exporters.identity import RankIdentity
from rankwatch.exporters.probe import Probe
from rankwatch.sim.node import SimulatedNode

NODE_PORT = 9410
PROBE_PORT = 9420
_HOST = "fleet-sentinel-host"
_RANK = 987654
_LOCAL = 7
_SECTIONS = {"dataloader": 0.02, "forward": 0.30, "backward": 0.55, "optimizer": 0.05, "comm": 0.08}


def node_name(i: int) -> str:
    return f"node-{i:04d}"


class Fleet:
    """``serve()`` starts the HTTP server in a thread; ``close()`` stops everything."""

    def __init__(self, nodes: int, ranks_per_node: int = 8, run: str = "fleet-run") -> None:
        self.nodes = nodes
        self.ranks_per_node = ranks_per_node
        self.node = SimulatedNode(_HOST, gpus=8, efa=32)
        # world_size is written as the real one per target (see body())
        self.probe = Probe(run, port=0, identity=RankIdentity(rank=_RANK, local_rank=_LOCAL, world_size=_RANK + 1,
                                                              node=_HOST, pp=0, tp=_LOCAL, dp=0, gpu=_LOCAL),
                           wandb_run=None, cuda_timing=False)
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, bytes]] = {}
        self._stop = threading.Event()
        self._feeder = threading.Thread(target=self._feed, daemon=True, name="fleet-probe-feeder")
        self._feeder.start()
        self.server: ThreadingHTTPServer | None = None
        self.requests = 0
        self.abandoned = 0

    def _feed(self) -> None:
        n = 0
        while not self._stop.wait(0.5):
            n += 1
            self.probe.record_step(1.0, _SECTIONS, tokens=32768, step=n)

    def _base(self, kind: str) -> bytes:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(kind)
            if hit is None or now - hit[0] >= 1.0:
                body = self.node.exporter.scrape() if kind == "node" else generate_latest(self.probe.registry)
                hit = (now, body)
                self._cache[kind] = hit
            return hit[1]

    def body(self, path: str) -> bytes | None:
        """The body of target ``/node/<index>`` or ``/rank/<rank>``."""
        parts = path.strip("/").split("/")
        if len(parts) != 2 or not parts[1].isdigit():
            return None
        i = int(parts[1])
        if parts[0] == "node" and i < self.nodes:
            host = node_name(i).encode()
            return (self._base("node").replace(_HOST.encode(), host)
                    .replace(b'UUID="GPU-', b'UUID="GPU-%05x' % i))
        if parts[0] == "rank" and i < self.nodes * self.ranks_per_node:
            local = i % self.ranks_per_node
            host = node_name(i // self.ranks_per_node).encode()
            return (self._base("rank").replace(b'rank="%d"' % _RANK, b'rank="%d"' % i)
                    .replace(b'local_rank="%d"' % _LOCAL, b'local_rank="%d"' % local)
                    .replace(b'gpu="%d"' % _LOCAL, b'gpu="%d"' % local).replace(b'tp="%d"' % _LOCAL, b'tp="%d"' % local)
                    .replace(b'world_size="%d"' % (_RANK + 1), b'world_size="%d"' % (self.nodes * self.ranks_per_node))
                    .replace(_HOST.encode(), host))
        return None

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> int:
        fleet = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                body = fleet.body(self.path)
                fleet.requests += 1
                if body is None:
                    self.send_error(404)
                    return
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    fleet.abandoned += 1  # the scraper timed out and left: counted, reported

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True, name="fleet-http").start()
        return int(self.server.server_address[1])

    def jobs(self, port: int, suffix: str = "", node_relabel: list | None = None,
             probe_relabel: list | None = None) -> list[dict]:
        """Scrape jobs (``rankwatch-node<suffix>``, ``rankwatch-probe<suffix>``) reaching every
        target of the fleet; ``*_relabel``: their ``metric_relabel_configs``."""
        redirect = [{"source_labels": ["__address__"], "target_label": "instance"},
                    {"target_label": "__address__", "replacement": f"127.0.0.1:{port}"}]
        nodes = [{"targets": [f"{node_name(i)}:{NODE_PORT}"], "labels": {"__metrics_path__": f"/node/{i}"}}
                 for i in range(self.nodes)]
        probes = [{"targets": [f"{node_name(r // self.ranks_per_node)}:{PROBE_PORT + r % self.ranks_per_node}"],
                   "labels": {"__metrics_path__": f"/rank/{r}"}} for r in range(self.nodes * self.ranks_per_node)]
        out = []
        for name, groups, relabel in (("rankwatch-node", nodes, node_relabel), ("rankwatch-probe", probes, probe_relabel)):
            job: dict = {"job_name": name + suffix, "static_configs": groups, "relabel_configs": redirect}
            if relabel:
                job["metric_relabel_configs"] = relabel
            out.append(job)
        return out

    def scrape_config(self, port: int, interval: str = "15s", jobs: list[dict] | None = None) -> str:
        """Prometheus / VictoriaMetrics configuration: ``jobs`` (default: ``self.jobs(port)``)."""
        seconds = int(interval.rstrip("s"))  # whole seconds, e.g. "15s"
        cfg = {"global": {"scrape_interval": interval, "scrape_timeout": f"{min(seconds, 10)}s"},
               "scrape_configs": jobs if jobs is not None else self.jobs(port)}
        return yaml.safe_dump(cfg, sort_keys=False, width=1000)

    def close(self) -> None:
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        self._feeder.join(timeout=5)
        self.probe.close()
        self.node.close()
