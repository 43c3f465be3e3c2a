"""`rankwatch deploy amp`: load alerts/ into Amazon Managed Service for Prometheus."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from rankwatch.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("deploy", help="load rankwatch's alert rules into a managed service")
    sub = parser.add_subparsers(dest="deploy_command", metavar="TARGET", required=True)
    amp = sub.add_parser(
        "amp", help="upload alerts/ to Amazon Managed Service for Prometheus: the rules as a rule groups "
        "namespace, alertmanager.yml as an alert manager definition with SNS receivers",
        description="Creates or updates the rule groups namespace and the alert manager definition of an AMP "
        "workspace; identical ones are left alone. AWS credentials come from the default chain "
        "(environment, AWS_PROFILE, SSO, instance or pod role).")
    amp.add_argument("--workspace-id", metavar="ID",
                     help="AMP workspace id, e.g. ws-0123abcd-... (default: none; required unless --dry-run)")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    amp.add_argument("--region", default=region, metavar="R",
                     help=f"AWS region of the workspace (default: $AWS_REGION or $AWS_DEFAULT_REGION: {region or 'unset'})")
    amp.add_argument("--sns-topic-arn", metavar="ARN",
                     help="SNS topic every receiver of alertmanager.yml publishes to (default: none; required "
                     "unless --rules-only)")
    amp.add_argument("--receiver-topic", action="append", default=[], metavar="NAME=ARN",
                     help="send receiver NAME of alertmanager.yml to its own SNS topic, e.g. "
                     "oncall-webhook=arn:aws:sns:...:oncall; repeatable (default: none, all use --sns-topic-arn)")
    amp.add_argument("--message-format", choices=("chatbot", "text"), default="chatbot",
                     help="SNS message body: 'chatbot' is the JSON that AWS Chatbot / Amazon Q Developer posts to "
                     "Slack, 'text' plain text for Lambda, HTTPS or e-mail subscribers (default: chatbot)")
    amp.add_argument("--namespace", default="rankwatch", metavar="NAME",
                     help="name of the rule groups namespace (default: rankwatch)")
    amp.add_argument("--alertmanager-config", metavar="PATH",
                     help="Alertmanager config to convert (default: alertmanager.yml of rankwatch's alerts)")
    amp.add_argument("--endpoint-url", metavar="URL",
                     help="AMP API endpoint, e.g. a VPC endpoint (default: AWS's endpoint for --region)")
    amp.add_argument("--wait-timeout", type=float, default=300.0, metavar="S",
                     help="seconds to wait for AMP to apply each change (default: 300)")
    amp.add_argument("--rules-only", action="store_true",
                     help="upload only the rule groups namespace, e.g. when Grafana does the alerting and AMP only "
                     "evaluates the recording rules (default: off)")
    amp.add_argument("--dry-run", action="store_true",
                     help="write the exact payloads to --out instead of calling AWS (default: off)")
    amp.add_argument("--out", default="amp-payload", metavar="DIR",
                     help="directory for the --dry-run payloads (default: amp-payload)")
    amp.set_defaults(func=_amp)


def _receiver_topics(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, arn = pair.partition("=")
        if not sep or not name or not arn:
            raise InputError(f"--receiver-topic {pair!r}: expected NAME=ARN")
        out[name] = arn
    return out


def _amp(args: argparse.Namespace) -> int:
    from rankwatch import assets
    from rankwatch.deploy.amp_payload import alertmanager_definition, rule_groups_namespace

    # Both payloads are built (and checked against what AMP refuses) before any AWS call.
    am_path = Path(args.alertmanager_config) if args.alertmanager_config else assets.asset_dir("alerts") / "alertmanager.yml"
    rules = rule_groups_namespace(assets.rule_files())
    definition = None
    if not args.rules_only:
        if not args.sns_topic_arn:
            raise InputError("--sns-topic-arn is required (or --rules-only)")
        definition = alertmanager_definition(am_path, args.sns_topic_arn,
                                             receiver_topics=_receiver_topics(args.receiver_topic),
                                             message_format=args.message_format)
    if args.dry_run:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        payloads = [(f"rule-groups-namespace-{args.namespace}.yaml", rules)]
        if definition is not None:
            payloads.append(("alert-manager-definition.yaml", definition))
        for name, text in payloads:
            (out / name).write_text(text)
            print(f"wrote {out / name}")
        return 0
    if not args.workspace_id:
        raise InputError("--workspace-id is required (or use --dry-run)")
    if not args.region:
        raise InputError("--region is required (or set AWS_REGION)")
    from rankwatch.deploy.amp_api import AmpDeployer, amp_client

    deployer = AmpDeployer(amp_client(args.region, args.endpoint_url), args.workspace_id,
                           wait_timeout_s=args.wait_timeout)
    outcomes = [deployer.ensure_rule_groups_namespace(args.namespace, rules)]
    if definition is not None:
        outcomes.append(deployer.ensure_alert_manager_definition(definition))
    for outcome in outcomes:
        print(f"{outcome.what}: {outcome.action} ({outcome.status})")
    sys.stdout.flush()
    return 0
