"""EFA network dashboard: per node and device, the HyperPod EFA exporter's `node_amazonefa_*`
names (counters without `_total`). EFA series carry no host label; they are joined to the host
through `rankwatch_node_info` on `instance` (DESIGN "Joining series")."""

from __future__ import annotations

from grafanalib.core import Dashboard, Table, TimeSeries

from rankwatch.dashboards.common import base_dashboard, efa_by_host, grid, query_variable, target

DEV = 'device=~"$device"'
LEGEND = "{{Hostname}} {{device}}"


def rate(counter: str, fn: str = "rate") -> str:
    """Per-device rate of an EFA counter, with the host name attached."""
    return efa_by_host(f"sum by (instance, device) ({fn}(node_amazonefa_{counter}{{{DEV}}}[$__rate_interval]))")


def _ts(title: str, counter: str, unit: str, description: str | None = None, fn: str = "rate",
        **kwargs) -> TimeSeries:
    return TimeSeries(title=title, description=description, targets=[target(rate(counter, fn), LEGEND)], unit=unit,
                      **kwargs)


def build() -> Dashboard:
    events = ("retrans_timeout_events", "unresponsive_remote_events", "impaired_remote_conn_events", "rx_drops",
              "rdma_read_wr_err", "rdma_write_wr_err")
    trouble_now = " or ".join(
        f'label_replace(sum by (instance, device) (increase(node_amazonefa_{c}{{{DEV}}}[$__range])) > 0, '
        f'"counter", "{c}", "", "")' for c in events)
    summary = [
        (Table(title="Devices with link-trouble events in the range",
               description="Non-zero increases of SRD timeouts, unresponsive remotes, impaired connections, drops "
               "and RDMA errors; healthy fabrics show none.",
               targets=[target(efa_by_host(trouble_now), instant=True, table=True)],
               extraJson={"transformations": [{"id": "organize", "options": {
                   "excludeByName": {"Time": True, "instance": True}, "renameByName": {"Value": "increase"}}}]}),
         24, 6),
    ]
    throughput = [
        (_ts("TX throughput", "tx_bytes", "Bps"), 12, 8),
        (_ts("RX throughput", "rx_bytes", "Bps"), 12, 8),
        (_ts("RDMA read", "rdma_read_bytes", "Bps", "Bytes received with RDMA read."), 12, 8),
        (_ts("RDMA write", "rdma_write_bytes", "Bps", "Bytes sent with RDMA write (0 on devices without it)."),
         12, 8),
    ]
    trouble = [
        (TimeSeries(title="Retransmitted packets (share of sent)",
                    description="SRD retransmissions per transmitted packet; congestion or loss on the path.",
                    targets=[target(efa_by_host(
                        f"sum by (instance, device) (rate(node_amazonefa_retrans_pkts{{{DEV}}}[$__rate_interval]))"
                        f" / sum by (instance, device) (rate(node_amazonefa_tx_pkts{{{DEV}}}[$__rate_interval]))"),
                        LEGEND)],
                    unit="percentunit"), 12, 8),
        (_ts("Retransmitted bytes", "retrans_bytes", "Bps"), 12, 8),
        (_ts("Timeouts (path changes)", "retrans_timeout_events", "short",
             "SRD traffic timed out and moved to another network path.", fn="increase", drawStyle="bars",
             fillOpacity=80), 8, 8),
        (_ts("Unresponsive remote events", "unresponsive_remote_events", "short",
             "A peer host, NIC or process stopped answering.", fn="increase", drawStyle="bars", fillOpacity=80), 8, 8),
        (_ts("Impaired remote connections", "impaired_remote_conn_events", "short",
             "Connections put on a reduced rate limit: a direct cause of a slow rank.", fn="increase",
             drawStyle="bars", fillOpacity=80), 8, 8),
        (_ts("RX drops", "rx_drops", "short", "Packets received and then dropped.", fn="increase", drawStyle="bars",
             fillOpacity=80), 12, 8),
        (TimeSeries(title="RDMA work-request errors", targets=[
            target(rate("rdma_read_wr_err", "increase"), LEGEND + " read"),
            target(rate("rdma_write_wr_err", "increase"), LEGEND + " write", ref="B")],
            unit="short", drawStyle="bars", fillOpacity=80), 12, 8),
    ]
    return base_dashboard(
        title="rankwatch / EFA network", key="efa_network",
        description="Per node and EFA device: throughput, RDMA, retransmits, SRD timeout/unresponsive/impaired "
        "events and drops.",
        templates=[query_variable("node", "Node", "label_values(rankwatch_node_info, Hostname)"),
                   query_variable("device", "Device", "label_values(node_amazonefa_tx_bytes, device)")],
        panels=grid([(None, summary), ("Throughput", throughput), ("Link trouble", trouble)]),
    )
