"""`import` and `info` on the command line: results printed, user mistakes as one error line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hil import cli_trace
from hil.trace import TraceWriter, declare, make_header

REPO = Path(__file__).resolve().parents[2]

CSV_TEXT = ("\ufeffTime;Amps;Offered\n"
            "01/02/2024 12:00:00;0,5;16\n"
            "01/02/2024 12:00:01;10,25;16\n"
            "01/02/2024 12:00:02;15,5;10\n")
MAPPING_TOML = """\
importer = "csv"
[csv]
delimiter = ";"
decimal = ","
[time]
column = "Time"
format = "%d/%m/%Y %H:%M:%S"
timezone = "Europe/London"
[[channels]]
csv = "Amps"
channel = "meter.current_a"
phase = 1
[[channels]]
csv = "Offered"
channel = "pilot.offered_a"
"""


def traces_dir() -> Path:
    env = os.environ.get("EVEDGE_TRACES")
    return Path(env) if env else REPO.parent / "shared" / "traces"


@pytest.fixture
def log(tmp_path: Path) -> tuple[Path, Path]:
    csv_path = tmp_path / "log.csv"
    csv_path.write_bytes(CSV_TEXT.encode())
    mapping = tmp_path / "mine.toml"
    mapping.write_text(MAPPING_TOML)
    return csv_path, mapping


def _run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = cli_trace.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_import_then_info(capsys: pytest.CaptureFixture[str], log: tuple[Path, Path], tmp_path: Path) -> None:
    out_trace = tmp_path / "log.trace"
    code, out, err = _run(capsys, "import", log[0], "--mapping", log[1], "-o", out_trace)
    assert (code, err) == (0, "")
    assert out.strip() == ("wrote %s: 6 records on 2 channels from 3 rows (0 empty cells skipped), "
                           "2024-02-01T12:00:00.000Z + 0:00:02" % out_trace)
    code, out, err = _run(capsys, "info", out_trace)
    assert (code, err) == (0, "")
    assert "evedge-trace v1, complete" in out
    assert "time      2024-02-01T12:00:00.000Z .. 2024-02-01T12:00:02.000Z (0:00:02)" in out
    assert "records   6 on 2 channels, 1 column (c1)" in out
    row = next(line for line in out.splitlines() if line.startswith("c1/pilot.offered_a"))
    assert row.split() == ["c1/pilot.offered_a", "A", "float", "3", "0:00:00", "0:00:02", "10", "16"]
    code, out, _ = _run(capsys, "info", "--json", out_trace)
    summary = json.loads(out)
    assert code == 0 and summary["records"] == 6
    assert summary["channels"]["c1/meter.current_a"]["max"] == 15.5


def test_import_errors_are_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], log: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    csv_path, mapping = log
    out = tmp_path / "x.trace"
    cases = [
        ((tmp_path / "nope.csv", "--mapping", mapping, "-o", out), "error: source file not found: "),
        ((csv_path, "--mapping", "nope", "-o", out), "error: unknown mapping 'nope': ready mappings are"),
        ((csv_path, "--mapping", "openevse-shaper", "-o", out),
         "error: mapping 'openevse-shaper' needs CSV column 'TimeStamp', which log.csv does not have"),
        ((csv_path, "--mapping", mapping, "-o", out, "--from", "2024-01-01"),
         "error: --from only apply to session lists"),
        ((csv_path, "--mapping", "acn-sessions", "-o", out, "--column", "c1"),
         "error: --column applies to CSV"),
        ((csv_path, "--mapping", mapping, "-o", tmp_path / "no" / "dir" / "x.trace"), "error: cannot write"),
        ((csv_path, "--mapping", mapping, "-o", out, "--timezone", "Nowhere/City"),
         "error: unknown timezone 'Nowhere/City'"),
        ((csv_path, "--mapping", "acn-sessions", "-o", out), "error: log.csv is not valid JSON"),
    ]
    for argv, expected in cases:
        code, stdout, err = _run(capsys, "import", *argv)
        assert code == 2, argv
        assert stdout == ""
        assert _one_error_line(err).startswith(expected), (argv, err)
        assert not out.exists()
    bad_mapping = tmp_path / "bad.toml"
    bad_mapping.write_text(MAPPING_TOML.replace('channel = "pilot.offered_a"', 'chanel = "pilot.offered_a"'))
    code, _, err = _run(capsys, "import", csv_path, "--mapping", bad_mapping, "-o", out)
    assert code == 2
    assert _one_error_line(err) == "error: mapping 'bad': channels[1].channel: missing (required)"


def test_mapping_typo_names_the_key(capsys: pytest.CaptureFixture[str], log: tuple[Path, Path],
                                   tmp_path: Path) -> None:
    bad_mapping = tmp_path / "bad.toml"
    bad_mapping.write_text(MAPPING_TOML.replace('phase = 1', 'phase = 1\nsacle = 2'))
    code, _, err = _run(capsys, "import", log[0], "--mapping", bad_mapping, "-o", tmp_path / "x.trace")
    assert code == 2
    assert _one_error_line(err) == "error: mapping 'bad': channels[0]: unknown key 'sacle'"


def _small_trace(path: Path) -> bytes:
    with TraceWriter(path, make_header("t", 0, dict([declare("ev.state", "c1")]))) as w:
        for t, state in ((0, "A"), (1000, "B"), (2000, "C")):
            w.write(t, "c1/ev.state", state)
    return path.read_bytes()


def test_info_errors_name_the_place(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    data = _small_trace(tmp_path / "good.trace")
    cut = tmp_path / "cut.trace"
    cut.write_bytes(data[:-20])
    code, out, err = _run(capsys, "info", cut)
    assert code == 2 and out == ""
    assert "at byte offset" in _one_error_line(err) and str(cut) in err
    cut_between = tmp_path / "cut-between.trace"
    writer = TraceWriter(cut_between, make_header("t", 0, dict([declare("ev.state", "c1")])))
    writer.write(0, "c1/ev.state", "A")
    writer.write(1000, "c1/ev.state", "B")
    writer.abort()  # as if the recorder had been killed: no end marker
    code, _, err = _run(capsys, "info", cut_between)
    assert code == 2 and "the file ends there without the end marker" in _one_error_line(err)
    code, out, err = _run(capsys, "info", "--partial", cut_between)
    assert (code, err) == (0, "")
    assert "INCOMPLETE (no end marker)" in out and "records   2 on 1 channels" in out
    code, _, err = _run(capsys, "info", tmp_path / "missing.trace")
    assert code == 2 and _one_error_line(err).startswith("error: cannot open trace")
    not_trace = tmp_path / "notes.txt"
    not_trace.write_text("hello")
    code, _, err = _run(capsys, "info", not_trace)
    assert code == 2 and "header at byte offset 0" in _one_error_line(err)


def test_info_strict_and_lenient(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    header = make_header("t", 0, {"c1/lab.temp_c": {"unit": "degC", "kind": "float", "column": "c1",
                                                     "description": "lab temperature"}})
    path = tmp_path / "custom.trace"
    with TraceWriter(path, header, strict=False) as w:
        w.write(0, "c1/lab.temp_c", 21.0)
    code, _, err = _run(capsys, "info", path)
    assert code == 2 and "unknown channel 'lab.temp_c'" in _one_error_line(err)
    code, out, _ = _run(capsys, "info", "--lenient", path)
    assert code == 0 and "c1/lab.temp_c" in out


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], log: tuple[Path, Path]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_trace.main(["import", str(log[0]), "-o", "x.trace"])  # no --mapping
    assert exc.value.code == 2
    assert "--mapping" in capsys.readouterr().err


def _module(*argv: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "hil.cli_trace", *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_as_a_module_a_corrupt_trace_is_exit_2_without_traceback(tmp_path: Path) -> None:
    data = bytearray(_small_trace(tmp_path / "t.trace"))
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "t.trace").write_bytes(bytes(data))
    proc = _module("info", str(tmp_path / "t.trace"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert "byte offset" in _one_error_line(proc.stderr)


def test_the_real_charger_log_through_the_cli(tmp_path: Path) -> None:
    source = traces_dir() / "openevse-shaper" / "shaper_1s_part1.csv"
    if not source.is_file():
        pytest.skip("real recorded log not found at %s (set EVEDGE_TRACES)" % source)
    out = tmp_path / "shaper.trace"
    proc = _module("import", str(source), "--mapping", "openevse-shaper", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "19500 records on 5 channels from 3900 rows" in proc.stdout
    proc = _module("info", "--json", str(out))
    summary = json.loads(proc.stdout)
    assert summary["channels"]["c1/pilot.offered_a"]["min"] == 6.0
    assert summary["channels"]["c1/pilot.offered_a"]["max"] == 32.0
    assert summary["duration_ms"] == 3_899_000
    assert summary["start_utc"] == "2023-12-17T13:25:00.000Z"


def test_real_sessions_through_the_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    source = traces_dir() / "acn-sessions" / "acndata_sessions_0002_2021.json"
    if not source.is_file():
        pytest.skip("real session list not found at %s (set EVEDGE_TRACES)" % source)
    out = tmp_path / "day.trace"
    code, stdout, err = _run(capsys, "import", source, "--mapping", "acn-sessions", "--from", "2021-09-10",
                             "--to", "2021-09-11", "--max-columns", "20", "--compress-idle", "900", "-o", out)
    assert (code, err) == (0, "")
    # that day 41 cars came to 21 stations; the 20 busiest stations saw 40 of them
    assert "on 20 channels from 40 sessions (2074 sessions left out)" in stdout
    code, stdout, _ = _run(capsys, "info", out)
    assert code == 0 and "20 columns" in stdout and "type: plug" in stdout
