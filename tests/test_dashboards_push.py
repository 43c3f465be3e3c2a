"""`rankwatch dashboards push` against a local server implementing Grafana's folder and
dashboard endpoints (rankwatch.sim.grafana), including 401 and 412 answers."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from rankwatch.cli import main
from rankwatch.dashboards.build import render_all
from rankwatch.dashboards.push import push_dashboards
from rankwatch.errors import RankwatchError
from rankwatch.sim.grafana import FakeGrafana

TOKEN = "glsa_Sup3rSecretServiceAccountToken_abcdef"
UIDS = {d["uid"] for d in render_all().values()}


@pytest.fixture
def grafana():
    with FakeGrafana(token=TOKEN) as g:
        yield g


def _push(monkeypatch: pytest.MonkeyPatch, grafana: FakeGrafana, *args: str, token: str | None = TOKEN) -> int:
    monkeypatch.delenv("GRAFANA_TOKEN_FILE", raising=False)
    if token is None:
        monkeypatch.delenv("GRAFANA_TOKEN", raising=False)
    else:
        monkeypatch.setenv("GRAFANA_TOKEN", token)
    return main(["--log-level", "DEBUG", "dashboards", "push", "--grafana", grafana.url, *args])


def test_push_creates_folder_and_dashboards_then_updates_them(monkeypatch, grafana, capsys, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    assert _push(monkeypatch, grafana, "--run", "llama-70b-pt-7") == 0
    assert set(grafana.folders) == {"rankwatch"}
    assert set(grafana.dashboards) == UIDS
    assert all(d["folderUid"] == "rankwatch" and d["version"] == 1 for d in grafana.dashboards.values())
    # The live run is what the dashboards open on.
    training = grafana.dashboards["rankwatch-training-run"]["dashboard"]
    run_var = next(v for v in training["templating"]["list"] if v["name"] == "run")
    assert run_var["current"]["value"] == "llama-70b-pt-7"
    out = capsys.readouterr()
    assert "rankwatch / Training run" in out.out and "/d/rankwatch-training-run/" in out.out

    # Second push: folder found (not created again), dashboards overwritten in place.
    assert _push(monkeypatch, grafana) == 0
    assert [r for r in grafana.requests if r[:2] == ("POST", "/api/folders")] == [("POST", "/api/folders", 200)]
    assert all(d["version"] == 2 for d in grafana.dashboards.values())
    assert TOKEN not in capsys.readouterr().err + caplog.text


def test_wrong_token_is_a_clear_error_without_the_token(monkeypatch, grafana, capsys, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "glsa_wrongwrongwrong_123456"
    assert _push(monkeypatch, grafana, token=wrong) == 2
    err = capsys.readouterr().err
    assert "401" in err and "GRAFANA_TOKEN" in err and "Traceback" not in err
    assert wrong not in err + caplog.text
    assert grafana.dashboards == {}


def test_missing_token_is_a_config_error(monkeypatch, grafana, capsys) -> None:
    assert _push(monkeypatch, grafana, token=None) == 2
    assert "GRAFANA_TOKEN" in capsys.readouterr().err
    assert grafana.requests == []


def test_token_from_file(monkeypatch, grafana, tmp_path: Path, capsys) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert _push(monkeypatch, grafana, "--token-file", str(token_file), token=None) == 0
    assert set(grafana.dashboards) == UIDS
    assert _push(monkeypatch, grafana, "--token-file", str(tmp_path / "absent"), token=None) == 2
    assert str(tmp_path / "absent") in capsys.readouterr().err


def test_version_conflict_without_overwrite_keeps_the_ui_edit(monkeypatch, grafana, capsys) -> None:
    push_dashboards(grafana.url, TOKEN, render_all())
    # Unchanged in Grafana: a careful push succeeds.
    assert _push(monkeypatch, grafana, "--no-overwrite") == 0
    grafana.edit_in_ui("rankwatch-gpu-health")
    edited = grafana.dashboards["rankwatch-gpu-health"]["version"]
    capsys.readouterr()
    # Edited in the UI meanwhile: push reads version N, but the server moved on before the save.
    real_handle = grafana.handle

    def racing(method, path, body):
        if path == "/api/dashboards/db" and body["dashboard"]["uid"] == "rankwatch-gpu-health":
            grafana.edit_in_ui("rankwatch-gpu-health")
        return real_handle(method, path, body)

    monkeypatch.setattr(grafana, "handle", racing)
    assert _push(monkeypatch, grafana, "--no-overwrite") == 2
    err = capsys.readouterr().err
    assert "412" in err and "version-mismatch" in err and "rankwatch / GPU health" in err and "--overwrite" in err
    assert ("POST", "/api/dashboards/db", 412) in grafana.requests
    assert grafana.dashboards["rankwatch-gpu-health"]["version"] == edited + 1  # the UI edit survived
    monkeypatch.setattr(grafana, "handle", real_handle)
    # --overwrite (the default) replaces it.
    assert _push(monkeypatch, grafana) == 0
    assert grafana.dashboards["rankwatch-gpu-health"]["version"] == edited + 2


def test_existing_folder_with_the_title_is_reused(grafana) -> None:
    grafana.handle("POST", "/api/folders", {"uid": "abc123", "title": "rankwatch"})
    push_dashboards(grafana.url, TOKEN, render_all())
    assert set(grafana.folders) == {"abc123"}
    assert all(d["folderUid"] == "abc123" for d in grafana.dashboards.values())


def test_push_from_committed_dir_and_unreachable_grafana(monkeypatch, grafana, tmp_path: Path, capsys) -> None:
    repo = Path(__file__).resolve().parents[1]
    assert _push(monkeypatch, grafana, "--from-dir", str(repo / "dashboards")) == 0
    committed = json.loads((repo / "dashboards" / "node.json").read_text())
    assert grafana.dashboards["rankwatch-node"]["dashboard"]["panels"] == committed["panels"]
    with pytest.raises(RankwatchError, match="cannot reach Grafana"):
        push_dashboards("http://127.0.0.1:9", TOKEN, render_all())
    (tmp_path / "broken.json").write_text('{"title": "x",\n  oops}')
    capsys.readouterr()
    assert _push(monkeypatch, grafana, "--from-dir", str(tmp_path)) == 2
    assert f"{tmp_path / 'broken.json'}:2: not valid JSON" in capsys.readouterr().err


def test_live_run_is_found_in_prometheus(monkeypatch, grafana, prometheus_factory) -> None:
    """`--run-from-prometheus URL` opens the dashboards on the run whose ranks stepped last (real
    probes, scraped by a real Prometheus)."""
    import time

    from conftest import scrape_config

    from rankwatch.exporters.identity import RankIdentity
    from rankwatch.exporters.probe import Probe
    from rankwatch.promserver import free_port, wait_for_series

    ports = [free_port(), free_port()]
    old = Probe("old-run", port=ports[0], addr="127.0.0.1", identity=RankIdentity(node="n1"), wandb_run=None)
    new = Probe("new-run", port=ports[1], addr="127.0.0.1", identity=RankIdentity(node="n2"), wandb_run=None)
    try:
        now = time.time()
        old.record_step(1.0, {"forward": 0.5}, tokens=10, end_time=now - 600)
        new.record_step(1.0, {"forward": 0.5}, tokens=10, end_time=now)
        prom = prometheus_factory(scrape_config({"probes": [f"127.0.0.1:{p}" for p in ports]}))
        wait_for_series(prom.url, "rankwatch_last_step_timestamp_seconds", min_series=2)
        assert _push(monkeypatch, grafana, "--run-from-prometheus", prom.url) == 0
    finally:
        old.close()
        new.close()
    training = grafana.dashboards["rankwatch-training-run"]["dashboard"]
    assert next(v for v in training["templating"]["list"] if v["name"] == "run")["current"]["value"] == "new-run"
