"""Replay reports: summary.json, JUnit XML and PNG plots."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from hil import scenarios
from hil.__main__ import main as hil_main
from hil.replay.engine import RunResult, replay
from hil.replay.report import Series, write_report, write_suite_report
from hil.replay.sim import SimTarget

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RunResult]:
    folder = tmp_path_factory.mktemp("traces")
    expected = scenarios.write_trace(scenarios.car_ignores_reduction(), folder / "expected.trace")
    sc = scenarios.car_ignores_reduction()
    sc.expect = {}
    sc.name = "car-ignores-reduction-unexpected"
    failing = scenarios.write_trace(sc, folder / "failing.trace")
    return {"expected": replay(expected, SimTarget()), "failing": replay(failing, SimTarget())}


def _png_ok(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 15_000, (path, len(data))  # a drawn figure, not an empty canvas


def test_report_files_parse_and_plots_are_drawn(runs: dict[str, RunResult], tmp_path: Path) -> None:
    result = runs["expected"]
    files = write_report(result, tmp_path / "rep")
    names = sorted(p.name for p in files)
    assert names == ["column-c1.png", "column-c2.png", "junit.xml", "site.png", "summary.json"]
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert summary["ok"] is True and summary["scenario"] == "car-ignores-reduction"
    assert summary["target"] == "sim" and summary["virtual_s"] == 240.0
    assert summary["realtime_factor"] > 10 and summary["column_steps"] > 0
    oracles = {o["id"]: o for o in summary["oracles"]}
    assert oracles["limit.car/c1"]["passed"] is False and oracles["limit.car/c1"]["expected"] == "fail"
    assert oracles["limit.car/c1"]["ok"] is True and oracles["limit.car/c1"]["figure"]["overshoot_as"] > 50
    assert oracles["reported/c1"]["figure"]["seen"] == {"OverCurrentFailure": 1}
    assert summary["columns"]["c1"]["errors_reported"] == {"OverCurrentFailure": 1}
    root = ET.parse(tmp_path / "rep" / "junit.xml").getroot()
    assert root.tag == "testsuites"
    suite = root.find("testsuite")
    assert suite is not None and suite.get("name") == "hil.replay.car-ignores-reduction"
    cases = suite.findall("testcase")
    assert len(cases) == len(result.results) == int(suite.get("tests", "0"))
    assert suite.get("failures") == "0" and not suite.findall("testcase/failure")
    car = next(c for c in cases if c.get("name") == "limit.car/c1")
    assert (car.findtext("system-out") or "").startswith("expected failure observed")
    for png in ("site.png", "column-c1.png", "column-c2.png"):
        _png_ok(tmp_path / "rep" / png)


def test_junit_carries_failures_with_their_figure(runs: dict[str, RunResult], tmp_path: Path) -> None:
    write_report(runs["failing"], tmp_path, plots=False)
    assert not (tmp_path / "site.png").exists()
    suite = ET.parse(tmp_path / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    failures = {
        c.get("name"): c.find("failure") for c in suite.findall("testcase") if c.find("failure") is not None
    }
    assert set(failures) == {"limit.car/c1", "limit.site"} and suite.get("failures") == "2"
    fail = failures["limit.car/c1"]
    assert fail is not None and "violation" in fail.get("message", "")
    assert json.loads(fail.text or "{}")["violations"] == 1


def test_suite_report_has_a_testsuite_per_run_and_the_skipped(
    runs: dict[str, RunResult], tmp_path: Path
) -> None:
    write_suite_report(
        list(runs.values()), tmp_path, skipped=[("site-24h-20col", "too long for real time")], plots=False
    )
    root = ET.parse(tmp_path / "junit.xml").getroot()
    names = [s.get("name") for s in root.findall("testsuite")]
    assert names == [
        "hil.replay.car-ignores-reduction",
        "hil.replay.car-ignores-reduction-unexpected",
        "hil.replay.site-24h-20col",
    ]
    assert root.findall("testsuite/testcase/skipped")[0].get("message") == "too long for real time"
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["ok"] is False and [r["ok"] for r in doc["runs"]] == [True, False]
    assert json.loads((tmp_path / "car-ignores-reduction" / "summary.json").read_text())["ok"] is True


def test_cli_report_option_writes_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = scenarios.write_trace(scenarios.dno_expiry(), tmp_path / "exp.trace")
    assert hil_main(["replay", str(trace), "--no-progress", "--report", str(tmp_path / "out")]) == 0
    assert "report    %s (5 files)" % (tmp_path / "out") in capsys.readouterr().out
    _png_ok(tmp_path / "out" / "site.png")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["ok"] is True


def test_series_keep_changes_only_and_thin_keeping_extremes() -> None:
    s = Series(eps=0.01)
    for t in range(100):
        s.add(t, 5.0)
    s.add(100, None)
    s.add(101, None)
    assert len(s) == 2 and math.isnan(s.v[1])
    s.close(200)
    assert list(s.t) == [0, 100, 200]
    big = Series(eps=0.0)
    for t in range(100_000):
        big.add(t, (t % 1000) / 10.0 + (500.0 if t == 54_321 else 0.0))
    ts, vs = big.points(4000)
    assert len(ts) <= 4100 and max(vs) == pytest.approx(532.1) and min(vs) == 0.0
    assert ts == sorted(ts)
