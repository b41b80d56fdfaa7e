"""Oracles: each one passes a good run and catches a deliberately broken one."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from hil import scenarios
from hil.replay.engine import RunResult, replay
from hil.replay.oracles import (
    ColumnInfo,
    ColumnOracles,
    Expectations,
    LimitWatch,
    OracleConfig,
    OracleResult,
    check_telemetry,
)
from hil.replay.sim import SimTarget
from hil.replay.target import ColumnOutputs


def _by_id(result: RunResult) -> dict[str, OracleResult]:
    return {r.id: r for r in result.results}


def _trace(tmp_path: Path, sc: scenarios.Scenario, *, keep_expect: bool = False) -> Path:
    if not keep_expect:
        sc.expect = {}
    return scenarios.write_trace(sc, tmp_path / (sc.name + ".trace"))


def _out(**kw: Any) -> ColumnOutputs:
    base: dict[str, Any] = {
        "duty": 10000,
        "offered_a": 0.0,
        "contactor": False,
        "status": "Available",
        "cp_state": "A",
        "limit_source": "failsafe",
        "failsafe_active": True,
        "energy_wh": 0,
        "error": "NoError",
    }
    base.update(kw)
    return ColumnOutputs(**base)


# ---- LimitWatch: the response time, the overshoot integral ----------------------------------


def test_limit_watch_allows_the_response_time_then_flags_and_integrates_the_overshoot() -> None:
    w = LimitWatch(response_ms=10_000, tolerance=0.1)
    w.set_limit(0, 16.0)
    for t in range(0, 10_001, 1000):
        w.observe(t, 16.0)
    w.set_limit(10_000, 8.0)  # a reduction at 10 s: 16 A stays allowed before 20 s
    for t in range(11_000, 20_000, 1000):
        w.observe(t, 16.0)
    assert w.passed and w.violations == 0
    w.observe(20_000, 16.0)  # 10 s after the reduction: the new limit rules
    w.observe(21_000, 8.0)
    assert not w.passed and w.violations == 1
    assert w.first_violation_ms == 20_000
    assert w.worst_excess == pytest.approx(8.0)
    # 16 A held over [10 s, 21 s) against 8 A: 11 s x 8 A above the limit in force.
    assert w.overshoot_as == pytest.approx(88.0)
    assert w.violation_ms == 1000
    fig = w.figure()
    assert fig["violations"] == 1 and fig["overshoot_as"] == pytest.approx(88.0)


def test_limit_watch_an_increase_applies_at_once_and_a_tolerance_is_kept() -> None:
    w = LimitWatch(response_ms=10_000, tolerance=0.1)
    w.set_limit(0, 6.0)
    w.observe(20_000, 6.05)  # within the tolerance
    w.set_limit(20_000, 16.0)
    w.observe(20_000, 16.0)
    w.observe(25_000, 16.0)
    assert w.passed
    w.observe(26_000, 16.2)  # above limit + tolerance, no recent higher limit
    assert not w.passed


def test_limit_watch_with_a_short_response_catches_a_slow_offer() -> None:
    w = LimitWatch(response_ms=100, tolerance=0.05)
    w.set_limit(0, 16.0)
    w.observe(0, 16.0)
    w.set_limit(1000, 8.0)
    w.observe(1000, 16.0)  # the same instant: allowed (the response time runs)
    w.observe(1100, 16.0)  # one step later: still 16 A offered -> caught
    assert not w.passed


# ---- column oracles on synthetic samples -------------------------------------------------------


def _col(hb_ms: int = 60_000) -> ColumnOracles:
    return ColumnOracles(ColumnInfo("c1", 32.0, 6.0, hb_ms, 10.0), OracleConfig())


def test_timing_oracle_flags_a_contactor_that_opens_late_and_passes_a_prompt_one() -> None:
    ok, late = _col(), _col()
    for col, open_after in ((ok, 40), (late, 250)):
        col.sample(
            0,
            "C",
            16.0,
            _out(contactor=True, offered_a=16.0, status="Charging", cp_state="C"),
            powered=True,
            modelled_wh=0.0,
        )
        for t in range(10, 400, 10):  # the car leaves C at 10 ms
            closed = t < 10 + open_after
            col.sample(
                t,
                "B",
                0.0,
                _out(contactor=closed, offered_a=16.0, status="Preparing"),
                powered=True,
                modelled_wh=0.0,
            )
    good = {r.id: r for r in ok.results(400)}["timing/c1"]
    bad = {r.id: r for r in late.results(400)}["timing/c1"]
    assert good.passed and good.figure["leave_cd_max_ms"] == 40
    assert not bad.passed and bad.figure["leave_cd_max_ms"] == 250
    assert "leave_cd 250 ms > 100 ms" in bad.message


def test_timing_oracle_fault_and_pwm_off_limits() -> None:
    col = _col()
    col.sample(
        0,
        "C",
        16.0,
        _out(contactor=True, offered_a=16.0, status="Charging", cp_state="C"),
        powered=True,
        modelled_wh=0.0,
    )
    for t in range(100, 3400, 100):  # faulted but the contactor stays closed 3.3 s
        col.sample(
            t,
            "C",
            16.0,
            _out(contactor=True, offered_a=0.0, status="Faulted", error="GroundFailure"),
            powered=True,
            modelled_wh=0.0,
        )
    col.sample(
        3400,
        "C",
        0.0,
        _out(contactor=False, status="Faulted", error="GroundFailure"),
        powered=True,
        modelled_wh=0.0,
    )
    r = {x.id: x for x in col.results(3400)}["timing/c1"]
    assert not r.passed and r.figure["fault_max_ms"] == 3300


def test_failsafe_oracle_judges_each_silence_against_heartbeat_plus_margin() -> None:
    def run(reached_at_ms: int | None, silence_ms: int) -> OracleResult:
        col = _col(hb_ms=60_000)
        col.assignment(0, 16.0, 60, 8.0)
        col.silent(1000, True)
        for t in range(1000, silence_ms + 1000, 500):
            fs = reached_at_ms is not None and t >= reached_at_ms
            col.sample(
                t,
                "C",
                8.0,
                _out(
                    contactor=True,
                    offered_a=8.0 if fs else 16.0,
                    failsafe_active=fs,
                    status="Charging",
                    cp_state="C",
                ),
                powered=True,
                modelled_wh=0.0,
            )
        col.silent(silence_ms + 1000, False)
        return {x.id: x for x in col.results(silence_ms + 1000)}["failsafe/c1"]

    good = run(61_000, 120_000)  # 60 s after the silence began
    assert good.passed and good.figure["worst_s"] == pytest.approx(60.0)
    late = run(63_500, 120_000)  # 62.5 s: beyond 60 s + 1 s
    assert not late.passed and late.figure["failed"] == 1
    never = run(None, 120_000)
    assert not never.passed
    short = run(None, 30_000)  # the silence ended before the timeout: not judged
    assert short.passed and short.figure["judged"] == 0


def test_energy_oracle_tolerance_is_half_a_percent_plus_resolution_and_a_quantum_per_cut() -> None:
    def run(register_wh: int, modelled_wh: float, cuts: int = 0) -> OracleResult:
        col = _col()
        col.sample(0, "A", 0.0, _out(energy_wh=0), powered=True, modelled_wh=0.0)
        for i in range(cuts):
            col.power_cut(1000 + i)
        col.sample(10_000, "A", 0.0, _out(energy_wh=register_wh), powered=True, modelled_wh=modelled_wh)
        return {x.id: x for x in col.results(10_000)}["energy/c1"]

    assert run(10_050, 10_000.0).passed  # 0.5 % = 50 Wh, + 1 Wh resolution
    assert not run(10_052, 10_000.0).passed
    assert not run(9_900, 10_000.0).passed
    assert run(9_940, 10_000.0, cuts=1).passed  # one 10 Wh quantum lost at a cut
    r = run(10_200, 10_000.0)
    assert r.figure["error_wh"] == pytest.approx(200.0) and r.figure["error_pct"] == pytest.approx(2.0)


def test_telemetry_oracle_fails_on_lost_or_conflicting_seqs_and_counts_redeliveries() -> None:
    good = check_telemetry({"gw/site1": [1, 2, 3, 4], "gw/site2": [7, 8]})
    assert good.passed and good.figure["received"] == 6
    lost = check_telemetry({"gw/site1": [1, 2, 4, 5]})
    assert not lost.passed and lost.figure["lost"] == 1
    # At least once (docs/mqtt-api.md): a redelivery is dropped by seq and counted...
    dup = check_telemetry({"gw/site1": [1, 2, 2, 3]})
    assert dup.passed and dup.figure["duplicates"] == 1
    assert dup.figure["bad_publishers"]["gw/site1"]["duplicates"] == 1
    # ...but one seq with two different payloads is a failure, and so is a redelivered gap.
    conflict = check_telemetry({"gw/site1": [1, 2, 2, 3]}, conflicting={"gw/site1": 1})
    assert not conflict.passed and conflict.figure["conflicting"] == 1
    assert not check_telemetry({"gw/site1": [1, 3, 3]}).passed
    assert not check_telemetry({"p": [2, 3]}, first=1).passed  # the first one never came


def test_expectations_turn_an_expected_failure_into_ok_and_catch_a_missing_one() -> None:
    failing = OracleResult("limit.car/c1", "t", False, {}, "m", "c1")
    passing = OracleResult("limit.site", "t", True, {}, "m")
    exp = Expectations.from_meta(
        {
            "expect": {
                "fail": ["limit.car/*", "limit.site", "nothing/*"],
                "errors": {"c1": "OverCurrentFailure"},
            }
        }
    )
    out = {r.id: r for r in exp.apply([failing, passing], {"c1": {"OverCurrentFailure": 1}})}
    assert out["limit.car/c1"].ok and out["limit.car/c1"].expected == "fail"
    assert not out["limit.site"].ok  # expected to fail, but passed
    assert not out["expect/nothing/*"].ok  # a pattern that matches no check
    assert out["reported/c1"].ok
    missing = {r.id: r for r in exp.apply([], {})}
    assert not missing["reported/c1"].ok
    with pytest.raises(ValueError, match=r"expect\.fail"):
        Expectations.from_meta({"expect": {"fail": "limit.site"}})


# ---- broken runs through the whole engine ------------------------------------------------------


class IgnoresLimits(SimTarget):
    """A column firmware that takes any assignment as 'as much as you like'."""

    def assign_limit(
        self, column_id: str, now_ms: int, limit_a: float, validity_s: int, failsafe_a: float | None = None
    ) -> bool:
        return super().assign_limit(column_id, now_ms, 80.0, validity_s, failsafe_a)


class KeepsLastLimit(SimTarget):
    """A firmware that holds on to its last assignment when the gateway goes silent
    (as if it refreshed it itself): it never falls to its failsafe."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, tuple[float, int]] = {}

    def assign_limit(
        self, column_id: str, now_ms: int, limit_a: float, validity_s: int, failsafe_a: float | None = None
    ) -> bool:
        ok = super().assign_limit(column_id, now_ms, limit_a, validity_s, failsafe_a)
        if ok:
            self._last[column_id] = (limit_a, validity_s)
        return ok

    def advance(self, to_ms: int) -> None:
        for cid, col in self.columns.items():
            if col.silent and cid in self._last and col.ctl is not None:
                limit_a, validity_s = self._last[cid]
                col.ctl.assign_limit(int(limit_a * 10), validity_s, to_ms)
        super().advance(to_ms)


class LateContactor(SimTarget):
    """Reports the contactor closed for 300 ms after the firmware opened it."""

    def __init__(self) -> None:
        super().__init__()
        self._opened: dict[str, int] = {}
        self._now = 0

    def advance(self, to_ms: int) -> None:
        self._now = to_ms
        super().advance(to_ms)

    def outputs(self, column_id: str) -> ColumnOutputs:
        out = super().outputs(column_id)
        if out.contactor:
            self._opened[column_id] = -1
        elif self._opened.get(column_id) == -1:
            self._opened[column_id] = self._now
        at = self._opened.get(column_id, -1)
        if at >= 0 and self._now - at < 300:
            return dataclasses.replace(out, contactor=True)
        return out


class EnergyDrift(SimTarget):
    """A register that counts 2 % too much."""

    def outputs(self, column_id: str) -> ColumnOutputs:
        out = super().outputs(column_id)
        return dataclasses.replace(out, energy_wh=int(out.energy_wh * 1.02))


class WithTelemetry(SimTarget):
    def telemetry_sequences(self) -> dict[str, list[int]]:
        return {"evedge/v1/site/telemetry": [0, 1, 2, 4, 4, 5]}


def test_a_target_that_ignores_limits_fails_the_offer_and_site_oracles(tmp_path: Path) -> None:
    trace = _trace(tmp_path, scenarios.dno_curtailment())
    good = _by_id(replay(trace, SimTarget()))
    assert all(r.passed for r in good.values())
    bad = _by_id(replay(trace, IgnoresLimits()))
    for cid in ("c1", "c2", "c3"):
        assert not bad["limit.offer/" + cid].passed
        assert bad["limit.offer/" + cid].figure["worst_excess_a"] > 5
    assert not bad["limit.site"].passed
    assert bad["limit.site"].figure["overshoot_as"] > 1000


def test_a_car_ignoring_a_reduction_fails_the_car_oracle_not_the_offer_and_is_suspended(
    tmp_path: Path,
) -> None:
    result = replay(_trace(tmp_path, scenarios.car_ignores_reduction()), SimTarget())
    r = _by_id(result)
    assert not r["limit.car/c1"].passed  # the car broke its limit ...
    assert r["limit.offer/c1"].passed  # ... the firmware's offer never did
    assert r["limit.car/c2"].passed and r["limit.offer/c2"].passed
    assert not r["limit.site"].passed
    # The firmware suspended it for overdraw and opened the contactor after the 6 s PWM-off wait.
    assert "OverCurrentFailure" in result.columns["c1"]["errors_reported"]
    timing = r["timing/c1"]
    assert timing.passed and 6000 <= timing.figure["pwm_off_max_ms"] <= 6100
    # The car ignored it from 90 s; 7 s overdraw grace + 6 s PWM off: ~13 s above, 3 s beyond the budget.
    assert 2.0 <= r["limit.car/c1"].figure["violation_s"] <= 4.5
    # And the gateway's own load check reported the column.
    kinds = {(v["kind"], v["target"]) for v in result.gateway["load_violations_reported"]}
    assert ("column_overdraw", "c1") in kinds


def test_a_link_that_never_goes_silent_fails_the_failsafe_oracle(tmp_path: Path) -> None:
    trace = _trace(tmp_path, scenarios.gateway_loss())
    good = _by_id(replay(trace, SimTarget()))
    assert all(good["failsafe/c%d" % i].passed for i in (1, 2, 3))
    assert 50 <= good["failsafe/c1"].figure["worst_s"] <= 61
    bad = _by_id(replay(trace, KeepsLastLimit()))
    assert not any(bad["failsafe/c%d" % i].passed for i in (1, 2, 3))


def test_a_late_contactor_fails_the_timing_oracle(tmp_path: Path) -> None:
    sc = scenarios.Scenario(
        "unplug",
        "charge then unplug",
        60_000,
        scenarios._layout(scenarios._site(32.0), scenarios._columns(1)),
    )
    sc.add(1, "c1/ev.event", scenarios._plug()).add(40, "c1/ev.event", {"type": "unplug"})
    trace = _trace(tmp_path, sc)
    good = _by_id(replay(trace, SimTarget()))["timing/c1"]
    assert good.passed and good.figure["leave_cd_max_ms"] <= 100 and good.figure["leave_cd_events"] == 1
    bad = _by_id(replay(trace, LateContactor()))["timing/c1"]
    assert not bad.passed and bad.figure["leave_cd_max_ms"] >= 300


def test_a_register_that_drifts_fails_the_energy_oracle(tmp_path: Path) -> None:
    trace = _trace(tmp_path, scenarios.dno_expiry())
    good = _by_id(replay(trace, SimTarget()))
    assert good["energy/c1"].passed and abs(good["energy/c1"].figure["error_wh"]) <= 2
    bad = _by_id(replay(trace, EnergyDrift()))
    assert not bad["energy/c1"].passed and bad["energy/c1"].figure["error_pct"] > 1.5


def test_telemetry_from_a_target_is_judged(tmp_path: Path) -> None:
    trace = _trace(tmp_path, scenarios.dno_expiry())
    assert "telemetry" not in _by_id(replay(trace, SimTarget()))
    r = _by_id(replay(trace, WithTelemetry()))["telemetry"]
    assert not r.passed and r.figure["lost"] == 1 and r.figure["duplicates"] == 1


def test_a_dno_column_limit_is_judged_and_catches_a_column_ignoring_it(tmp_path: Path) -> None:
    sc = scenarios.Scenario(
        "dno-column",
        "a DNO limit on one column",
        120_000,
        scenarios._layout(scenarios._site(63.0), scenarios._columns(2)),
    )
    sc.add(1, "c1/ev.event", scenarios._plug()).add(2, "c2/ev.event", scenarios._plug())
    sc.add(40, "c1/dno.limit", scenarios._dno(8, 600, "col-1"))
    trace = _trace(tmp_path, sc)
    good = _by_id(replay(trace, SimTarget()))
    assert good["limit.dno/c1"].passed and good["limit.dno/c1"].figure["lowest_limit_a"] == 8.0
    assert "limit.dno/c2" not in good and good["limit.car/c2"].figure["max_measured_a"] > 15
    bad = _by_id(replay(trace, IgnoresLimits()))
    assert not bad["limit.dno/c1"].passed and bad["limit.dno/c1"].figure["worst_excess_a"] > 7
