"""What a notification says: pure functions from an incident to a Slack Block Kit message, a
plain-text rendering (Slack's notification/fallback text, W&B alert text, Alertmanager
description) and short titles. Built for a tired on-call engineer: what, where, how bad, the
evidence, since when, and links — readable in five seconds.

Run and node labels come from whoever starts a training job: every piece of text taken from an
event goes through ``escape_mrkdwn`` before it lands in Slack mrkdwn (block text, fields, the
notification text, thread replies), so ``<!channel>`` stays text instead of pinging the channel
and ``<https://evil.example|click here>`` cannot disguise a link. ``plain_text`` objects (the
header, button labels) are never parsed by Slack and stay as they are."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from rankwatch.alerts.config import LinksConfig
from rankwatch.alerts.lifecycle import EpisodeView, IncidentView
from rankwatch.alerts.links import render as render_link
from rankwatch.events import Event

KIND_LABELS = {
    "straggler": "Straggler",
    "gpu_fault": "Failing GPU",
    "network": "Degraded network",
    "hang": "Training hang",
    "throughput_drop": "Throughput drop",
    "data_gap": "Data gap",
}
SEVERITY_EMOJI = {"critical": ":red_circle:", "warning": ":large_orange_circle:", "info": ":large_blue_circle:"}
RESOLVED_EMOJI = ":white_check_mark:"

# Evidence keys with a known meaning (fractions are shown as percentages). Everything else in
# the evidence is shown generically, scalars only.
_SLOWDOWN_KEYS = ("slowdown", "compute_slowdown", "relative_slowdown", "slowdown_rel")
# Fraction of the job's step time this problem costs (the detector's est_job_speedup).
_LOSS_KEYS = ("throughput_loss", "est_job_speedup", "est_throughput_loss", "estimated_throughput_loss")
_HIDDEN_KEYS = {"compute_series", "series", "chart", "flagged_evaluations", "first_flagged_time"}
# Shown first when present: what explains it and the numbers an engineer compares.
_PRIORITY_KEYS = ("explanation", "cause", "compute_s", "peer_compute_s", "comm_wait_s", "peer_comm_wait_s",
                  "dataloader_s", "peer_dataloader_s", "step_s", "est_step_saving_s", "xid", "xids", "peer_group")
MAX_EVIDENCE_LINES = 8
_LABELS = {
    "explanation": "why", "cause": "cause", "compute_s": "compute per step", "peer_compute_s": "peers' compute per step",
    "comm_wait_s": "comm wait per step", "peer_comm_wait_s": "peers' comm wait per step",
    "dataloader_s": "dataloader per step", "peer_dataloader_s": "peers' dataloader per step", "step_s": "step time",
    "est_step_saving_s": "step time saved without it", "peer_group": "compared with", "peer_group_size": "peers",
}


def escape_mrkdwn(text: str) -> str:
    """Slack's three control characters as the entities Slack documents: ``&`` first."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _same(text: str) -> str:
    return text


def kind_label(kind: str) -> str:
    return KIND_LABELS.get(kind, kind.replace("_", " ").capitalize())


def _fmt_num(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01:
        return f"{v:.3g}"
    return f"{v:.2e}"


def _fmt_value(key: str, v: Any) -> str | None:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int | float):
        if key in _SLOWDOWN_KEYS or key in _LOSS_KEYS or key.endswith(("_rel", "_frac", "_ratio", "_slowdown")):
            return f"{v * 100:+.1f} %" if key in _SLOWDOWN_KEYS else f"{v * 100:.1f} %"
        if isinstance(v, int):
            return f"{v:,}"
        return _fmt_num(float(v))
    if isinstance(v, str):
        return v if len(v) <= 120 else v[:117] + "…"
    if isinstance(v, list | tuple) and len(v) <= 8 and all(isinstance(x, str | int | float) for x in v):
        return ", ".join(_fmt_value("", x) or "" for x in v)
    return None  # nested objects and long series are for the chart, not the text


def _first(evidence: Mapping[str, Any], keys: Iterable[str]) -> float | None:
    for k in keys:
        v = evidence.get(k)
        if isinstance(v, int | float) and not isinstance(v, bool):
            return float(v)
    return None


def where(ev: Event) -> str:
    parts = []
    if ev.rank is not None:
        parts.append(f"rank {ev.rank}")
    if ev.node:
        parts.append(f"node {ev.node}")
    if ev.gpu not in (None, ""):
        parts.append(f"GPU {ev.gpu}")
    if ev.nic:
        parts.append(f"NIC {ev.nic}")
    return " · ".join(parts) or "whole run"


def short_where(ev: Event) -> str:
    if ev.rank is not None:
        s = f"rank {ev.rank}"
        if ev.node:
            s += f" on {ev.node}"
        if ev.gpu not in (None, ""):
            s += f" (GPU {ev.gpu})"
        return s
    if ev.node:
        return ev.node + (f" GPU {ev.gpu}" if ev.gpu not in (None, "") else "") + (f" {ev.nic}" if ev.nic else "")
    return "whole run"


def how_bad(ev: Event) -> str:
    parts = [ev.severity]
    slow = _first(ev.evidence, _SLOWDOWN_KEYS)
    if slow is not None:
        parts.append(f"{slow * 100:+.0f} % vs peers")
    loss = _first(ev.evidence, _LOSS_KEYS)
    if loss is not None:
        parts.append(f"≈{loss * 100:.0f} % job throughput lost")
    if ev.score:
        parts.append(f"score {_fmt_num(ev.score)}")
    return " · ".join(parts)


def evidence_lines(ev: Event, limit: int = MAX_EVIDENCE_LINES) -> list[str]:
    lines: list[str] = []
    flat: list[tuple[str, Any]] = []
    shown = set(_SLOWDOWN_KEYS) | set(_LOSS_KEYS) | _HIDDEN_KEYS
    keys = [k for k in _PRIORITY_KEYS if k in ev.evidence] + [k for k in ev.evidence if k not in _PRIORITY_KEYS]
    for k in keys:
        v = ev.evidence[k]
        if k in shown or k.startswith(("z_", "smoothed_")):
            continue  # already in "how bad", or statistics internals
        if isinstance(v, Mapping):
            flat += [(f"{k}.{k2}", v2) for k2, v2 in v.items() if not isinstance(v2, Mapping | list)]
        else:
            flat.append((k, v))
    for k, v in flat:
        text = _fmt_value(k.rsplit(".", 1)[-1], v)
        if not text:  # nothing to show (an empty explanation): no empty "why:" line
            continue
        leaf = k.rsplit(".", 1)[-1]
        label = _LABELS.get(k) or k.replace("_", " ")
        if leaf.endswith("_s") and isinstance(v, int | float) and not isinstance(v, bool):
            label = _LABELS.get(k) or k[:-2].replace("_", " ")
            text += " s"
        lines.append(f"{label}: {text}")
        if len(lines) >= limit:
            break
    return lines


def _rank_ranges(ranks: list[int]) -> str:
    ranks = sorted(set(ranks))
    out: list[str] = []
    start = prev = None
    for r in ranks + [None]:  # type: ignore[list-item]
        if start is None:
            start = prev = r
        elif r is not None and r == prev + 1:
            prev = r
        else:
            out.append(str(start) if start == prev else f"{start}–{prev}")
            start = prev = r
    return ", ".join(out)


def _utc(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def slack_date(ts: float) -> str:
    """Slack renders this in the reader's time zone; the fallback is UTC."""
    return f"<!date^{int(ts)}^{{date_short_pretty}} {{time_secs}}|{_utc(ts)}>"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class Rendered:
    text: str  # notification / fallback text (also the plain-text rendering's first line)
    blocks: list[dict[str, Any]]
    title: str  # short title (W&B alert, chart)


def headline(view: IncidentView) -> str:
    """'Straggler: rank 37 on p5-012 (GPU 3)', 'Failing GPU + Straggler: rank 29 on node-03 (GPU 5)'
    or 'Degraded network: 40 ranks on 3 nodes'."""
    kinds = sorted({e.firing.kind for e in view.episodes})
    if len(kinds) == 1:
        label = kind_label(kinds[0])
    elif len(kinds) == 2:
        label = " + ".join(kind_label(k) for k in kinds)
    else:
        label = "Multiple problems"
    if len(view.episodes) == 1:
        return f"{label}: {short_where(view.episodes[0].firing)}"
    ranks = sorted({e.firing.rank for e in view.episodes if e.firing.rank is not None})
    nodes = sorted({e.firing.node for e in view.episodes if e.firing.node})
    if len(ranks) == 1 and len(nodes) <= 1:
        # One rank seen from several sides (a throttling GPU and the straggler it causes): name it.
        named = [e.firing for e in view.episodes if e.firing.rank == ranks[0]]
        best = view.culprit.firing if view.culprit.firing.rank == ranks[0] else named[0]
        return f"{label}: {short_where(best)}"
    what = f"{len(ranks)} ranks" if ranks else f"{len(view.episodes)} problems"
    if nodes:
        what += f" on {len(nodes)} node{'s' if len(nodes) != 1 else ''}"
    return f"{label}: {what}"


def render_incident(view: IncidentView, action: str, links: LinksConfig, *, now: float | None = None,
                    chart_note: str | None = None) -> Rendered:
    """The main message of an incident (posted on firing, rewritten on update and resolve)."""
    culprit = view.culprit.firing
    # A firing message delivered late (Slack was down) still says what fired; the resolved
    # notification that follows rewrites it.
    resolved = action == "resolved"
    run = view.run or "(no run label)"
    head = headline(view)
    since = min((e.firing.since if e.firing.since is not None else e.firing.time) for e in view.episodes)
    end = view.resolved_at if resolved and view.resolved_at is not None else None
    emoji = RESOLVED_EMOJI if resolved else SEVERITY_EMOJI.get(view.severity, ":warning:")
    header = f"{emoji} {'Resolved · ' if resolved else ''}{head}"
    if len(header) > 150:
        header = header[:149] + "…"

    e = escape_mrkdwn
    summary = e(culprit.summary or head)
    if len(view.episodes) > 1:
        nodes = sorted({ep.firing.node for ep in view.episodes if ep.firing.node})
        summary += f"\n*{len(view.episodes)} episodes in this run* started within a few minutes of each other"
        if nodes:
            shown = ", ".join(escape_mrkdwn(n) for n in nodes[:6]) + (f" and {len(nodes) - 6} more" if len(nodes) > 6 else "")
            summary += f" — nodes {shown}"
        summary += ": likely one shared cause."
    if resolved and end is not None:
        summary = f"*Recovered* after {_duration(end - since)}. " + summary

    fields = [
        {"type": "mrkdwn", "text": f"*Run*\n{e(run)}"},
        {"type": "mrkdwn", "text": f"*Where*\n{e(where(culprit))}"},
        {"type": "mrkdwn", "text": f"*How bad*\n{e(how_bad(culprit))}"},
        {"type": "mrkdwn", "text": f"*Since*\n{slack_date(since)}" + (f"\n*Resolved* {slack_date(end)}" if end else "")},
    ]
    if len(view.episodes) > 1:
        ranks = [ep.firing.rank for ep in view.episodes if ep.firing.rank is not None]
        active = len(view.active)
        fields.append({"type": "mrkdwn", "text": f"*Affected ranks*\n{_rank_ranges(ranks) or '—'}"})
        if not resolved:
            fields.append({"type": "mrkdwn", "text": f"*Still firing*\n{active} of {len(view.episodes)}"})

    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": header, "emoji": True}},
        {"type": "section", "text": {"type": "mrkdwn", "text": truncate(summary, 3000)}},
        {"type": "section", "fields": [{**f, "text": truncate(f["text"], 2000)} for f in fields[:10]]},
    ]
    ev_lines = evidence_lines(culprit)
    if ev_lines:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": truncate(
            "*Evidence*\n" + "\n".join(f"• {e(ln)}" for ln in ev_lines), 3000)}})
    buttons = link_buttons(culprit, links, now=now)
    if buttons:
        blocks.append({"type": "actions", "elements": buttons})
    context = (f"rankwatch detector · incident #{view.id} · {e(culprit.kind)} · "
               f"episode `{e(culprit.episode or '-')}`")
    if chart_note:
        context += f" · {chart_note}"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": truncate(context, 3000)}]})
    return Rendered(text=truncate(notification_text(view, action, e), 3000), blocks=blocks,
                    title=f"#{view.id} {head}"[:63])


def notification_text(view: IncidentView, action: str, escape: Any = _same) -> str:
    """'[WARNING] Straggler: rank 37 on p5-012 (GPU 3) — run llama. Rank 37 spends …'; ``escape``
    is applied to every piece taken from the event."""
    resolved = action == "resolved"
    prefix = "Resolved" if resolved else ("Still firing" if action == "reminder" else view.severity.upper())
    culprit = view.culprit.firing
    run = view.run or "(no run label)"
    return f"[{prefix}] {escape(headline(view))} — run {escape(run)}. {escape(culprit.summary or '')}".strip()


def truncate(text: str, limit: int) -> str:
    """At most ``limit`` characters, never ending inside an entity (``&lt;`` cut to ``&l``)."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    amp = cut.rfind("&", max(0, len(cut) - 5))
    if amp != -1 and ";" not in cut[amp:]:
        cut = cut[:amp]
    return cut + "…"


def link_buttons(ev: Event, links: LinksConfig, *, now: float | None = None) -> list[dict[str, Any]]:
    out = []
    for label, template, action_id in (("Grafana: node", links.grafana_url, "open_grafana"),
                                       ("W&B run", links.wandb_run_url, "open_wandb"),
                                       ("Runbook", links.runbook_url, "open_runbook")):
        url = render_link(template, ev, now=now)
        if url:
            out.append({"type": "button", "text": {"type": "plain_text", "text": label}, "url": url,
                        "action_id": action_id})
    return out


def render_thread_reply(view: IncidentView, action: str) -> str:
    head = escape_mrkdwn(headline(view))
    since = min((e.firing.since if e.firing.since is not None else e.firing.time) for e in view.episodes)
    if action == "resolved":
        end = view.resolved_at if view.resolved_at is not None else since
        return f"{RESOLVED_EMOJI} Resolved after {_duration(end - since)}: {head}."
    if action == "reminder":
        return (f":repeat: Still firing (reminder {view.reminders}): {head} — "
                f"{len(view.active)} of {len(view.episodes)} episodes open since {slack_date(since)}.")
    return f"{head}: {len(view.active)} of {len(view.episodes)} still firing."


def render_plain(view: IncidentView, action: str, links: LinksConfig, *, now: float | None = None,
                 escape: Any = _same) -> str:
    """The same message as plain text: logs, the README sample, and (with ``escape=escape_mrkdwn``)
    W&B alert text, which W&B forwards to Slack."""
    culprit = view.culprit.firing
    e = escape
    since = min((ep.firing.since if ep.firing.since is not None else ep.firing.time) for ep in view.episodes)
    lines = [notification_text(view, action, e), f"Where: {e(where(culprit))}", f"How bad: {e(how_bad(culprit))}",
             f"Since: {_utc(since)}"]
    if action == "resolved" and view.resolved_at is not None:
        lines.append(f"Resolved: {_utc(view.resolved_at)} (after {_duration(view.resolved_at - since)})")
    if len(view.episodes) > 1:
        ranks = [ep.firing.rank for ep in view.episodes if ep.firing.rank is not None]
        lines.append(f"Affected ranks: {_rank_ranges(ranks)} ({len(view.active)} of {len(view.episodes)} still firing)")
    ev = evidence_lines(culprit)
    if ev:
        lines.append("Evidence:")
        lines += [f"  - {e(ln)}" for ln in ev]
    for b in link_buttons(culprit, links, now=now):
        lines.append(f"{b['text']['text']}: {b['url']}")
    return "\n".join(lines)


def episode_description(ep: EpisodeView) -> str:
    ev = ep.firing
    lines = [ev.summary, f"Where: {where(ev)}", f"How bad: {how_bad(ev)}"]
    lines += evidence_lines(ev)
    return "\n".join(lines)
