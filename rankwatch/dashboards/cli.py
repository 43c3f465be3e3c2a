"""`rankwatch dashboards generate|push`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from rankwatch.cliargs import DeprecatedAlias

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dashboards", help="generate the Grafana dashboards or push them to Grafana")
    sub = parser.add_subparsers(dest="dashboards_command", metavar="ACTION", required=True)

    gen = sub.add_parser("generate", help="write the dashboard JSON, the Grafana alert rules (OUT/alerting/) and the "
                         "Kubernetes manifests derived from them")
    gen.add_argument("--out", default="dashboards", help="directory for the dashboard JSON files (default: dashboards)")
    gen.add_argument("--kubernetes-out", metavar="DIR",
                     help="also write the dashboard ConfigMaps, the PrometheusRule and the Grafana alert rules "
                     "ConfigMap (both from --alerts) here (default: none)")
    gen.add_argument("--alerts", metavar="DIR", type=Path,
                     help="directory of Prometheus rule files for the PrometheusRule and the Grafana alert rules "
                          "(default: rankwatch's own rules, from the checkout or the installed package)")
    gen.add_argument("--grafana-datasource-uid", default="prometheus", metavar="UID",
                     help="uid of the Prometheus datasource the Grafana alert rules (OUT/alerting/) query "
                     "(default: prometheus, the uid rankwatch's compose and kube-prometheus-stack provision)")
    gen.add_argument("--check", action="store_true", help="write nothing; exit 1 if any file is missing or stale")
    gen.set_defaults(func=_generate)

    push = sub.add_parser("push", help="create or update the dashboards through Grafana's HTTP API "
                          "(self-hosted or Amazon Managed Grafana)")
    push.add_argument("--grafana", default=os.environ.get("GRAFANA_URL"), required="GRAFANA_URL" not in os.environ,
                      metavar="URL", help="Grafana base URL (default: $GRAFANA_URL)")
    push.add_argument("--token-file", metavar="PATH",
                      help="file holding the service account token (else env GRAFANA_TOKEN or GRAFANA_TOKEN_FILE)")
    push.add_argument("--folder", default="rankwatch", help="folder title (default: rankwatch)")
    push.add_argument("--folder-uid", default="rankwatch", help="folder uid (default: rankwatch)")
    live = push.add_mutually_exclusive_group()
    live.add_argument("--run", help="open the dashboards on this run (default: their first run)")
    live.add_argument("--run-from-prometheus", metavar="URL",
                      help="open the dashboards on the run that reported a step most recently to the Prometheus "
                           "at URL")
    live.add_argument("--prometheus", dest="run_from_prometheus", metavar="URL", action=DeprecatedAlias,
                      new="--run-from-prometheus URL")
    push.add_argument("--no-overwrite", dest="overwrite", action="store_false",
                      help="fail (412) instead of replacing a dashboard edited in Grafana since it was read")
    push.add_argument("--overwrite", dest="overwrite", action="store_true", default=True,
                      help="replace stored dashboards, including edits made in Grafana (default: on)")
    push.add_argument("--from-dir", metavar="DIR",
                      help="push the *.json dashboards in DIR instead of generating them")
    push.add_argument("--alerts", dest="push_alerts", action="store_true",
                      help="also create or update the Grafana-managed alert rules made from rankwatch's "
                      "alerts/rankwatch-*.yml, one rule group per group, in the same folder (default: off)")
    push.add_argument("--datasource-uid", metavar="UID",
                      help="Prometheus datasource the alert rules query (default: the one the dashboards' "
                      "$datasource opens on: named Prometheus, else the default Prometheus datasource)")
    push.add_argument("--alerts-editable", action="store_true",
                      help="send X-Disable-Provenance so that the pushed alert rules can be edited in Grafana's "
                      "UI (default: off: they are marked provisioned; edit alerts/ instead)")
    push.set_defaults(func=_push)


def _generate(args: argparse.Namespace) -> int:
    from rankwatch.dashboards.alert_rules import PROVISIONING_FILE, provisioning_file
    from rankwatch.dashboards.build import dashboard_files, stale_files, write_files
    from rankwatch.dashboards.manifests import alert_rule_files

    outputs: list[tuple[Path, dict[str, str]]] = []
    dashboards = dashboard_files()
    outputs.append((Path(args.out), dashboards))
    # Grafana-managed alert rules from the same rule files as the PrometheusRule.
    grafana_alerts = provisioning_file(alert_rule_files(args.alerts), args.grafana_datasource_uid)
    outputs.append((Path(args.out) / "alerting", {PROVISIONING_FILE: grafana_alerts}))
    if args.kubernetes_out:
        from rankwatch.dashboards.manifests import kubernetes_files

        outputs.append((Path(args.kubernetes_out), kubernetes_files(dashboards, args.alerts, grafana_alerts)))
    if args.check:
        stale = [str(out / name) for out, files in outputs for name in stale_files(files, out)]
        for path in stale:
            print(f"stale: {path}", file=sys.stderr)
        if stale:
            print("run `make dashboards` and commit the result", file=sys.stderr)
        return 1 if stale else 0
    for out, files in outputs:
        for path in write_files(files, out):
            print(f"wrote {path}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from rankwatch.dashboards.push import live_run, push_dashboards, resolve_token
    from rankwatch.errors import InputError

    token = resolve_token(args.token_file)
    if args.from_dir:
        dashboards = {}
        for path in sorted(Path(args.from_dir).glob("*.json")):
            try:
                dashboards[path.name] = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
        if not dashboards:
            raise InputError(f"no *.json dashboards in {args.from_dir}")
    else:
        from rankwatch.dashboards.build import render_all

        dashboards = render_all()
    run = args.run
    if args.run_from_prometheus:
        run = live_run(args.run_from_prometheus)
        if run is None:
            log.warning("no run reports steps at %s; dashboards open on their first run", args.run_from_prometheus)
    results = push_dashboards(args.grafana, token, dashboards, folder_uid=args.folder_uid,
                              folder_title=args.folder, overwrite=args.overwrite, run=run)
    for r in results:
        print(f"{r.title}: {r.url} (version {r.version})")
    if args.push_alerts:
        from rankwatch import assets
        from rankwatch.dashboards.alerts_push import push_alert_rules
        from rankwatch.dashboards.push import GrafanaClient

        groups = push_alert_rules(GrafanaClient(args.grafana, token), assets.rule_files(),
                                  folder_uid=args.folder_uid, folder_title=args.folder,
                                  datasource_uid=args.datasource_uid, overwrite=args.overwrite,
                                  editable=args.alerts_editable)
        for g in groups:
            print(f"alert rule group {g.title}: {g.action} ({g.rules} rules)")
    return 0
