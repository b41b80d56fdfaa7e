"""The column farm (hil/rig/column_farm.py): many columns of real firmware in one process,
each one an independent column under the gateway's own Modbus adapters: its own limit, its
own failsafe, its own heartbeat supervision, its own TCP port or bus address, and its own
board, with the firmware's timestamp on every pilot change."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware.status import ST_FAULTED
from gateway.south.cbor_columns import CborColumns, CborConfig, CborTcpColumn, ColumnBooted
from gateway.south.modbus_bus import ModbusRtuBus, RtuBusConfig, RtuColumn
from gateway.south.modbus_tcp import ModbusTcpColumns, TcpColumn, TcpConfig
from gateway.south.types import ColumnEvent, ColumnLink, ColumnReading, LimitCommand
from hil.rig.column_farm import ColumnFarm, FarmColumn, tcp_ports
from hil.rig.firmware_proc import INTERPRETERS
from tools.firmware_build import build

pytestmark = pytest.mark.timeout(240)

BASE: dict[str, Any] = {
    "phases": 3, "hardware_rating_a": 32, "installation_rating_a": 32, "failsafe_a": 6,
    "meter": {"type": "sdm630", "address": 1, "baud": 9600}, "heartbeat_timeout_s": 10,
    "min_pause_s": 0, "pwm_min_change_interval_s": 0,
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(out=tmp_path_factory.mktemp("farm-bundle") / "firmware").root


def plug_in(cols: list[FarmColumn]) -> None:
    for col in cols:
        col.meter.set_load([5.0, 5.0, 5.0])
        col.board(cp_mv=9000, diode=1, pp_ohms=220)
    time.sleep(0.3)
    for col in cols:
        col.board(cp_mv=6000)


async def until(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def offered(col: FarmColumn) -> int:
    return int(col.outputs().get("offered_da", -1))


class Seen:
    """The adapter's events: each column's latest reading and link state."""

    def __init__(self) -> None:
        self.readings: dict[str, ColumnReading] = {}
        self.links: dict[str, ColumnLink] = {}

    def __call__(self, event: ColumnEvent) -> None:
        if isinstance(event, ColumnReading):
            self.readings[event.column_id] = event
        else:
            self.links[event.column_id] = event


@pytest.fixture(params=INTERPRETERS)
def tcp_farm(request: pytest.FixtureRequest, tmp_path: Path, bundle: Path) -> Iterator[ColumnFarm]:
    configs = [dict(BASE, column_id=f"tcp-{i}", bus_address=1,
                    link={"mode": "modbus-tcp", "tcp_port": port, "host": "127.0.0.1"})
               for i, port in enumerate(tcp_ports(3))]
    with ColumnFarm(request.param, tmp_path / "farm", configs, bundle=bundle) as farm:
        yield farm


def tcp_adapter(cols: list[FarmColumn], heartbeat_s: float) -> ModbusTcpColumns:
    columns = [TcpColumn(c.config["column_id"], "127.0.0.1", c.config["link"]["tcp_port"], 1,
                         poll_period_s=0.3) for c in cols]
    return ModbusTcpColumns(columns, TcpConfig(heartbeat_period_s=heartbeat_s))


def test_tcp_columns_take_their_own_limits_failsafes_and_heartbeats(tcp_farm: ColumnFarm) -> None:
    c0, c1, c2 = tcp_farm.columns
    plug_in([c0, c1])                       # no car at c2

    async def scenario() -> None:
        seen = Seen()
        gateway = tcp_adapter([c0, c1, c2], heartbeat_s=2.0)
        gateway.subscribe(seen)
        await gateway.start()
        try:
            await until(lambda: len(seen.readings) == 3, 15, "the first poll of every column")
            t_sent = time.monotonic() * 1000
            results = await gateway.set_limits([LimitCommand("tcp-0", 10.0, 120, failsafe_a=7.0),
                                                LimitCommand("tcp-1", 13.0, 120, failsafe_a=8.0),
                                                LimitCommand("tcp-2", 16.0, 120, failsafe_a=9.0)])
            assert all(r.ok for r in results), results
            await until(lambda: offered(c0) == 100 and offered(c1) == 130, 10, "each car's own limit")
            # The firmware's own timestamp of the pilot change, on this machine's clock.
            applied = next(e for e in c0.board_log if e.get("offered_da") == 100)
            assert t_sent - 5 <= applied["t"] <= time.monotonic() * 1000
            await until(lambda: all(c in seen.readings and seen.readings[c].failsafe_a > 6.5
                                    for c in ("tcp-0", "tcp-1", "tcp-2")), 10, "the failsafes in the polls")
            r0, r1, r2 = (seen.readings[c] for c in ("tcp-0", "tcp-1", "tcp-2"))
            assert (r0.offered_a, r1.offered_a, r2.offered_a) == (10.0, 13.0, 0.0)
            assert (r0.failsafe_a, r1.failsafe_a, r2.failsafe_a) == (7.0, 8.0, 9.0)
            assert (r0.status, r1.status, r2.status) == ("Charging", "Charging", "Available")
            assert r0.limit_source == r1.limit_source == "gateway"
        finally:
            await gateway.stop()
        # Now only tcp-0 hears from a gateway: tcp-1's heartbeat supervision runs out on its
        # own and it falls back to ITS failsafe; tcp-0 keeps its assigned limit.
        mark = len(c0.board_log)
        gateway = tcp_adapter([c0], heartbeat_s=2.0)
        await gateway.start()
        try:
            await until(lambda: offered(c1) == 80, 25, "tcp-1 on its failsafe")
            assert offered(c0) == 100
            assert all(e.get("offered_da") == 100 for e in c0.board_log[mark:])
        finally:
            await gateway.stop()

    asyncio.run(scenario())
    assert c2.board_log == [] or all(e.get("offered_da") == 0 for e in c2.board_log)


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_rtu_columns_share_one_bus_by_their_addresses(interp: str, tmp_path: Path, bundle: Path) -> None:
    configs = [dict(BASE, column_id=f"rtu-{a}", bus_address=a, link={"mode": "modbus-rtu", "baud": 115200})
               for a in (1, 2, 3)]
    with ColumnFarm(interp, tmp_path / "farm", configs, bundle=bundle) as farm:
        cols = farm.columns
        assert farm.bus_path is not None and all(c.link_path == farm.bus_path for c in cols)
        plug_in(cols)

        async def scenario() -> None:
            seen = Seen()
            bus = ModbusRtuBus(RtuBusConfig(farm.bus_path or "", baud=115200, heartbeat_period_s=2.0),
                               [RtuColumn(f"rtu-{a}", a, poll_period_s=0.3) for a in (1, 2, 3)])
            bus.subscribe(seen)
            await bus.start()
            try:
                await until(lambda: len(seen.readings) == 3, 15, "the first poll of every address")
                limits = {"rtu-1": 10.0, "rtu-2": 13.0, "rtu-3": 16.0}
                await bus.set_limits([LimitCommand(c, a, 120) for c, a in limits.items()])
                await until(lambda: [offered(c) for c in cols] == [100, 130, 160], 10,
                            "each column's own limit")
                await until(lambda: all(seen.readings.get(c) is not None and seen.readings[c].offered_a == a
                                        for c, a in limits.items()), 10, "the polls of every address")
                # One column stops: the others stay on the bus and keep their limits.
                cols[1].close()
                await until(lambda: seen.links.get("rtu-2") is not None and not seen.links["rtu-2"].online,
                            15, "rtu-2 offline")
                polled = {c: seen.readings[c].ts_ms for c in ("rtu-1", "rtu-3")}
                await until(lambda: all(seen.readings[c].ts_ms > t for c, t in polled.items()), 5,
                            "rtu-1 and rtu-3 still answering")
                assert all(seen.links.get(c) is None or seen.links[c].online for c in ("rtu-1", "rtu-3"))
                assert [offered(cols[0]), offered(cols[2])] == [100, 160]
            finally:
                await bus.stop()

        asyncio.run(scenario())


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_boards_are_independent(interp: str, tmp_path: Path, bundle: Path) -> None:
    """One column's car, RCD and contactor never show on another's board."""
    configs = [dict(BASE, column_id=f"b-{i}", bus_address=1,
                    link={"mode": "modbus-tcp", "tcp_port": port, "host": "127.0.0.1"})
               for i, port in enumerate(tcp_ports(2))]
    with ColumnFarm(interp, tmp_path / "farm", configs, bundle=bundle) as farm:
        a, b = farm.columns
        plug_in([a])
        deadline = time.monotonic() + 10
        while not (a.outputs().get("contactor") == 1 and offered(a) == 60):
            assert time.monotonic() < deadline, a.board_log
            time.sleep(0.05)
        a.board(rcd=1)                     # a trips; b never had a car
        deadline = time.monotonic() + 10
        while a.outputs().get("contactor") != 0:
            assert time.monotonic() < deadline, a.board_log
            time.sleep(0.05)
        assert a.outputs()["status"] == ST_FAULTED
        assert b.board_log and all(e.get("contactor") == 0 and e.get("status") != ST_FAULTED
                                   for e in b.board_log)


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_cbor_tcp_columns_boot_and_take_their_own_limits(interp: str, tmp_path: Path, bundle: Path) -> None:
    ports = tcp_ports(2)
    configs = [dict(BASE, column_id=f"cb-{i}", bus_address=i + 1,
                    link={"mode": "cbor-tcp", "tcp_port": port, "host": "127.0.0.1"})
               for i, port in enumerate(ports)]
    with ColumnFarm(interp, tmp_path / "farm", configs, bundle=bundle) as farm:
        cols = farm.columns
        plug_in(cols)

        async def scenario() -> None:
            booted: set[str] = set()
            gateway = CborColumns([CborTcpColumn(f"cb-{i}", "127.0.0.1", p) for i, p in enumerate(ports)],
                                  CborConfig(heartbeat_interval_s=2))
            gateway.subscribe(lambda e: booted.add(e.column_id) if isinstance(e, ColumnBooted) else None)
            await gateway.start()
            try:
                await until(lambda: booted == {"cb-0", "cb-1"}, 20, "a BootNotification from each column")
                results = await gateway.set_limits([LimitCommand("cb-0", 10.0, 120),
                                                    LimitCommand("cb-1", 13.0, 120)])
                assert [r.limit_da for r in results if r.ok] == [100, 130], results
                await until(lambda: [offered(c) for c in cols] == [100, 130], 10, "each column's own limit")
            finally:
                await gateway.stop()

        asyncio.run(scenario())
