"""The coarse timer the Modbus TCP columns share for reply timeouts and naps: never early, at
most one grid slot late, one loop timer per slot, and one failing callback does not strand the
others (each of them settles a future some poll is waiting on)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.south.coarse_timer import CoarseTimer

RES = 0.05


def test_callbacks_run_never_early_and_at_most_one_slot_late() -> None:
    async def main() -> list[tuple[float, float]]:
        loop = asyncio.get_running_loop()
        timer = CoarseTimer(RES)
        fired: list[tuple[float, float]] = []
        done = loop.create_future()
        start = loop.time()
        delays = [0.0, 0.011, 0.049, 0.05, 0.051, 0.12, 0.2]
        for d in delays:
            timer.call_at(loop, start + d, lambda due: fired.append((due, loop.time())), start + d)
        timer.call_at(loop, start + 0.25, lambda f: f.set_result(None), done)
        await asyncio.wait_for(done, 5)
        assert timer.pending == 0
        return fired

    fired = asyncio.run(main())
    assert len(fired) == 7
    for due, at in fired:
        assert at >= due
        # One slot late at most, plus what the loop itself adds to a timer (generous: a busy CI).
        assert at - due <= RES + 0.1
    assert [due for due, _ in fired] == sorted(due for due, _ in fired)


def test_deadlines_in_one_slot_share_one_loop_timer() -> None:
    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        timer = CoarseTimer(1.0)
        before = len(loop._scheduled)  # type: ignore[attr-defined]
        base = loop.time() + 10.0
        anchor = (int(base) + 1) * 1.0 + 0.001  # just past a slot boundary: all in the next slot
        for i in range(1000):
            timer.call_at(loop, anchor + 0.0005 * i, lambda _x: None, i)
        return len(loop._scheduled) - before, timer.pending  # type: ignore[attr-defined]

    timers, pending = asyncio.run(main())
    assert (timers, pending) == (1, 1000)


def test_a_failing_callback_does_not_strand_the_others(caplog: pytest.LogCaptureFixture) -> None:
    def boom(_x: object) -> None:
        raise RuntimeError("bug")

    async def main() -> list[bool]:
        loop = asyncio.get_running_loop()
        timer = CoarseTimer(RES)
        futs = [loop.create_future() for _ in range(3)]
        when = loop.time() + 0.01
        timer.call_at(loop, when, lambda f: f.set_result(True), futs[0])
        timer.call_at(loop, when, boom, None)
        timer.call_at(loop, when, lambda f: f.set_result(True), futs[1])
        timer.call_at(loop, when, lambda f: f.set_result(True), futs[2])
        return list(await asyncio.wait_for(asyncio.gather(*futs), 5))

    assert asyncio.run(main()) == [True, True, True]
    assert "coarse timer callback failed" in caplog.text


def test_a_resolution_that_is_not_positive_is_refused() -> None:
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            CoarseTimer(bad)
