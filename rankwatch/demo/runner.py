"""`rankwatch demo`: start the simulated cluster, a real Prometheus with the project's rules,
the detector and the alert endpoints on loopback; play the scripted timeline; show it live;
write the report; stop everything.

Processes (each in its own process group, all stopped in ``finally``):

* ``rankwatch.demo.cluster --role nodes``: the node exporters (simulated NVML + fake EFA sysfs),
  one per simulated node, each on its own loopback address.
* ``rankwatch.demo.cluster --role ranks``: the simulated training job feeding one real
  ``rankwatch.Probe`` per rank.
* ``prometheus`` (the real binary) scraping both, itself and the detector, with ``alerts/*.yml``.
* ``python -m rankwatch detector``: the real detector, as in production, with Slack (pointed at
  the local Slack-compatible server in this process) and W&B offline.

Both workers play the same timeline from the same start time (``start.json``) and the same
slot start times (``schedule.json``), so the fault a GPU shows in NVML and the slowdown its
rank shows in the probe begin together. Each slot lasts its scripted length and then until the
detector has seen what it is for (``pacing.Pacer``): a busy machine makes the demo longer,
never a missed incident."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

from rankwatch import assets, promserver
from rankwatch.demo import report as report_mod
from rankwatch.demo.cluster import node_targets, probe_targets, write_schedule
from rankwatch.demo.pacing import Pacer
from rankwatch.demo.procs import Supervisor, sigterm_as_interrupt, stop_all, terminate, wait_for_file
from rankwatch.demo.resources import (
    PromResources,
    process_cpu_seconds,
    prometheus_alerts,
    prometheus_resources,
)
from rankwatch.demo.scenario import DemoConfig, Timeline, build_timeline, expected_incidents
from rankwatch.demo.scoring import Verdict, judge
from rankwatch.demo.ui import RankScore, ViewState, event_line, render, slot_title
from rankwatch.errors import RankwatchError
from rankwatch.events import Event

log = logging.getLogger(__name__)

# The directory holding the rankwatch package (a checkout, or site-packages for a wheel): the
# children run ``python -m rankwatch…`` from the demo's work directory and must import this copy.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]
SLACK_CHANNEL = "C0DEMOALERT"
# Evaluations past a slot's scripted end after which the demo stops waiting for the detector to
# name the incident (or close its episodes): several times what its persistence rules need.
PATIENCE_EVALUATIONS = 10
# Shard sizes of the cluster workers (see cluster.py): 256 ranks -> 4 processes, 32 nodes -> 2.
RANKS_PER_WORKER = 64
NODES_PER_WORKER = 16
SLACK_TOKEN = "xoxb-rankwatch-demo"  # the local Slack-compatible server checks it like Slack


@dataclass
class DemoResult:
    verdict: Verdict
    events: list[Event]
    report_dir: Path
    resources: PromResources | None
    slack_messages: list[dict[str, Any]]
    prometheus_alerts: list[dict[str, str]] = field(default_factory=list)
    wandb_alerts: list[dict[str, Any]] = field(default_factory=list)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    wall_seconds: float = 0.0
    t0: float = 0.0
    phases: dict[str, float] = field(default_factory=dict)  # wall seconds of start-up, timeline, report
    leftover_pids: list[int] = field(default_factory=list)
    laps: dict[str, float] = field(default_factory=dict)  # wall seconds of each report step
    held: dict[str, str] = field(default_factory=dict)  # slot -> what it waited for beyond its length


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(PACKAGE_PARENT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _duration(seconds: float) -> str:
    """A Prometheus duration (it rejects fractional seconds such as 0.5s)."""
    return f"{int(round(seconds * 1000))}ms"


def prometheus_config(cfg: DemoConfig, nodes: list[str], probes: list[str], detector: str,
                      self_addr: str, rule_files: list[Path]) -> str:
    interval = _duration(cfg.scrape_interval)
    lines = ["global:", f"  scrape_interval: {interval}", f"  scrape_timeout: {interval}",
             f"  evaluation_interval: {interval}"]
    lines += ["rule_files:", *(f"  - {p}" for p in rule_files)] if rule_files else ["rule_files: []"]
    lines.append("scrape_configs:")

    def job(name: str, targets: list[str], every: float | None = None) -> None:
        lines.append(f"  - job_name: {name}")
        if every is not None:
            lines.extend([f"    scrape_interval: {_duration(every)}", f"    scrape_timeout: {_duration(min(every, 10.0))}"])
        lines.extend(["    static_configs:", "      - targets: [" + ", ".join(f"'{t}'" for t in targets) + "]"])

    job("prometheus", [self_addr])
    job("rankwatch-node", nodes, cfg.node_scrape_interval)
    job("rankwatch-probe", probes)
    job("rankwatch-detector", [detector])
    return "\n".join(lines) + "\n"


def _read_new_events(path: Path, offset: int) -> tuple[list[Event], int]:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for line in data[: end + 1].splitlines():
        line = line.strip()
        if line:
            try:
                events.append(Event.from_json(line.decode()))
            except (ValueError, TypeError) as exc:
                log.warning("skipping unreadable event line: %s", exc)
    return events, offset + end + 1


def _scalar(url: str, promql: str) -> float | None:
    try:
        res = promserver.query(url, promql, timeout=3)
    except (RankwatchError, requests.RequestException, ValueError):
        return None
    return float(res[0]["value"][1]) if res else None


def read_detector(metrics_url: str) -> tuple[list[RankScore], float | None]:
    """From the detector's own /metrics: the per-rank straggler score and flagged state, and
    the data time of its last evaluation (None before the first)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = requests.get(metrics_url, timeout=5).text
    except requests.RequestException:
        return [], None
    scores: dict[int, RankScore] = {}
    flagged: set[int] = set()
    evaluated: float | None = None
    for fam in text_string_to_metric_families(text):
        if fam.name == "rankwatch_detector_last_evaluated_timestamp_seconds" and fam.samples:
            evaluated = fam.samples[0].value or None
        elif fam.name == "rankwatch_detector_rank_score":
            for s in fam.samples:
                try:
                    rank = int(s.labels["rank"])
                except (KeyError, ValueError):
                    continue
                scores[rank] = RankScore(rank, s.labels.get("node", ""), s.labels.get("gpu", ""), s.value, False)
        elif fam.name == "rankwatch_detector_rank_flagged":
            flagged |= {int(s.labels["rank"]) for s in fam.samples if s.value > 0 and "rank" in s.labels}
    for r in flagged & scores.keys():
        scores[r].flagged = True
    return sorted(scores.values(), key=lambda r: (not r.flagged, -r.score)), evaluated


class Demo:
    def __init__(self, cfg: DemoConfig, report_dir: Path, *, live: bool | None = None,
                 console: Any = None, on_event: Callable[[Event], None] | None = None) -> None:
        from rich.console import Console

        cfg.validate()
        self.cfg = cfg
        self.timeline: Timeline = build_timeline(cfg)
        # Absolute before anything starts: children run with cwd set to the demo's work directory.
        self.report_dir = report_dir.resolve()
        self.console = console or Console(highlight=False)
        self.live = self.console.is_terminal if live is None else live
        self.on_event = on_event
        self.sv = Supervisor()
        self.work = Path(tempfile.mkdtemp(prefix="rankwatch-demo-"))
        self.logs = self.report_dir / "logs"
        self.events: list[Event] = []
        self.t0 = 0.0

    # ------------------------------------------------------------------ start-up
    def _start_workers(self, role: str, total: int, per_shard: int) -> list[dict[str, Any]]:
        out = []
        for first in range(0, total, per_shard):
            count = min(per_shard, total - first)
            name = f"{role}-{first:04d}"
            ready = self.work / f"{name}.ready.json"
            args = [sys.executable, "-m", "rankwatch.demo.cluster", "--role", role, "--first", str(first),
                    "--count", str(count), "--spec", str(self.work / "spec.json"), "--ready", str(ready),
                    "--start", str(self.work / "start.json"), "--schedule", str(self.work / "schedule.json")]
            proc = self.sv.spawn(f"cluster worker {name}", args, log_path=self.logs / f"cluster-{name}.log",
                                 env=child_env(), cwd=self.work)
            self._worker_procs.setdefault(role, []).append(proc)
            out.append({"proc": proc, "ready": ready})
        return out

    def start(self) -> None:
        from rankwatch.sim.slack import SlackServer

        if self.report_dir.exists():
            shutil.rmtree(self.report_dir)
        self.logs.mkdir(parents=True)
        cfg = self.cfg
        (self.work / "spec.json").write_text(json.dumps({"config": json.loads(cfg.to_json()),
                                                         "timeline": json.loads(self.timeline.to_json())}))
        self.status("starting the local Slack-compatible server")
        self.slack = SlackServer(token=SLACK_TOKEN, channel=SLACK_CHANNEL)
        self.slack.start()
        self.sv.on_close("slack server", self.slack.stop)

        # The dashboards do not depend on the run: generate them while the cluster starts.
        self.dashboards = self.sv.spawn(
            "dashboards generate",
            [sys.executable, "-m", "rankwatch", "dashboards", "generate", "--out", str(self.report_dir / "dashboards")],
            log_path=self.logs / "dashboards.log", env=child_env(), cwd=self.work, service=False)

        # Targets are fixed by the configuration (one loopback address per node), so the
        # workers, Prometheus and the detector all start at once.
        self.status(f"starting {cfg.nodes} node exporters and {cfg.world_size} rank probes, Prometheus, the detector")
        self._worker_procs: dict[str, list[Any]] = {}
        node_workers = self._start_workers("nodes", cfg.nodes, NODES_PER_WORKER)
        rank_workers = self._start_workers("ranks", cfg.world_size, RANKS_PER_WORKER)
        nodes, probes = node_targets(cfg), probe_targets(cfg)

        self.det_port = promserver.free_port()
        prom_port = promserver.free_port()
        rules = assets.rule_files()
        prom_cfg = prometheus_config(cfg, nodes, probes, f"127.0.0.1:{self.det_port}", f"127.0.0.1:{prom_port}",
                                     rules)
        self.prom = promserver.start_prometheus(prom_cfg, workdir=self.work / "prometheus", port=prom_port,
                                                timeout=60)
        self.sv.on_close("prometheus", self.prom.stop)
        (self.report_dir / "prometheus.yml").write_text(prom_cfg)

        det_cfg = self.work / "detector.toml"
        det_cfg.write_text(detector_toml(cfg, self.prom.url, self.slack.api_url))
        shutil.copy(det_cfg, self.report_dir / "detector.toml")
        self.events_path = self.report_dir / "events.jsonl"
        # scrapes of the evaluated window have landed by then (probes every scrape_interval)
        self.query_delay = max(1.0, cfg.scrape_interval * 1.5)
        state_dir = self.work / "detector-state"
        state_dir.mkdir()
        args = [sys.executable, "-m", "rankwatch", "detector", "--prometheus", self.prom.url,
                "--config", str(det_cfg), "--events-file", str(self.events_path), "--quiet",
                "--listen", f"127.0.0.1:{self.det_port}", "--state-dir", str(state_dir),
                "--query-delay", f"{self.query_delay:g}",
                # a busy machine slows Prometheus down before anything else
                "--query-timeout", "15"]
        # WANDB_DIR: the offline W&B run stays in the demo's state directory (the report copies
        # it from there), whatever the user's environment says.
        env = child_env({"SLACK_BOT_TOKEN": SLACK_TOKEN, "WANDB_MODE": "offline", "WANDB_DIR": str(state_dir / "wandb"),
                         "WANDB_SILENT": "true", "WANDB_CONSOLE": "off"})
        self.detector = self.sv.spawn("detector", args, log_path=self.logs / "detector.log", env=env,
                                      cwd=self.work)

        for w, want in [(w, nodes) for w in node_workers] + [(w, probes) for w in rank_workers]:
            wait_for_file(w["ready"], 120, w["proc"], what="cluster worker")
            served = json.loads(w["ready"].read_text())["targets"]
            if not set(served) <= set(want):
                raise RankwatchError(f"cluster worker serves {served[:3]}…, not the configured targets")
        self.status(f"Prometheus scrapes {len(nodes) + len(probes)} targets ({len(rules)} rule files); "
                    "waiting for the detector")
        promserver.wait_http_ok(f"http://127.0.0.1:{self.det_port}/metrics", timeout=60, proc=self.detector)

        # Everything answers: start the clock. Workers poll for this file.
        self.t0 = time.time() + 1.0
        self.pacer = Pacer(cfg, self.timeline, self.t0, lag_s=cfg.eval_interval + self.query_delay + 1.0,
                           patience_s=PATIENCE_EVALUATIONS * cfg.eval_interval)
        write_schedule(self.work / "schedule.json", self.pacer.starts)
        tmp = self.work / "start.json.tmp"
        tmp.write_text(json.dumps({"t0": self.t0}))
        tmp.rename(self.work / "start.json")

    # ------------------------------------------------------------------ main loop
    def status(self, text: str) -> None:
        if hasattr(self, "view"):
            self.view.status = text
        elif not self.live:
            self.console.print(f"[dim]{text}[/dim]")
        else:
            self.console.print(f"[dim]· {text}[/dim]")

    def _poll(self, state: ViewState, offset: int, window: int) -> int:
        new, offset = _read_new_events(self.events_path, offset)
        for ev in new:
            self.events.append(ev)
            state.events.append(ev)
            if self.on_event:
                self.on_event(ev)
            if not self.live:
                self.console.print(event_line(ev, self.t0), markup=False, highlight=False, soft_wrap=True)
        url = self.prom.url
        sel = f'run="{self.cfg.run}"'
        state.tokens_per_s = _scalar(url, f"sum(rate(rankwatch_tokens_total{{{sel}}}[{window}s]))")
        state.step_seconds = _scalar(url, f"avg(rate(rankwatch_step_seconds_total{{{sel}}}[{window}s]) "
                                          f"/ rate(rankwatch_steps_total{{{sel}}}[{window}s]))")
        state.targets_up = int(_scalar(url, 'count(up{job!="prometheus"} == 1)') or 0)
        state.targets_total = int(_scalar(url, 'count(up{job!="prometheus"})') or 0)
        p99 = _scalar(url, 'quantile(0.99, scrape_duration_seconds{job!="prometheus"})')
        state.scrape_p99_ms = None if p99 is None else p99 * 1e3
        slot = state.slot_at(time.time())
        if slot and slot[0] == "benign" and state.tokens_per_s:
            self._healthy.append(state.tokens_per_s)
            state.baseline_tokens_per_s = sorted(self._healthy)[len(self._healthy) // 2]
        ranks, self.evaluated = read_detector(f"http://127.0.0.1:{self.det_port}/metrics")
        ranks = ranks[:8]
        gpn = self.cfg.gpus_per_node
        for r in ranks:
            r.node, r.gpu = self.cfg.node_name(r.rank // gpn), str(r.rank % gpn)
        if ranks:
            # the evidence next to the score: each top rank's own compute time per step
            sel_ranks = f'{sel},rank=~"{"|".join(str(r.rank) for r in ranks)}"'
            try:
                rows = promserver.query(url, (
                    f'sum by (rank) (rate(rankwatch_section_seconds_total{{{sel_ranks},section!~"comm|dataloader"}}'
                    f"[{window}s])) / sum by (rank) (rate(rankwatch_steps_total{{{sel_ranks}}}[{window}s]))"), timeout=3)
                compute = {int(row["metric"]["rank"]): float(row["value"][1]) for row in rows}
            except (RankwatchError, requests.RequestException, ValueError, KeyError):
                compute = {}
            for r in ranks:
                c = compute.get(r.rank)
                r.compute_ms = None if c is None or c != c else c * 1e3
        state.ranks = ranks
        return offset

    def play(self) -> None:
        from rich.live import Live

        cfg = self.cfg
        self._healthy: list[float] = []
        # matplotlib takes seconds to import on a busy machine: do it while the timeline plays.
        threading.Thread(target=_preload_matplotlib, name="preload-matplotlib", daemon=True).start()
        self.view = ViewState(
            title=(f"{cfg.nodes} nodes × {cfg.gpus_per_node} GPUs = {cfg.world_size} ranks "
                   f"(tp {cfg.tp} × pp {cfg.pp} × dp {cfg.dp}), run {cfg.run}, Prometheus {self.prom.url}"),
            timeline=self.pacer.projected(0.0), t0=self.t0)
        self.evaluated = None
        offset = 0
        window = int(cfg.window)
        next_line = 0.0
        live = Live(console=self.console, refresh_per_second=4, transient=False,
                    get_renderable=lambda: render(self.view, width=self.console.width,
                                                  height=self.console.height)) if self.live else None
        if live:
            live.start()
        try:
            while True:
                now = time.time()
                self.sv.check_alive()
                self.view.status = "" if now >= self.t0 else "starting the timeline"
                offset = self._poll(self.view, offset, window)
                if self.pacer.advance(now - self.t0, self.events,
                                      None if self.evaluated is None else self.evaluated - self.t0):
                    write_schedule(self.work / "schedule.json", self.pacer.starts)
                self.view.timeline = self.pacer.projected(now - self.t0)
                end = None if self.pacer.end is None else self.t0 + self.pacer.end
                if not self.live and now >= next_line:
                    tps = self.view.tokens_per_s
                    self.console.print(
                        f"[t+{now - self.t0:5.0f}s] {slot_title(self.view, now)}; throughput "
                        f"{'n/a' if tps is None else f'{tps / 1e3:.1f} k tokens/s'}; targets up "
                        f"{self.view.targets_up}/{self.view.targets_total}",
                        markup=False, highlight=False, soft_wrap=True)
                    next_line = now + 15
                if end is not None and now >= end:
                    break
                time.sleep(1.0 if end is None else max(0.0, min(1.0, end - time.time())))
        finally:
            if live:
                live.stop()
        self._offset = offset

    # ------------------------------------------------------------------ finish
    def _lap(self, name: str) -> None:
        now = time.monotonic()
        self.laps[name] = now - self._lap_start
        self._lap_start = now

    def finish(self) -> DemoResult:
        self.laps: dict[str, float] = {}
        self._lap_start = time.monotonic()
        cfg = self.cfg
        span = time.time() - self.t0
        self.status("collecting resource figures")
        resources = prometheus_resources(self.prom.url, span)
        prom_alerts = prometheus_alerts(self.prom.url, span)
        cpu = {}
        groups = (("node exporters", self._worker_procs["nodes"]),
                  ("rank probes + training sim", self._worker_procs["ranks"]),
                  ("detector", [self.detector]), ("prometheus", [self.prom.proc]))
        for name, procs in groups:
            values = [process_cpu_seconds(p.pid) for p in procs]
            if all(v is not None for v in values):
                cpu[name] = sum(v for v in values if v is not None)
        # Stop the detector politely so it flushes its sinks (Slack outbox, W&B offline run).
        self._lap("report: resource figures")
        self.status("stopping the detector (flushing Slack and W&B)")
        stop_all([self.detector], timeout=30)
        self._lap("report: detector flush and stop")
        # The simulated cluster has nothing more to say: give its CPU to the charts
        # (close() waits for the workers to exit).
        terminate([p for procs in self._worker_procs.values() for p in procs])
        new, self._offset = _read_new_events(self.events_path, self._offset)
        # The W&B offline run lives in the detector's state directory: keep it in the report.
        wandb_dir = self.work / "detector-state" / "wandb"
        if wandb_dir.is_dir():
            # latest-run is a symlink to one of the runs: copying it would duplicate that run
            shutil.copytree(wandb_dir, self.report_dir / "wandb", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("latest-run"))
        self.events.extend(new)
        played = self.pacer.played()
        incidents = expected_incidents(cfg, played, self.t0)
        verdict = judge(incidents, self.events, grace=cfg.window + 6 * cfg.eval_interval)
        messages = [asdict(m) for m in self.slack.messages]
        self.status("drawing charts and generating dashboards")
        thermal = next((f for f in played.faults if f.kind == "thermal"), None)
        efa = next((f for f in played.faults if f.kind == "efa_degraded"), None)
        from rankwatch.demo.charts import draw_all

        charts: list[Path] = []
        try:
            charts = draw_all(self.prom.url, self.report_dir / "charts", t0=self.t0, end=time.time(),
                              step=max(1.0, cfg.scrape_interval), window=cfg.window, incidents=incidents,
                              events=self.events, run=cfg.run,
                              thermal=(cfg.node_name(thermal.node), str(thermal.local_rank))
                              if thermal and thermal.node is not None else None,
                              efa_node=cfg.node_name(efa.node) if efa and efa.node is not None else None)
        except (ValueError, requests.RequestException) as exc:
            log.warning("charts: %s", exc)
        self._lap("report: charts")
        try:
            dashboards_ok = self.dashboards.wait(timeout=120) == 0
        except subprocess.TimeoutExpired:
            dashboards_ok = False
        wandb_alerts: list[dict[str, Any]] = []
        if (self.report_dir / "wandb").is_dir():
            from rankwatch.alerts.wandb_notifier import offline_alerts

            try:
                wandb_alerts = offline_alerts(self.report_dir / "wandb")
            except Exception as exc:  # noqa: BLE001 - the report goes on without them
                log.warning("could not read the W&B offline run: %s", exc)
        result = DemoResult(verdict, self.events, self.report_dir, resources, messages, prom_alerts, wandb_alerts,
                            cpu, wall_seconds=span, t0=self.t0, held=dict(self.pacer.held))
        report_mod.write(result, cfg=cfg, t0=self.t0, charts=charts, dashboards_ok=dashboards_ok)
        self._lap("report: write")
        return result

    def close(self) -> list[int]:
        self.sv.close()
        shutil.rmtree(self.work, ignore_errors=True)
        return [pid for pid in self.sv.pids if _alive(pid)]


def _preload_matplotlib() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is dead for our purpose (it was reaped by Popen.wait already in practice).
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_demo(cfg: DemoConfig, report_dir: Path, *, live: bool | None = None, console: Any = None) -> DemoResult:
    """Run the whole demo; every process it started is stopped before this returns or raises."""
    demo = Demo(cfg, report_dir, live=live, console=console)
    phases: dict[str, float] = {}
    with sigterm_as_interrupt():
        try:
            began = time.monotonic()
            demo.start()
            phases["start-up"] = time.monotonic() - began
            demo.play()
            phases["timeline"] = time.monotonic() - began - phases["start-up"]
            result = demo.finish()
        finally:
            leftover = demo.close()
            phases["report and clean-up"] = time.monotonic() - began - sum(phases.values())
    result.leftover_pids = leftover
    result.phases = phases
    log.info("demo phases: %s; report steps: %s", phases, getattr(demo, "laps", {}))
    result.laps = dict(getattr(demo, "laps", {}))
    with (result.report_dir / "summary.md").open("a") as fh:
        fh.write("\n## Wall time\n\n" + "".join(f"- {k}: {v:.0f} s\n" for k, v in phases.items())
                 + f"- total: {sum(phases.values()):.0f} s\n")
    return result


def detector_toml(cfg: DemoConfig, prom_url: str, slack_api_url: str) -> str:
    """The detector's configuration for compressed time. Only cadence-bound settings change
    from the defaults (which are for 15 s windows over hours): the statistical thresholds —
    z-score, minimum slowdown, the sequential test's charts and hysteresis in windows — stay as
    shipped; the charts' seconds (minimum durations, thresholds of excess) shrink with the
    windows, as the demo's time does."""
    from rankwatch.detectors.config import DetectorConfig

    warmup = max(cfg.window, cfg.warmup_seconds / 2)
    shipped = DetectorConfig()
    scale = cfg.window / shipped.window_s
    durations = ", ".join(f"{d * scale:g}" for d in shipped.cusum_min_duration_s)
    thresholds = ", ".join(f"{h * scale:g}" for h in shipped.cusum_thresholds_s)
    # A hang is no step for max(hang_factor × median step, hang_min_s): the simulated job's
    # evaluation step takes three nominal steps, so ten keep well clear of it while still
    # catching the XID 79 hang inside its slot.
    hang_min = max(3.0, 10 * cfg.step_seconds)
    group_window = max(5.0, cfg.incident_seconds / 3)
    return f"""# rankwatch demo: detector settings for compressed time (see `rankwatch detector --help`)
[detector]
interval_s = {cfg.eval_interval:g}
window_s = {cfg.window:g}
warmup_s = {warmup:g}
hang_min_s = {hang_min:g}
cusum_min_duration_s = [{durations}]
cusum_thresholds_s = [{thresholds}]

[slack]
bot_token_env = "SLACK_BOT_TOKEN"
channel = "{SLACK_CHANNEL}"
api_url = "{slack_api_url}"
chart = true
chart_window_s = 600

[wandb]
project = "rankwatch-demo"
group = "{cfg.run}"
mode = "offline"

[notify]
group_wait_s = {min(3.0, cfg.eval_interval):g}
group_window_s = {group_window:g}
min_interval_s = 0.2
retry_interval_s = 2
close_timeout_s = 15

[links]
prometheus_url = "{prom_url}"
"""
