"""The detector state DB writes only the parts of the core state that changed, and what it reads
back is the state it was given: across restarts, a file deleted under it, and a file written
by the previous schema (one JSON text), which is upgraded in place."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from rankwatch.detectors.config import DetectorConfig
from rankwatch.detectors.core import DetectorCore
from rankwatch.detectors.state import DetectorState, join_state, split_state
from rankwatch.sim.scenario import Scenario, simulate, snapshots
from rankwatch.sim.training import Fault, Layout


def _normal(state: dict) -> dict:
    return json.loads(json.dumps(state, default=lambda o: sorted(o) if isinstance(o, set) else o.item()))


def _core_states(n: int) -> list[dict]:
    """Successive states of a real core over a 64-rank job with a straggler."""
    sc = Scenario("parts", layout=Layout(tp=8, pp=4, dp=2), nodes=8, duration_s=15.0 * (n + 1), seed=2,
                  faults=[Fault("slowdown", rank=21, start_s=60.0, magnitude=0.3)])
    core = DetectorCore(DetectorConfig())
    out = []
    for snap in snapshots(simulate(sc), 15.0, 15.0):
        core.evaluate(snap)
        out.append(_normal(core.export_state()))
    return out[:n]


def test_split_and_join_are_inverse_whatever_the_keys() -> None:
    state = {"version": 1, "trackers": {"straggler": {"state": {"a:1": {"x": 1}}}, "gpu": {"state": {}}},
             "gpu": {"clock_baseline": {"node-0:1": [1.0, 2.0]}, "seen": {"n": ["0"]}},
             "empty": {}, "odd": {'we"ird/\n': [1], "x": {}}, "scalar": 3.5}
    parts = split_state(state)
    assert join_state(parts) == state
    assert len(parts) > len(state)  # tables of tables went in one part per entry


def test_only_changed_parts_are_written_and_a_restart_reads_the_same_state(tmp_path: Path) -> None:
    states = _core_states(12)
    db = tmp_path / "state.sqlite"
    st = DetectorState(db)
    written = []
    for i, s in enumerate(states):
        st.save(15.0 * (i + 1), s, [])
        written.append(st.parts_written)
    total = len(split_state(states[-1]))
    assert written[0] == len(split_state(states[0]))  # the first save writes everything
    assert max(written[1:]) < total  # later ones skip what did not change
    st.close()
    again = DetectorState(db)
    loaded, last = again.load()
    assert last == 15.0 * len(states) and loaded == states[-1]
    again.save(15.0 * (len(states) + 1), states[-1], [])
    assert again.parts_written == 0  # what it loaded is what it holds: nothing to rewrite
    again.close()


def test_a_file_deleted_under_it_gets_the_whole_state_at_the_next_save(tmp_path: Path) -> None:
    states = _core_states(4)
    db = tmp_path / "state.sqlite"
    st = DetectorState(db)
    for i, s in enumerate(states[:3]):
        st.save(15.0 * (i + 1), s, [])
    for suffix in ("", "-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    st.save(60.0, states[3], [])
    assert st.parts_written == len(split_state(states[3]))
    st.close()
    assert DetectorState(db).load() == (states[3], 60.0)


def test_a_version_1_file_is_upgraded_in_place(tmp_path: Path) -> None:
    state = _core_states(3)[-1]
    db = tmp_path / "v1.sqlite"
    con = sqlite3.connect(db)
    con.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE core_state (id INTEGER PRIMARY KEY CHECK (id = 1), last_time REAL NOT NULL, state TEXT NOT NULL,
                                 saved_at REAL NOT NULL);
        CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, kind TEXT NOT NULL,
                             state TEXT NOT NULL, episode TEXT NOT NULL, body TEXT NOT NULL,
                             published INTEGER NOT NULL DEFAULT 0);""")
    con.execute("INSERT INTO core_state VALUES (1, 45.0, ?, 0)", (json.dumps(state),))
    con.commit()
    con.close()
    st = DetectorState(db)
    assert st.load() == (state, 45.0)
    st.close()
    con = sqlite3.connect(db)
    assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("2",)
    assert con.execute("SELECT state FROM core_state").fetchone() == ("",)
    con.close()
