"""Training run dashboard: throughput and step time of one run, the per-rank compute heatmap in
which a straggler shows as a hot row, comm wait per rank (lowest on the straggler, DESIGN
"What the detector must understand"), the per-section breakdown, detector scores and events
as annotations, and the throughput lost to the slowest rank."""

from __future__ import annotations

from grafanalib.core import Dashboard, Heatmap, Stat, Table, TimeSeries

from rankwatch.dashboards.common import (
    base_dashboard,
    drill_link,
    grid,
    prometheus_annotation,
    query_variable,
    run_variable,
    target,
)

RUN = 'run="$run"'
SEL = 'run="$run", node=~"$node"'
# Sections that are the rank's own work; `comm` is waiting for the others and `dataloader`
# stalls are input-bound, not compute (DESIGN: the straggler has the highest compute time).
NOT_COMPUTE = 'section!~"comm|dataloader"'


def per_step(numerator: str, sel: str = SEL) -> str:
    """Seconds per step by rank: a per-rank rate divided by that rank's step rate."""
    return (f"sum by (rank, node) (rate({numerator}[$__rate_interval]))"
            f" / on(rank, node) sum by (rank, node) (rate(rankwatch_steps_total{{{sel}}}[$__rate_interval]))")


COMPUTE_PER_STEP = per_step(f"rankwatch_section_seconds_total{{{SEL}, {NOT_COMPUTE}}}")
COMM_PER_STEP = per_step(f'rankwatch_section_seconds_total{{{SEL}, section="comm"}}')
COMPUTE_ALL_NODES = per_step(f"rankwatch_section_seconds_total{{{RUN}, {NOT_COMPUTE}}}", RUN)
MEAN_STEP = (f"sum(rate(rankwatch_step_seconds_total{{{RUN}}}[$__rate_interval]))"
             f" / sum(rate(rankwatch_steps_total{{{RUN}}}[$__rate_interval]))")
TOKENS_PER_S = f"sum(rate(rankwatch_tokens_total{{{RUN}}}[$__rate_interval]))"
# Ranks in different pipeline stages do different work, so each rank is compared with its
# stage: the time the slowest rank of a stage adds over the stage median, divided by the step
# time, is the share of every step spent waiting for it. A missing `pp` groups all ranks.
_COMPUTE_WITH_PP = f"({COMPUTE_ALL_NODES}) * on(rank) group_left(pp) max by (rank, pp) (rankwatch_rank_info{{{RUN}}})"
LOST_RATIO = (f"clamp_min(max(max by (pp) ({_COMPUTE_WITH_PP}) - quantile by (pp) (0.5, {_COMPUTE_WITH_PP}))"
              f" / ({MEAN_STEP}), 0)")


def build() -> Dashboard:
    rank_link = drill_link("Node ${__field.labels.node}", "node", node="${__field.labels.node}", run="$run")
    stats = [
        (Stat(title="Tokens/s", targets=[target(TOKENS_PER_S)], format="short", reduceCalc="lastNotNull"), 4, 4),
        (Stat(title="Mean step time", targets=[target(MEAN_STEP)], format="s", reduceCalc="lastNotNull",
              decimals=3), 4, 4),
        (Stat(title="Step", targets=[target(f"max(rankwatch_step{{{RUN}}})")], format="none",
              reduceCalc="lastNotNull", graphMode="none"), 4, 4),
        (Stat(title="Seconds since the last step", description="On all ranks; a growing value with every endpoint "
              "still answering is a hang.",
              targets=[target(f"time() - max(rankwatch_last_step_timestamp_seconds{{{RUN}}})")], format="s",
              reduceCalc="lastNotNull", graphMode="none"), 4, 4),
        (Stat(title="Ranks reporting", description="Probes answering now; compare with world_size in the Ranks table.",
              targets=[target(f"count(rankwatch_rank_info{{{RUN}}})")],
              format="none", reduceCalc="lastNotNull", graphMode="none"), 4, 4),
        (Stat(title="Estimated throughput lost", description="Share of each step spent waiting for the slowest "
              "rank of a pipeline stage beyond the stage median (compute time, comm and dataloader excluded).",
              targets=[target(LOST_RATIO)], format="percentunit", reduceCalc="lastNotNull", decimals=1), 4, 4),
    ]
    throughput = [
        (TimeSeries(title="Tokens/s", targets=[target(TOKENS_PER_S, "tokens/s"),
                                               target(f"({TOKENS_PER_S}) * ({LOST_RATIO})", "lost to stragglers (est.)",
                                                      ref="B")],
                    unit="short"), 12, 8),
        (TimeSeries(title="Step time", description="Mean over ranks, and the slowest rank.",
                    targets=[target(MEAN_STEP, "mean"),
                             target(f"max({per_step(f'rankwatch_step_seconds_total{{{RUN}}}', RUN)})", "max rank",
                                    ref="B")],
                    unit="s"), 12, 8),
    ]
    ranks = [
        (Heatmap(title="Compute time per step by rank",
                 description="One row per rank; a straggler is the row that stays hot. Compute = all sections "
                 "except comm and dataloader.",
                 targets=[target(COMPUTE_PER_STEP, "{{rank}}")],
                 extraJson={"options": {"calculate": False, "cellGap": 1, "yAxis": {"axisLabel": "rank"},
                                        "rowsFrame": {"layout": "unknown"},
                                        "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
                                        "tooltip": {"mode": "single", "yHistogram": False},
                                        "legend": {"show": True}},
                            "fieldConfig": {"defaults": {"unit": "s"}}}), 24, 10),
        (TimeSeries(title="Comm wait per step by rank",
                    description="Time blocked in collectives: the straggler waits least, everyone else waits for it.",
                    targets=[target(COMM_PER_STEP, "rank {{rank}}")], unit="s",
                    extraJson={"fieldConfig": {"defaults": {"links": [rank_link]}}}), 12, 9),
        (TimeSeries(title="Per-section time per step (mean over ranks)",
                    targets=[target(f"sum by (section) (rate(rankwatch_section_seconds_total{{{SEL}}}[$__rate_interval]))"
                                    f" / scalar(sum(rate(rankwatch_steps_total{{{SEL}}}[$__rate_interval])))",
                                    "{{section}}")],
                    unit="s", fillOpacity=60, stacking={"mode": "normal", "group": "A"}), 12, 9),
    ]
    detector = [
        (TimeSeries(title="Straggler score by rank",
                    description="rankwatch detector's robust z-score of each rank against its peers.",
                    targets=[target(f"rankwatch_detector_rank_score{{{RUN}}}", "rank {{rank}}")],
                    unit="none"), 12, 8),
        (Table(title="Ranks flagged now",
               targets=[target(f"rankwatch_detector_rank_flagged{{{RUN}}} == 1", instant=True, table=True)],
               extraJson={"transformations": [{"id": "organize", "options": {
                   "excludeByName": {"Time": True, "Value": True, "__name__": True, "instance": True}}}]}), 6, 8),
        (TimeSeries(title="Detector events",
                    targets=[target("sum by (kind, state) (increase(rankwatch_detector_events_total[$__rate_interval]))",
                                    "{{kind}} {{state}}")],
                    unit="short", drawStyle="bars", fillOpacity=80), 6, 8),
    ]
    info = [
        (Table(title="Ranks",
               description="Rank → node and GPU (from the probes' rankwatch_rank_info); click a node to drill down.",
               targets=[target(f"rankwatch_rank_info{{{SEL}}}", instant=True, table=True)],
               extraJson={"transformations": [{"id": "organize", "options": {
                   "excludeByName": {"Time": True, "Value": True, "__name__": True}}}],
                   "fieldConfig": {"overrides": [{"matcher": {"id": "byName", "options": "node"}, "properties": [
                       {"id": "links", "value": [drill_link("Node ${__value.raw}", "node", node="${__value.raw}",
                                                            run="$run")]}]}]}}), 24, 8),
    ]
    annotations = [
        prometheus_annotation(
            "Straggler flagged", f"rankwatch_detector_rank_flagged{{{RUN}}} == 1",
            title="straggler: rank {{rank}}", text="score {{value}}", tags="rank", color="red"),
        prometheus_annotation(
            "Detector events", "sum by (kind, state) (changes(rankwatch_detector_events_total[1m])) > 0",
            title="{{kind}} {{state}}", tags="kind,state", color="orange"),
    ]
    return base_dashboard(
        title="rankwatch / Training run", key="training_run",
        description="One training run: throughput, step time, per-rank compute and comm wait, stragglers.",
        templates=[run_variable(),
                   query_variable("node", "Node", 'label_values(rankwatch_rank_info{run="$run"}, node)')],
        annotations=annotations,
        panels=grid([(None, stats), ("Throughput", throughput), ("Ranks", ranks),
                     ("Detector", detector), ("Layout", info)]),
    )
