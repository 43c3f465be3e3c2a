"""Detector configuration: defaults, TOML loading, validation errors that name key and file."""

from __future__ import annotations

from pathlib import Path

import pytest

from rankwatch.detectors.config import DetectorConfig, config_from_mapping, load_config
from rankwatch.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "detector.toml"


def test_example_file_documents_every_key_with_its_default():
    text = EXAMPLE.read_text()
    for name in DetectorConfig.__dataclass_fields__:
        assert f"\n{name} = " in text, f"{name} missing from examples/detector.toml"
    assert load_config(EXAMPLE) == DetectorConfig()


def test_none_gives_defaults_and_values_override(tmp_path):
    assert load_config(None) == DetectorConfig()
    p = tmp_path / "d.toml"
    p.write_text('interval_s = 30\nresolve_windows = 4\ncritical_xids = [79]\ncusum_slowdowns = [0.1, 0.3]\n'
                 'cusum_thresholds_s = [1, 5.5]\ncusum_min_duration_s = [30, 0]\n[slack]\ntoken_env = "X"\n')
    cfg = load_config(p)
    assert cfg.interval_s == 30.0 and cfg.resolve_windows == 4 and cfg.critical_xids == (79,)
    assert cfg.cusum_slowdowns == (0.1, 0.3) and cfg.cusum_thresholds_s == (1.0, 5.5)


def test_detector_table_is_accepted():
    cfg = config_from_mapping({"detector": {"z_threshold": 4.0}, "links": {"grafana": "http://g"}})
    assert cfg.z_threshold == 4.0


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("zthreshold = 3\n", "unknown key 'zthreshold'"),
        ('z_threshold = "high"\n', "z_threshold: must be a number"),
        ("resolve_windows = 2.5\n", "resolve_windows: must be a whole number"),
        ("resolve_windows = 0\n", "resolve_windows: must be a positive number"),
        ("cusum_slowdowns = [0.2, 0.1, 0.3]\n", "cusum_slowdowns: must be increasing fractions"),
        ("cusum_slowdowns = [0.1, 0.2]\n", "need one value each per chart"),
        ("cusum_thresholds_s = [1, -1, 2]\n", "cusum_thresholds_s: must be seconds"),
        ("cusum_min_duration_s = [1, \"x\", 2]\n", "cusum_min_duration_s: must be a list of numbers"),
        ("noise_tail_factor = 0.5\n", "noise_tail_factor: must be at least 1"),
        ("min_slowdown = 5\n", "min_slowdown: must be between 0 and 1"),
        ("critical_xids = [79, \"x\"]\n", "critical_xids: must be a list of integers"),
        ("interval_s = true\n", "interval_s: must be a number"),
        ("interval_s = \n", "invalid TOML"),
    ],
)
def test_bad_values_name_key_and_file(tmp_path, text, needle):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert needle in str(exc.value)
    assert str(p) in str(exc.value)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.toml")
