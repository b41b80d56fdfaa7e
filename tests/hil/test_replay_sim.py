"""The `sim` target and the replay engine: the firmware core in virtual time, the real log, the CLI."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest

from hil import scenarios
from hil.__main__ import main as hil_main
from hil.models.ev_profiles import traces_dir
from hil.replay.engine import EngineOptions, Progress, ReplayError, replay
from hil.replay.sim import SimTarget, meter_register_wh
from hil.replay.target import ColumnInputs, TargetError
from hil.trace import TraceWriter, declare, make_header

REAL_LOG = traces_dir() / "openevse-shaper" / "shaper_1s_part1.csv"
CFG: dict[str, Any] = {
    "column_id": "c1",
    "bus_address": 1,
    "phases": 3,
    "hardware_rating_a": 32,
    "installation_rating_a": 32,
    "failsafe_a": 6,
    "meter": {"type": "sdm630"},
    "link": {"mode": "modbus-rtu", "baud": 115200},
}


def _inputs(cp_mv: int = 6000, amps: float = 0.0, wh: float = 0.0, meter_ok: bool = True) -> ColumnInputs:
    return ColumnInputs(cp_mv, True, 220, (amps, amps, amps), (230.0, 230.0, 230.0), wh, False, meter_ok)


def _step(t: SimTarget, now: int, inputs: ColumnInputs) -> None:
    t.set_inputs("c1", now, inputs)
    t.advance(now)


# ---- the sim target ------------------------------------------------------------------------------


def test_sim_rejects_an_invalid_firmware_config_naming_the_key() -> None:
    with pytest.raises(TargetError, match=r"column c1: invalid firmware config: .*hardware_rating_a"):
        SimTarget().start({"c1": dict(CFG, hardware_rating_a=500)})


def test_sim_offers_the_assignment_and_drops_it_while_silent() -> None:
    t = SimTarget()
    t.start({"c1": CFG})
    assert t.assign_limit("c1", 0, 16.0, 60, 8.0) is True
    for now in range(0, 200, 10):  # a car in C: debounce, PWM, diode, contactor
        _step(t, now, _inputs())
    out = t.outputs("c1")
    assert out.offered_a == 16.0 and out.contactor and out.status == "Charging"
    assert out.limit_source == "gateway" and not out.failsafe_active
    t.gateway_silent("c1", 200, True)
    assert t.assign_limit("c1", 200, 10.0, 60, 8.0) is False  # not delivered
    _step(t, 1000, _inputs(amps=15.5))
    assert t.outputs("c1").offered_a == 16.0
    _step(t, 60_000, _inputs(amps=15.5))  # heartbeat timeout (60 s)
    out = t.outputs("c1")
    assert out.failsafe_active and out.offered_a == 8.0 and out.limit_source == "failsafe"


def test_sim_power_cut_keeps_the_register_on_flash_and_closes_the_session() -> None:
    t = SimTarget()
    t.start({"c1": CFG})
    t.assign_limit("c1", 0, 16.0, 600, 8.0)
    wh = 0.0
    for now in range(0, 120_000, 100):
        wh += 16.0 * 3 * 230.0 * 0.1 / 3600.0
        _step(t, now, _inputs(amps=16.0 if now > 500 else 0.0, wh=wh))
    before = t.outputs("c1").energy_wh
    assert before == pytest.approx(wh, abs=1.5)
    t.power_cut("c1", 120_000, 5000)
    out = t.outputs("c1")
    assert out.status == "Unavailable" and not out.contactor and out.offered_a == 0.0
    assert t.assign_limit("c1", 121_000, 16.0, 60) is False
    _step(t, 122_000, _inputs(cp_mv=9000, wh=wh))  # still off: nothing runs
    _step(t, 125_000, _inputs(cp_mv=9000, wh=wh))  # boots
    col = t.columns["c1"]
    assert col.boots == 2
    after = t.outputs("c1").energy_wh
    assert before - 10 <= after <= before  # at most one 10 Wh quantum lost
    assert not col.store.session_active  # the cut session was closed
    _step(t, 125_100, _inputs(cp_mv=9000, wh=wh))
    assert col.store.session_active and col.sessions == 2  # a new one started


def test_meter_register_reads_like_the_sdm_float32_kwh() -> None:
    assert meter_register_wh(1234.4) == 1234
    assert meter_register_wh(1234.6) == 1235
    assert meter_register_wh(100_000_004.0) == 100_000_008  # float32 kWh: 7.8 Wh steps at 100 MWh


# ---- the engine on small traces ----------------------------------------------------------------


def _one_car(tmp_path: Path, limit_a: float = 10.0) -> Path:
    sc = scenarios.Scenario(
        "one-car",
        "one car under a 10 A DNO limit",
        180_000,
        scenarios._layout(scenarios._site(32.0), scenarios._columns(1)),
    )
    sc.add(1, "c1/ev.event", scenarios._plug()).add(60, "dno.limit", scenarios._dno(limit_a, 600, "d"))
    return scenarios.write_trace(sc, tmp_path / "one.trace")


def test_one_car_follows_the_allocation_and_the_energy_adds_up(tmp_path: Path) -> None:
    result = replay(_one_car(tmp_path), SimTarget())
    assert result.ok, [r.message for r in result.results if not r.ok]
    col = result.columns["c1"]
    assert col["final_status"] == "Charging" and col["cars"] == 1
    # Offered 32 A (the column's rating: the gateway does not know the car), the car draws its
    # own 16 A for ~55 s, then 10 A less its 0.33 A offset, on three phases.
    assert 300 < col["modelled_wh"] < 700
    assert abs(col["register_wh"] - col["modelled_wh"]) <= 1.5
    site = {r.id: r for r in result.results}["limit.site"]
    assert site.figure["lowest_limit_a"] == 10.0 and site.figure["max_measured_a"] == 16.0
    assert result.gateway["dno_accepted"] == 1 and result.target_stats["sessions"] == 1
    assert result.realtime_factor > 50


def test_replays_are_deterministic(tmp_path: Path) -> None:
    trace = scenarios.write_trace(scenarios.bus_noise(), tmp_path / "noise.trace")
    a, b = replay(trace, SimTarget()), replay(trace, SimTarget())
    assert [r.as_dict() for r in a.results] == [r.as_dict() for r in b.results]
    assert a.column_steps == b.column_steps and a.gateway["not_delivered"] == b.gateway["not_delivered"] > 0


def test_speed_paces_a_virtual_target(tmp_path: Path) -> None:
    sc = scenarios.Scenario(
        "short", "2 s", 2000, scenarios._layout(scenarios._site(32.0), scenarios._columns(1))
    )
    sc.add(0, "c1/ev.event", scenarios._plug())
    trace = scenarios.write_trace(sc, tmp_path / "short.trace")
    started = time.perf_counter()
    replay(trace, SimTarget(), EngineOptions(speed=4.0))
    assert time.perf_counter() - started >= 0.45


def test_progress_bar_draws_on_its_stream() -> None:
    stream = io.StringIO()
    bar = Progress("x.trace", stream, after_s=0.0)
    bar.update(0.5, 3_600_000, 1.0)
    bar.done()
    assert "x.trace [###############" in stream.getvalue() and " 50%" in stream.getvalue()
    assert "1:00:00 virtual" in stream.getvalue() and stream.getvalue().endswith("\n")


def test_a_bad_event_is_a_replay_error_naming_the_column_and_time(tmp_path: Path) -> None:
    sc = scenarios.Scenario(
        "bad", "", 10_000, scenarios._layout(scenarios._site(32.0), scenarios._columns(1))
    )
    sc.add(2.5, "c1/ev.event", {"type": "misbehave", "what": "teleport"})
    trace = scenarios.write_trace(sc, tmp_path / "bad.trace")
    with pytest.raises(ReplayError, match=r"column c1 at 2.500 s: unknown misbehaviour 'teleport'"):
        replay(trace, SimTarget())


# ---- the real log --------------------------------------------------------------------------------


def test_the_real_openevse_log_imports_and_replays_on_sim(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not REAL_LOG.is_file():
        pytest.skip("real log not found at %s (set EVEDGE_TRACES)" % REAL_LOG)
    trace = tmp_path / "shaper.trace"
    assert hil_main(["import", str(REAL_LOG), "--mapping", "openevse-shaper", "-o", str(trace)]) == 0
    result = replay(trace, SimTarget())
    assert result.ok, [r.message for r in result.results if not r.ok]
    assert result.duration_ms == 3_899_000
    assert result.recorded["samples"] == 3900
    c1 = result.columns["c1"]
    assert c1["phases"] == 1 and c1["cars"] == 1  # a car plugged from the start
    assert 3000 < c1["modelled_wh"] < 8000
    assert any("recorded pilot.offered_a" in n for n in result.notes)
    # The recorded offer drives the column: the firmware's offer never exceeded it.
    offer = {r.id: r for r in result.results}["limit.offer/c1"]
    assert offer.passed and offer.figure["lowest_limit_a"] >= 6.0
    assert hil_main(["replay", str(trace), "--no-progress"]) == 0
    assert "limit.car/c1" in capsys.readouterr().out


# ---- the command line ----------------------------------------------------------------------------


def test_cli_exit_codes_pass_fail(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = _one_car(tmp_path)
    assert hil_main(["replay", str(good), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "result    PASS" in out and "real time" in out and "limit.site" in out
    sc = scenarios.car_ignores_reduction()
    sc.expect = {}  # the misbehaving car now fails the run
    bad = scenarios.write_trace(sc, tmp_path / "bad.trace")
    assert hil_main(["replay", str(bad), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "result    FAIL" in out and "limit.car/c1    FAIL" in out


def _custom_channel_trace(path: Path) -> None:
    name, decl = declare("ev.event", "c1")
    header = make_header(
        "test",
        0,
        {name: decl, "c1/wind.speed": {"unit": "m/s", "kind": "float", "column": "c1", "description": "?"}},
    )
    with TraceWriter(path, header, strict=False) as w:
        w.write(0, "c1/wind.speed", 3.0)


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "truncated",
        "unknown-channel",
        "bad-layout",
        "bad-event",
        "unknown-target",
        "serial-without-port",
    ],
)
def test_cli_user_mistakes_are_one_line_and_exit_2(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = tmp_path / "t.trace"
    args = ["replay", str(trace), "--no-progress"]
    expect = ""
    if case == "missing":
        expect = "trace not found"
    elif case == "truncated":
        data = _one_car(tmp_path).read_bytes()
        trace.write_bytes(data[: len(data) - 40])
        expect = "byte offset"
    elif case == "unknown-channel":
        _custom_channel_trace(trace)
        expect = "unknown channel 'wind.speed'"
    elif case == "bad-layout":
        sc = scenarios.Scenario(
            "x", "", 1000, scenarios._layout(scenarios._site(32.0), scenarios._columns(1, phases=2))
        )
        sc.add(0, "c1/ev.event", scenarios._plug())
        scenarios.write_trace(sc, trace)
        expect = "layout.columns[0].phases"
    elif case == "bad-event":
        sc = scenarios.Scenario(
            "x", "", 1000, scenarios._layout(scenarios._site(32.0), scenarios._columns(1))
        )
        sc.add(0, "c1/ev.event", scenarios._plug(profile="no such car at all"))
        scenarios.write_trace(sc, trace)
        # Named as "no vehicle profile matches" with the vehicle list in ../shared/traces,
        # as "unknown profile" without it: either way the column, the time and the name.
        expect = "column c1 at 0.000 s: "
    elif case == "unknown-target":
        scenarios.write_trace(scenarios.dno_expiry(), trace)
        args += ["--target", "teleporter"]
        expect = "unknown target 'teleporter'"
    else:
        scenarios.write_trace(scenarios.dno_expiry(), trace)
        args += ["--target", "serial"]
        expect = "unknown target 'serial'"
    assert hil_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expect in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    if case == "bad-event":
        assert "'no such car at all'" in err and "profile" in err, err


class _SilentBoard:
    """A realtime target whose columns never boot."""

    realtime = True

    def __init__(self, port: str | None = None, *, speed: float | None = None) -> None:
        self.closed = False

    def start(self, columns: dict[str, dict[str, object]]) -> None:
        raise TargetError("column c1 did not answer within 20 s on /dev/ttyUSB9")

    def close(self) -> None:
        self.closed = True


def test_a_target_that_does_not_answer_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys
    import types

    from hil.replay import cli

    fake = types.ModuleType("fake_board_target")
    fake.SerialTarget = _SilentBoard  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_board_target", fake)
    monkeypatch.setitem(cli._REALTIME, "serial", ("fake_board_target", "SerialTarget"))
    monkeypatch.setitem(cli._REALTIME, "mpy", ("no_such_target_module", "MpyTarget"))
    trace = scenarios.write_trace(scenarios.dno_expiry(), tmp_path / "t.trace")
    assert hil_main(["replay", str(trace), "--target", "serial:/dev/ttyUSB9", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == "error: target serial:/dev/ttyUSB9: column c1 did not answer within 20 s on /dev/ttyUSB9\n"
    assert hil_main(["replay", str(trace), "--target", "mpy", "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        "error: target 'mpy' is not available: no_such_target_module.py is not there yet\n"
    )
