"""`rankwatch dashboards generate`: writes the dashboards and derived manifests, `--check`
reports stale files, and the generated JSON keeps the promises of the issue (datasource
variable, shared variables, links, no grafanalib stale defaults)."""

from __future__ import annotations

import json
from pathlib import Path

from rankwatch.cli import main
from rankwatch.dashboards.build import render_all

REPO = Path(__file__).resolve().parents[1]


def test_generate_then_check(tmp_path: Path, capsys) -> None:
    out, k8s = tmp_path / "dash", tmp_path / "k8s"
    args = ["dashboards", "generate", "--out", str(out), "--kubernetes-out", str(k8s), "--alerts", str(REPO / "alerts")]
    assert main([*args, "--check"]) == 1  # nothing there yet
    assert main(args) == 0
    assert sorted(p.name for p in out.iterdir()) == ["alerting", "efa-network.json", "gpu-health.json", "node.json",
                                                     "training-run.json"]
    assert [p.name for p in (out / "alerting").iterdir()] == ["rankwatch-alert-rules.yaml"]
    assert (k8s / "prometheusrule.yaml").is_file() and (k8s / "grafana-alert-rules.yaml").is_file()
    capsys.readouterr()
    assert main([*args, "--check"]) == 0
    (out / "node.json").write_text("{}")
    assert main([*args, "--check"]) == 1
    assert str(out / "node.json") in capsys.readouterr().err
    assert main(args) == 0 and json.loads((out / "node.json").read_text())["uid"] == "rankwatch-node"


def test_dashboards_are_portable_and_linked() -> None:
    dashboards = render_all()
    for name, d in dashboards.items():
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        assert {"node"} <= set(variables), name
        assert d["links"][0]["includeVars"] and d["links"][0]["keepTime"] and d["links"][0]["tags"] == ["rankwatch"]
        assert "rankwatch" in d["tags"] and d["schemaVersion"] >= 36
        for panel in d["panels"]:
            assert "maxDataPoints" not in panel, f"{name}/{panel['title']}: grafanalib's 100-point cap"
            for t in panel.get("targets", []):
                assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
                assert "intervalFactor" not in t
        for ann in d["annotations"]["list"]:
            if "expr" in ann:
                assert ann["datasource"]["uid"] == "${datasource}"
    assert {"run", "node", "gpu"} <= {v["name"] for d in dashboards.values() for v in d["templating"]["list"]}
    # Data links into the node drill-down carry the variables.
    training = json.dumps(dashboards["training-run.json"])
    assert "/d/rankwatch-node/?var-node=" in training and "var-run=$run" in training
