"""The trace file format: round trip, streaming, and every kind of damage reported with its place."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hil.trace import Record, TraceError, TraceReader, TraceWriter, declare, make_header, summarise
from hil.trace.channels import check_value, unit_factor

START = 1_702_819_500_000  # 2023-12-17 13:25:00 UTC


def _header(**extra: Any) -> dict[str, Any]:
    chans = dict([
        declare("pilot.offered_a", "c1"), declare("meter.current_a", "c1"), declare("ev.state", "c1"),
        declare("ev.event", "c1"), declare("dno.limit"), declare("site.power_w"), declare("power.cut", "c2"),
    ])
    layout = {"site": {"name": "test"}, "columns": [{"id": "c1", "phases": 3}, {"id": "c2", "phases": 1}]}
    return make_header("unit test", START, chans, layout=layout, meta=extra or {"note": "x"})


RECORDS = [
    (0, "c1/ev.state", "A"),
    (0, "c1/pilot.offered_a", 16.0),
    (500, "c1/ev.event", {"type": "plug", "energy_wh": 12000.0}),
    (1000, "c1/ev.state", "C"),
    (1000, "c1/meter.current_a", [15.5, 15.25, 0.0]),
    (2000, "dno.limit", {"limit_kw": 11.0, "validity_s": 900, "id": "cmd-1"}),
    (2000, "site.power_w", 10_750.5),
    (3500, "c2/power.cut", {"duration_ms": 2000}),
    (4000, "c1/pilot.offered_a", 6.0),
]


def _trace_bytes(records: list[tuple[int, str, Any]] = RECORDS) -> bytes:
    buf = io.BytesIO()
    with TraceWriter(buf, _header()) as w:
        for rec in records:
            w.write(*rec)
    return buf.getvalue()


def _read_all(data: bytes, **kw: Any) -> list[Record]:
    with TraceReader(io.BytesIO(data), **kw) as r:
        return list(r)


def test_round_trip_keeps_header_and_records(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    with TraceWriter(path, _header()) as w:
        for rec in RECORDS:
            w.write(*rec)
    assert w.records == len(RECORDS)
    with TraceReader(path) as r:
        assert r.header["format"] == "evedge-trace" and r.header["version"] == 1
        assert r.start_utc_ms == START
        assert r.header["layout"]["columns"][0] == {"id": "c1", "phases": 3}
        assert r.channels["c1/meter.current_a"] == {"unit": "A", "kind": "list", "column": "c1",
                                                    "description": "measured current per phase [L1, L2, L3]"}
        got = list(r)
        assert r.complete
    assert [tuple(x) for x in got] == RECORDS
    assert got[4].column == "c1" and got[4].base == "meter.current_a"
    assert got[5].column is None and got[5].base == "dno.limit"


def test_file_is_a_plain_cbor_sequence_with_an_end_marker() -> None:
    data = _trace_bytes()
    items = []
    dec = cbor2.CBORDecoder(io.BytesIO(data))
    while True:
        try:
            items.append(dec.decode())
        except cbor2.CBORDecodeEOF:
            break
    assert items[0]["format"] == "evedge-trace"
    assert items[1] == [0, "c1/ev.state", "A"]
    assert items[-1]["end"] is True and items[-1]["records"] == len(RECORDS)
    assert len(items) == len(RECORDS) + 2


def test_ints_are_stored_as_floats_in_float_channels() -> None:
    recs = _read_all(_trace_bytes([(0, "c1/pilot.offered_a", 16), (0, "c1/meter.current_a", [1, 0, 0])]))
    assert recs[0].value == 16.0 and isinstance(recs[0].value, float)
    assert recs[1].value == [1.0, 0.0, 0.0] and all(isinstance(v, float) for v in recs[1].value)


def test_iterating_again_starts_over() -> None:
    with TraceReader(io.BytesIO(_trace_bytes())) as r:
        assert list(r) == list(r)


@pytest.mark.parametrize(("t_ms", "channel", "value", "message"), [
    (0, "c9/pilot.offered_a", 6.0, "not declared"),
    (0, "c1/pilot.offered_a", "16", "expected a float"),
    (0, "c1/pilot.offered_a", float("nan"), "expected a float"),
    (0, "c1/pilot.offered_a", True, "expected a float"),
    (0, "c1/meter.current_a", [1.0, 2.0], "expected 3 phase currents"),
    (0, "c1/ev.state", "X", "state must be one of A-F"),
    (0, "c1/ev.event", {"energy_wh": 1.0}, "missing key 'type'"),
    (0, "c1/ev.event", {"type": "teleport"}, "'type' must be one of"),
    (0, "dno.limit", {"limit_a": 16, "limit_kw": 11, "validity_s": 60, "id": 1}, "exactly one of"),
    (0, "dno.limit", {"limit_a": 16, "id": 1}, "missing key 'validity_s'"),
    (0, "c2/power.cut", {"duration_ms": -1}, "'duration_ms' must be an int >= 0"),
    (0, "c1/ev.event", {"type": "plug", "car": object()}, "cannot encode type"),
    (-1, "c1/pilot.offered_a", 6.0, "t_ms must be an int >= 0"),
    (1.5, "c1/pilot.offered_a", 6.0, "t_ms must be an int >= 0"),
])
def test_writer_rejects_bad_records(t_ms: Any, channel: str, value: Any, message: str) -> None:
    w = TraceWriter(io.BytesIO(), _header())
    with pytest.raises(TraceError, match=message):
        w.write(t_ms, channel, value)


def test_writer_enforces_non_decreasing_time() -> None:
    w = TraceWriter(io.BytesIO(), _header())
    w.write(1000, "c1/pilot.offered_a", 6.0)
    w.write(1000, "c1/pilot.offered_a", 7.0)  # equal times are fine
    with pytest.raises(TraceError, match="record 2: time goes backwards"):
        w.write(999, "c1/pilot.offered_a", 8.0)


def _decl(kind: str, column: str | None, unit: str = "") -> dict[str, Any]:
    return {"unit": unit, "kind": kind, "column": column, "description": ""}


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda h: h["channels"].update({"c1/ev.teleport": _decl("str", "c1")}), "unknown channel 'ev.teleport'"),
    (lambda h: h["channels"]["c1/pilot.offered_a"].update(unit="mA"), "must be kind 'float' in unit 'A'"),
    (lambda h: h["channels"]["c1/pilot.offered_a"].update(column="c2"), "field 'column' is 'c2'"),
    (lambda h: h["channels"].update({"c3/ev.state": _decl("str", "c3")}), "column 'c3' is not in the layout"),
    (lambda h: h["channels"].update({"pilot.offered_a": _decl("float", None, "A")}), "belongs to a column"),
    (lambda h: h.update(version=2), "unsupported trace version 2"),
    (lambda h: h.update(format="csv"), "not an evedge-trace file"),
    (lambda h: h.update(start_utc_ms="now"), "'start_utc_ms' must be an int"),
])
def test_bad_headers_are_refused_by_writer_and_reader(mutate: Any, message: str) -> None:
    header = _header()
    mutate(header)
    with pytest.raises(TraceError, match=message):
        TraceWriter(io.BytesIO(), header)
    with pytest.raises(TraceError, match="header at byte offset 0: .*" + message):
        TraceReader(io.BytesIO(cbor2.dumps(header)))


def test_lenient_mode_accepts_custom_channels() -> None:
    header = _header()
    header["channels"]["c1/lab.temp_c"] = _decl("float", "c1", "degC")
    buf = io.BytesIO()
    with TraceWriter(buf, header, strict=False) as w:
        w.write(0, "c1/lab.temp_c", 21.5)
    assert _read_all(buf.getvalue(), strict=False) == [Record(0, "c1/lab.temp_c", 21.5)]
    with pytest.raises(TraceError, match=r"unknown channel 'lab\.temp_c'"):
        _read_all(buf.getvalue())


def _raw_trace(*records: Any) -> tuple[bytes, list[int]]:
    """Header + raw record items (no end marker) and each record's byte offset."""
    data = cbor2.dumps(_header())
    offsets = []
    for rec in records:
        offsets.append(len(data))
        data += cbor2.dumps(rec)
    return data, offsets


def test_reader_names_the_record_and_offset_of_an_unknown_channel() -> None:
    data, offsets = _raw_trace([0, "c1/ev.state", "A"], [10, "c1/ev.teleport", "B"])
    with pytest.raises(TraceError, match="record 1 at byte offset %d: unknown channel 'c1/ev.teleport'"
                       % offsets[1]) as err:
        _read_all(data)
    assert err.value.offset == offsets[1] and err.value.record == 1


@pytest.mark.parametrize(("bad", "message"), [
    ([5, "c1/ev.state", "A"], "time goes backwards"),
    ([20, "c1/ev.state"], r"expected \[t_ms, channel, value\]"),
    (["20", "c1/ev.state", "A"], "t_ms must be an int"),
    ([20, "c1/pilot.offered_a", "six"], "channel c1/pilot.offered_a: expected a float"),
    ({"end": True, "records": 5, "crc32": 0}, "expected a record or an end marker for 1 records"),
])
def test_reader_checks_every_record(bad: Any, message: str) -> None:
    data, offsets = _raw_trace([10, "c1/ev.state", "A"], bad)
    with pytest.raises(TraceError, match="record 1 at byte offset %d: %s" % (offsets[1], message)):
        _read_all(data)


def test_truncation_at_every_byte_offset_is_a_trace_error_with_its_offset() -> None:
    data = _trace_bytes()
    header_len = len(cbor2.dumps(_header()))
    for cut in range(len(data)):
        with pytest.raises(TraceError) as err:
            _read_all(data[:cut])
        exc = err.value
        assert exc.offset is not None and 0 <= exc.offset <= cut, (cut, str(exc))
        assert "byte offset %d" % exc.offset in str(exc)
        if cut < header_len:
            assert exc.offset == 0 and "header" in str(exc)
        else:
            assert exc.record is not None and "record %d" % exc.record in str(exc)
    assert len(_read_all(data)) == len(RECORDS)


def test_cut_at_a_record_boundary_is_incomplete_not_shorter() -> None:
    data, _ = _raw_trace([0, "c1/ev.state", "A"], [10, "c1/ev.state", "B"])
    with pytest.raises(TraceError, match="record 2 at byte offset %d: the file ends there without the end "
                       "marker" % len(data)):
        _read_all(data)
    with TraceReader(io.BytesIO(data), partial_ok=True) as r:
        assert [x.value for x in r] == ["A", "B"]
        assert not r.complete


def test_writer_that_raised_leaves_an_incomplete_trace(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    with pytest.raises(RuntimeError), TraceWriter(path, _header()) as w:
        w.write(0, "c1/ev.state", "A")
        raise RuntimeError("recorder crashed")
    with pytest.raises(TraceError, match="without the end marker"):
        summarise(path)


def test_every_single_byte_flip_is_detected() -> None:
    data = _trace_bytes()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x5A
        with pytest.raises(TraceError, match="byte offset"):
            _read_all(bytes(bad))


def test_a_flipped_digit_inside_a_value_fails_the_checksum() -> None:
    data = bytearray(_trace_bytes())
    pos = data.index(cbor2.dumps(10_750.5, canonical=True))
    data[pos + 3] ^= 0x01  # still a valid float: only the checksum can tell
    with pytest.raises(TraceError, match="checksum mismatch"):
        _read_all(bytes(data))


def test_data_after_the_end_marker_is_refused() -> None:
    data = _trace_bytes()
    message = "unexpected data after the end marker at byte offset %d" % len(data)
    with pytest.raises(TraceError, match=message):
        _read_all(data + cbor2.dumps([9000, "c1/ev.state", "A"]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_damage_only_ever_raises_trace_error(data: st.DataObject) -> None:
    blob = bytearray(_trace_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        del blob[data.draw(st.integers(0, len(blob))):]
    try:
        _read_all(bytes(blob))
    except TraceError as exc:
        assert "byte offset" in str(exc)


def test_garbage_files_are_trace_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.trace"
    empty.write_bytes(b"")
    with pytest.raises(TraceError, match="empty file") as err:
        TraceReader(empty)
    assert err.value.offset == 0
    text = tmp_path / "json.trace"
    text.write_text('{"format": "evedge-trace"}')
    with pytest.raises(TraceError, match="header at byte offset 0"):
        TraceReader(text)
    with pytest.raises(TraceError, match=r"cannot open trace .*missing\.trace"):
        TraceReader(tmp_path / "missing.trace")


def test_a_long_trace_streams_in_flat_memory(tmp_path: Path) -> None:
    path = tmp_path / "long.trace"
    n = 100_000
    with TraceWriter(path, _header()) as w:
        for i in range(n):
            w.write(i * 100, "c1/meter.current_a", [i % 32 + 0.25, 0.0, 0.0])
    size = path.stat().st_size
    assert size > 2_500_000
    count = 0
    total = 0.0
    tracemalloc.start()  # traced: opening and the first 20,000 records (tracing is slow)
    try:
        with TraceReader(path) as r:
            for rec in r:
                count += 1
                total += rec.value[0]
                if count == 20_000:
                    _, peak = tracemalloc.get_traced_memory()
                    tracemalloc.stop()
            assert r.complete
    finally:
        tracemalloc.stop()
    assert count == n
    assert total == sum(i % 32 + 0.25 for i in range(n))
    assert peak < size / 6, "reading held %d bytes for a %d byte trace" % (peak, size)


def test_summarise_reports_counts_ranges_and_values() -> None:
    s = summarise(io.BytesIO(_trace_bytes()))
    assert s["records"] == len(RECORDS) and s["complete"]
    assert s["start_utc"] == "2023-12-17T13:25:00.000Z" and s["end_utc"] == "2023-12-17T13:25:04.000Z"
    assert s["duration_ms"] == 4000 and s["first_t_ms"] == 0 and s["last_t_ms"] == 4000
    assert s["columns"] == ["c1", "c2"]
    offered = s["channels"]["c1/pilot.offered_a"]
    assert (offered["records"], offered["min"], offered["max"]) == (2, 6.0, 16.0)
    assert (offered["first_t_ms"], offered["last_t_ms"], offered["unit"]) == (0, 4000, "A")
    assert s["channels"]["c1/meter.current_a"]["max"] == 15.5
    assert s["channels"]["c1/ev.state"]["values"] == {"A": 1, "C": 1}
    assert s["channels"]["dno.limit"]["fields"]["limit_kw"] == {"min": 11.0, "max": 11.0}
    assert s["channels"]["c1/ev.event"]["fields"]["type"] == {"values": {"plug": 1}}
    assert s["meta"] == {"note": "x"}


def test_vocabulary_helpers() -> None:
    assert declare("site.limit_w") == ("site.limit_w", {"unit": "W", "kind": "float", "column": None,
                                                        "description": "site power cap in force"})
    with pytest.raises(ValueError, match="site-wide"):
        declare("site.limit_w", "c1")
    with pytest.raises(ValueError, match="must not contain"):
        declare("ev.state", "a/b")
    with pytest.raises(ValueError, match="unknown channel"):
        declare("ev.mood", "c1")
    assert check_value("link.fault", {"kind": "silent", "duration_ms": 5000}) is None
    problem = check_value("link.fault", {"kind": "x", "duration_ms": 1})
    assert problem is not None and "one of drop/corrupt/delay/silent" in problem
    assert unit_factor("kW", "W") == 1000.0 and unit_factor("W", "kW") == 0.001
    assert unit_factor("mA", "A") == 0.001 and unit_factor("V", "A") is None


def test_items_larger_than_a_read_chunk_are_read_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    big = {"type": "plug", "session": "s" * 300_000}
    data = _trace_bytes([(0, "c1/ev.event", big), (1, "c1/ev.state", "B")])
    assert [r.value for r in _read_all(data)] == [big, "B"]
    monkeypatch.setattr("hil.trace.format._MAX_ITEM", 100_000)  # a corrupt length would claim this much
    with pytest.raises(TraceError, match=r"record 0 at byte offset \d+: an item longer than 100000 bytes"):
        _read_all(data)


class _Pipe(io.BytesIO):
    def seekable(self) -> bool:
        return False


def test_a_non_seekable_stream_reads_once() -> None:
    with TraceReader(_Pipe(_trace_bytes())) as r:
        assert len(list(r)) == len(RECORDS) and r.complete
        with pytest.raises(TraceError, match="iterated only once"):
            list(r)
