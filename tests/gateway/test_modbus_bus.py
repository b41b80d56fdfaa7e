"""The Modbus RTU bus master against the firmware's own slave: three or more columns on
one serial line pair, polled, written to, broadcast to, silenced and corrupted."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from south_columns import FirmwareColumn, RtuColumnBus

from firmware import regmap
from firmware.crc import crc16
from gateway.south.modbus_bus import ModbusRtuBus, RtuBusConfig, RtuColumn, plan_limits
from gateway.south.types import (
    ColumnEvent,
    ColumnLink,
    ColumnReading,
    LimitCommand,
    LinkTracker,
    decode_inputs,
)
from hil.rig.serial_pair import SerialPair

ADDRESSES = (1, 2, 3)


def with_crc(frame: bytes) -> bytes:
    crc = crc16(frame)
    return frame + bytes((crc & 0xFF, crc >> 8))


@dataclass
class Line:
    pair: SerialPair
    columns: list[FirmwareColumn]
    slaves: RtuColumnBus

    def column(self, address: int) -> FirmwareColumn:
        return next(c for c in self.columns if c.address == address)


@pytest.fixture
def line() -> Iterator[Line]:
    cols = [FirmwareColumn(a) for a in ADDRESSES]
    with SerialPair() as pair, RtuColumnBus(pair.b_path, cols) as slaves:
        yield Line(pair, cols, slaves)


def bus_for(path: str, addresses: tuple[int, ...] = ADDRESSES, *, period_s: float = 0.05,
            **cfg: object) -> ModbusRtuBus:
    config = RtuBusConfig(path, **{"baud": 115200, "heartbeat_period_s": None, "broadcast_turnaround_s": 0.01,
                                   "offline_after": 2, "offline_poll_period_s": 0.1, **cfg})  # type: ignore[arg-type]
    columns = [RtuColumn("c%d" % a, a, poll_period_s=period_s, timeout_s=0.05, retries=0) for a in addresses]
    return ModbusRtuBus(config, columns)


async def wait_event(bus: ModbusRtuBus, pred: Callable[[ColumnEvent], bool],
                     timeout_s: float = 2.0) -> ColumnEvent:
    async with asyncio.timeout(timeout_s):
        while True:
            event = await bus.events.get()
            if pred(event):
                return event


async def readings_from_all(bus: ModbusRtuBus, ids: set[str],
                            timeout_s: float = 2.0) -> dict[str, ColumnReading]:
    got: dict[str, ColumnReading] = {}
    async with asyncio.timeout(timeout_s):
        while set(got) != ids:
            event = await bus.events.get()
            if isinstance(event, ColumnReading) and event.column_id in ids:
                got[event.column_id] = event
    return got


def is_link(cid: str, online: bool) -> Callable[[ColumnEvent], bool]:
    return lambda e: isinstance(e, ColumnLink) and e.column_id == cid and e.online is online


# -- polling ---------------------------------------------------------------------------------

def test_polls_every_column_and_decodes_the_register_map(line: Line) -> None:
    line.column(2).inputs[regmap.IR_ERROR_FLAGS] = regmap.FLAG_FAILSAFE_ACTIVE | regmap.FLAG_PAUSED

    async def main() -> tuple[dict[str, ColumnReading], list[ColumnLink]]:
        async with bus_for(line.pair.a_path) as bus:
            links: list[ColumnLink] = []
            bus.subscribe(lambda e: links.append(e) if isinstance(e, ColumnLink) else None)
            return await readings_from_all(bus, {"c1", "c2", "c3"}), links

    got, links = asyncio.run(main())
    r = got["c2"]
    assert (r.status, r.error, r.cp_state, r.limit_source) == ("Charging", "NoError", "C", "gateway")
    assert r.offered_a == 16.0
    assert r.current_a == (15.8, 15.7, 15.6)
    assert r.voltage_v == (230.1, 229.9, 230.5)
    assert (r.power_w, r.energy_wh, r.session_energy_wh, r.session_id) == (10950, 1_234_567, 4321, 7)
    assert r.failsafe_a == 6.0
    assert r.flags == ("failsafe_active", "paused")
    assert r.fw_version == "1.2.3" and r.phases == 3 and r.hardware_a == 32.0 and r.cable_a == 20.0
    assert r.online and abs(r.ts_ms - time.time() * 1000) < 5000
    assert got["c1"].flags == ()
    assert sorted(link.column_id for link in links if link.online) == ["c1", "c2", "c3"]
    # FC04 from register 0 for the whole input map, exactly as on the wire:
    assert bytes.fromhex("01 04 00 00 00 20 f1 d2") in line.slaves.requests
    assert with_crc(bytes.fromhex("03 04 00 00 00 20")) in line.slaves.requests


def test_heartbeats_reach_every_column(line: Line) -> None:
    async def main() -> None:
        async with bus_for(line.pair.a_path, heartbeat_period_s=0.05) as bus:
            async with asyncio.timeout(2):
                while not all(c.holding[regmap.HR_HEARTBEAT] >= 2 for c in line.columns):
                    await asyncio.sleep(0.02)
            assert bus.stats.heartbeats >= 6

    asyncio.run(main())
    # FC06 to HR_HEARTBEAT with a sequence number, e.g. the first one to column 1:
    assert with_crc(bytes.fromhex("01 06 00 03 00 01")) in line.slaves.requests


def test_a_single_write_echoed_with_another_value_is_not_confirmed() -> None:
    """FC06 echoes address and value: a reply with the right address and CRC but another value
    is not the confirmation of what was written."""
    tampered = [0]

    def other_value(direction: str, chunk: bytes) -> bytes:
        if direction == "ba" and len(chunk) == 8 and chunk[:2] == b"\x02\x06":
            tampered[0] += 1
            return with_crc(chunk[:4] + bytes((chunk[4] ^ 0x80, chunk[5])))
        return chunk

    columns = [FirmwareColumn(a) for a in ADDRESSES]
    with SerialPair(manipulator=other_value) as pair, RtuColumnBus(pair.b_path, columns):
        async def main() -> None:
            async with bus_for(pair.a_path, heartbeat_period_s=0.05) as bus:
                async with asyncio.timeout(3):
                    while bus.failures().get("wrong_length", 0) < 2 or bus.stats.heartbeats < 9:
                        await asyncio.sleep(0.02)
                assert tampered[0] >= 2 and bus.failures()["wrong_length"] <= tampered[0]
                assert bus.column_failures("c1") == {} and bus.column_failures("c3") == {}
        asyncio.run(main())


# -- limits ----------------------------------------------------------------------------------

def test_unicast_limit_is_in_the_holding_registers_when_set_limits_returns(line: Line) -> None:
    async def main() -> float:
        # Polls every 5 s: a write that waited for the next poll would not be there in time.
        async with bus_for(line.pair.a_path, period_s=5.0) as bus:
            await readings_from_all(bus, {"c1"})
            t0 = time.monotonic()
            results = await bus.set_limits([LimitCommand("c2", 10.5, 120, failsafe_a=6.0)])
            elapsed = time.monotonic() - t0
            assert [(r.column_id, r.ok, r.via, r.limit_da, r.validity_s) for r in results] == \
                [("c2", True, "unicast", 105, 120)]
            assert list(line.column(2).holding[0:3]) == [105, 120, 60]
            return elapsed

    elapsed = asyncio.run(main())
    assert elapsed < 0.5
    assert line.column(2).writes == [(regmap.HR_ASSIGNED_LIMIT, [105, 120, 60])]
    assert list(line.column(1).holding[0:3]) == [0, 0, 0]
    assert with_crc(bytes.fromhex("02 10 00 00 00 03 06 00 69 00 78 00 3c")) in line.slaves.requests


def test_broadcast_table_updates_all_columns_in_one_frame(line: Line) -> None:
    async def main() -> None:
        async with bus_for(line.pair.a_path, period_s=5.0) as bus:
            await readings_from_all(bus, {"c1"})
            before = len(line.slaves.requests)
            results = await bus.set_limits([LimitCommand("c1", 16, 60), LimitCommand("c2", 10, 60),
                                            LimitCommand("c3", 6.05, 60)])
            assert [(r.column_id, r.ok, r.via, r.limit_da) for r in results] == [
                ("c1", True, "broadcast", 160), ("c2", True, "broadcast", 100), ("c3", True, "broadcast", 60)]
            assert line.slaves.requests[before:] == [
                with_crc(bytes.fromhex("00 10 01 00 00 04 08 00 3c 00 a0 00 64 00 3c"))]
            assert bus.stats.broadcast_frames == 1 and bus.stats.unicast_writes == 0

    asyncio.run(main())
    assert [list(c.holding[0:2]) for c in line.columns] == [[160, 60], [100, 60], [60, 60]]
    assert [c.slave.broadcasts for c in line.columns] == [1, 1, 1]


def test_a_broadcasts_columns_are_polled_first_after_it(line: Line) -> None:
    """Nobody answers a broadcast: the next polls are its columns', whose replies show whether
    each took it, long before their slots in a slow poll cycle would come round."""
    async def main() -> None:
        # Polls spread over 30 s: c1 at once, c2 in 10 s, c3 in 20 s.
        async with bus_for(line.pair.a_path, period_s=30.0) as bus:
            await readings_from_all(bus, {"c1"})
            assert bus.stats.polls == 1
            results = await bus.set_limits([LimitCommand("c2", 16, 60), LimitCommand("c3", 10, 60)])
            assert [r.via for r in results] == ["broadcast", "broadcast"]
            await readings_from_all(bus, {"c2", "c3"}, timeout_s=2.0)   # not in 10 and 20 s
            await asyncio.sleep(0.3)
            assert bus.stats.polls == 3     # earlier polls, not extra ones: c1's next is 30 s away

    asyncio.run(main())


def test_without_broadcast_each_column_gets_its_own_confirmed_write(line: Line) -> None:
    async def main() -> None:
        async with bus_for(line.pair.a_path, period_s=5.0, broadcast=False) as bus:
            results = await bus.set_limits([LimitCommand(f"c{a}", 8, 30) for a in ADDRESSES])
            assert [(r.ok, r.via) for r in results] == [(True, "unicast")] * 3
            assert bus.stats.broadcast_frames == 0

    asyncio.run(main())
    assert [list(c.holding[0:2]) for c in line.columns] == [[80, 30]] * 3
    assert [c.slave.broadcasts for c in line.columns] == [0, 0, 0]


def test_bad_limits_are_refused_before_the_wire(line: Line) -> None:
    async def main() -> None:
        async with bus_for(line.pair.a_path, period_s=5.0) as bus:
            await readings_from_all(bus, {"c1"})
            before = len(line.slaves.requests)
            results = await bus.set_limits([
                LimitCommand("c1", math.nan, 60), LimitCommand("c2", -1, 60), LimitCommand("c3", 80.1, 60),
                LimitCommand("c9", 10, 60), LimitCommand("c1", 10, 70000)])
            assert [(r.column_id, r.ok, r.reason) for r in results] == [
                ("c2", False, "bad_limit"), ("c3", False, "bad_limit"), ("c9", False, "unknown_column"),
                ("c1", False, "bad_validity")]
            assert len(line.slaves.requests) == before

    asyncio.run(main())
    assert [list(c.holding[0:2]) for c in line.columns] == [[0, 0]] * 3


def test_plan_groups_by_validity_and_splits_wide_address_ranges() -> None:
    addresses = {"a": 1, "b": 3, "c": 130, "d": 200, "e": 5, "f": 7}
    plan = plan_limits([LimitCommand("a", 10, 60), LimitCommand("b", 11, 60), LimitCommand("c", 12, 60),
                        LimitCommand("d", 13, 60), LimitCommand("e", 14, 30), LimitCommand("f", 15, 60,
                                                                                             failsafe_a=6)],
                       addresses, broadcast=True, min_columns=2)
    frames = {(f.start, f.values, f.column_ids) for f in plan.broadcasts}
    nc = regmap.NO_CHANGE
    assert frames == {
        (regmap.BROADCAST_TABLE, (60, 100, nc, 110), ("a", "b")),               # 1..3, NO_CHANGE for 2
        (regmap.BROADCAST_TABLE + 129, (60, 120, *([nc] * 69), 130), ("c", "d")),  # 130..200
    }
    # e is alone with its validity, f carries a failsafe: both confirmed writes.
    assert {(w.column_id, w.values) for w in plan.unicasts} == {("e", (140, 30)), ("f", (150, 60, 60))}
    far = plan_limits([LimitCommand("a", 10, 60), LimitCommand("c", 12, 60)], addresses, broadcast=True)
    assert far.broadcasts == () and len(far.unicasts) == 2   # 129 apart: no frame spans both


# -- failures --------------------------------------------------------------------------------

def test_a_silent_column_goes_offline_and_comes_back(line: Line) -> None:
    async def main() -> None:
        async with bus_for(line.pair.a_path) as bus:
            await readings_from_all(bus, {"c1", "c2", "c3"})
            line.column(2).silent = True
            down = await wait_event(bus, is_link("c2", False))
            assert isinstance(down, ColumnLink) and down.reason == "timeout"
            assert down.consecutive_failures == 2 and down.last_ok_ms is not None
            # The others are still polled while c2 is down.
            await readings_from_all(bus, {"c1", "c3"})
            line.column(2).silent = False
            up = await wait_event(bus, is_link("c2", True))
            assert isinstance(up, ColumnLink) and up.reason == "ok" and up.consecutive_failures == 0
            await readings_from_all(bus, {"c2"})
            assert bus.column_failures("c2")["timeout"] >= 2
            assert bus.link("c1").online and bus.link("c1").consecutive_failures == 0

    asyncio.run(main())


class Corrupter:
    """Damages every reply to one unit: the manipulator of the serial pair."""

    def __init__(self, unit: int, mode: str) -> None:
        self.unit = unit
        self.mode = mode
        self.last_request_unit = -1
        self.damaged = 0

    def __call__(self, direction: str, chunk: bytes) -> bytes:
        if direction == "ab":
            if chunk:
                self.last_request_unit = chunk[0]
            return chunk
        if self.last_request_unit != self.unit or not chunk:
            return chunk
        self.damaged += 1
        if self.mode == "crc":
            return chunk[:-1] + bytes((chunk[-1] ^ 0x5A,))
        if self.mode == "wrong_length":   # a good frame with 10 registers instead of 32
            return with_crc(bytes((chunk[0], 4, 20)) + chunk[3:23])
        if self.mode == "garbled":        # the reply breaks off halfway
            return chunk[: len(chunk) // 2]
        if self.mode == "odd_count":      # good CRC, 3 data bytes: not a whole register list
            return with_crc(bytes((chunk[0], 4, 3)) + chunk[3:6])
        if self.mode == "foreign_function":  # good CRC, a function code nobody asked for
            return with_crc(bytes((chunk[0], 0x41)) + chunk[2:10])
        if self.mode == "noise":          # line noise in front of and behind the reply
            return b"\xff\x00\x13" + chunk + b"\x55"
        return chunk


@pytest.mark.parametrize(("mode", "reason"), [
    ("crc", "crc"), ("wrong_length", "wrong_length"), ("garbled", "garbled"), ("exception", "exception"),
    ("odd_count", "wrong_length"), ("foreign_function", "garbled"), ("noise", "garbled")])
def test_a_column_answering_garbage_is_counted_and_leaves_the_others_alone(mode: str, reason: str) -> None:
    corrupter = Corrupter(2, mode)
    # "exception": a column whose (older) map is shorter answers the poll with exception 02.
    columns = [FirmwareColumn(1), FirmwareColumn(2, input_count=20 if mode == "exception" else 32),
               FirmwareColumn(3)]
    with SerialPair(manipulator=corrupter if mode != "exception" else None) as pair, \
            RtuColumnBus(pair.b_path, columns):
        async def main() -> None:
            async with bus_for(pair.a_path) as bus:
                down = await wait_event(bus, is_link("c2", False))
                assert isinstance(down, ColumnLink) and down.reason == reason
                if mode == "exception":
                    assert down.detail == "exception code 2"
                counts = {"c1": 0, "c3": 0}
                async with asyncio.timeout(2):
                    while min(counts.values()) < 5:
                        event = await bus.events.get()
                        assert not isinstance(event, ColumnReading) or event.column_id != "c2"
                        if isinstance(event, ColumnReading):
                            counts[event.column_id] += 1
                assert bus.failures()[reason] >= 2
                assert bus.link("c1").online and bus.link("c3").online
                assert bus.stats.internal_errors == 0
                # Writes to the healthy columns still work while c2 babbles.
                results = await bus.set_limits([LimitCommand("c3", 12, 60, failsafe_a=6)])
                assert results[0].ok
        asyncio.run(main())
    assert list(columns[2].holding[0:3]) == [120, 60, 60]
    if mode != "exception":
        assert corrupter.damaged >= 2


def test_on_a_line_damaging_replies_limits_go_answered_until_it_is_quiet() -> None:
    """A broadcast is lost with any one of its bytes and nobody says so: after a damaged reply
    the limits go as answered writes, and broadcasts come back once the line is quiet again."""
    corrupter = Corrupter(2, "crc")
    columns = [FirmwareColumn(1), FirmwareColumn(2), FirmwareColumn(3)]
    with SerialPair(manipulator=corrupter) as pair, RtuColumnBus(pair.b_path, columns):
        async def main() -> None:
            async with bus_for(pair.a_path, broadcast_quiet_s=0.5) as bus:
                await wait_event(bus, is_link("c2", False))     # c2's replies arrive damaged
                results = await bus.set_limits([LimitCommand("c1", 16, 60), LimitCommand("c3", 10, 60)])
                assert [(r.via, r.ok) for r in results] == [("unicast", True), ("unicast", True)]
                assert bus.stats.broadcasts_held == 1 and bus.stats.broadcast_frames == 0
                corrupter.mode = "none"                           # the line is clean again
                await wait_event(bus, is_link("c2", True))
                await asyncio.sleep(0.6)
                results = await bus.set_limits([LimitCommand("c1", 12, 60), LimitCommand("c3", 8, 60)])
                assert [r.via for r in results] == ["broadcast", "broadcast"]
                assert bus.stats.broadcast_frames == 1
        asyncio.run(main())
    assert [list(c.holding[0:2]) for c in (columns[0], columns[2])] == [[120, 60], [80, 60]]


def test_a_missing_serial_device_reports_every_column_offline() -> None:
    async def main() -> None:
        async with bus_for("/dev/does-not-exist-rs485", reconnect_base_s=0.01, reconnect_max_s=0.02) as bus:
            down = await wait_event(bus, is_link("c1", False))
            assert isinstance(down, ColumnLink) and down.reason == "disconnected"
            results = await bus.set_limits([LimitCommand("c1", 10, 60)])
            assert [(r.ok, r.reason) for r in results] == [(False, "disconnected")]

    asyncio.run(main())


# -- bus time --------------------------------------------------------------------------------

def test_on_a_paced_9600_baud_line_polls_fit_the_budget_and_writes_jump_the_queue() -> None:
    """Three columns asking for a poll every 100 ms need ~2.9x the line at 9600 baud: the
    schedule stretches the periods to fit 80 %, and a limit write still goes out at the
    next exchange boundary, not after the queue of due polls."""
    with SerialPair(baud=9600) as pair, RtuColumnBus(pair.b_path, [FirmwareColumn(a) for a in ADDRESSES]):
        async def main() -> None:
            config = RtuBusConfig(pair.a_path, baud=9600, heartbeat_period_s=None,
                                  broadcast_turnaround_s=0.01)
            columns = [RtuColumn("c%d" % a, a, poll_period_s=0.1) for a in ADDRESSES]
            async with ModbusRtuBus(config, columns) as bus:
                assert bus.schedule.demand() == pytest.approx(3 * 0.1015 / 0.1, rel=0.02)
                assert bus.utilisation() == pytest.approx(0.8)
                assert bus.schedule.period_s(("poll", "c1")) == pytest.approx(0.1 * 3.045 / 0.8, rel=0.02)
                await readings_from_all(bus, {"c1", "c2", "c3"}, timeout_s=3)
                await asyncio.sleep(1.0)
                measured = bus.measured_utilisation()
                assert 0.4 < measured < 0.85
                t0 = time.monotonic()
                results = await bus.set_limits([LimitCommand("c2", 13, 60)])
                # At most one exchange in flight (~0.1 s) + the write itself (~0.03 s).
                assert results[0].ok and time.monotonic() - t0 < 0.3
                assert all(bus.link(c).online for c in ("c1", "c2", "c3"))
                assert bus.stats.poll_failures == 0
        asyncio.run(main())


def test_a_slow_consumer_and_a_failing_callback_cost_events_not_the_bus(line: Line) -> None:
    def broken(event: ColumnEvent) -> None:
        raise RuntimeError("consumer bug")

    async def main() -> None:
        async with bus_for(line.pair.a_path, event_queue_size=2) as bus:
            bus.subscribe(broken)
            async with asyncio.timeout(2):
                while bus.stats.polls < 12:
                    await asyncio.sleep(0.02)
            assert bus.events.qsize() == 2                     # the newest two, never more
            assert bus.stats.events_dropped >= 8 and bus.stats.callback_errors >= 12
            assert bus.stats.internal_errors == 0
            assert all(bus.link(c).online for c in ("c1", "c2", "c3"))

    asyncio.run(main())


def test_codes_newer_than_the_gateway_are_named_not_dropped() -> None:
    image = [0] * regmap.INPUT_COUNT
    image[regmap.IR_STATUS], image[regmap.IR_ERROR], image[regmap.IR_LIMIT_SOURCE] = 42, 99, 17
    image[regmap.IR_ERROR_FLAGS] = 0x8001          # a flag bit this gateway has no name for
    r = decode_inputs("c1", image, 0)
    assert (r.status, r.error, r.limit_source) == ("Unknown(42)", "Unknown(99)", "Unknown(17)")
    assert r.flags == ("overdraw",) and r.flags_raw == 0x8001


def test_link_tracker_offline_after_n_failures_online_on_first_success() -> None:
    t = LinkTracker("c1", offline_after=3)
    assert t.ok(100) is not None and t.link.online          # first contact is announced
    assert t.fail("timeout", 200) is None and t.fail("crc", 300) is None
    down = t.fail("timeout", 400)
    assert down is not None and not down.online and down.consecutive_failures == 3 and down.since_ms == 400
    assert t.fail("timeout", 500) is None                    # announced once
    up = t.ok(600)
    assert up is not None and up.online and up.since_ms == 600 and up.last_ok_ms == 600
    assert t.failures_by_reason == {"timeout": 3, "crc": 1}
    never = LinkTracker("c2", offline_after=2)
    assert never.fail("timeout", 10) is None
    first = never.fail("timeout", 20)
    assert first is not None and not first.online and first.last_ok_ms is None
