"""The parts of the Prometheus alert rules that must say what the detector says, written from
the same source: the XID alerts from the XID table (``rankwatch.xids``), the EFA error alert from
the detector's network rule and its defaults (``rankwatch.detectors.network``).

Each part sits in ``alerts/rankwatch-alerts.yml`` between ``# BEGIN generated: NAME`` and
``# END generated: NAME`` lines; everything else in the file is written by hand.

    python -m rankwatch.rulegen            # rewrite the generated parts (make rules)
    python -m rankwatch.rulegen --check    # exit 1 if they are stale
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from rankwatch import xids
from rankwatch.errors import InputError

RUNBOOK = "https://github.com/rankwatch/rankwatch/blob/main/docs/runbooks/{}.md"
EFA_WINDOW_S = 300  # the alert's increase() window
_MARK = re.compile(r"^(?P<indent>[ \t]*)# BEGIN generated: (?P<name>[\w-]+)\n.*?^[ \t]*# END generated: (?P=name)\n",
                   re.M | re.S)


def _alt(codes: tuple[int, ...] | list[int] | list[str]) -> str:
    return "|".join(str(c) for c in codes)


def xid_rules() -> str:
    """The two XID alerts: FAIL class critical; WARN class and unknown codes warning;
    application XIDs (PASS class) nothing."""
    fail = _alt(xids.codes(xids.FAIL))
    quiet = _alt(sorted(xids.codes(xids.FAIL) + xids.codes(xids.PASS)))
    app = _alt(xids.codes(xids.PASS))

    def expr(selector: str) -> str:
        # increase() cannot see an XID code's first event (its series starts at 1): the
        # "unless ... offset" term catches that ("+ 0" drops the metric name so both terms
        # carry the same labels).
        return (f"        expr: |\n"
                f"          (\n"
                f"            increase(DCGM_EXP_XID_ERRORS_COUNT{{{selector}}}[10m]) > 0\n"
                f"          )\n"
                f"          or\n"
                f"          (\n"
                f"            DCGM_EXP_XID_ERRORS_COUNT{{{selector}}} + 0 > 0\n"
                f"              unless DCGM_EXP_XID_ERRORS_COUNT offset 10m\n"
                f"          )\n")

    return (
        "      # XIDs of class FAIL in rankwatch's XID table (the exporter's health status and the\n"
        "      # detector use the same table): broken hardware or driver state, the GPU must leave the job.\n"
        "      # Annotations avoid $value of range functions: Prometheus 2 and 3 count the window's\n"
        "      # edge sample differently.\n"
        "      - alert: RankwatchGpuXidHardware\n"
        + expr(f'xid=~"{fail}"') +
        f"        labels:\n"
        f"          severity: critical\n"
        f"          xid_class: hardware\n"
        f"        annotations:\n"
        f'          summary: "GPU {{{{ $labels.gpu }}}} on {{{{ $labels.Hostname }}}} raised hardware XID {{{{ $labels.xid }}}}"\n'
        f'          description: "XID {{{{ $labels.xid }}}} in the last 10 min on GPU {{{{ $labels.gpu }}}} ({{{{ $labels.UUID }}}}) '
        f"of {{{{ $labels.Hostname }}}}. This class of XID (ECC, row remap, NVLink, fell off the bus, GSP) means the GPU "
        f'needs a reset or replacement; the job\'s ranks on it will stall or crash."\n'
        f'          runbook_url: "{RUNBOOK.format("RankwatchGpuXidHardware")}"\n'
        f"      # XIDs of class WARN and codes the table does not know; never the application's own\n"
        f"      # ({app}).\n"
        f"      - alert: RankwatchGpuXidOther\n"
        + expr(f'xid!~"{quiet}"') +
        f"        labels:\n"
        f"          severity: warning\n"
        f"          xid_class: other\n"
        f"        annotations:\n"
        f'          summary: "GPU {{{{ $labels.gpu }}}} on {{{{ $labels.Hostname }}}} raised XID {{{{ $labels.xid }}}}"\n'
        f'          description: "XID {{{{ $labels.xid }}}} in the last 10 min on GPU {{{{ $labels.gpu }}}} of '
        f"{{{{ $labels.Hostname }}}}. A warning-class or unknown XID, not a GPU failure yet; check the kernel log "
        f'(dmesg) on the node."\n'
        f'          runbook_url: "{RUNBOOK.format("RankwatchGpuXidOther")}"\n'
    )


def efa_rules() -> str:
    """The EFA error alert: the detector's network rule over 5 min (errors per packet of the
    NIC's own traffic at least the threshold, and at least the floor per second)."""
    from rankwatch.detectors.config import DetectorConfig
    from rankwatch.detectors.network import PACKET_COUNTERS

    cfg = DetectorConfig()

    def total(counters: list[str], indent: str) -> str:
        # one increase() per counter, told apart by a label: increase() drops the metric name,
        # and one over a regex of names would give duplicate label sets
        terms = f"\n{indent}  or ".join(
            f'label_replace(increase(node_amazonefa_{c}[5m]), "counter", "{c}", "", "")' for c in counters)
        return f"sum by (instance, device, port) (\n{indent}    {terms}\n{indent})"

    floor = f"{cfg.efa_min_errors_per_s * EFA_WINDOW_S:g}"
    err_sum = total(sorted(cfg.efa_error_counters), " " * 16)
    pkt_sum = total(sorted(PACKET_COUNTERS), " " * 16)
    per_million = f"{cfg.efa_max_errors_per_packet * 1e6:g}"
    rule = (f"(\n"
            f"                1e6 * {err_sum}\n"
            f"                  / on (instance, device, port)\n"
            f"                {pkt_sum}\n"
            f"                  >= {per_million}\n"
            f"              )\n"
            f"              and on (instance, device, port)\n"
            f"              {err_sum} >= {floor}")
    return (
        f"      # The detector's network rule (rankwatch.detectors.network, with its defaults): a NIC\n"
        f"      # whose error events are at least {per_million} per million packets it sent and received,\n"
        f"      # and at least {cfg.efa_min_errors_per_s:g} per second ({floor} in 5 min). Error events:\n"
        f"      # {', '.join(sorted(cfg.efa_error_counters))}.\n"
        f"      # EFA series carry no host label: the host comes from rankwatch_node_info through\n"
        f"      # instance when the node exporter serves it. The value: errors per million packets.\n"
        f"      - alert: RankwatchEfaErrorsRising\n"
        f"        expr: |\n"
        f"          (\n"
        f"            (\n"
        f"              {rule}\n"
        f"            )\n"
        f"            * on (instance) group_left (Hostname) rankwatch:instance_hostname:info1h\n"
        f"          )\n"
        f"          or on (instance, device, port)\n"
        f"          (\n"
        f"              {rule}\n"
        f"          )\n"
        f"        for: 2m\n"
        f"        labels:\n"
        f"          severity: warning\n"
        f"        annotations:\n"
        f'          summary: "EFA {{{{ $labels.device }}}} on {{{{ with $labels.Hostname }}}}{{{{ . }}}}{{{{ else }}}}'
        f'{{{{ $labels.instance }}}}{{{{ end }}}}: {{{{ $value | humanize }}}} errors per million packets"\n'
        f'          description: "EFA device {{{{ $labels.device }}}} port {{{{ $labels.port }}}} ({{{{ $labels.instance }}}}) '
        f"counted {{{{ $value | humanize }}}} error events per million packets it sent and received over 5 min "
        f"(threshold {per_million}, and at least {floor} events). Collectives through this NIC are retried or rerouted; "
        f'the job slows to its pace."\n'
        f'          runbook_url: "{RUNBOOK.format("RankwatchEfaErrorsRising")}"\n'
    )


GENERATORS = {"xid": xid_rules, "efa": efa_rules}


def render(text: str, source: str = "<rules>") -> str:
    """``text`` with every generated part rewritten; each generator's part must be there once."""
    seen: dict[str, int] = {}

    def repl(m: re.Match[str]) -> str:
        name = m.group("name")
        if name not in GENERATORS:
            raise InputError(f"{source}: unknown generated part {name!r} (known: {', '.join(GENERATORS)})")
        seen[name] = seen.get(name, 0) + 1
        ind = m.group("indent")
        return f"{ind}# BEGIN generated: {name}\n{GENERATORS[name]()}{ind}# END generated: {name}\n"

    out = _MARK.sub(repl, text)
    missing = [n for n in GENERATORS if seen.get(n) != 1]
    if missing:
        raise InputError(f"{source}: needs exactly one '# BEGIN generated: NAME' ... '# END generated: NAME' part for "
                         f"{', '.join(missing)}")
    return out


def alert_file() -> Path:
    from rankwatch.assets import asset_dir

    return asset_dir("alerts") / "rankwatch-alerts.yml"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rankwatch.rulegen", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", nargs="?", type=Path, help="rule file to update (default: the shipped rankwatch-alerts.yml)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if the generated parts are stale")
    args = ap.parse_args(argv)
    path = args.file or alert_file()
    try:
        text = path.read_text(encoding="utf-8")
        new = render(text, str(path))
    except OSError as exc:
        print(f"rulegen: {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except InputError as exc:
        print(f"rulegen: {exc}", file=sys.stderr)
        return 2
    if args.check:
        if new != text:
            print(f"stale: {path}\nrun `make rules` and commit the result", file=sys.stderr)
            return 1
        return 0
    if new != text:
        path.write_text(new, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
