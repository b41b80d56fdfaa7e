"""The Modbus TCP adapter against the firmware's own TCP slave: two columns, each on its
own loopback port, polled, written to, dropped off the network and reconnected."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import replace

import pytest
from south_columns import FirmwareColumn, TcpColumnServer

from firmware import regmap
from gateway.south.modbus_tcp import ModbusTcpColumns, TcpColumn, TcpConfig
from gateway.south.modbus_tcp_client import TcpRequester
from gateway.south.types import ColumnEvent, ColumnLink, ColumnReading, LimitCommand
from hil.rig.ports import free_port

FAST = TcpConfig(offline_after=2, offline_poll_period_s=0.1, heartbeat_period_s=None, connect_timeout_s=0.5,
                 reconnect_base_s=0.02, reconnect_max_s=0.1)


@pytest.fixture
def servers() -> Iterator[list[TcpColumnServer]]:
    started = [TcpColumnServer(FirmwareColumn(address), free_port()) for address in (1, 2)]
    for s in started:
        s.start()
    try:
        yield started
    finally:
        for s in started:
            s.stop()


def adapter(servers: list[TcpColumnServer], config: TcpConfig = FAST) -> ModbusTcpColumns:
    return ModbusTcpColumns([TcpColumn("t%d" % s.column.address, "127.0.0.1", s.port, unit=s.column.address,
                                       poll_period_s=0.05, timeout_s=0.2) for s in servers], config)


async def wait_event(tcp: ModbusTcpColumns, pred: Callable[[ColumnEvent], bool],
                     timeout_s: float = 3.0) -> ColumnEvent:
    async with asyncio.timeout(timeout_s):
        while True:
            event = await tcp.events.get()
            if pred(event):
                return event


def reading_of(cid: str) -> Callable[[ColumnEvent], bool]:
    return lambda e: isinstance(e, ColumnReading) and e.column_id == cid


def link_of(cid: str, online: bool) -> Callable[[ColumnEvent], bool]:
    return lambda e: isinstance(e, ColumnLink) and e.column_id == cid and e.online is online


def test_polls_each_column_on_its_own_connection(servers: list[TcpColumnServer]) -> None:
    servers[1].column.inputs[regmap.IR_OFFERED_CURRENT] = 100

    async def main() -> None:
        async with adapter(servers) as tcp:
            r1 = await wait_event(tcp, reading_of("t1"))
            r2 = await wait_event(tcp, reading_of("t2"))
            assert isinstance(r1, ColumnReading) and isinstance(r2, ColumnReading)
            assert (r1.status, r1.offered_a, r1.current_a) == ("Charging", 16.0, (15.8, 15.7, 15.6))
            assert r2.offered_a == 10.0
            assert tcp.link("t1").online and tcp.link("t2").online
            assert tcp.connects("t1") == 1 and tcp.connects("t2") == 1

    asyncio.run(main())
    assert servers[0].column.slave.requests >= 1 and servers[1].column.slave.requests >= 1


def test_limits_are_written_at_once_to_every_column(servers: list[TcpColumnServer]) -> None:
    async def main() -> None:
        config = TcpConfig(heartbeat_period_s=None, connect_timeout_s=0.5)
        columns = [TcpColumn("t%d" % s.column.address, "127.0.0.1", s.port, unit=s.column.address,
                             poll_period_s=10.0) for s in servers]
        tcp = ModbusTcpColumns(columns, config)
        async with tcp:
            await wait_event(tcp, reading_of("t2"))
            t0 = time.monotonic()
            results = await tcp.set_limits([LimitCommand("t1", 20, 300, failsafe_a=8),
                                            LimitCommand("t2", 7.5, 300), LimitCommand("t3", 10, 300)])
            assert time.monotonic() - t0 < 0.5
            assert [(r.column_id, r.ok, r.via, r.reason) for r in results] == [
                ("t1", True, "unicast", "ok"), ("t2", True, "unicast", "ok"),
                ("t3", False, "none", "unknown_column")]
            assert list(servers[0].column.holding[0:3]) == [200, 300, 80]
            assert list(servers[1].column.holding[0:3]) == [75, 300, 0]

    asyncio.run(main())


def test_heartbeats_are_written(servers: list[TcpColumnServer]) -> None:
    async def main() -> None:
        config = TcpConfig(heartbeat_period_s=0.05, connect_timeout_s=0.5)
        async with adapter(servers, config):
            async with asyncio.timeout(2):
                while not all(s.column.holding[regmap.HR_HEARTBEAT] >= 2 for s in servers):
                    await asyncio.sleep(0.02)

    asyncio.run(main())


def test_a_column_that_drops_off_goes_offline_and_reconnects(servers: list[TcpColumnServer]) -> None:
    async def main() -> None:
        async with adapter(servers) as tcp:
            await wait_event(tcp, reading_of("t1"))
            await wait_event(tcp, reading_of("t2"))
            servers[0].stop()
            down = await wait_event(tcp, link_of("t1", False))
            assert isinstance(down, ColumnLink) and down.reason == "disconnected"
            results = await tcp.set_limits([LimitCommand("t1", 10, 60), LimitCommand("t2", 11, 60)])
            assert [(r.ok, r.reason) for r in results] == [(False, "disconnected"), (True, "ok")]
            await wait_event(tcp, reading_of("t2"))          # the other column carries on
            assert tcp.link("t2").online
            servers[0].start()                                # same port, back on the network
            up = await wait_event(tcp, link_of("t1", True))
            assert isinstance(up, ColumnLink) and up.reason == "ok"
            await wait_event(tcp, reading_of("t1"))
            assert tcp.connects("t1") == 2 and tcp.connects("t2") == 1
            assert tcp.stats.internal_errors == 0

    asyncio.run(main())
    assert list(servers[1].column.holding[0:2]) == [110, 60]


def test_a_column_not_there_at_start_is_offline_until_it_appears() -> None:
    server = TcpColumnServer(FirmwareColumn(5), free_port())

    async def main() -> None:
        async with adapter([server]) as tcp:
            down = await wait_event(tcp, link_of("t5", False))
            assert isinstance(down, ColumnLink) and down.reason == "disconnected" and down.last_ok_ms is None
            server.start()
            await wait_event(tcp, link_of("t5", True))
            await wait_event(tcp, reading_of("t5"))

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_a_column_answering_exceptions_is_counted_and_offline() -> None:
    # An older map without the full input range: every poll gets exception 02.
    servers = [TcpColumnServer(FirmwareColumn(1, input_count=20), free_port()),
               TcpColumnServer(FirmwareColumn(2), free_port())]
    for s in servers:
        s.start()

    async def main() -> None:
        async with adapter(servers) as tcp:
            down = await wait_event(tcp, link_of("t1", False))
            assert isinstance(down, ColumnLink)
            assert (down.reason, down.detail) == ("exception", "exception code 2")
            await wait_event(tcp, reading_of("t2"))
            assert tcp.column_failures("t1")["exception"] >= 2
            assert tcp.link("t2").online

    try:
        asyncio.run(main())
    finally:
        for s in servers:
            s.stop()


def test_a_connection_that_goes_quiet_is_dropped_and_redialled() -> None:
    """A listener that accepts (the kernel does, from its backlog) but never answers: the
    polls time out, the column goes offline and the adapter dials a fresh connection."""
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as quiet:
        quiet.bind(("127.0.0.1", port))
        quiet.listen(8)

        async def main() -> None:
            tcp = ModbusTcpColumns([TcpColumn("q", "127.0.0.1", port, poll_period_s=0.05, timeout_s=0.05,
                                              retries=0)], FAST)
            async with tcp:
                down = await wait_event(tcp, link_of("q", False))
                assert isinstance(down, ColumnLink) and down.reason == "timeout"
                async with asyncio.timeout(2):
                    while tcp.connects("q") < 2:
                        await asyncio.sleep(0.02)
                assert tcp.column_failures("q")["timeout"] >= 2

        asyncio.run(main())


def image_server(arrivals: dict[int, list[float]]) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                                 Awaitable[None]]:
    """A Modbus TCP server answering every FC04 poll, any unit, with an all-zero image; it
    records when each unit's polls arrive."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                frame = await reader.readexactly(12)
                unit = frame[6]
                arrivals.setdefault(unit, []).append(time.monotonic())
                pdu = bytes((4, 2 * regmap.POLL_COUNT)) + bytes(2 * regmap.POLL_COUNT)
                writer.write(frame[0:4] + (len(pdu) + 1).to_bytes(2, "big") + bytes((unit,)) + pdu)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
    return serve


def test_a_lost_poll_reply_is_retried_and_the_column_stays_online() -> None:
    """A column that ignores every second request: each poll whose first request goes unanswered
    is asked again at once (retries=1), so the column keeps reporting and never goes offline."""
    async def every_other(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            for n in itertools.count():
                frame = await reader.readexactly(12)
                if n % 2:
                    continue
                pdu = bytes((4, 2 * regmap.POLL_COUNT)) + bytes(2 * regmap.POLL_COUNT)
                writer.write(frame[0:4] + (len(pdu) + 1).to_bytes(2, "big") + frame[6:7] + pdu)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(every_other, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tcp = ModbusTcpColumns([TcpColumn("r", "127.0.0.1", port, poll_period_s=0.05, timeout_s=0.05,
                                          retries=1)], FAST)
        readings = 0
        async with tcp:
            async with asyncio.timeout(5):
                while readings < 6:
                    event = await tcp.events.get()
                    assert not (isinstance(event, ColumnLink) and not event.online), event
                    readings += isinstance(event, ColumnReading)
            assert tcp.stats.retries >= 4 and tcp.stats.poll_failures == 0
            assert tcp.link("r").online and tcp.connects("r") == 1
        server.close()
        await server.wait_closed()

    asyncio.run(main())


def test_the_columns_polls_are_spread_over_the_period() -> None:
    """Ten columns polled every 0.5 s: after the first poll at connect, each column keeps its own
    slot in the period, so the requests arrive evenly, not in a burst of ten every period."""
    period, n = 0.5, 10
    arrivals: dict[int, list[float]] = {}

    async def main() -> None:
        server = await asyncio.start_server(image_server(arrivals), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        columns = [TcpColumn("s%d" % u, "127.0.0.1", port, unit=u, poll_period_s=period)
                   for u in range(1, n + 1)]
        async with ModbusTcpColumns(columns, FAST):
            await asyncio.sleep(4 * period)
        await asyncio.sleep(0.1)   # the server's handlers see the connections end
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    assert sorted(arrivals) == list(range(1, n + 1))
    # Each column's polls after the first, as phases in the period (t0: the earliest of them).
    later = [t for times in arrivals.values() for t in times[1:]]
    assert len(later) >= 2 * n
    t0 = min(later)
    phases = sorted({round(((t - t0) % period) / period, 2) for t in later})
    gaps = [b - a for a, b in itertools.pairwise(phases)] + [1 + phases[0] - phases[-1]]
    assert max(gaps) < 0.4, phases   # in step, they would leave one gap of almost the whole period


def test_a_large_site_dials_its_columns_a_few_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every column of a site dials at start; thousands of connects at once all miss their
    timeout, so at most `max_connecting` attempts are under way at a time."""
    active, peak = 0, 0
    real_connect = TcpRequester.connect

    async def counted(self: TcpRequester) -> bool:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await asyncio.sleep(0.02)
            return await real_connect(self)
        finally:
            active -= 1

    monkeypatch.setattr(TcpRequester, "connect", counted)
    arrivals: dict[int, list[float]] = {}

    async def main() -> None:
        server = await asyncio.start_server(image_server(arrivals), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        columns = [TcpColumn("d%d" % u, "127.0.0.1", port, unit=u, poll_period_s=0.2) for u in range(1, 9)]
        async with ModbusTcpColumns(columns, replace(FAST, max_connecting=3)) as tcp:
            async with asyncio.timeout(5):
                while not all(tcp.link(c.column_id).online for c in columns):
                    await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    assert peak == 3 and sorted(arrivals) == list(range(1, 9))
