"""Shared pieces of the rankwatch dashboards: the datasource and `run`/`node`/`gpu` variables,
links that carry them between dashboards, a grid layout helper, and the post-processing that
replaces grafanalib 0.7.1's stale defaults with what current Grafana expects."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import attr
from grafanalib._gen import DashboardEncoder
from grafanalib.core import (
    REFRESH_ON_TIME_RANGE_CHANGE,
    SORT_ALPHA_ASC,
    SORT_NUMERIC_ASC,
    Dashboard,
    DashboardLink,
    GridPos,
    RowPanel,
    Target,
    Template,
)

TAG = "rankwatch"
# Every panel and variable reads from the datasource chosen in `$datasource`, so the same JSON
# works on self-hosted Grafana (provisioned uid "prometheus") and Amazon Managed Grafana
# (whatever uid the AMP datasource got there).
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's current dashboard schema; grafanalib still writes 12 and Grafana would migrate
# every load. Fields below are written in their schema-39 form.
SCHEMA_VERSION = 39

UIDS = {
    "training_run": "rankwatch-training-run",
    "gpu_health": "rankwatch-gpu-health",
    "efa_network": "rankwatch-efa-network",
    "node": "rankwatch-node",
}

# Series-join helpers (DESIGN "Joining series"): EFA series carry no host label, so they reach
# the host name through the node exporter's `rankwatch_node_info{Hostname}` on `instance`.
NODE_INFO_JOIN = 'on(instance) group_left(Hostname) rankwatch_node_info{{Hostname=~"{node}"}}'


def efa_by_host(expr: str, node: str = "$node") -> str:
    """``expr`` (an EFA series expression keeping `instance`) with a `Hostname` label added."""
    return f"({expr}) * {NODE_INFO_JOIN.format(node=node)}"


# --- variables --------------------------------------------------------------------------------

def datasource_variable() -> Template:
    return Template(name="datasource", label="Data source", query="prometheus", type="datasource",
                    default="Prometheus")


def query_variable(name: str, label: str, query: str, *, multi: bool = True, numeric: bool = False) -> Template:
    """A `label_values(...)` variable refreshed on time-range change; multi-select ones offer
    All as `.*` so that queries use `=~"$var"` and stay short on big fleets."""
    return Template(
        name=name,
        label=label,
        query=query,
        dataSource=DATASOURCE,
        refresh=REFRESH_ON_TIME_RANGE_CHANGE,
        multi=multi,
        includeAll=multi,
        allValue=".*" if multi else None,
        sort=SORT_NUMERIC_ASC if numeric else SORT_ALPHA_ASC,
    )


def run_variable() -> Template:
    return query_variable("run", "Run", "label_values(rankwatch_rank_info, run)", multi=False)


# --- links ------------------------------------------------------------------------------------

def dashboard_links() -> list[DashboardLink]:
    """A drop-down of every rankwatch dashboard; the current variables (`run`, `node`, `gpu`)
    and time range travel with the click."""
    return [DashboardLink(title="rankwatch", tags=[TAG], asDropdown=True, includeVars=True, keepTime=True,
                          type="dashboards")]


def drill_link(title: str, dashboard: str, **params: str) -> dict[str, Any]:
    """A panel/field data link into another rankwatch dashboard, e.g. from a rank's series to
    its node. ``params`` are variable values, Grafana template syntax allowed."""
    query = "&".join(f"var-{k}={v}" for k, v in params.items())
    return {"title": title, "url": f"/d/{UIDS[dashboard]}/?{query}&${{__url_time_range}}"}


# --- panels -----------------------------------------------------------------------------------

def target(expr: str, legend: str = "", *, ref: str = "A", instant: bool = False, table: bool = False) -> Target:
    return Target(expr=expr, legendFormat=legend, refId=ref, instant=instant, datasource=DATASOURCE,
                  format="table" if table else "time_series")


def grid(rows: Sequence[tuple[str | None, Sequence[tuple[Any, int, int]]]]) -> list[Any]:
    """Lay out panels on Grafana's 24-column grid: ``rows`` is ``[(row title or None,
    [(panel, width, height), ...]), ...]``; panels wrap when a line is full."""
    out: list[Any] = []
    y = 0
    for title, panels in rows:
        if title is not None:
            out.append(RowPanel(title=title, gridPos=GridPos(h=1, w=24, x=0, y=y)))
            y += 1
        x = 0
        line_h = 0
        for panel, w, h in panels:
            if x + w > 24:
                x, y, line_h = 0, y + line_h, 0
            out.append(attr.evolve(panel, gridPos=GridPos(h=h, w=w, x=x, y=y)))
            x += w
            line_h = max(line_h, h)
        y += line_h
    return out


def prometheus_annotation(name: str, expr: str, *, title: str, text: str = "", tags: str = "",
                          color: str = "red", step: str = "30s") -> dict[str, Any]:
    """A Prometheus annotation query: each non-zero sample of ``expr`` becomes an annotation
    (adjacent samples merge into a region)."""
    return {
        "datasource": DATASOURCE,
        "enable": True,
        "expr": expr,
        "iconColor": color,
        "name": name,
        "step": step,
        "titleFormat": title,
        "textFormat": text,
        "tagKeys": tags,
        "useValueForTime": False,
    }


BUILTIN_ANNOTATION = {
    "builtIn": 1,
    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
    "enable": True,
    "hide": True,
    "iconColor": "rgba(0, 211, 255, 1)",
    "name": "Annotations & Alerts",
    "type": "dashboard",
}


# --- rendering --------------------------------------------------------------------------------

LEGACY_HEATMAP_KEYS = ("cards", "color", "dataFormat", "heatmap", "hideZeroBuckets", "highlightCards", "legend",
                       "reverseYBuckets", "tooltip", "xAxis", "yAxis", "xBucketNumber", "xBucketSize",
                       "yBucketBound", "yBucketNumber", "yBucketSize")


def _modernise_panel(panel: dict[str, Any]) -> None:
    # grafanalib's maxDataPoints=100 caps a 1 h range at a 36 s step and a 7 d range at 1.7 h;
    # without the key Grafana uses the panel's pixel width.
    panel.pop("maxDataPoints", None)
    panel.pop("error", None)
    for key in [k for k, v in panel.items() if v is None]:
        panel.pop(key)
    defaults = panel.get("fieldConfig", {}).get("defaults", {})
    thresholds = defaults.get("thresholds")
    if thresholds is not None and not thresholds.get("steps"):
        # grafanalib writes "" (Stat) or [] here; Grafana needs a base step to colour anything.
        thresholds["steps"] = [{"color": "green", "value": None}]
    if defaults.get("noValue") == "none":  # grafanalib's Stat default shows the word "none"
        defaults.pop("noValue")
    for key in [k for k, v in defaults.items() if v is None]:
        defaults.pop(key)
    if panel.get("type") == "heatmap":
        # grafanalib writes the pre-Grafana-9 (Angular) heatmap; the options set through
        # extraJson are the current panel's, and the legacy keys would only invite a migration.
        for key in LEGACY_HEATMAP_KEYS:
            panel.pop(key, None)
        panel["pluginVersion"] = "10.4.0"
    if panel.get("type") == "table":
        # Angular-table leftovers; value mappings live in fieldConfig.defaults.mappings.
        for key in ("color", "columns", "fontSize", "mappings", "styles"):
            panel.pop(key, None)
    if panel.get("type") != "row":
        panel["datasource"] = DATASOURCE
    for t in panel.get("targets", []):
        # intervalFactor is deprecated and 2 halves the resolution; `query` duplicates `expr`
        # and `target`/`metric`/`step` are Graphite-era fields Grafana ignores for Prometheus.
        for key in ("intervalFactor", "query", "target", "metric", "step"):
            t.pop(key, None)
        t["datasource"] = DATASOURCE
        t["range"] = not t.get("instant", False)
        if not t.get("interval"):
            t.pop("interval", None)
    for child in panel.get("panels", []):
        _modernise_panel(child)


def render(dashboard: Dashboard) -> dict[str, Any]:
    """The dashboard as plain JSON data in the current schema."""
    data = json.loads(json.dumps(dashboard.auto_panel_ids().to_json_data(), cls=DashboardEncoder))
    data["schemaVersion"] = SCHEMA_VERSION
    data.pop("rows", None)
    data.pop("style", None)
    data.pop("hideControls", None)
    data.pop("sharedCrosshair", None)
    data["id"] = None
    for panel in data["panels"]:
        _modernise_panel(panel)
    for var in data["templating"]["list"]:
        for key in ("useTags", "tagsQuery", "tagValuesQuery", "auto", "auto_min", "auto_count"):
            var.pop(key, None)
        var["regex"] = var.get("regex") or ""
        if var["type"] == "query":
            # Structured query form (Grafana >= 9); the legacy string still works on load.
            var["definition"] = var["query"]
            var["query"] = {"query": var["query"], "refId": "PrometheusVariableQueryEditor-VariableQuery"}
            # Multi-selects open on All; single ones on Grafana's first value (push preselects the live run).
            var["current"] = ({"selected": True, "text": ["All"], "value": ["$__all"]} if var.get("includeAll")
                              else {})
        if var["type"] == "datasource":
            var["current"] = {}
            var["regex"] = ""
    return data


def dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def base_dashboard(*, title: str, key: str, description: str, panels: list[Any],
                   templates: Iterable[Template], annotations: list[dict[str, Any]] | None = None,
                   time_from: str = "now-1h") -> Dashboard:
    from grafanalib.core import GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR, Annotations, Templating, Time

    return Dashboard(
        title=title,
        uid=UIDS[key],
        description=description,
        tags=[TAG],
        timezone="browser",
        refresh="30s",
        time=Time(time_from, "now"),
        graphTooltip=GRAPH_TOOLTIP_MODE_SHARED_CROSSHAIR,
        editable=False,
        links=dashboard_links(),
        annotations=Annotations(list=[BUILTIN_ANNOTATION, *(annotations or [])]),
        templating=Templating(list=[datasource_variable(), *templates]),
        panels=panels,
    )
