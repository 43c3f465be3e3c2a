"""The Prometheus rule files, their promtool unit tests and alertmanager.yml, checked by the
real promtool and amtool."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from rankwatch import promserver

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "alerts"
RULE_FILES = sorted(ALERTS.glob("rankwatch-*.yml"))
TEST_FILES = sorted((ALERTS / "tests").glob("*.test.yml"))


def _alert_rules() -> list[dict]:
    out = []
    for f in RULE_FILES:
        for group in yaml.safe_load(f.read_text())["groups"]:
            out += [r for r in group["rules"] if "alert" in r]
    return out


def test_promtool_check_rules() -> None:
    res = promserver.promtool("check", "rules", *map(str, RULE_FILES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("SUCCESS") == len(RULE_FILES)


def test_promtool_unit_tests_pass() -> None:
    res = promserver.promtool("test", "rules", *map(str, TEST_FILES))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests_fail_when_a_threshold_is_broken(tmp_path: Path) -> None:
    """The unit tests bite: loosen one threshold and its test fails."""
    for f in RULE_FILES:
        text = f.read_text()
        if f.name == "rankwatch-alerts.yml":
            assert "> 600" in text
            text = text.replace("> 600", "> 500")
        (tmp_path / f.name).write_text(text)
    (tmp_path / "tests").mkdir()
    doc = yaml.safe_load(TEST_FILES[0].read_text())
    doc["tests"] = [g for g in doc["tests"]
                    if any(c["alertname"] == "RankwatchTrainingHang" for c in g.get("alert_rule_test", []))]
    test_file = tmp_path / "tests" / "hang.test.yml"
    test_file.write_text(yaml.safe_dump(doc))
    res = promserver.promtool("test", "rules", str(test_file))
    assert res.returncode != 0 and "RankwatchTrainingHang" in res.stdout + res.stderr
    (tmp_path / "rankwatch-alerts.yml").write_text((ALERTS / "rankwatch-alerts.yml").read_text())
    assert promserver.promtool("test", "rules", str(test_file)).returncode == 0


def test_every_alert_has_fields_tests_and_a_runbook() -> None:
    tests = [yaml.safe_load(t.read_text()) for t in TEST_FILES]
    cases: dict[str, list] = {}
    for doc in tests:
        for group in doc["tests"]:
            for case in group.get("alert_rule_test", []):
                cases.setdefault(case["alertname"], []).append(case)
    for rule in _alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), name
        runbook = rule["annotations"]["runbook_url"].rsplit("/docs/runbooks/", 1)[1]
        page = REPO / "docs" / "runbooks" / runbook
        assert page.is_file(), f"{name}: {page} missing"
        text = page.read_text()
        assert name in text and "Slurm" in text and "Kubernetes" in text and "HyperPod" in text, page
        assert any(c["exp_alerts"] for c in cases.get(name, [])), f"{name}: no firing test"
        assert any(not c["exp_alerts"] for c in cases.get(name, [])), f"{name}: no not-firing test"


def test_alertmanager_config_is_valid() -> None:
    amtool = promserver.find_binary("amtool")
    res = subprocess.run([amtool, "check-config", str(ALERTS / "alertmanager.yml")], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    cfg = yaml.safe_load((ALERTS / "alertmanager.yml").read_text())
    slack = [c for r in cfg["receivers"] for c in r.get("slack_configs", [])]
    assert slack and all("api_url_file" in c and "api_url" not in c for c in slack)
    assert any(r.get("webhook_configs") for r in cfg["receivers"])
