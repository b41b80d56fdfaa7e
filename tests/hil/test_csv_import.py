"""CSV logs become traces through a mapping; a log or mapping that does not fit says where."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest

from hil.trace import TraceError, TraceImportError, TraceReader, summarise
from hil.trace.csv_import import import_csv
from hil.trace.mappings import MappingError, load_mapping, ready_mappings

BERLIN_10AM_UTC_MS = 1_705_482_000_000  # 17/01/2024 10:00:00 in Europe/Berlin (UTC+1) = 09:00 UTC


def traces_dir() -> Path:
    env = os.environ.get("EVEDGE_TRACES")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "traces"


MAPPING: dict[str, Any] = {
    "name": "wallbox-de",
    "importer": "csv",
    "meta": {"licence": "test data"},
    "csv": {"delimiter": ";", "decimal": ",", "thousands": "."},
    "time": {"column": "Zeit", "format": "%d/%m/%Y %H:%M:%S", "timezone": "Europe/Berlin"},
    "layout": {"column": "wb1", "phases": 3},
    "channels": [
        {"csv": "I1", "channel": "meter.current_a", "phase": 1},
        {"csv": "I2", "channel": "meter.current_a", "phase": 2},
        {"csv": "I3 [mA]", "channel": "meter.current_a", "phase": 3, "unit": "mA"},
        {"csv": "P [kW]", "channel": "meter.power_w", "unit": "kW"},
        {"csv": "Angebot", "channel": "pilot.offered_a", "on_change": True},
        {"csv": "Status", "channel": "cp.state", "values": {"1": "A", "2": "B", "3": "C"}},
        {"csv": "Netz [W]", "channel": "site.power_w", "scale": 2.0, "offset": -100.0},
    ],
}

CSV_TEXT = (
    "\ufeffZeit;I1;I2;I3 [mA];P [kW];Angebot;Status;Netz [W]\n"
    "17/01/2024 10:00:00;0;0;0;0;16;1;1.234,5\n"
    "17/01/2024 10:00:01;1,5;1,25;500;0,35;16;2;1.300\n"
    "\n"
    "17/01/2024 10:00:03;15,75;15,5;15250;10,9;10;3;\n"
)


def _write(tmp_path: Path, text: str = CSV_TEXT, name: str = "log.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return path


def _records(path: Path) -> list[tuple[int, str, Any]]:
    with TraceReader(path) as r:
        return [(rec.t_ms, rec.channel, rec.value) for rec in r]


def test_european_csv_with_bom_semicolons_and_decimal_commas(tmp_path: Path) -> None:
    out = tmp_path / "out.trace"
    result = import_csv(_write(tmp_path), MAPPING, out)
    assert (result.rows, result.skipped) == (3, 1)  # the empty Netz cell of the last row
    assert result.start_utc_ms == BERLIN_10AM_UTC_MS and result.last_t_ms == 3000
    recs = _records(out)
    by_channel: dict[str, list[tuple[int, Any]]] = {}
    for t, name, value in recs:
        by_channel.setdefault(name, []).append((t, value))
    assert by_channel["wb1/meter.current_a"] == [(0, [0.0, 0.0, 0.0]), (1000, [1.5, 1.25, 0.5]),
                                                 (3000, [15.75, 15.5, 15.25])]
    assert by_channel["wb1/meter.power_w"] == [(0, 0.0), (1000, 350.0), (3000, 10900.0)]
    assert by_channel["wb1/pilot.offered_a"] == [(0, 16.0), (3000, 10.0)]  # on_change drops the repeat
    assert by_channel["wb1/cp.state"] == [(0, "A"), (1000, "B"), (3000, "C")]
    assert by_channel["site.power_w"] == [(0, 2369.0), (1000, 2500.0)]  # 1.234,5 x 2 - 100
    assert result.records == len(recs) == 13
    with TraceReader(out) as r:
        assert r.header["meta"]["licence"] == "test data" and r.header["meta"]["timezone"] == "Europe/Berlin"
        assert r.header["layout"]["columns"] == [{"id": "wb1", "phases": 3}]
        assert r.channels["site.power_w"]["column"] is None


def test_timezone_and_column_can_be_overridden(tmp_path: Path) -> None:
    out = tmp_path / "out.trace"
    result = import_csv(_write(tmp_path), MAPPING, out, timezone="UTC", column="bay7")
    assert result.start_utc_ms == BERLIN_10AM_UTC_MS + 3_600_000
    assert "bay7/meter.current_a" in result.channels
    result = import_csv(_write(tmp_path), MAPPING, out, timezone="+02:00")
    assert result.start_utc_ms == BERLIN_10AM_UTC_MS - 3_600_000


@pytest.mark.parametrize(("fmt", "stamps", "start"), [
    ("unix_s", ["1705482000", "1705482000,5"], BERLIN_10AM_UTC_MS),
    ("unix_ms", ["1705482000000", "1705482000500"], BERLIN_10AM_UTC_MS),
    ("iso", ["2024-01-17T10:00:00", "2024-01-17T10:00:00.500"], BERLIN_10AM_UTC_MS),
    ("iso", ["2024-01-17T10:00:00+00:00", "2024-01-17T10:00:00.500Z"], BERLIN_10AM_UTC_MS + 3_600_000),
])
def test_other_time_formats(tmp_path: Path, fmt: str, stamps: list[str], start: int) -> None:
    mapping = copy.deepcopy(MAPPING)
    mapping["time"] = {"column": "t", "format": fmt, "timezone": "Europe/Berlin"}
    mapping["channels"] = [{"csv": "A", "channel": "pilot.offered_a"}]
    text = "t;A\n%s;6\n%s;7,5\n" % tuple(stamps)
    result = import_csv(_write(tmp_path, text), mapping, tmp_path / "o.trace")
    assert result.start_utc_ms == start and result.last_t_ms == 500
    assert _records(tmp_path / "o.trace") == [(0, "wb1/pilot.offered_a", 6.0),
                                              (500, "wb1/pilot.offered_a", 7.5)]


def test_a_mapping_that_does_not_match_the_csv_names_column_and_mapping(tmp_path: Path) -> None:
    text = CSV_TEXT.replace("Angebot", "Offered")
    out = tmp_path / "out.trace"
    with pytest.raises(MappingError) as err:
        import_csv(_write(tmp_path, text), MAPPING, out)
    message = str(err.value)
    assert "mapping 'wallbox-de' needs CSV column 'Angebot', which log.csv does not have" in message
    assert "Offered" in message  # the columns it has
    assert not out.exists()


def _with(change: Any) -> dict[str, Any]:
    mapping = copy.deepcopy(MAPPING)
    change(mapping)
    return mapping


@pytest.mark.parametrize(("mapping", "message"), [
    (_with(lambda m: m["channels"][3].update(sacle=2)), "channels[3]: unknown key 'sacle'"),
    (_with(lambda m: m["channels"][3].update(channel="meter.powr_w")), "unknown channel 'meter.powr_w'"),
    (_with(lambda m: m["channels"][3].update(unit="A")), "channels[3].unit: 'A' cannot be converted"),
    (_with(lambda m: m["channels"][0].pop("phase")), "phase: channel meter.current_a is a per-phase"),
    (_with(lambda m: m["channels"][4].update(phase=1)), "only per-phase list channels take a phase"),
    (_with(lambda m: m["channels"][4].update(channel="dno.limit")), "holds maps"),
    (_with(lambda m: m["channels"][1].update(phase=1)), "channel meter.current_a phase 1 is mapped twice"),
    (_with(lambda m: m["channels"][4].update(scale="2")), "channels[4].scale: must be float, got '2'"),
    (_with(lambda m: m["time"].update(timezone="Mars/Olympus")), "time.timezone: unknown timezone"),
    (_with(lambda m: m.pop("time")), "time: missing (required)"),
    (_with(lambda m: m["csv"].update(decimal=";")), "csv.decimal: must be '.' or ','"),
    (_with(lambda m: m["layout"].update(column="a b")), "must not contain"),
    (_with(lambda m: m.update(channels=[])), "maps no channels"),
    (_with(lambda m: m.update(importer="acn-sessions")), "is not a CSV mapping"),
])
def test_malformed_mappings_are_refused_with_the_key(tmp_path: Path, mapping: dict[str, Any],
                                                     message: str) -> None:
    with pytest.raises(MappingError) as err:
        import_csv(_write(tmp_path), mapping, tmp_path / "out.trace")
    assert "mapping 'wallbox-de'" in str(err.value)
    assert message in str(err.value)


@pytest.mark.parametrize(("text", "message"), [
    (CSV_TEXT.replace("0,35", "0,3x"), "log.csv line 3, column 'P [kW]': '0,3x' is not a number"),
    (CSV_TEXT.replace("0,35", "0.35"), "line 3, column 'P [kW]': '0.35' has a misplaced thousands separator"),
    (CSV_TEXT.replace("0,35", "1.2345,6"), "line 3, column 'P [kW]': '1.2345,6' has a misplaced thousands"),
    (CSV_TEXT.replace("10:00:03", "10:00:00").replace("10:00:01", "10:00:02"),
     "log.csv line 5, column 'Zeit': time '17/01/2024 10:00:00' is earlier than the row before"),
    (CSV_TEXT.replace("17/01/2024 10:00:01", "2024-01-17 10:00:01"),
     "line 3, column 'Zeit': time '2024-01-17 10:00:01' does not match the format '%d/%m/%Y %H:%M:%S'"),
    (CSV_TEXT.replace(";1.300", ""), "log.csv line 3: expected 8 fields like the header, found 7"),
    (CSV_TEXT.replace(";3;", ";4;"), "line 5, column 'Status': '4' is not in the mapping's values table"),
    (CSV_TEXT.replace(";0;16;1;", ";inf;16;1;"), "line 2, column 'P [kW]': 'inf' is not a finite number"),
    ("", "log.csv is empty: expected a header row"),
    (CSV_TEXT.splitlines()[0] + "\n", "log.csv has a header row but no data rows"),
    ("Zeit;I1;I1\n", "the header names column 'I1' twice"),
])
def test_bad_rows_are_reported_with_file_line_and_column(tmp_path: Path, text: str, message: str) -> None:
    out = tmp_path / "out.trace"
    out.write_bytes(b"an older trace")
    with pytest.raises(TraceImportError) as err:
        import_csv(_write(tmp_path, text), MAPPING, out)
    assert message in str(err.value)
    assert out.read_bytes() == b"an older trace"  # a failed import leaves the old output alone
    assert not (tmp_path / "out.trace.part").exists()


def test_a_log_that_is_not_utf8_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_bytes(CSV_TEXT[1:].replace("Angebot", "Angeb\u00f6t").encode("latin-1"))
    with pytest.raises(TraceImportError, match=r"log\.csv is not utf-8-sig text"):
        import_csv(path, MAPPING, tmp_path / "out.trace")
    latin = _with(lambda m: m["csv"].update(encoding="latin-1"))
    latin["channels"][4]["csv"] = "Angeb\u00f6t"
    assert import_csv(path, latin, tmp_path / "out.trace").rows == 3


def test_missing_source_file(tmp_path: Path) -> None:
    with pytest.raises(TraceImportError, match=r"cannot read .*nope\.csv"):
        import_csv(tmp_path / "nope.csv", MAPPING, tmp_path / "out.trace")


def test_mapping_files_load_as_toml_or_json(tmp_path: Path) -> None:
    toml = tmp_path / "mine.toml"
    toml.write_text('importer = "csv"\n[time]\ncolumn = "Zeit"\nformat = "%d/%m/%Y %H:%M:%S"\n'
                    '[csv]\ndelimiter = ";"\ndecimal = ","\nthousands = "."\n'
                    '[[channels]]\ncsv = "Angebot"\nchannel = "pilot.offered_a"\n')
    result = import_csv(_write(tmp_path), toml, tmp_path / "a.trace")
    assert result.channels == ["c1/pilot.offered_a"] and result.records == 3
    js = tmp_path / "mine.json"
    js.write_text(json.dumps(MAPPING))
    assert load_mapping(js)["name"] == "wallbox-de"
    assert import_csv(_write(tmp_path), str(js), tmp_path / "b.trace").records == 13
    bad = tmp_path / "bad.toml"
    bad.write_text("importer = csv\n")
    with pytest.raises(MappingError, match=r"mapping file .*bad\.toml is not valid TOML"):
        load_mapping(bad)
    with pytest.raises(MappingError, match=r"unknown mapping 'openevse'.*openevse-shaper"):
        load_mapping("openevse")
    with pytest.raises(MappingError, match="cannot read mapping file"):
        load_mapping(tmp_path / "absent.toml")
    assert {"openevse-shaper", "acn-sessions"} <= set(ready_mappings())


@pytest.fixture
def shaper_csv() -> Path:
    path = traces_dir() / "openevse-shaper" / "shaper_1s_part1.csv"
    if not path.is_file():
        pytest.skip("real recorded log not found at %s (set EVEDGE_TRACES)" % path)
    return path


def test_the_real_openevse_shaper_log_imports(shaper_csv: Path, tmp_path: Path) -> None:
    before = shaper_csv.stat()
    out = tmp_path / "shaper.trace"
    result = import_csv(shaper_csv, "openevse-shaper", out)
    assert (result.rows, result.records, result.skipped) == (3900, 5 * 3900, 0)
    assert result.start_utc_ms == 1_702_819_500_000  # 17/12/2023 13:25:00 (UTC, see the mapping)
    assert result.last_t_ms == 3_899_000  # 14:29:59
    s = summarise(out)
    assert s["start_utc"] == "2023-12-17T13:25:00.000Z" and s["end_utc"] == "2023-12-17T14:29:59.000Z"
    offered = s["channels"]["c1/pilot.offered_a"]
    assert (offered["records"], offered["min"], offered["max"]) == (3900, 6.0, 32.0)
    assert s["channels"]["c1/meter.current_a"]["max"] == 31.46
    assert s["channels"]["site.limit_w"]["min"] == 6400.0 and s["channels"]["site.limit_w"]["max"] == 8400.0
    assert s["meta"]["licence"] == "GPL-3.0"
    with TraceReader(out) as r:
        recs = list(r)
    first = {rec.channel: rec.value for rec in recs[:5]}
    assert first == {"c1/meter.current_a": [0.0, 0.0, 0.0], "c1/pilot.offered_a": 31.0,
                     "c1/meter.power_w": 0.0, "site.power_w": 1055.75, "site.limit_w": 8400.0}
    last = {rec.channel: rec.value for rec in recs[-5:]}
    assert last["c1/meter.current_a"] == [24.86, 0.0, 0.0] and last["c1/pilot.offered_a"] == 25.0
    assert all(rec.value[1:] == [0.0, 0.0] for rec in recs if rec.base == "meter.current_a")  # one phase
    assert shaper_csv.stat().st_mtime == before.st_mtime and shaper_csv.stat().st_size == before.st_size


def test_truncated_import_output_is_never_left_behind(tmp_path: Path) -> None:
    out = tmp_path / "out.trace"
    text = CSV_TEXT + "17/01/2024 10:00:04;x;0;0;0;16;1;1\n"
    with pytest.raises(TraceImportError, match="line 6"):
        import_csv(_write(tmp_path, text), MAPPING, out)
    assert not out.exists()
    with pytest.raises(TraceError, match="cannot open trace"):
        TraceReader(out)
