"""rankwatch.assets: the declarative artifacts come from the checkout (here) or the wheel's
copy (tests/test_wheel_install.py); missing ones are a clear error, never an empty result."""

from __future__ import annotations

from pathlib import Path

import pytest

from rankwatch import assets
from rankwatch.cli import main
from rankwatch.errors import InputError

REPO = Path(__file__).resolve().parents[1]


def test_checkout_assets_are_the_top_level_directories() -> None:
    assert {name: assets.asset_dir(name) for name in assets.ASSETS} == {
        "alerts": REPO / "alerts", "runbooks": REPO / "docs" / "runbooks", "dashboards": REPO / "dashboards",
        "examples": REPO / "examples"}
    assert [p.name for p in assets.rule_files()] == ["rankwatch-alerts.yml", "rankwatch-rules.yml"]


def test_missing_assets_name_where_they_were_looked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "_CHECKOUT", tmp_path)  # neither a wheel copy nor a checkout here
    with pytest.raises(InputError, match=r"rankwatch's alerts files are missing: neither .*_assets/alerts nor "
                                         + str(tmp_path / "alerts")):
        assets.asset_dir("alerts")
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "alerts").mkdir()
    with pytest.raises(InputError, match=r"no rule files \(rankwatch-\*\.yml\) in"):
        assets.rule_files()
    with pytest.raises(KeyError, match="unknown asset"):
        assets.asset_dir("grafana")


def test_assets_command_prints_each_directory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["assets", "examples"]) == 0
    assert capsys.readouterr().out == f"{REPO / 'examples'}\n"
    assert main(["assets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"alerts\t{REPO / 'alerts'}" and len(lines) == 4
