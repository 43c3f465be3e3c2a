"""Node drill-down: one node's GPUs, EFA devices and training ranks side by side, so that a
slow rank can be read against its own GPU's clocks and its node's NIC counters."""

from __future__ import annotations

from grafanalib.core import Dashboard, Stat, StateTimeline, Table, TimeSeries

from rankwatch.dashboards.common import base_dashboard, drill_link, efa_by_host, grid, query_variable, target
from rankwatch.dashboards.gpu_health import HEALTH_MAPPINGS

GPU = 'Hostname=~"$node", gpu=~"$gpu"'
RANKS = 'run=~"$run", node=~"$node"'


def _efa(counter: str, fn: str = "rate") -> str:
    return efa_by_host(f"sum by (instance, device) ({fn}(node_amazonefa_{counter}[$__rate_interval]))")


def _per_step(section_sel: str) -> str:
    return (f"sum by (run, rank) (rate(rankwatch_section_seconds_total{{{RANKS}, {section_sel}}}[$__rate_interval]))"
            f" / on(run, rank) sum by (run, rank) (rate(rankwatch_steps_total{{{RANKS}}}[$__rate_interval]))")


def build() -> Dashboard:
    run_link = drill_link("Training run ${__field.labels.run}", "training_run", run="${__field.labels.run}",
                          node="$node")
    overview = [
        (Stat(title="Exporter up", description="Scrape health of the target that served this node's "
              "rankwatch_node_info within the last hour (the node exporter): 0 when it stopped answering.",
              targets=[target('min(up * on(instance) group_left(Hostname) '
                              'max_over_time(rankwatch_node_info{Hostname=~"$node"}[1h]))')],
              format="bool_yes_no", reduceCalc="lastNotNull", graphMode="none", colorMode="background",
              thresholds=[{"color": "red", "value": None}, {"color": "green", "value": 1}]), 6, 5),
        (Stat(title="Ranks on this node", targets=[target(f"count(rankwatch_rank_info{{{RANKS}}})")],
              format="none", reduceCalc="lastNotNull", graphMode="none"), 6, 5),
        (Table(title="Ranks → GPUs", description="Which rank runs on which GPU (rankwatch_rank_info).",
               targets=[target(f"rankwatch_rank_info{{{RANKS}}}", instant=True, table=True)],
               extraJson={"transformations": [{"id": "organize", "options": {
                   "excludeByName": {"Time": True, "Value": True, "__name__": True, "instance": True}}}]}), 12, 5),
    ]
    gpus = [
        (StateTimeline(title="GPU health", targets=[target(
            f"max by (gpu) (DCGM_EXP_GPU_HEALTH_STATUS{{{GPU}}})", "gpu{{gpu}}")],
            mappings=HEALTH_MAPPINGS,
            extraJson={"fieldConfig": {"defaults": {"mappings": HEALTH_MAPPINGS}}}), 24, 5),
        (TimeSeries(title="GPU utilisation", targets=[target(f"DCGM_FI_DEV_GPU_UTIL{{{GPU}}}", "gpu{{gpu}}")],
                    unit="percent"), 6, 8),
        (TimeSeries(title="SM clock", targets=[target(f"DCGM_FI_DEV_SM_CLOCK{{{GPU}}}", "gpu{{gpu}}")],
                    unit="rotmhz"), 6, 8),
        (TimeSeries(title="Temperature", targets=[target(f"DCGM_FI_DEV_GPU_TEMP{{{GPU}}}", "gpu{{gpu}}")],
                    unit="celsius"), 6, 8),
        (TimeSeries(title="Power", targets=[target(f"DCGM_FI_DEV_POWER_USAGE{{{GPU}}}", "gpu{{gpu}}")],
                    unit="watt"), 6, 8),
    ]
    nics = [
        (TimeSeries(title="EFA TX / RX", targets=[target(_efa("tx_bytes"), "{{device}} tx"),
                                                  target(_efa("rx_bytes"), "{{device}} rx", ref="B")],
                    unit="Bps"), 8, 8),
        (TimeSeries(title="EFA retransmitted packets", targets=[target(_efa("retrans_pkts"), "{{device}}")],
                    unit="pps"), 8, 8),
        (TimeSeries(title="EFA link-trouble events", targets=[
            target(_efa("retrans_timeout_events", "increase"), "{{device}} timeout"),
            target(_efa("unresponsive_remote_events", "increase"), "{{device}} unresponsive", ref="B"),
            target(_efa("impaired_remote_conn_events", "increase"), "{{device}} impaired", ref="C"),
            target(_efa("rx_drops", "increase"), "{{device}} rx drops", ref="D")],
            unit="short", drawStyle="bars", fillOpacity=80), 8, 8),
    ]
    ranks = [
        (TimeSeries(title="Compute time per step by rank",
                    targets=[target(_per_step('section!~"comm|dataloader"'), "rank {{rank}}")], unit="s",
                    extraJson={"fieldConfig": {"defaults": {"links": [run_link]}}}), 8, 8),
        (TimeSeries(title="Comm wait per step by rank", targets=[target(_per_step('section="comm"'), "rank {{rank}}")],
                    unit="s", extraJson={"fieldConfig": {"defaults": {"links": [run_link]}}}), 8, 8),
        (TimeSeries(title="Straggler score by rank",
                    targets=[target('rankwatch_detector_rank_score{run=~"$run"} * on(run, rank) group_left(node) '
                                    f"max by (run, rank, node) (rankwatch_rank_info{{{RANKS}}})", "rank {{rank}}")],
                    unit="none"), 8, 8),
    ]
    return base_dashboard(
        title="rankwatch / Node", key="node",
        description="One node: its GPUs, EFA devices and training ranks side by side.",
        templates=[query_variable("node", "Node", "label_values(rankwatch_node_info, Hostname)", multi=False),
                   query_variable("gpu", "GPU", 'label_values(DCGM_FI_DEV_GPU_TEMP{Hostname=~"$node"}, gpu)',
                                  numeric=True),
                   query_variable("run", "Run", 'label_values(rankwatch_rank_info{node=~"$node"}, run)')],
        panels=grid([(None, overview), ("GPUs", gpus), ("EFA devices", nics), ("Ranks", ranks)]),
    )
