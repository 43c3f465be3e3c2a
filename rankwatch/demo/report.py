"""The demo's report directory and its printed summary.

``demo-report/``
  ``summary.md``          per incident: injected at, detected at, delay, correct or not; false alarms;
                          Prometheus resource use
  ``verdict.json``        the same verdict for scripts (``verdict_json``)
  ``events.jsonl``        the detector's events, as it wrote them
  ``slack-messages.json`` every request the detector made to the Slack-compatible server
  ``charts/*.png``        throughput, per-rank compute heatmap, hardware evidence
  ``dashboards/``         the generated Grafana dashboards
  ``wandb/``              the detector's W&B offline run (alerts and scores)
  ``prometheus.yml``, ``detector.toml``, ``logs/``"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from rankwatch.demo.scenario import DemoConfig
from rankwatch.demo.scoring import IncidentResult, entity_of
from rankwatch.events import Event

if TYPE_CHECKING:
    from rankwatch.demo.runner import DemoResult


def _t(v: float | None, t0: float) -> str:
    return "—" if v is None else f"t+{v - t0:.0f}s"


def incident_rows(results: Sequence[IncidentResult], t0: float) -> list[list[str]]:
    rows = []
    for r in results:
        inc = r.incident
        if inc.benign:
            found = ", ".join(f"{e.kind} {entity_of(e)}" for e in r.wrong) or "nothing (as it should)"
            rows.append([inc.title, _t(inc.start, t0), "—", "—", found, "yes" if r.correct else "NO (false alarm)"])
            continue
        found = "; ".join(sorted({f"{e.kind} {entity_of(e)}" for e in r.matched})) or "nothing"
        verdict = "yes" if r.correct else "NO: missing " + ", ".join(x.describe() for x in r.missing)
        delay = "—" if r.delay is None else f"{r.delay:.0f}s"
        rows.append([inc.title, _t(inc.start, t0), _t(r.detected_at, t0), delay, found, verdict])
    return rows


HEADERS = ["incident", "injected", "detected", "delay", "events", "correct"]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _event(e: Event) -> dict[str, Any]:
    return {"time": e.time, "kind": e.kind, "state": e.state, "rank": e.rank, "node": e.node, "gpu": e.gpu,
            "nic": e.nic, "summary": e.summary}


def verdict_json(result: DemoResult) -> dict[str, Any]:
    """The judge's verdict for scripts and CI: each incident's slot (Unix seconds), first
    detection, matched events and what is missing; false alarms; the slots held past their
    scripted length and why; Prometheus' resource figures."""
    v = result.verdict
    return {
        "all_correct": v.all_correct,
        "t0": result.t0,
        "incidents": [{"name": r.incident.name, "benign": r.incident.benign, "start": r.incident.start,
                       "end": r.incident.end, "detected_at": r.detected_at, "correct": r.correct,
                       "required": [x.describe() for x in r.incident.required],
                       "missing": [x.describe() for x in r.missing],
                       "matched": [_event(e) for e in r.matched], "wrong": [_event(e) for e in r.wrong]}
                      for r in v.results],
        "false_alarms": [_event(e) for e in v.false_alarms],
        "held": result.held,
        "resources": asdict(result.resources) if result.resources else None,
    }


def write(result: DemoResult, *, cfg: DemoConfig, t0: float, charts: Sequence[Path], dashboards_ok: bool) -> None:
    d = result.report_dir
    v = result.verdict
    (d / "slack-messages.json").write_text(json.dumps(result.slack_messages, indent=2, default=str))
    (d / "wandb-alerts.json").write_text(json.dumps(result.wandb_alerts, indent=2, default=str))
    (d / "prometheus-alerts.json").write_text(json.dumps(result.prometheus_alerts, indent=2))
    (d / "verdict.json").write_text(json.dumps(verdict_json(result), indent=2, default=str) + "\n")
    rows = incident_rows(v.results, t0)
    fa_rows = [[_t(e.time, t0), e.kind, entity_of(e), e.summary] for e in v.false_alarms]
    res_rows = result.resources.rows() if result.resources else []
    cpu_rows = [[k, f"{s:.1f} s", f"{s / max(result.wall_seconds, 1):.2f}"] for k, s in result.cpu_seconds.items()]
    md = [
        "# rankwatch demo report",
        "",
        f"Cluster: {cfg.nodes} nodes × {cfg.gpus_per_node} GPUs = {cfg.world_size} ranks (tp {cfg.tp} × pp {cfg.pp} × "
        f"dp {cfg.dp}), run `{cfg.run}`. Scrape every {cfg.scrape_interval:g} s, detector every "
        f"{cfg.eval_interval:g} s over a {cfg.window:g} s window, one training step per {cfg.step_seconds:g} s.",
        "",
        "## Incidents",
        "",
        markdown_table(HEADERS, rows),
        "",
        f"False alarms: {len(v.false_alarms)}",
        "",
    ]
    if fa_rows:
        md += [markdown_table(["fired", "kind", "entity", "summary"], fa_rows), ""]
    if result.held:
        md += ["Slots held past their scripted length (each waits until the detector has seen what it is for):", "",
               *(f"- {slot}: waited for {why}" for slot, why in result.held.items()), ""]
    md += [f"Verdict: {'every incident caught with the right kind and entity, nothing else fired' if v.all_correct else 'NOT all correct'}.",
           "", "## Alerts delivered", "",
           f"- Slack: {len(result.slack_messages)} messages (`slack-messages.json`)",
           f"- W&B (offline run): {len(result.wandb_alerts)} alerts (`wandb-alerts.json`)",
           f"- Prometheus rules (`alerts/*.yml`) that fired: {len(result.prometheus_alerts)} (`prometheus-alerts.json`)",
           ""]
    if result.prometheus_alerts:
        md += [markdown_table(["alert", "labels"], [[a.get("alertname", ""), ", ".join(
            f"{k}={val}" for k, val in a.items() if k != "alertname")] for a in result.prometheus_alerts]), ""]
    md += ["## Prometheus resource use", "", markdown_table(["figure", "value"], res_rows), "",
           "## CPU time of the demo's processes", "",
           markdown_table(["process", "CPU", "cores (avg over the timeline)"], cpu_rows), "",
           "## Files", "",
           f"- `events.jsonl`: {len(result.events)} detector events",
           f"- `slack-messages.json`: {len(result.slack_messages)} messages as the Slack-compatible server received them",
           "- `wandb-alerts.json`, `prometheus-alerts.json`: the W&B alerts and the Prometheus rule alerts",
           *(f"- `charts/{p.name}`" for p in charts),
           f"- `dashboards/`: {'generated Grafana dashboards' if dashboards_ok else 'generation failed, see logs/dashboards.log'}",
           "- `wandb/`: the detector's W&B offline run (`wandb sync` uploads it)", ""]
    (d / "summary.md").write_text("\n".join(md))


def print_summary(result: DemoResult, console: Console, t0: float) -> None:
    v = result.verdict
    table = Table(title="incidents", title_justify="left")
    for h in HEADERS:
        table.add_column(h)
    for row, r in zip(incident_rows(v.results, t0), v.results, strict=True):
        table.add_row(*row, style="green" if r.correct else "bold red")
    console.print(table)
    if v.false_alarms:
        fa = Table(title="false alarms", title_justify="left")
        for h in ("fired", "kind", "entity", "summary"):
            fa.add_column(h)
        for e in v.false_alarms:
            fa.add_row(_t(e.time, t0), e.kind, entity_of(e), e.summary, style="red")
        console.print(fa)
    else:
        console.print("false alarms: none")
    if result.resources:
        rt = Table(title=f"Prometheus resource use ({result.resources.scrape_targets} targets)", title_justify="left")
        rt.add_column("figure")
        rt.add_column("value", justify="right")
        for k, val in result.resources.rows():
            rt.add_row(k, val)
        console.print(rt)
    if result.phases:
        console.print(f"finished in {sum(result.phases.values()):.0f} s ("
                      + ", ".join(f"{k} {v:.0f} s" for k, v in result.phases.items()) + ")")
    console.print(f"alerts delivered: {len(result.slack_messages)} Slack messages, {len(result.wandb_alerts)} W&B alerts; "
                  f"{len(result.prometheus_alerts)} Prometheus rule alerts fired")
    console.print(f"report: {result.report_dir}/ (summary.md, events.jsonl, slack-messages.json, charts/, "
                  f"dashboards/, wandb/)")
