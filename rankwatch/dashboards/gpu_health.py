"""GPU health dashboard: per node and GPU, dcgm-exporter 4.8.2 names (so it also reads a real
dcgm-exporter), the failure-signal fields rankwatch turns on by default, and a fleet table of
the GPUs that are not passing or not answering."""

from __future__ import annotations

from grafanalib.core import Dashboard, Stat, StateTimeline, Table, TimeSeries

from rankwatch.dashboards.common import base_dashboard, drill_link, grid, query_variable, target

SEL = 'Hostname=~"$node", gpu=~"$gpu"'
GPU_LEGEND = "{{Hostname}} gpu{{gpu}}"
# Exporter-owned GPU counts (DESIGN: a GPU that fell off the bus is visible, not silently absent).
GPUS_EXPECTED = "rankwatch_gpu_expected"
GPUS_ANSWERING = "rankwatch_gpu_answering"
# The count families need not carry a host label; `rankwatch_node_info` names the host.
NODE_ON_HOST = 'on(instance) group_left(Hostname) rankwatch_node_info{Hostname=~"$node"}'
HEALTH_MAPPINGS = [{"type": "value", "options": {
    "0": {"text": "PASS", "color": "green", "index": 0},
    "10": {"text": "WARN", "color": "orange", "index": 1},
    "20": {"text": "FAIL", "color": "red", "index": 2}}}]


def _ts(title: str, expr: str, unit: str, description: str | None = None, legend: str = GPU_LEGEND,
        **kwargs) -> TimeSeries:
    return TimeSeries(title=title, description=description, targets=[target(expr, legend)], unit=unit, **kwargs)


def build() -> Dashboard:
    node_link = drill_link("Node ${__data.fields.Hostname}", "node", node="${__data.fields.Hostname}")
    fleet = [
        (Stat(title="GPUs answering / expected",
              description="NVML devices answering vs. devices the node should have; a gap is a GPU that fell off "
              "the bus.",
              targets=[target(f"sum({GPUS_ANSWERING} * {NODE_ON_HOST})", "answering"),
                       target(f"sum({GPUS_EXPECTED} * {NODE_ON_HOST})", "expected", ref="B")],
              format="none", reduceCalc="lastNotNull", graphMode="none", textMode="value_and_name"), 6, 6),
        (Stat(title="GPUs not passing", description="Health status WARN or FAIL on any watch.",
              targets=[target(f"count(max by (Hostname, gpu) (DCGM_EXP_GPU_HEALTH_STATUS{{{SEL}}}) > 0) or vector(0)")],
              format="none", reduceCalc="lastNotNull", graphMode="none", colorMode="background",
              thresholds=[{"color": "green", "value": None}, {"color": "red", "value": 1}]), 6, 6),
        (Table(title="Fleet: GPUs not passing",
               description="Every GPU whose health watch is WARN (10) or FAIL (20) now, and every GPU that stopped "
               "answering NVML (a missing GPU is not silence), worst first.",
               targets=[target(f"(max by (Hostname, gpu, UUID, health_watch) (DCGM_EXP_GPU_HEALTH_STATUS{{{SEL}}}) > 0)"
                               f' or label_replace(max by (Hostname, gpu, UUID) (rankwatch_gpu_up{{{SEL}}} == 0) + 20,'
                               f' "health_watch", "NOT ANSWERING", "", "")', instant=True, table=True)],
               extraJson={"transformations": [{"id": "organize", "options": {
                   "excludeByName": {"Time": True}, "renameByName": {"Value": "status"}}}],
                   "fieldConfig": {"defaults": {"links": [node_link]}, "overrides": [
                       {"matcher": {"id": "byName", "options": "status"}, "properties": [
                           {"id": "mappings", "value": HEALTH_MAPPINGS},
                           {"id": "custom.cellOptions", "value": {"type": "color-background"}}]}]},
                   "options": {"sortBy": [{"displayName": "status", "desc": True}]}}), 12, 6),
    ]
    health = [
        (StateTimeline(title="Health status", targets=[target(
            f"max by (Hostname, gpu) (DCGM_EXP_GPU_HEALTH_STATUS{{{SEL}}})", GPU_LEGEND)],
            mappings=HEALTH_MAPPINGS,
            extraJson={"fieldConfig": {"defaults": {"mappings": HEALTH_MAPPINGS, "thresholds": {
                "mode": "absolute", "steps": [{"color": "green", "value": None}, {"color": "orange", "value": 10},
                                              {"color": "red", "value": 20}]}}}}), 24, 7),
    ]
    perf = [
        (_ts("Utilisation", f"DCGM_FI_DEV_GPU_UTIL{{{SEL}}}", "percent"), 8, 8),
        (_ts("SM clock", f"DCGM_FI_DEV_SM_CLOCK{{{SEL}}}", "rotmhz",
             "A clock drop with throttling reasons set below is a GPU slowing its whole job."), 8, 8),
        (_ts("Temperature", f"DCGM_FI_DEV_GPU_TEMP{{{SEL}}}", "celsius"), 8, 8),
        (_ts("Power", f"DCGM_FI_DEV_POWER_USAGE{{{SEL}}}", "watt"), 8, 8),
        (_ts("Framebuffer used", f"DCGM_FI_DEV_FB_USED{{{SEL}}}", "decmbytes"), 8, 8),
        (_ts("Framebuffer used (share)",
             f"DCGM_FI_DEV_FB_USED{{{SEL}}} / (DCGM_FI_DEV_FB_USED{{{SEL}}} + DCGM_FI_DEV_FB_FREE{{{SEL}}})",
             "percentunit"), 8, 8),
    ]
    errors = [
        (Table(title="Last XID per GPU", description="DCGM_FI_DEV_XID_ERRORS holds the last XID seen (0 = none). "
               "Critical: 48 DBE, 63/64 row remap, 74 NVLink, 79 fell off the bus, 94/95 contained/uncontained ECC.",
               targets=[target(f"max by (Hostname, gpu) (DCGM_FI_DEV_XID_ERRORS{{{SEL}}}) > 0", instant=True,
                               table=True)],
               extraJson={"transformations": [{"id": "organize", "options": {
                   "excludeByName": {"Time": True}, "renameByName": {"Value": "last XID"}}}]}), 8, 8),
        (_ts("XID events", f'sum by (Hostname, gpu, xid) (increase(DCGM_EXP_XID_ERRORS_COUNT{{{SEL}, xid!=""}}[$__rate_interval]))',
             "short", legend=GPU_LEGEND + " xid {{xid}}", drawStyle="bars", fillOpacity=80), 8, 8),
        (_ts("ECC errors (volatile, per interval)",
             f'increase(DCGM_FI_DEV_ECC_DBE_VOL_TOTAL{{{SEL}}}[$__rate_interval])',
             "short", "Double-bit (uncorrectable) errors: each one is an XID 48 and usually a job crash.",
             legend=GPU_LEGEND + " DBE", drawStyle="bars", fillOpacity=80), 8, 8),
        (_ts("ECC single-bit (volatile, per interval)",
             f'increase(DCGM_FI_DEV_ECC_SBE_VOL_TOTAL{{{SEL}}}[$__rate_interval])', "short",
             legend=GPU_LEGEND + " SBE"), 8, 8),
        (TimeSeries(title="Remapped rows", targets=[
            target(f"DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS{{{SEL}}}", GPU_LEGEND + " uncorrectable"),
            target(f"DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS{{{SEL}}}", GPU_LEGEND + " correctable", ref="B")],
            unit="short"), 8, 8),
        (_ts("Row remap failure", f"DCGM_FI_DEV_ROW_REMAP_FAILURE{{{SEL}}}", "bool_yes_no",
             "1 = remapping failed: the GPU needs a reset or replacement."), 8, 8),
    ]
    throttle = [
        (_ts("Throttling reasons (activations)",
             f'sum by (Hostname, gpu, clock_event) (increase(DCGM_EXP_CLOCK_EVENTS_COUNT{{{SEL}, clock_event!~"gpu_idle|"}}[$__rate_interval]))',
             "short", legend=GPU_LEGEND + " {{clock_event}}", drawStyle="bars", fillOpacity=80), 12, 8),
        (TimeSeries(title="Time throttled (share)", description="Power and thermal violation time per second.",
                    targets=[target(f"rate(DCGM_FI_DEV_POWER_VIOLATION{{{SEL}}}[$__rate_interval]) / 1e9",
                                    GPU_LEGEND + " power"),
                             target(f"rate(DCGM_FI_DEV_THERMAL_VIOLATION{{{SEL}}}[$__rate_interval]) / 1e9",
                                    GPU_LEGEND + " thermal", ref="B")],
                    unit="percentunit"), 12, 8),
    ]
    return base_dashboard(
        title="rankwatch / GPU health", key="gpu_health",
        description="Per node and GPU: utilisation, clocks, temperature, power, memory, XIDs, ECC, row remapping, "
        "throttling and health; fleet table of GPUs not passing.",
        templates=[query_variable("node", "Node", "label_values(DCGM_FI_DEV_GPU_TEMP, Hostname)"),
                   query_variable("gpu", "GPU", 'label_values(DCGM_FI_DEV_GPU_TEMP{Hostname=~"$node"}, gpu)',
                                  numeric=True)],
        panels=grid([(None, fleet), ("Health", health), ("Performance", perf), ("Errors", errors),
                     ("Throttling", throttle)]),
    )

