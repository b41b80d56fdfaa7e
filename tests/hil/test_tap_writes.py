"""What a column's firmware received, read from its board line's tap (hil.replay.tap), is
what the column checks judge on the `mpy` target, as on `site`.

The tap on its own: counter moves become GatewayWrites stamped with the step at which the
harness saw them; a rebooted column's old lines are not counted again; the tap is switched
on again with the board's inputs after a reboot.

End to end on the real firmware (MicroPython, real time, about 40 s for both runs, which
run at the same time): a DNO curtailment lowers the column's assignment from 32 A to 8 A.
With a master that reaches the column 1.5 s after its gateway decided, the firmware keeps
offering the old limit until the write arrives; limit.offer counts the 8 A from that
arrival and passes. A firmware that reports the 8 A write through its tap but keeps its
pilot up fails limit.offer.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from firmware import pilot
from hil.replay.engine import EngineOptions, RunResult, replay
from hil.replay.mpy import MpyTarget
from hil.replay.oracles import OracleResult
from hil.replay.realtime import Column
from hil.replay.report import Series
from hil.replay.tap import TapColumns
from hil.replay.target import GatewayWrite
from hil.scenarios import Scenario, write_trace

# ---- the tap on its own ---------------------------------------------------------------------


class FakeBoard:
    """A VirtualColumn's board line as the tap reads it: lines the process wrote wait in
    `pending` until the harness reads the line (outputs())."""

    def __init__(self) -> None:
        self.board_log: list[dict[str, Any]] = []
        self.pending: list[dict[str, Any]] = []
        self.sent: list[dict[str, int]] = []

    def board(self, **inputs: int) -> None:
        self.sent.append(inputs)

    def outputs(self) -> dict[str, Any]:
        self.board_log += self.pending
        self.pending = []
        return self.board_log[-1] if self.board_log else {}

    def write(self, **changes: int) -> None:
        line = {"t": 0, "duty": 10000, "contactor": 0, "offered_da": 0, "status": 0, "cp": 0, "src": 0,
                "fs": 1, "err": 0, "wh": 0, "na": 0, "ada": 0, "as": 0, "nh": 0, "nf": 0, "fda": 60}
        if self.pending or self.board_log:
            line.update((self.pending or self.board_log)[-1])
        line.update(changes)
        self.pending.append(line)


class Switch:
    def __init__(self) -> None:
        self.calls: list[bool] = []

    def __call__(self, on: bool) -> None:
        self.calls.append(on)


def _tapped() -> tuple[TapColumns, FakeBoard]:
    target = TapColumns(speed="max")
    board = FakeBoard()
    col = Column("c1", {}, None, board=board, power=Switch())
    target.columns["c1"] = col
    target._tap_on(col, board)  # type: ignore[arg-type]
    return target, board


def _step(target: TapColumns, t_ms: int) -> list[GatewayWrite]:
    target.advance(t_ms)
    target.outputs("c1")
    return list(target.gateway_writes("c1"))


def test_counter_moves_become_writes_stamped_when_the_harness_saw_them() -> None:
    target, board = _tapped()
    assert board.sent == [{"tap": 1}]
    assert target.outputs("c1").status == "Unavailable"   # no tap line yet: booting
    board.write()
    assert _step(target, 100) == []
    board.write(na=1, ada=160, **{"as": 60}, nh=1)   # an assignment (and its heartbeat)
    board.write(na=2, ada=80, **{"as": 60}, nh=2)    # and another before the harness looks
    assert _step(target, 200) == [GatewayWrite(200, 8.0, 60, 6.0)]   # the latest one counts
    board.write(nh=3)
    assert _step(target, 300) == [GatewayWrite(300, None, 0, None)]
    board.write(nf=1, fda=100)
    assert _step(target, 400) == [GatewayWrite(400, None, 0, 10.0)]
    board.write(offered_da=80, duty=pilot.duty_for_current_da(80), status=2, cp=2, src=1, fs=0)
    assert _step(target, 500) == []
    out = target.outputs("c1")
    assert out.offered_a == 8.0 and out.duty == pilot.duty_for_current_da(80) and not out.failsafe_active


def test_a_rebooted_column_counts_from_zero_and_its_old_lines_are_not_counted_again() -> None:
    target, board = _tapped()
    board.write(na=3, ada=160, **{"as": 60}, nh=5)
    assert _step(target, 100) == [GatewayWrite(100, 16.0, 60, 6.0)]
    target.power_cut("c1", 100, 1000)
    board.write(na=4, ada=120, **{"as": 60})   # the old process's last line, read only later
    assert target.outputs("c1").status == "Unavailable"
    assert list(target.gateway_writes("c1")) == []
    target.advance(1100)   # power on: the old line is read, the tap goes on again
    assert board.sent[-1]["tap"] == 1
    assert target.outputs("c1").status == "Unavailable"   # the new process has not written yet
    board.write(na=0, ada=0, nh=0, nf=0)
    assert _step(target, 1200) == []
    board.write(na=1, ada=100, **{"as": 55}, nh=1)
    assert _step(target, 1300) == [GatewayWrite(1300, 10.0, 55, 6.0)]


# ---- end to end on the real firmware --------------------------------------------------------

CURTAIL_AT_S = 10
DNO_LIMIT_A = 8.0
LATE_MS = 1500
LATE_FROM_MS = 5000   # the bus is busy from then on (earlier, a late 0 A would pause the car's session)


def curtailment(folder: Path) -> Path:
    """One car under a 32 A column; at 10 s the DNO limits the site to 8 A."""
    layout = {"site": {"id": "scenario", "capacity_a": 63.0,
                       "allocation": {"increase_delay_max_s": 2, "dno_restore_without_delay": True}},
              "columns": [{"id": "c1", "phases": 3, "hardware_a": 32.0}],
              "gateway": {"period_s": 5, "refresh_s": 10, "validity_s": 60}}
    sc = Scenario("tap-curtailment", "one car; the DNO curtails the site to 8 A", 24_000, layout)
    sc.add(1, "c1/ev.event", {"type": "plug", "profile": "generic-3ph-11kw", "soc_pct": 30})
    sc.add(CURTAIL_AT_S, "dno.limit", {"limit_a": DNO_LIMIT_A, "validity_s": 60, "id": "curtail-1"})
    sc.add(19, "c1/ev.event", {"type": "unplug"})
    return write_trace(sc, folder / "tap-curtailment.trace")


class LateMaster(MpyTarget):
    """From LATE_FROM_MS the harness's master reaches the column LATE_MS after its gateway
    decided (a busy bus): each assignment is put on the link that much later. `sent` says when."""

    def __init__(self) -> None:
        super().__init__("micropython")
        self.held: list[tuple[int, int, str, float, int, float | None]] = []
        self.sent: list[tuple[int, int, float]] = []   # (decided, put on the link, limit)

    def assign_limit(self, column_id: str, now_ms: int, limit_a: float, validity_s: int,
                     failsafe_a: float | None = None) -> bool:
        if now_ms < LATE_FROM_MS:
            return super().assign_limit(column_id, now_ms, limit_a, validity_s, failsafe_a)
        self.held.append((now_ms + LATE_MS, now_ms, column_id, limit_a, validity_s, failsafe_a))
        return True

    def advance(self, to_ms: int) -> None:
        super().advance(to_ms)
        due = [h for h in self.held if h[0] <= to_ms]
        self.held = [h for h in self.held if h[0] > to_ms]
        for _due, decided, cid, limit_a, validity_s, failsafe_a in due:
            super().assign_limit(cid, to_ms, limit_a, validity_s, failsafe_a)
            self.sent.append((decided, to_ms, limit_a))


class KeepsPilotUp(MpyTarget):
    """A firmware whose pilot ignores a lower limit it received: while the contactor is
    closed its board line reports the highest offer so far (the tap's counts untouched)."""

    def __init__(self) -> None:
        super().__init__("micropython")
        self.top_da = 0

    def _line(self, col: Column) -> dict[str, Any]:
        line = super()._line(col)
        if "cp" not in line or not line["contactor"]:
            return line
        if line["offered_da"] >= self.top_da:
            self.top_da = line["offered_da"]
            return line
        return {**line, "offered_da": self.top_da, "duty": pilot.duty_for_current_da(self.top_da)}


def _run(trace: Path, target: MpyTarget) -> RunResult:
    try:
        return replay(trace, target, EngineOptions(progress=False), target_name="mpy")
    finally:
        target.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[RunResult, MpyTarget]]:
    trace = curtailment(tmp_path_factory.mktemp("tap-traces"))
    targets: dict[str, MpyTarget] = {"late": LateMaster(), "keeps": KeepsPilotUp()}
    with ThreadPoolExecutor(len(targets)) as pool:
        futures = {name: pool.submit(_run, trace, t) for name, t in targets.items()}
        return {name: (f.result(), targets[name]) for name, f in futures.items()}


def _check(result: RunResult, oracle_id: str) -> OracleResult:
    return next(r for r in result.results if r.id == oracle_id)


def _first(series: Series, pred: Any, after_ms: int = 0) -> int:
    return next(int(t) for t, v in zip(series.t, series.v, strict=True) if t >= after_ms and pred(v))


def _value_before(series: Series, t_ms: int) -> float:
    return [v for t, v in zip(series.t, series.v, strict=True) if t < t_ms][-1]


def test_a_late_write_counts_from_when_the_firmware_received_it(runs: dict[str, Any]) -> None:
    result, target = runs["late"]
    decided, on_link, _ = next(s for s in target.sent if s[2] <= DNO_LIMIT_A and s[0] >= CURTAIL_AT_S * 1000)
    assert on_link - decided >= LATE_MS
    plot = result.plots.columns["c1"]
    # The firmware kept offering the old, higher limit after the gateway decided: judged
    # from the decision, its offer would be over the new limit for about LATE_MS.
    assert _value_before(plot.offer, on_link) > DNO_LIMIT_A + 5
    # The 8 A limit is in force from when the firmware reported it (the step after the
    # write went on the link), not from the decision.
    edge = _first(plot.limit, lambda v: v <= DNO_LIMIT_A, after_ms=decided)
    assert on_link <= edge <= on_link + 2000, (decided, on_link, edge)
    assert _first(plot.offer, lambda v: v <= DNO_LIMIT_A, after_ms=decided) >= on_link
    offer = _check(result, "limit.offer/c1")
    assert offer.passed, (offer.message, dict(offer.figure))


def test_a_firmware_that_ignores_a_received_decrease_fails_the_offer_check(runs: dict[str, Any]) -> None:
    result, _ = runs["keeps"]
    plot = result.plots.columns["c1"]
    # The firmware did report the 8 A assignment...
    _first(plot.limit, lambda v: v <= DNO_LIMIT_A, after_ms=CURTAIL_AT_S * 1000)
    # ...and its pilot stayed up: limit.offer fails, by what it kept offering over 8 A.
    offer = _check(result, "limit.offer/c1")
    assert not offer.passed
    assert offer.figure["worst_excess_a"] > 5, dict(offer.figure)
