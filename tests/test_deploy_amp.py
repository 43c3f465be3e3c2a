"""`rankwatch deploy amp`: the payloads (checked by the real promtool and amtool) and the real
boto3 client against a local server speaking the AMP REST API (rankwatch.sim.amp), including
AWS's error answers and AMP's asynchronous status."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
import yaml

from rankwatch import assets, promserver
from rankwatch.cli import main
from rankwatch.deploy.amp_payload import TEMPLATE_FILE
from rankwatch.sim.amp import FakeAMP

REGION = "us-west-2"
KEY_ID = "AKIARANKWATCHTEST0001"
SECRET = "rankwatch/Sup3rSecretAccessKey+abcdefghijklmn"
WS = "ws-rankwatch-0001"
TOPIC = "arn:aws:sns:us-west-2:123456789012:rankwatch-alerts"
ONCALL = "arn:aws:sns:us-west-2:123456789012:rankwatch-oncall"


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials through the default chain (environment), nothing from this machine's ~/.aws."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_AMP", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_REGION", REGION)


@pytest.fixture
def amp(aws_env):
    with FakeAMP(region=REGION, access_key=KEY_ID, workspaces=[WS]) as fake:
        yield fake


def _deploy(amp: FakeAMP, *args: str, workspace: str = WS) -> int:
    return main(["deploy", "amp", "--workspace-id", workspace, "--sns-topic-arn", TOPIC,
                 "--endpoint-url", amp.url, "--wait-timeout", "30", *args])


def _dry_run(out: Path, *args: str) -> tuple[str, dict]:
    assert main(["deploy", "amp", "--dry-run", "--out", str(out), "--sns-topic-arn", TOPIC, *args]) == 0
    rules = (out / "rule-groups-namespace-rankwatch.yaml").read_text()
    definition = yaml.safe_load((out / "alert-manager-definition.yaml").read_text())
    return rules, definition


def _amtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([promserver.find_binary("amtool"), *args], capture_output=True, text=True, timeout=60)


def _write_am(definition: dict, where: Path) -> Path:
    """The definition as Alertmanager reads it: the config, its template files beside it."""
    where.mkdir(parents=True, exist_ok=True)
    for name, text in definition["template_files"].items():
        (where / name).write_text(text)
    (where / "alertmanager.yml").write_text(definition["alertmanager_config"])
    return where / "alertmanager.yml"


def test_dry_run_payloads_pass_promtool_and_amtool(aws_env, tmp_path: Path, capsys) -> None:
    rules, definition = _dry_run(tmp_path / "out", "--receiver-topic", f"oncall-webhook={ONCALL}")
    assert f"wrote {tmp_path / 'out'}" in capsys.readouterr().out
    # The rule payload is alerts/rankwatch-*.yml's groups, and promtool accepts it.
    rule_file = tmp_path / "out" / "rule-groups-namespace-rankwatch.yaml"
    res = promserver.promtool("check", "rules", str(rule_file))
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr
    source_groups = [g for f in assets.rule_files() for g in yaml.safe_load(f.read_text())["groups"]]
    assert yaml.safe_load(rules)["groups"] == source_groups

    # AMP's two keys; alertmanager_config passes amtool with its templates.
    assert set(definition) == {"template_files", "alertmanager_config"}
    config = _write_am(definition, tmp_path / "am")
    res = _amtool("check-config", str(config))
    assert res.returncode == 0 and "SUCCESS" in res.stdout, res.stdout + res.stderr
    cfg = yaml.safe_load(definition["alertmanager_config"])
    source = yaml.safe_load((assets.asset_dir("alerts") / "alertmanager.yml").read_text())
    # Only SNS receivers, each signed for its topic's region, none of what AMP forbids.
    assert [r["name"] for r in cfg["receivers"]] == [r["name"] for r in source["receivers"]]
    for r in cfg["receivers"]:
        assert set(r) == {"name", "sns_configs"}
        for sns in r["sns_configs"]:
            assert sns["sigv4"] == {"region": REGION} and "api_url" not in sns and "http_config" not in sns
    topics = {r["name"]: r["sns_configs"][0]["topic_arn"] for r in cfg["receivers"]}
    assert topics == {"slack-ml-alerts": TOPIC, "oncall-webhook": ONCALL}
    # Critical/warning routing, grouping, timings and inhibitions are the source's.
    assert cfg["route"] == source["route"] and cfg["inhibit_rules"] == source["inhibit_rules"]
    assert "api_url" not in definition["alertmanager_config"] and "_file" not in definition["alertmanager_config"]


def test_sns_message_is_an_aws_chatbot_event(aws_env, tmp_path: Path) -> None:
    """The default message renders (real Alertmanager template engine) to the JSON event AWS
    Chatbot posts to Slack; values with quotes, markup and newlines stay valid JSON."""
    _, definition = _dry_run(tmp_path / "out")
    _write_am(definition, tmp_path / "am")
    glob = str(tmp_path / "am" / TEMPLATE_FILE)
    res = _amtool("template", "render", f"--template.glob={glob}", '--template.text={{ template "rankwatch.sns.chatbot" . }}')
    assert res.returncode == 0, res.stderr
    event = json.loads(res.stdout)
    assert event["version"] == "1.0" and event["source"] == "custom"
    assert event["content"]["textType"] == "client-markdown" and "Runbook:" in event["content"]["description"]
    hostile = 'GPU "7" <b>on</b> p5-01\\n & `rm -rf` \u2603\nline two\ttab'
    go_literal = json.dumps(hostile, ensure_ascii=False)  # a Go string literal for this text
    res = _amtool("template", "render", f"--template.glob={glob}",
                  '--template.text="{{ template "rankwatch.json.str" ' + go_literal + ' }}"')
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == hostile
    # The text format is for subscribers that are not Chatbot (Lambda, HTTPS, e-mail).
    _, text_def = _dry_run(tmp_path / "text", "--message-format", "text")
    cfg = yaml.safe_load(text_def["alertmanager_config"])
    assert all(s["message"] == '{{ template "rankwatch.sns.text" . }}' for r in cfg["receivers"] for s in r["sns_configs"])


def test_deploy_creates_then_a_second_run_changes_nothing(amp: FakeAMP, tmp_path: Path, capsys, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    rules, _ = _dry_run(tmp_path / "out")
    definition_text = (tmp_path / "out" / "alert-manager-definition.yaml").read_text()
    capsys.readouterr()
    assert _deploy(amp) == 0
    out = capsys.readouterr().out
    assert "rule groups namespace 'rankwatch': created (ACTIVE)" in out
    assert "alert manager definition: created (ACTIVE)" in out
    # AMP holds exactly the dry-run payloads.
    assert amp.namespaces[(WS, "rankwatch")]["data"].decode() == rules
    assert amp.definitions[WS]["data"].decode() == definition_text
    assert [r[:2] for r in amp.changes()] == [("POST", f"/workspaces/{WS}/rulegroupsnamespaces"),
                                             ("POST", f"/workspaces/{WS}/alertmanager/definition")]
    # Second run: read, compare, leave alone.
    before = len(amp.requests)
    assert _deploy(amp) == 0
    out = capsys.readouterr().out
    assert "rule groups namespace 'rankwatch': unchanged" in out and "alert manager definition: unchanged" in out
    assert all(r[0] == "GET" for r in amp.requests[before:])
    # A changed definition is replaced in place; the unchanged namespace is not touched.
    before = len(amp.requests)
    assert _deploy(amp, "--message-format", "text") == 0
    out = capsys.readouterr().out
    assert "alert manager definition: updated (ACTIVE)" in out and "'rankwatch': unchanged" in out
    assert [r[:2] for r in amp.requests[before:] if r[0] != "GET"] == [("PUT", f"/workspaces/{WS}/alertmanager/definition")]
    assert SECRET not in caplog.text + out


@pytest.mark.parametrize("problem, config, expected", [
    ("non-SNS receiver", {"name": "mixed", "sns_configs": [{"topic_arn": TOPIC, "sigv4": {"region": REGION}}],
                          "slack_configs": [{"channel": "#x"}]}, "slack_configs: AMP delivers only to Amazon SNS"),
    ("api_url", {"name": "r", "sns_configs": [{"topic_arn": TOPIC, "sigv4": {"region": REGION},
                                               "api_url": "https://sns.example"}]}, "sns_configs[0].api_url"),
    ("http_config", {"name": "r", "sns_configs": [{"topic_arn": TOPIC, "sigv4": {"region": REGION},
                                                   "http_config": {"proxy_url": "http://p"}}]}, "http_config"),
    ("missing region", {"name": "r", "sns_configs": [{"topic_arn": TOPIC, "sigv4": {}}]}, "sigv4.region is missing"),
])
def test_what_amp_refuses_fails_before_any_call(amp: FakeAMP, tmp_path: Path, capsys, problem, config, expected) -> None:
    source = yaml.safe_load((assets.asset_dir("alerts") / "alertmanager.yml").read_text())
    source["receivers"].append(config)
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(source))
    assert _deploy(amp, "--alertmanager-config", str(path)) == 2
    err = capsys.readouterr().err
    assert expected in err and str(path) in err and "Traceback" not in err, err
    assert amp.requests == []


def test_repeat_interval_over_five_days_and_regionless_topic_fail_before_any_call(amp: FakeAMP, tmp_path: Path,
                                                                                 capsys) -> None:
    source = yaml.safe_load((assets.asset_dir("alerts") / "alertmanager.yml").read_text())
    source["route"]["routes"][1]["repeat_interval"] = "6d"
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(source))
    assert _deploy(amp, "--alertmanager-config", str(path)) == 2
    assert "route.routes[1].repeat_interval: 6d is over AMP's limit of 5d" in capsys.readouterr().err
    source["route"]["routes"][1]["repeat_interval"] = "120h"  # exactly 5 days is allowed
    path.write_text(yaml.safe_dump(source))
    assert main(["deploy", "amp", "--dry-run", "--out", str(tmp_path / "ok"), "--sns-topic-arn", TOPIC,
                 "--alertmanager-config", str(path)]) == 0
    assert main(["deploy", "amp", "--workspace-id", WS, "--endpoint-url", amp.url,
                 "--sns-topic-arn", "arn:aws:sns::123456789012:no-region"]) == 2
    assert "names no region" in capsys.readouterr().err
    assert main(["deploy", "amp", "--workspace-id", WS, "--endpoint-url", amp.url, "--sns-topic-arn", TOPIC,
                 "--receiver-topic", "pagerduty=" + ONCALL]) == 2
    assert "receivers that the config does not have: pagerduty" in capsys.readouterr().err
    assert amp.requests == []


def test_aws_errors_are_one_line_messages(amp: FakeAMP, monkeypatch, capsys, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    assert _deploy(amp, workspace="ws-does-not-exist") == 2
    err = capsys.readouterr().err
    assert "ResourceNotFoundException" in err and "ws-does-not-exist" in err and "Traceback" not in err
    # A request signed for another region.
    assert _deploy(amp, "--region", "eu-west-1") == 2
    assert "InvalidSignatureException" in capsys.readouterr().err
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG01")
    assert _deploy(amp) == 2
    assert "credentials are not valid" in capsys.readouterr().err
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert _deploy(amp) == 2
    assert "no AWS credentials" in capsys.readouterr().err
    assert amp.changes() == [] and SECRET not in caplog.text


def test_throttling_is_retried_and_failed_changes_are_reported(amp: FakeAMP, capsys) -> None:
    amp.throttle_next = 2  # boto3's standard retry mode absorbs these
    assert _deploy(amp) == 0
    assert sum(1 for r in amp.requests if r[2] == 429) == 2
    capsys.readouterr()
    # AMP accepts a change (202) and later reports it failed: the reason reaches the user.
    amp.fail_next_change = "group rankwatch.gpu: parse error in rule 3"
    assert _deploy(amp, "--message-format", "text") == 2
    err = capsys.readouterr().err
    assert "UPDATE_FAILED" in err and "parse error in rule 3" in err


def test_change_in_flight_is_awaited_or_reported(amp: FakeAMP, capsys, monkeypatch) -> None:
    assert _deploy(amp) == 0
    capsys.readouterr()
    # Someone else's update is still being applied and does not settle in time.
    amp.namespaces[(WS, "rankwatch")]["status"] = {"statusCode": "UPDATING"}
    amp.namespaces[(WS, "rankwatch")]["_describes"] = 0
    amp.settle_after = 10**9
    assert main(["deploy", "amp", "--workspace-id", WS, "--sns-topic-arn", TOPIC, "--endpoint-url", amp.url,
                 "--wait-timeout", "0"]) == 2
    assert "still UPDATING" in capsys.readouterr().err
    # It settles: the deploy waits for it, then finds nothing to change.
    amp.settle_after = 2
    assert _deploy(amp) == 0
    assert "'rankwatch': unchanged" in capsys.readouterr().out
    # A creator racing this one: AMP answers 409 and the message says what to do.
    del amp.namespaces[(WS, "rankwatch")]
    real = amp.handle

    def racing(method, path, body):
        if method == "POST" and path.endswith("/rulegroupsnamespaces"):
            real(method, path, body)
        return real(method, path, body)

    monkeypatch.setattr(amp, "handle", racing)
    assert _deploy(amp) == 2
    err = capsys.readouterr().err
    assert "ConflictException (409)" in err and "rerun" in err


def test_rules_only_leaves_the_alert_manager_alone(amp: FakeAMP, tmp_path: Path, capsys) -> None:
    """When Grafana does the alerting, AMP only needs the rules (the recording rules the alerts use)."""
    assert main(["deploy", "amp", "--dry-run", "--rules-only", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rule-groups-namespace-rankwatch.yaml"]
    assert main(["deploy", "amp", "--workspace-id", WS, "--endpoint-url", amp.url, "--rules-only"]) == 0
    assert "rule groups namespace 'rankwatch': created" in capsys.readouterr().out
    assert amp.definitions == {} and [r[1] for r in amp.changes()] == [f"/workspaces/{WS}/rulegroupsnamespaces"]
    assert main(["deploy", "amp", "--workspace-id", WS, "--endpoint-url", amp.url]) == 2
    assert "--sns-topic-arn is required" in capsys.readouterr().err
