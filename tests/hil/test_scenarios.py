"""The generated scenario suite: deterministic traces, all passing on sim, the 24 h site fast."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from hil import scenarios
from hil.__main__ import main as hil_main
from hil.models.ev_profiles import traces_dir
from hil.replay.cli import run_suite
from hil.replay.engine import RunResult, replay
from hil.replay.report import summary_dict
from hil.replay.sim import SimTarget
from hil.trace import TraceReader, summarise

ACN = traces_dir() / scenarios.ACN_FILE
SHORT = [n for n in scenarios.BUILDERS if n != "site-24h-20col"]


def test_the_suite_is_generated_deterministically(tmp_path: Path) -> None:
    a = scenarios.write_scenarios(tmp_path / "a", SHORT)
    b = scenarios.write_scenarios(tmp_path / "b", SHORT)
    assert [p.name for p in a] == [n + ".trace" for n in SHORT]
    for pa, pb in zip(a, b, strict=True):
        assert pa.read_bytes() == pb.read_bytes()
        info = summarise(pa)
        meta = info["meta"]
        assert info["complete"] and meta["scenario"] == pa.stem and meta["description"]
        assert meta["duration_ms"] >= info["last_t_ms"] and meta["realtime_ok"] is True
    expect = summarise(tmp_path / "a" / "car-ignores-reduction.trace")["meta"]["expect"]
    assert expect == {"fail": ["limit.car/c1", "limit.site"], "errors": {"c1": ["OverCurrentFailure"]}}


def test_scenarios_command_writes_the_traces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert hil_main(["scenarios", "-o", str(tmp_path), "--only", "power-cut", "--only", "ev-faults"]) == 0
    assert capsys.readouterr().out.split() == [
        str(tmp_path / "power-cut.trace"),
        str(tmp_path / "ev-faults.trace"),
    ]
    assert hil_main(["scenarios", "-o", str(tmp_path), "--only", "no-such"]) == 2
    assert "unknown scenario no-such" in capsys.readouterr().err


def test_every_short_scenario_passes_on_sim(tmp_path: Path) -> None:
    out = io.StringIO()
    seen: list[RunResult] = []
    code = run_suite("sim", only=SHORT, out=out, on_result=seen.append, report=tmp_path / "rep", plots=False)
    assert code == 0, out.getvalue()
    assert [r.scenario for r in seen] == SHORT
    assert "suite PASS: %d passed, 0 failed" % len(SHORT) in out.getvalue()
    by = {r.scenario: {x.id: x for x in r.results} for r in seen}
    # What each scenario is about actually happened.
    assert by["gateway-loss"]["failsafe/c1"].figure["judged"] == 1
    assert by["broker-outage"]["limit.site"].figure["limit_sources"] == ["capacity", "dno", "dno-failsafe"]
    assert by["meter-failure"]["reported/c1"].passed
    assert by["power-cut"]["energy/c2"].figure["power_cuts"] == 1
    assert by["ev-faults"]["timing/c1"].figure["leave_cd_events"] >= 1
    assert by["ev-faults"]["timing/c3"].figure["fault_events"] == 1
    noise = next(r for r in seen if r.scenario == "bus-noise")
    assert noise.gateway["not_delivered"] > 0
    assert (tmp_path / "rep" / "junit.xml").is_file()


def test_a_failing_scenario_fails_the_suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> scenarios.Scenario:
        sc = scenarios.car_ignores_reduction()
        sc.expect = {}
        return sc

    monkeypatch.setitem(scenarios.BUILDERS, "car-ignores-reduction", broken)
    out = io.StringIO()
    assert run_suite("sim", only=["car-ignores-reduction"], out=out) == 1
    assert "FAIL" in out.getvalue() and "limit.car/c1" in out.getvalue()
    assert run_suite("teleporter", only=["dno-expiry"], out=out) == 2


@pytest.fixture(scope="module")
def day(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunResult]:
    trace = scenarios.write_scenarios(tmp_path_factory.mktemp("day"), ["site-24h-20col"])[0]
    return trace, replay(trace, SimTarget())


def test_twenty_columns_for_24_hours_pass_well_under_a_minute(day: tuple[Path, RunResult]) -> None:
    _trace, result = day
    assert result.ok, [r.message for r in result.results if not r.ok]
    assert result.duration_ms == 24 * 3600_000 and len(result.columns) == 20
    assert result.wall_s < 60
    summary = summary_dict(result)
    assert summary["realtime_factor"] >= 1000 and summary["step_us_per_column_step"] > 0
    site = {r.id: r for r in result.results}["limit.site"]
    assert {"capacity", "dno"} <= set(site.figure["limit_sources"])
    assert sum(c["cars"] for c in result.columns.values()) >= 20
    assert result.target_stats["sessions"] >= 20


def test_the_day_is_the_acn_day_or_says_it_is_synthetic(day: tuple[Path, RunResult], tmp_path: Path) -> None:
    trace, _result = day
    with TraceReader(trace) as reader:
        meta = reader.header["meta"]
        columns = reader.header["layout"]["columns"]
    assert len(columns) == 20 and meta["realtime_ok"] is False
    if ACN.is_file():
        assert meta["arrivals"].startswith("acn-sessions: acndata_sessions_0002_2021.json, 2021-09-10")
    else:
        assert meta["arrivals"].startswith("synthetic")
    # Without the shared traces, a seeded synthetic day of the same shape.
    sc = scenarios.site_24h(seed=3, traces=tmp_path / "absent")
    assert sc.meta["arrivals"].startswith("synthetic: seeded arrival process (seed 3")
    assert len(sc.layout["columns"]) == 20
    plugs = [r for r in sc.records if r[1].endswith("/ev.event") and r[2]["type"] == "plug"]
    assert len(plugs) >= 20 and all(0 <= t < 24 * 3600_000 for t, _c, _v in sc.records)
    again = scenarios.site_24h(seed=3, traces=tmp_path / "absent")
    assert again.records == sc.records
