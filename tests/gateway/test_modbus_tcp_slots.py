"""The Modbus TCP adapter's poll slots: the polls of the columns that share a slot are sent by one
driver and their replies handled as they come in. Against a scripted server that can hold or
drop a chosen request's reply: replies out of order, a reply after the deadline, a failed poll
retried, a limit write queued while a poll is in flight, a heartbeat retried."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from firmware import regmap
from gateway.south.modbus_tcp import ModbusTcpColumns, TcpColumn, TcpConfig
from gateway.south.modbus_tcp_client import FC_READ_INPUT, FC_WRITE_MULTIPLE, FC_WRITE_SINGLE
from gateway.south.types import ColumnEvent, ColumnLink, ColumnReading, LimitCommand

# Every column in one slot (the slot is the whole period), no heartbeats unless a test asks.
ONE_SLOT = TcpConfig(offline_after=3, offline_poll_period_s=0.5, heartbeat_period_s=None,
                     connect_timeout_s=0.5, reconnect_base_s=0.02, reconnect_max_s=0.1, poll_slot_s=0.5)
LATE_MARK = 0xDEAD   # offered current of a reply sent after its deadline: must never show in a reading


@dataclass
class Request:
    unit: int
    fc: int
    n: int           # the unit's n-th request (1 = first)
    at: float        # when it came in (loop time)
    value: int       # the second word of the request (FC04: count, FC06: value, FC16: count)


@dataclass
class Columns:
    """A Modbus TCP server for many units (a connection each): FC04 answered with an image whose
    offered current is the unit (deci-amps), FC06/FC16 with their echo. `hold[(unit, n)]` delays
    the reply to that request by seconds (with `late` set, the held reply carries LATE_MARK);
    `drop` holds requests never answered (and `drop_fc` drops the first request of that
    function). Every request and every reply sent is logged."""

    hold: dict[tuple[int, int], float] = field(default_factory=dict)
    drop: set[tuple[int, int]] = field(default_factory=set)
    late: bool = False
    drop_fc: int | None = None   # the first request with this function code is never answered
    requests: list[Request] = field(default_factory=list)
    replies: list[tuple[int, int, int, float]] = field(default_factory=list)   # unit, fc, n, at
    received: asyncio.Event = field(default_factory=asyncio.Event)   # a held request came in
    _counts: dict[int, int] = field(default_factory=dict)
    _held: set[asyncio.Task[None]] = field(default_factory=set)

    def of(self, unit: int, fc: int) -> list[Request]:
        return [r for r in self.requests if r.unit == unit and r.fc == fc]

    def answer(self, frame: bytes, offered: int) -> bytes:
        unit, fc = frame[6], frame[7]
        if fc == FC_READ_INPUT:
            image = [0] * regmap.POLL_COUNT
            image[regmap.IR_OFFERED_CURRENT] = offered
            pdu = bytes((fc, 2 * len(image))) + b"".join(v.to_bytes(2, "big") for v in image)
        else:
            pdu = frame[7:12]   # FC06 echoes address and value, FC16 start and count
        return frame[0:4] + (len(pdu) + 1).to_bytes(2, "big") + bytes((unit,)) + pdu

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                head = await reader.readexactly(6)
                frame = head + await reader.readexactly(int.from_bytes(head[4:6], "big"))
                unit, fc = frame[6], frame[7]
                n = self._counts[unit] = self._counts.get(unit, 0) + 1
                self.requests.append(Request(unit, fc, n, loop.time(), int.from_bytes(frame[10:12], "big")))
                if fc == self.drop_fc:
                    self.drop_fc = None
                    self.drop.add((unit, n))
                if (unit, n) in self.drop:
                    self.received.set()
                    continue
                delay = self.hold.get((unit, n))
                if delay is None:
                    self._reply(writer, frame, unit)
                else:
                    self.received.set()
                    task = asyncio.create_task(self._later(writer, frame, unit, delay))
                    self._held.add(task)
                    task.add_done_callback(self._held.discard)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    def _reply(self, writer: asyncio.StreamWriter, frame: bytes, offered: int) -> None:
        if writer.is_closing():
            return
        writer.write(self.answer(frame, offered))
        self.replies.append((frame[6], frame[7], self._counts[frame[6]], asyncio.get_running_loop().time()))

    async def _later(self, writer: asyncio.StreamWriter, frame: bytes, unit: int, delay: float) -> None:
        await asyncio.sleep(delay)
        self._reply(writer, frame, LATE_MARK if self.late else unit)


async def serving(columns: Columns) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(columns.serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def tcp_columns(port: int, units: Iterator[int] | list[int], config: TcpConfig = ONE_SLOT, *,
                period_s: float = 0.5, timeout_s: float = 0.1, retries: int = 0) -> ModbusTcpColumns:
    return ModbusTcpColumns([TcpColumn("u%d" % u, "127.0.0.1", port, unit=u, poll_period_s=period_s,
                                       timeout_s=timeout_s, retries=retries) for u in units], config)


async def readings(tcp: ModbusTcpColumns, count: int, timeout_s: float = 5.0) -> list[ColumnEvent]:
    """The next events until `count` readings have come (links included)."""
    out: list[ColumnEvent] = []
    async with asyncio.timeout(timeout_s):
        while sum(isinstance(e, ColumnReading) for e in out) < count:
            out.append(await tcp.events.get())
    return out


async def stop_server(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()


def test_replies_of_one_slot_out_of_order_each_reach_their_own_column() -> None:
    """Six columns polled in one slot; the server answers their second polls in reverse order
    (the first unit's last): every reading carries its own column's image."""
    units = list(range(1, 7))
    columns = Columns(hold={(u, 2): 0.01 * (8 - u) for u in units})

    async def main() -> None:
        server, port = await serving(columns)
        async with tcp_columns(port, units, timeout_s=0.3) as tcp:
            events = await readings(tcp, 3 * len(units))
            got = [e for e in events if isinstance(e, ColumnReading)]
            assert all(e.offered_a == int(e.column_id[1:]) / 10 for e in got), got
            assert {e.column_id for e in got} == {"u%d" % u for u in units}
            assert tcp.stats.poll_failures == 0 and tcp.stats.internal_errors == 0
        await stop_server(server)

    asyncio.run(main())
    second = [r for r in columns.replies if r[2] == 2]
    assert [r[0] for r in second] == units[::-1]          # answered in reverse order
    asked = [r.at for r in columns.requests if r.n == 2]
    assert max(asked) - min(asked) < 0.1                  # asked together: one slot


def test_a_reply_after_the_deadline_is_a_timeout_and_its_bytes_are_ignored() -> None:
    """The third poll of unit 1 is answered 0.3 s late (timeout 0.1 s, no retries): a timeout,
    counted once; the late reply (another image) never becomes a reading; the column stays
    online and its next polls read normally on the same connection."""
    columns = Columns(hold={(1, 3): 0.3}, late=True)

    async def main() -> None:
        server, port = await serving(columns)
        async with tcp_columns(port, [1, 2]) as tcp:
            events = await readings(tcp, 12)
            got = [e for e in events if isinstance(e, ColumnReading)]
            assert all(e.offered_a != LATE_MARK / 10 for e in got)
            assert not any(isinstance(e, ColumnLink) and not e.online for e in events)
            assert tcp.column_failures("u1") == {"timeout": 1} and tcp.column_failures("u2") == {}
            assert tcp.stats.poll_failures == 1 and tcp.stats.retries == 0
            assert tcp.link("u1").online and tcp.connects("u1") == 1
            assert sum(e.column_id == "u1" for e in got) >= 4   # polled on after the timeout
        await stop_server(server)

    asyncio.run(main())
    late = [r for r in columns.replies if r[0] == 1 and r[2] == 3]
    assert late, "the late reply was sent"
    after = [r for r in columns.requests if r.unit == 1 and r.at > late[0][3]]
    assert after, "polled again after the late bytes came in"


def test_a_poll_that_fails_is_retried_at_once_and_the_column_stays_online() -> None:
    """Unit 1's third request is never answered; with retries=1 it is asked again right after the
    deadline (not a period later) and the poll succeeds: no failure counted, one retry."""
    columns = Columns(drop={(1, 3)})

    async def main() -> None:
        server, port = await serving(columns)
        async with tcp_columns(port, [1, 2], period_s=1.0, retries=1) as tcp:
            events = await readings(tcp, 8, timeout_s=8.0)
            assert not any(isinstance(e, ColumnLink) and not e.online for e in events)
            assert tcp.stats.retries == 1 and tcp.stats.poll_failures == 0
            assert tcp.column_failures("u1") == {}   # a poll that succeeded on its retry did not fail
            assert tcp.link("u1").online and tcp.connects("u1") == 1
        await stop_server(server)

    asyncio.run(main())
    polls = columns.of(1, FC_READ_INPUT)
    assert len(polls) >= 4
    dropped, retry = polls[2], polls[3]
    assert 0.05 < retry.at - dropped.at < 0.9, retry.at - dropped.at   # the deadline (0.1 s), not 1 s


def test_a_failed_poll_without_retries_counts_and_three_take_the_column_offline() -> None:
    """Unit 1 stops answering after its first two polls (retries=0): each missed poll is one
    failure; the third in a row takes it offline (timeout) and the connection is redialled."""
    columns = Columns(drop={(1, n) for n in range(3, 50)})

    async def main() -> None:
        server, port = await serving(columns)
        config = TcpConfig(offline_after=3, offline_poll_period_s=0.2, heartbeat_period_s=None,
                           connect_timeout_s=0.5, reconnect_base_s=0.02, reconnect_max_s=0.1, poll_slot_s=0.2)
        async with tcp_columns(port, [1, 2], config, period_s=0.2) as tcp:
            async with asyncio.timeout(5):
                while True:
                    event = await tcp.events.get()
                    if isinstance(event, ColumnLink) and event.column_id == "u1" and not event.online:
                        break
            assert event.reason == "timeout" and event.consecutive_failures == 3
            assert tcp.column_failures("u1") == {"timeout": 3}
            assert tcp.stats.poll_failures == 3
            async with asyncio.timeout(5):
                while tcp.connects("u1") < 2:
                    await asyncio.sleep(0.02)
            assert tcp.link("u2").online
        await stop_server(server)

    asyncio.run(main())


def test_a_limit_write_queued_while_a_slot_poll_is_in_flight_follows_its_reply() -> None:
    """set_limits while unit 1's third poll is held 0.2 s by the server: the write is not sent
    on the connection until that poll's reply is in (one request at a time), then at once, not
    at the next slot; the poll and the write both succeed."""
    columns = Columns(hold={(1, 3): 0.2})

    async def main() -> None:
        server, port = await serving(columns)
        async with tcp_columns(port, [1, 2], period_s=1.0, timeout_s=1.0) as tcp:
            async with asyncio.timeout(5):
                await columns.received.wait()
            t0 = time.monotonic()
            results = await tcp.set_limits([LimitCommand("u1", 12, 60), LimitCommand("u2", 13, 60)])
            took = time.monotonic() - t0
            assert [(r.column_id, r.ok, r.reason) for r in results] == [("u1", True, "ok"),
                                                                        ("u2", True, "ok")]
            assert 0.1 < took < 0.9, took   # behind the held poll, not behind the next slot (1 s)
            assert tcp.stats.poll_failures == 0 and tcp.column_failures("u1") == {}
            events = await readings(tcp, 1)
            assert events
        await stop_server(server)

    asyncio.run(main())
    held = next(r for r in columns.replies if r[0] == 1 and r[2] == 3)
    write = columns.of(1, FC_WRITE_MULTIPLE)
    assert len(write) == 1 and write[0].n == 4 and write[0].at >= held[3]
    assert columns.of(2, FC_WRITE_MULTIPLE)[0].at < held[3]   # the other column's write did not wait


def test_a_lost_heartbeat_is_retried_and_polls_go_on() -> None:
    """Heartbeats go out in the slots too: the first one is never answered; with retries=1 it is
    sent again right after its deadline with the same sequence number, and the column stays online."""
    columns = Columns(drop_fc=FC_WRITE_SINGLE)

    async def main() -> None:
        server, port = await serving(columns)
        config = replace(ONE_SLOT, heartbeat_period_s=0.4, poll_slot_s=0.1)
        async with tcp_columns(port, [1], config, period_s=0.4, retries=1) as tcp:
            async with asyncio.timeout(5):
                while len(columns.of(1, FC_WRITE_SINGLE)) < 3:
                    await asyncio.sleep(0.02)
            events = await readings(tcp, 2)
            assert not any(isinstance(e, ColumnLink) and not e.online for e in events)
            assert tcp.stats.retries == 1 and tcp.stats.heartbeats >= 2 and tcp.stats.poll_failures == 0
            assert tcp.link("u1").online and tcp.column_failures("u1") == {}
        await stop_server(server)

    asyncio.run(main())
    first, retry, nxt = columns.of(1, FC_WRITE_SINGLE)[:3]
    assert (first.value, retry.value, nxt.value) == (1, 1, 2)
    assert 0.05 < retry.at - first.at < 0.35   # its deadline (0.1 s), not the next period (0.4 s)
