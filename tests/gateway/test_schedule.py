"""Bus time arithmetic and the poll schedule, in virtual time."""

from __future__ import annotations

import pytest

from firmware import regmap
from gateway.south.schedule import (
    READ_REQUEST_BYTES,
    WRITE_MULTIPLE_REPLY_BYTES,
    LineTiming,
    PollSchedule,
    read_reply_bytes,
    spread_s,
    write_multiple_request_bytes,
)

POLL_REPLY = read_reply_bytes(regmap.POLL_COUNT)   # 32 registers: 69 bytes


def test_character_and_gap_times_follow_the_rtu_rules() -> None:
    # STANDARDS.md: one 11-bit character is 1.146 ms at 9600 baud and 0.095 ms at 115200.
    assert LineTiming(9600).char_s == pytest.approx(0.0011458, abs=1e-7)
    assert LineTiming(115200).char_s == pytest.approx(0.0000955, abs=1e-7)
    # 3.5 characters up to 19200 baud, a fixed 1.75 ms above.
    assert LineTiming(9600).gap_s == pytest.approx(3.5 * 11 / 9600)
    assert LineTiming(19200).gap_s == pytest.approx(3.5 * 11 / 19200)
    assert LineTiming(38400).gap_s == 0.00175
    assert LineTiming(115200).gap_s == 0.00175


def test_frame_sizes() -> None:
    assert (READ_REQUEST_BYTES, POLL_REPLY) == (8, 69)
    assert write_multiple_request_bytes(2) == 13           # limit + validity
    assert write_multiple_request_bytes(4) == 17           # a table frame for three columns
    assert WRITE_MULTIPLE_REPLY_BYTES == 8


@pytest.mark.parametrize(("baud", "poll_s"), [
    (9600, 77 * 11 / 9600 + 2 * 3.5 * 11 / 9600),   # 96.25 ms
    (115200, 77 * 11 / 115200 + 2 * 0.00175),        # 10.85 ms
])
def test_a_poll_exchange_costs_both_frames_and_their_gaps(baud: int, poll_s: float) -> None:
    timing = LineTiming(baud)
    assert timing.exchange_s(READ_REQUEST_BYTES, POLL_REPLY) == pytest.approx(poll_s)
    assert timing.exchange_s(READ_REQUEST_BYTES, POLL_REPLY, 0.005) == pytest.approx(poll_s + 0.005)


def schedule_of(baud: int, n: int, period_s: float, budget: float = 0.8) -> PollSchedule[str, str]:
    cost = LineTiming(baud).exchange_s(READ_REQUEST_BYTES, POLL_REPLY)
    sched: PollSchedule[str, str] = PollSchedule(budget=budget)
    for i in range(n):
        sched.add("c%d" % i, period_s, cost, now=0.0, phase_s=period_s * i / n)
    return sched


def test_utilisation_at_9600_baud_ten_columns_each_second_is_stretched_to_the_budget() -> None:
    sched = schedule_of(9600, 10, 1.0)
    assert sched.demand() == pytest.approx(0.9625)          # 10 x 96.25 ms in every second
    assert sched.stretch() == pytest.approx(0.9625 / 0.8)
    assert sched.utilisation() == pytest.approx(0.8)
    assert sched.period_s("c0") == pytest.approx(1.203125)
    # Eight columns fit at 1 s: no stretching.
    eight = schedule_of(9600, 8, 1.0)
    assert eight.demand() == pytest.approx(0.77) and eight.stretch() == 1.0 and eight.period_s("c0") == 1.0


def test_utilisation_at_115200_baud() -> None:
    sched = schedule_of(115200, 10, 1.0)
    assert sched.demand() == pytest.approx(0.108524, rel=1e-4)
    assert sched.stretch() == 1.0 and sched.utilisation() == sched.demand()
    # 60 columns every 0.5 s would need 130 % of the line: stretched to 80 %.
    busy = schedule_of(115200, 60, 0.5)
    assert busy.demand() == pytest.approx(1.30229, rel=1e-4)
    assert busy.utilisation() == pytest.approx(0.8)
    assert busy.period_s("c0") == pytest.approx(0.5 * 1.30229 / 0.8, rel=1e-4)


def simulate(sched: PollSchedule[str, str], costs: dict[str, float], until: float,
             urgent_at: dict[float, str] | None = None) -> tuple[dict[str, int], list[tuple[float, str]]]:
    """Run the schedule on a virtual line where each job occupies it for its cost."""
    now = 0.0
    runs = {k: 0 for k in costs}
    log: list[tuple[float, str]] = []
    pending = sorted((urgent_at or {}).items())
    while now < until:
        while pending and pending[0][0] <= now:
            sched.push_urgent(pending.pop(0)[1])
        item = sched.take_urgent()
        if item is not None:
            log.append((now, item))
            sched.record_busy(now, now + 0.01)
            now += 0.01
            continue
        due = sched.take(now)
        if due is None:
            wait = sched.wait_s(now)
            assert wait is not None and wait > 0
            now += min(wait, pending[0][0] - now) if pending else wait
            continue
        runs[due.key] += 1
        log.append((now, due.key))
        sched.record_busy(now, now + costs[due.key])
        now += costs[due.key]
    return runs, log


def test_ten_columns_at_9600_each_polled_at_the_stretched_period_and_the_line_within_budget() -> None:
    sched = schedule_of(9600, 10, 1.0)
    cost = LineTiming(9600).exchange_s(READ_REQUEST_BYTES, POLL_REPLY)
    runs, _log = simulate(sched, {"c%d" % i: cost for i in range(10)}, until=60.0)
    expected = 60.0 / sched.period_s("c0")                  # ~49.9 polls each
    assert all(abs(n - expected) <= 1 for n in runs.values()), runs
    assert sched.measured_utilisation(60.0) == pytest.approx(0.8, abs=0.02)
    assert sched.skipped_cycles == 0


def test_unequal_periods_are_served_earliest_deadline_first() -> None:
    timing = LineTiming(19200)
    cost = timing.exchange_s(READ_REQUEST_BYTES, POLL_REPLY)   # ~48 ms
    sched: PollSchedule[str, str] = PollSchedule(budget=0.8)
    sched.add("fast", 0.2, cost, now=0.0)
    sched.add("slow", 2.0, cost, now=0.0)
    sched.add("heartbeat", 5.0, timing.exchange_s(8, 8), now=0.0)
    runs, _ = simulate(sched, {"fast": cost, "slow": cost, "heartbeat": timing.exchange_s(8, 8)}, until=20.0)
    assert sched.stretch() == 1.0
    assert runs["fast"] in (99, 100, 101) and runs["slow"] in (10, 11) and runs["heartbeat"] in (4, 5)


def test_urgent_work_goes_out_at_the_next_exchange_boundary() -> None:
    sched = schedule_of(9600, 10, 1.0)
    cost = LineTiming(9600).exchange_s(READ_REQUEST_BYTES, POLL_REPLY)
    _runs, log = simulate(sched, {"c%d" % i: cost for i in range(10)}, until=5.0,
                          urgent_at={2.5001: "limits", 3.0: "meter"})
    starts = dict((item, t) for t, item in log)
    # Polls are back to back at this load; the write waits for at most the exchange in flight.
    assert 2.5001 <= starts["limits"] <= 2.5001 + cost
    assert 3.0 <= starts["meter"] <= 3.0 + cost
    assert sched.urgent_taken == 2


def test_urgent_first_then_due_jobs_and_wait_times() -> None:
    sched: PollSchedule[str, str] = PollSchedule()
    sched.add("a", 1.0, 0.01, now=0.0, phase_s=0.5)
    sched.add("b", 1.0, 0.01, now=0.0, phase_s=0.2)
    assert sched.take(0.1) is None and sched.wait_s(0.1) == pytest.approx(0.1)
    sched.push_urgent("write")
    assert sched.wait_s(0.1) == 0.0
    assert sched.take_urgent() == "write" and sched.take_urgent() is None
    due = sched.take(0.6)
    assert due is not None and (due.key, due.due) == ("b", 0.2) and due.late_s == pytest.approx(0.4)
    due = sched.take(0.6)
    assert due is not None and due.key == "a"
    assert sched.take(0.6) is None and sched.wait_s(0.6) == pytest.approx(0.6)   # b next at 1.2


def test_an_advanced_job_runs_at_the_next_opportunity_and_keeps_its_period() -> None:
    sched: PollSchedule[str, str] = PollSchedule()
    sched.add("a", 1.0, 0.01, now=0.0, phase_s=0.2)
    sched.add("b", 1.0, 0.01, now=0.0, phase_s=0.8)
    assert [sched.take(0.3).key, sched.take(0.3)] == ["a", None]   # type: ignore[union-attr]
    sched.advance("b", 0.3)          # due at 0.8: now instead
    sched.advance("missing", 0.3)    # not a job: nothing
    due = sched.take(0.3)
    assert due is not None and due.key == "b" and due.late_s == 0.0
    assert sched.take(0.3) is None and sched.wait_s(0.3) == pytest.approx(0.9)   # a at 1.2
    assert sched.take(1.2).key == "a" and sched.take(1.3).key == "b"              # type: ignore[union-attr]
    assert sched.runs("b") == 2      # an earlier run, not an extra one


def test_a_job_a_whole_period_behind_is_not_run_in_a_burst() -> None:
    sched: PollSchedule[str, str] = PollSchedule()
    sched.add("a", 1.0, 0.01, now=0.0)
    assert sched.take(0.0) is not None
    # The loop was stuck for 10 s: one run now, the next a full period later, not ten.
    assert sched.take(10.0) is not None
    assert sched.take(10.0) is None and sched.wait_s(10.0) == pytest.approx(1.0)
    assert sched.skipped_cycles == 1


def test_offline_columns_change_period_and_cost() -> None:
    sched = schedule_of(9600, 10, 1.0)
    for i in range(5):   # half the columns offline: probed every 5 s, each probe a 0.2 s timeout
        sched.update("c%d" % i, period_s=5.0, cost_s=0.2)
    assert sched.demand() == pytest.approx(5 * 0.09625 + 5 * 0.2 / 5)
    assert sched.stretch() == 1.0
    sched.update("c0", period_s=1.0, cost_s=0.09625, now=100.0)
    assert sched.period_s("c0") == 1.0


def test_measured_utilisation_over_a_window() -> None:
    sched: PollSchedule[str, str] = PollSchedule(window_s=10.0)
    assert sched.measured_utilisation(5.0) == 0.0
    for t in range(20):
        sched.record_busy(float(t), t + 0.25)
    assert sched.measured_utilisation(20.0) == pytest.approx(0.25)
    assert sched.busy_total_s == pytest.approx(5.0)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        PollSchedule(budget=0.0)
    sched: PollSchedule[str, str] = PollSchedule()
    with pytest.raises(ValueError):
        sched.add("a", 0.0, 0.01, now=0.0)


def test_a_job_that_falls_behind_keeps_its_slot_in_the_period() -> None:
    sched: PollSchedule[str, str] = PollSchedule()
    sched.add("a", 1.0, 0.0, now=0.0, phase_s=spread_s(3, 10, 1.0))   # the 4th of 10: at 0.3 s
    due = sched.take(0.3)
    assert due is not None and due.due == pytest.approx(0.3)
    # Stalled until 10.75: one run now; the next back in its slot at 11.3, not at 11.75.
    assert sched.take(10.75) is not None and sched.skipped_cycles == 1
    assert sched.wait_s(10.75) == pytest.approx(0.55)


def test_spread_phases_cover_the_period_evenly() -> None:
    assert [spread_s(i, 4, 2.0) for i in range(4)] == [0.0, 0.5, 1.0, 1.5]
    assert [spread_s(i, 4, 10.0, 0.5) for i in range(4)] == [1.25, 3.75, 6.25, 8.75]
    assert spread_s(0, 0, 1.0) == 0.0


def test_spread_phases_in_slots_group_the_jobs() -> None:
    phases = [spread_s(i, 1000, 1.0, slot_s=0.02) for i in range(1000)]
    assert len(set(phases)) == 50 and phases.count(0.0) == 20       # 50 slots of 20 jobs
    assert all(p == pytest.approx(round(p / 0.02) * 0.02) for p in phases) and max(phases) < 1.0
    assert [spread_s(i, 4, 1.0, slot_s=0.02) for i in range(4)] == [0.0, 0.24, 0.5, 0.74]   # rounded down
