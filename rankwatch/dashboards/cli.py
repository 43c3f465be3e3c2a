"""`rankwatch dashboards generate|push`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("dashboards", help="generate the Grafana dashboards or push them to Grafana")
    sub = parser.add_subparsers(dest="dashboards_command", metavar="ACTION", required=True)

    gen = sub.add_parser("generate", help="write the dashboard JSON (and the Kubernetes manifests derived from it)")
    gen.add_argument("--out", default="dashboards", help="directory for the dashboard JSON files (default: dashboards)")
    gen.add_argument("--kubernetes-out", metavar="DIR",
                     help="also write the dashboard ConfigMaps and the PrometheusRule (from --alerts) here")
    gen.add_argument("--alerts", metavar="DIR", type=Path,
                     help="directory of Prometheus rule files for the PrometheusRule "
                          "(default: rankwatch's own rules, from the checkout or the installed package)")
    gen.add_argument("--check", action="store_true", help="write nothing; exit 1 if any file is missing or stale")
    gen.set_defaults(func=_generate)

    push = sub.add_parser("push", help="create or update the dashboards through Grafana's HTTP API "
                          "(self-hosted or Amazon Managed Grafana)")
    push.add_argument("--grafana", default=os.environ.get("GRAFANA_URL"), required="GRAFANA_URL" not in os.environ,
                      metavar="URL", help="Grafana base URL (env GRAFANA_URL)")
    push.add_argument("--token-file", metavar="PATH",
                      help="file holding the service account token (else env GRAFANA_TOKEN or GRAFANA_TOKEN_FILE)")
    push.add_argument("--folder", default="rankwatch", help="folder title (default: rankwatch)")
    push.add_argument("--folder-uid", default="rankwatch", help="folder uid (default: rankwatch)")
    live = push.add_mutually_exclusive_group()
    live.add_argument("--run", help="open the dashboards on this run")
    live.add_argument("--prometheus", metavar="URL",
                      help="open the dashboards on the run that reported a step most recently here")
    push.add_argument("--no-overwrite", dest="overwrite", action="store_false",
                      help="fail (412) instead of replacing a dashboard edited in Grafana since it was read")
    push.add_argument("--overwrite", dest="overwrite", action="store_true", default=True,
                      help="replace stored dashboards, including edits made in Grafana (default)")
    push.add_argument("--from-dir", metavar="DIR",
                      help="push the *.json dashboards in DIR instead of generating them")
    push.set_defaults(func=_push)


def _generate(args: argparse.Namespace) -> int:
    from rankwatch.dashboards.build import dashboard_files, stale_files, write_files

    outputs: list[tuple[Path, dict[str, str]]] = []
    dashboards = dashboard_files()
    outputs.append((Path(args.out), dashboards))
    if args.kubernetes_out:
        from rankwatch.dashboards.manifests import kubernetes_files

        outputs.append((Path(args.kubernetes_out), kubernetes_files(dashboards, args.alerts)))
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
    if args.prometheus:
        run = live_run(args.prometheus)
        if run is None:
            log.warning("no run reports steps at %s; dashboards open on their first run", args.prometheus)
    results = push_dashboards(args.grafana, token, dashboards, folder_uid=args.folder_uid,
                              folder_title=args.folder, overwrite=args.overwrite, run=run)
    for r in results:
        print(f"{r.title}: {r.url} (version {r.version})")
    return 0
