"""Session lists (ACN-Data JSON) become site traces of plug/unplug events with energy demands."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from hil.trace import TraceImportError, TraceReader, summarise
from hil.trace.sessions_import import import_acn_sessions

MS_PER_H = 3_600_000
MAR1_8H = 1_614_585_600_000  # Mon, 01 Mar 2021 08:00:00 GMT


def traces_dir() -> Path:
    env = os.environ.get("EVEDGE_TRACES")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "traces"


def _s(sid: str, station: str, conn: str, disc: str, kwh: float, *, done: str | None = None,
       inputs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"sessionID": sid, "stationID": station, "spaceID": "space-" + station,
            "connectionTime": conn, "disconnectTime": disc, "doneChargingTime": done,
            "kWhDelivered": kwh, "userInputs": inputs}


SESSIONS = [
    _s("s1", "A", "Mon, 01 Mar 2021 08:00:00 GMT", "Mon, 01 Mar 2021 10:00:00 GMT", 10.5,
       done="Mon, 01 Mar 2021 09:30:00 GMT",
       inputs=[{"kWhRequested": 8, "minutesAvailable": 60}, {"kWhRequested": 12, "minutesAvailable": 150}]),
    _s("s2", "A", "Mon, 01 Mar 2021 10:00:00 GMT", "Mon, 01 Mar 2021 11:00:00 GMT", 3),
    _s("s3", "B", "Mon, 01 Mar 2021 09:00:00 GMT", "Mon, 01 Mar 2021 12:00:00 GMT", 20,
       done="Mon, 01 Mar 2021 12:00:30 GMT"),  # recorded as done after the car left
    _s("s4", "A", "Mon, 01 Mar 2021 10:30:00 GMT", "Mon, 01 Mar 2021 10:45:00 GMT", 1),  # overlaps s2
    _s("s5", "C", "Tue, 02 Mar 2021 08:00:00 GMT", "Tue, 02 Mar 2021 09:00:00 GMT", 5),
    _s("s6", "B", "Wed, 03 Mar 2021 01:00:00 GMT", "Wed, 03 Mar 2021 01:00:00 GMT", 0),
]


def _json(tmp_path: Path, sessions: Any = SESSIONS) -> Path:
    path = tmp_path / "sessions.json"
    path.write_text(json.dumps(sessions))
    return path


def _events(path: Path) -> list[tuple[int, str, str, str]]:
    """(t_ms, column, type, session) of every record."""
    with TraceReader(path) as r:
        return [(rec.t_ms, rec.column or "", rec.value["type"], rec.value["session"]) for rec in r]


def test_sessions_become_plug_and_unplug_events_per_station(tmp_path: Path) -> None:
    out = tmp_path / "site.trace"
    result = import_acn_sessions(_json(tmp_path), out, max_columns=0, timezone="UTC")
    assert (result.rows, result.records, result.skipped) == (5, 10, 1)
    assert result.notes == ["1 sessions overlap an earlier one on the same station: left out"]
    assert result.start_utc_ms == MAR1_8H
    assert _events(out) == [
        (0, "A", "plug", "s1"),
        (1 * MS_PER_H, "B", "plug", "s3"),
        (2 * MS_PER_H, "A", "unplug", "s1"),  # an unplug comes before a plug at the same instant
        (2 * MS_PER_H, "A", "plug", "s2"),
        (3 * MS_PER_H, "A", "unplug", "s2"),
        (4 * MS_PER_H, "B", "unplug", "s3"),
        (24 * MS_PER_H, "C", "plug", "s5"),
        (25 * MS_PER_H, "C", "unplug", "s5"),
        (41 * MS_PER_H, "B", "plug", "s6"),  # a zero-length session still plugs before it unplugs
        (41 * MS_PER_H, "B", "unplug", "s6"),
    ]
    with TraceReader(out) as r:
        recs = list(r)
        assert r.header["layout"]["columns"] == [
            {"id": "A", "sessions": 2, "space": "space-A"}, {"id": "B", "sessions": 2, "space": "space-B"},
            {"id": "C", "sessions": 1, "space": "space-C"}]
        assert r.header["meta"]["sessions"] == 5 and r.header["meta"]["skipped_sessions"] == 1
    assert recs[0].value == {"type": "plug", "session": "s1", "energy_wh": 10500.0, "stay_ms": 2 * MS_PER_H,
                             "done_after_ms": 5_400_000, "requested_wh": 12000.0,
                             "requested_stay_ms": 9_000_000}
    assert recs[1].value["done_after_ms"] == 3 * MS_PER_H  # clamped to the stay
    assert "requested_wh" not in recs[3].value and "done_after_ms" not in recs[3].value
    assert recs[2].value == {"type": "unplug", "session": "s1", "energy_wh": 10500.0}


def test_max_columns_keeps_the_busiest_stations(tmp_path: Path) -> None:
    result = import_acn_sessions(_json(tmp_path), tmp_path / "t.trace", max_columns=2)
    assert result.channels == ["A/ev.event", "B/ev.event"]  # A has 3 sessions, B 2, C 1
    assert {e[1] for e in _events(tmp_path / "t.trace")} == {"A", "B"}


def test_date_range_in_the_site_timezone(tmp_path: Path) -> None:
    out = tmp_path / "t.trace"
    result = import_acn_sessions(_json(tmp_path), out, start="2021-03-02", end="2021-03-03", timezone="UTC")
    assert result.rows == 1 and result.start_utc_ms == MAR1_8H + 16 * MS_PER_H  # 2 March 00:00 UTC
    assert _events(out) == [(8 * MS_PER_H, "C", "plug", "s5"), (9 * MS_PER_H, "C", "unplug", "s5")]
    # 1 March in Los Angeles runs from 08:00 to 08:00 UTC: s1 (08:00, inclusive) to s4, not s5.
    result = import_acn_sessions(_json(tmp_path), out, start="2021-03-01", end="2021-03-02",
                                 timezone="America/Los_Angeles")
    assert result.start_utc_ms == MAR1_8H
    assert sorted({e[3] for e in _events(out)}) == ["s1", "s2", "s3"]
    assert result.notes == ["1 sessions overlap an earlier one on the same station: left out"]


def test_idle_spells_can_be_compressed(tmp_path: Path) -> None:
    out = tmp_path / "t.trace"
    result = import_acn_sessions(_json(tmp_path), out, max_columns=0, compress_idle_s=600)
    times = [(e[0], e[3], e[2]) for e in _events(out)]
    assert times[:6] == [(0, "s1", "plug"), (MS_PER_H, "s3", "plug"), (2 * MS_PER_H, "s1", "unplug"),
                         (2 * MS_PER_H, "s2", "plug"), (3 * MS_PER_H, "s2", "unplug"),
                         (4 * MS_PER_H, "s3", "unplug")]  # sessions keep their length
    assert times[6:] == [(15_000_000, "s5", "plug"), (18_600_000, "s5", "unplug"),
                         (19_200_000, "s6", "plug"), (19_200_000, "s6", "unplug")]
    assert summarise(out)["meta"]["idle_removed_ms"] == (20 * MS_PER_H - 600_000) + (16 * MS_PER_H - 600_000)
    assert result.last_t_ms == 19_200_000


@pytest.mark.parametrize(("sessions", "kwargs", "message"), [
    ([{**SESSIONS[0], "connectionTime": "yesterday"}], {},
     "sessions.json session 0 (s1): 'connectionTime' is 'yesterday', not an RFC 1123 time"),
    ([SESSIONS[0], {**SESSIONS[1], "stationID": None}], {}, "session 1 (s2): 'stationID' must be a"),
    ([{**SESSIONS[0], "kWhDelivered": "lots"}], {}, "'kWhDelivered' must be a number >= 0, got 'lots'"),
    ({"sessions": []}, {}, "sessions.json: expected a JSON array of sessions"),
    (SESSIONS, {"start": "2021-03-05"}, "sessions.json: no sessions in the selected range"),
    (SESSIONS, {"start": "2021-03-05", "end": "2021-03-04"}, "the date range is empty"),
    (SESSIONS, {"start": "5 March"}, "from '5 March' is not a date"),
    (SESSIONS, {"timezone": "Mars/Olympus"}, "unknown timezone 'Mars/Olympus'"),
    (SESSIONS, {"max_columns": -1}, "max columns must be >= 0"),
])
def test_bad_session_lists_and_options_say_what_is_wrong(tmp_path: Path, sessions: Any,
                                                         kwargs: dict[str, Any], message: str) -> None:
    out = tmp_path / "t.trace"
    with pytest.raises(TraceImportError) as err:
        import_acn_sessions(_json(tmp_path, sessions), out, **kwargs)
    assert message in str(err.value)
    assert not out.exists()


def test_unreadable_sources(tmp_path: Path) -> None:
    with pytest.raises(TraceImportError, match="cannot read"):
        import_acn_sessions(tmp_path / "none.json", tmp_path / "t.trace")
    bad = tmp_path / "bad.json"
    bad.write_text("[{")
    with pytest.raises(TraceImportError, match=r"bad\.json is not valid JSON"):
        import_acn_sessions(bad, tmp_path / "t.trace")


@pytest.fixture
def acn_json() -> Path:
    path = traces_dir() / "acn-sessions" / "acndata_sessions_0002_2021.json"
    if not path.is_file():
        pytest.skip("real session list not found at %s (set EVEDGE_TRACES)" % path)
    return path


def test_the_real_acn_session_list_imports(acn_json: Path, tmp_path: Path) -> None:
    out = tmp_path / "all.trace"
    result = import_acn_sessions(acn_json, out, max_columns=0)
    assert (result.rows, result.records, result.skipped) == (2114, 4228, 0)
    assert len(result.channels) == 42
    s = summarise(out)
    assert s["start_utc"] == "2021-05-01T20:42:47.000Z" and s["complete"]
    plugs = sum(c["fields"]["type"]["values"]["plug"] for c in s["channels"].values())
    assert plugs == 2114
    busiest = s["channels"]["2-39-81-4550/ev.event"]
    assert busiest["records"] == 2 * 618
    assert busiest["fields"]["type"]["values"] == {"plug": 618, "unplug": 618}

    default = import_acn_sessions(acn_json, tmp_path / "top20.trace")  # the mapping keeps 20 stations
    assert len(default.channels) == 20 and default.rows == 2009
    assert default.channels[0] == "2-39-81-4550/ev.event"


def test_real_sessions_filtered_to_one_local_day(acn_json: Path, tmp_path: Path) -> None:
    la = ZoneInfo("America/Los_Angeles")
    raw = json.loads(acn_json.read_text())
    day = [x for x in raw if parsedate_to_datetime(x["connectionTime"]).astimezone(la).date().isoformat()
           == "2021-09-10"]
    assert len(day) == 41
    out = tmp_path / "day.trace"
    result = import_acn_sessions(acn_json, out, start="2021-09-10", end="2021-09-11", max_columns=0)
    assert result.rows == 41 and result.records == 82
    assert result.start_utc_ms == datetime(2021, 9, 10, 7, 0, tzinfo=UTC).timestamp() * 1000  # PDT midnight
    with TraceReader(out) as r:
        plugs = [rec for rec in r if rec.value["type"] == "plug"]
    assert all(0 <= p.t_ms < 24 * MS_PER_H for p in plugs)
    energy_wh = sum(p.value["energy_wh"] for p in plugs)
    assert energy_wh == pytest.approx(sum(x["kWhDelivered"] for x in day) * 1000)
