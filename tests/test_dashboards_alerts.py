"""Grafana-managed alert rules made from alerts/: the file-provisioning document and its sidecar
ConfigMap, and `rankwatch dashboards push --alerts` against the local Grafana
(rankwatch.sim.grafana) speaking the alerting provisioning API, with its error answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rankwatch import assets
from rankwatch.cli import main
from rankwatch.dashboards.alert_rules import (
    CONFIGMAP_FILE,
    PROVISIONING_FILE,
    api_rule_groups,
    grafana_rules,
    provisioning_file,
)
from rankwatch.dashboards.common import datasource_variable
from rankwatch.rulefiles import alert_rules
from rankwatch.sim.grafana import FakeGrafana

REPO = Path(__file__).resolve().parents[1]
TOKEN = "glsa_Sup3rSecretServiceAccountToken_abcdef"


@pytest.fixture
def grafana():
    with FakeGrafana(token=TOKEN) as g:
        yield g


def _push(monkeypatch: pytest.MonkeyPatch, grafana: FakeGrafana, *args: str, token: str = TOKEN) -> int:
    monkeypatch.delenv("GRAFANA_TOKEN_FILE", raising=False)
    monkeypatch.setenv("GRAFANA_TOKEN", token)
    return main(["dashboards", "push", "--grafana", grafana.url, "--alerts", *args])


def _rule_writes(grafana: FakeGrafana) -> list[tuple[str, str, int]]:
    return [r for r in grafana.requests if r[0] == "PUT" and "/rule-groups/" in r[1]]


def test_provisioning_file_is_committed_current_and_queries_the_dashboards_datasource() -> None:
    committed = (REPO / "dashboards" / "alerting" / PROVISIONING_FILE).read_text()
    assert committed == provisioning_file(assets.rule_files()), "run `make dashboards`"
    doc = yaml.safe_load(committed)
    assert doc["apiVersion"] == 1
    # The uid of the datasource the dashboards' $datasource variable opens on where rankwatch
    # provisions Grafana (the datasource named like the variable's default).
    provisioned = yaml.safe_load((REPO / "dashboards/provisioning/datasources/rankwatch.yaml").read_text())
    default_name = datasource_variable().default
    ds_uid = next(d["uid"] for d in provisioned["datasources"] if d["name"] == default_name)
    rules = [r for g in doc["groups"] for r in g["rules"]]
    source = alert_rules(assets.rule_files())
    assert [r["title"] for r in rules] == [r.name for r in source]
    assert [r["annotations"]["runbook_url"] for r in rules] == [r.annotations["runbook_url"] for r in source]
    for group in doc["groups"]:
        assert group["folder"] == "rankwatch" and group["orgId"] == 1 and group["interval"]
    for rule in rules:
        refs = {q["refId"]: q for q in rule["data"]}
        assert rule["condition"] == "C" and set(refs) == {"A", "B", "C"}
        assert refs["A"]["datasourceUid"] == ds_uid and refs["A"]["model"]["instant"] is True
        assert refs["B"]["model"]["expression"] == "is_number($A) || is_nan($A) || is_inf($A)"
        assert refs["C"]["model"]["conditions"][0]["evaluator"] == {"type": "gt", "params": [0]}
        assert rule["noDataState"] == "OK" and rule["execErrState"] == "Error"
        assert "$value " not in " ".join(rule["annotations"].values()) and len(rule["uid"]) <= 40


def test_sidecar_configmap_carries_the_same_file() -> None:
    cm = yaml.safe_load((REPO / "deploy/kubernetes/base/generated" / CONFIGMAP_FILE).read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"]["labels"]["grafana_alert"] == "1"
    assert cm["data"][PROVISIONING_FILE] == (REPO / "dashboards" / "alerting" / PROVISIONING_FILE).read_text()


def test_duplicate_alert_names_get_unique_titles_and_labels_survive_env_expansion(tmp_path: Path) -> None:
    rule = {"alert": "Dup", "expr": "up == 0", "labels": {"severity": "warning", "team": "ml$ops"},
            "annotations": {"summary": "{{ $labels.instance }} is {{ $value }}"}}
    path = tmp_path / "rankwatch-dup.yml"
    lingering = dict(rule, keep_firing_for="10m")
    path.write_text(yaml.safe_dump({"groups": [{"name": "a", "rules": [rule, lingering]}, {"name": "b", "rules": [rule]}]}))
    rules = grafana_rules([path])
    assert rules[1]["keepFiringFor"] == "10m" and "keepFiringFor" not in rules[0]
    titles = [r["title"] for r in rules]
    assert len(set(titles)) == 3 and len({r["uid"] for r in rules}) == 3 and all(t.startswith("Dup") for t in titles)
    assert rules[0]["annotations"]["summary"] == "{{ $labels.instance }} is {{ $values.A.Value }}"
    doc = yaml.safe_load(provisioning_file([path]))
    # File provisioning expands $VAR in labels; $$ is a literal $.
    assert doc["groups"][0]["rules"][0]["labels"]["team"] == "ml$$ops"
    assert doc["groups"][0]["rules"][1]["keepFiringFor"] == "10m"
    bad = dict(rule, annotations={"summary": "${HOME}"})
    path.write_text(yaml.safe_dump({"groups": [{"name": "a", "rules": [bad]}]}))
    with pytest.raises(Exception, match="environment variable"):
        provisioning_file([path])


def test_push_alerts_creates_the_groups_then_changes_nothing(monkeypatch, grafana, capsys) -> None:
    assert _push(monkeypatch, grafana) == 0
    out = capsys.readouterr().out
    expected = api_rule_groups(assets.rule_files(), "prometheus", "rankwatch")
    for group in expected:
        assert f"alert rule group {group['title']}: created ({len(group['rules'])} rules)" in out
        stored = grafana.rule_groups[("rankwatch", group["title"])]
        assert [r["data"][0]["model"]["expr"] for r in stored["rules"]] == [r["data"][0]["model"]["expr"]
                                                                          for r in group["rules"]]
        assert all(r["provenance"] == "api" for r in stored["rules"])  # locked in the UI: edit alerts/
    assert set(grafana.dashboards)  # the dashboards went in the same push
    writes = len(_rule_writes(grafana))
    assert writes == len(expected)
    assert _push(monkeypatch, grafana) == 0
    assert "unchanged" in capsys.readouterr().out
    assert len(_rule_writes(grafana)) == writes  # read, compared, left alone


def test_push_alerts_error_answers(monkeypatch, grafana, capsys) -> None:
    # 401: a wrong token, nothing written.
    assert _push(monkeypatch, grafana, token="glsa_wrong_0000") == 2
    err = capsys.readouterr().err
    assert "401" in err and "glsa_wrong_0000" not in err and grafana.rule_groups == {}
    assert _push(monkeypatch, grafana) == 0
    capsys.readouterr()
    # 403: rules pushed as provisioned cannot silently become UI-editable.
    grafana.rule_groups[("rankwatch", "rankwatch.gpu")]["rules"][0]["annotations"]["summary"] = "edited"
    assert _push(monkeypatch, grafana, "--alerts-editable") == 2
    err = capsys.readouterr().err
    assert "403" in err and "provenance status 'api'" in err and "rankwatch.gpu" in err
    # 409: another writer won the race; the message says to rerun, and a rerun succeeds.
    grafana.conflict_next_write = True
    assert _push(monkeypatch, grafana) == 2
    assert "409" in capsys.readouterr().err
    assert _push(monkeypatch, grafana) == 0
    assert "alert rule group rankwatch.gpu: updated" in capsys.readouterr().out
    assert grafana.rule_groups[("rankwatch", "rankwatch.gpu")]["rules"][0]["annotations"]["summary"] != "edited"


def test_rules_provisioned_from_files_are_not_overwritten(monkeypatch, grafana, capsys) -> None:
    grafana.handle("POST", "/api/folders", {"uid": "rankwatch", "title": "rankwatch"})
    group = api_rule_groups(assets.rule_files(), "prometheus", "rankwatch")[0]
    grafana.rule_groups[("rankwatch", group["title"])] = {
        **group, "rules": [{**r, "provenance": "file", "annotations": {}} for r in group["rules"]]}
    assert _push(monkeypatch, grafana) == 2
    err = capsys.readouterr().err
    assert "403" in err and "provisioned from files" in err
    assert all(r["provenance"] == "file" for r in grafana.rule_groups[("rankwatch", group["title"])]["rules"])


def test_no_overwrite_keeps_edits_and_412_stops_before_the_rules(monkeypatch, grafana, capsys) -> None:
    assert _push(monkeypatch, grafana) == 0
    grafana.rule_groups[("rankwatch", "rankwatch.training")]["rules"][0]["for"] = "30m"
    capsys.readouterr()
    writes = len(_rule_writes(grafana))
    assert _push(monkeypatch, grafana, "--no-overwrite") == 2
    err = capsys.readouterr().err
    assert "rankwatch.training" in err and "--overwrite" in err
    assert len(_rule_writes(grafana)) == writes
    # A dashboard edited in Grafana during a careful push: 412, and no rule group is touched.
    real = grafana.handle

    def racing(method, path, body):
        if path == "/api/dashboards/db":
            grafana.edit_in_ui(body["dashboard"]["uid"])
        return real(method, path, body)

    monkeypatch.setattr(grafana, "handle", racing)
    assert _push(monkeypatch, grafana, "--no-overwrite") == 2
    assert "412" in capsys.readouterr().err and len(_rule_writes(grafana)) == writes
    monkeypatch.setattr(grafana, "handle", real)
    assert _push(monkeypatch, grafana) == 0
    assert grafana.rule_groups[("rankwatch", "rankwatch.training")]["rules"][0]["for"] != "30m"


def test_datasource_is_the_one_the_dashboards_open_on(monkeypatch, capsys) -> None:
    amg = [{"id": 3, "uid": "cloudwatch", "name": "CloudWatch", "type": "cloudwatch", "isDefault": True},
           {"id": 4, "uid": "amp-ws1", "name": "Amazon Managed Prometheus ws-1", "type": "prometheus"},
           {"id": 5, "uid": "amp-ws2", "name": "Amazon Managed Prometheus ws-2", "type": "prometheus"}]
    with FakeGrafana(token=TOKEN, datasources=amg) as g:
        assert _push(monkeypatch, g) == 2
        err = capsys.readouterr().err
        assert "--datasource-uid" in err and "amp-ws1" in err and g.rule_groups == {}
        assert _push(monkeypatch, g, "--datasource-uid", "nope") == 2
        assert "no datasource with uid 'nope'" in capsys.readouterr().err
        assert _push(monkeypatch, g, "--datasource-uid", "amp-ws2") == 0
        stored = [r for grp in g.rule_groups.values() for r in grp["rules"]]
        assert stored and all(r["data"][0]["datasourceUid"] == "amp-ws2" for r in stored)
    with FakeGrafana(token=TOKEN, datasources=amg[:2]) as g:  # a single Prometheus datasource is the one
        assert _push(monkeypatch, g) == 0
        assert all(r["data"][0]["datasourceUid"] == "amp-ws1" for grp in g.rule_groups.values() for r in grp["rules"])
