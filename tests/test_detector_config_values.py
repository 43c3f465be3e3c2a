"""Detector TOML values from a careless or hostile operator: absurd numbers (1e308, NaN, inf,
negative windows) and strings that would be pasted into PromQL are refused with an error naming
the key and the file; property-based (hypothesis) over every key of the config."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rankwatch.detectors.config import DetectorConfig, load_config
from rankwatch.detectors.core import DetectorCore
from rankwatch.detectors.promql import EFA_PREFIX, build_queries
from rankwatch.errors import ConfigError

KEYS = sorted(DetectorConfig.__dataclass_fields__)


@pytest.mark.parametrize(("text", "key"), [
    ("interval_s = 1e308\n", "interval_s"),
    ("window_s = nan\n", "window_s"),
    ("window_s = inf\n", "window_s"),
    ("window_s = -15\n", "window_s"),
    ("warmup_s = -1\n", "warmup_s"),
    ("hang_min_s = 1e308\n", "hang_min_s"),
    ("interval_s = 0.0001\n", "interval_s"),
    ("resolve_windows = 1e300\n", "resolve_windows"),
    ("cusum_min_duration_s = [45, 30, 1e300]\n", "cusum_min_duration_s"),
    ("cusum_thresholds_s = [0, nan, 4.5]\n", "cusum_thresholds_s"),
    ("throughput_history = 1e15\n", "throughput_history"),
    ("critical_xids = [-1]\n", "critical_xids"),
    ('efa_error_counters = ["retrans_pkts[5m]) or vector(1) #"]\n', "efa_error_counters"),
    ('efa_error_counters = ["rx_drops{job=\\"x\\"}"]\n', "efa_error_counters"),
    ('efa_error_counters = ["rx drops"]\n', "efa_error_counters"),
    ('[detector]\nefa_error_counters = ["ok", "no/slash"]\n', "efa_error_counters"),
])
def test_absurd_values_are_refused_naming_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    p = tmp_path / "detector.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(p)
    assert str(p) in str(exc.value) and key in str(exc.value)


def test_sensible_values_are_kept(tmp_path: Path) -> None:
    p = tmp_path / "detector.toml"
    p.write_text('interval_s = 0.5\nwindow_s = 86400\nwarmup_s = 0\n'
                 'efa_error_counters = ["retrans_pkts", "rdma_read_resp_bytes", "Custom_2"]\n')
    cfg = load_config(p)
    assert cfg.interval_s == 0.5 and cfg.window_s == 86400.0
    assert cfg.efa_error_counters == ("retrans_pkts", "rdma_read_resp_bytes", "Custom_2")


def test_promql_refuses_a_counter_that_is_not_a_suffix_even_past_the_config() -> None:
    with pytest.raises(ValueError, match="metric-name suffixes"):
        build_queries(15.0, ['x[1m]) or vector(1'])


# --- property: any TOML value for any key is a config or a ConfigError naming key and file --------

def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    return "[" + ", ".join(_toml(v) for v in value) + "]"


_scalars = (st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2 ** 63), 2 ** 63 - 1)
            | st.booleans() | st.text(max_size=30))
_values = _scalars | st.lists(_scalars, max_size=4) | st.lists(
    st.from_regex(r"[A-Za-z0-9_]{1,12}", fullmatch=True) | st.text(min_size=1, max_size=20), max_size=4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(KEYS), _values, min_size=1, max_size=4), st.booleans())
def test_any_toml_value_gives_a_config_or_an_error_naming_key_and_file(tmp_path: Path, doc: dict[str, Any],
                                                                       table: bool) -> None:
    p = tmp_path / "prop.toml"
    body = "".join(f"{k} = {_toml(v)}\n" for k, v in doc.items())
    p.write_text(("[detector]\n" if table else "") + body, encoding="utf-8")
    try:
        cfg = load_config(p)
    except ConfigError as exc:
        msg = str(exc)
        assert msg.startswith(str(p)), msg
        assert "invalid TOML" in msg or any(k in msg for k in doc), msg
        return
    # accepted: every number finite and bounded, the core builds, the queries are well formed
    for k in KEYS:
        v = getattr(cfg, k)
        for x in (v if isinstance(v, tuple) else (v,)):
            assert not isinstance(x, float) or (math.isfinite(x) and abs(x) <= 1e12), (k, x)
    DetectorCore(cfg)
    for q in build_queries(cfg.window_s, cfg.efa_error_counters):
        if q.name.startswith("efa:"):
            # error counters come back only where they rose (`> 0`); nothing else reaches the text
            assert re.fullmatch(rf"increase\({EFA_PREFIX}[A-Za-z0-9_]+\[\d+m?s\]\)( > 0)?", q.expr), q.expr
