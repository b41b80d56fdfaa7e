"""The lean Modbus TCP client against a scripted server: the exact frames it sends, and how
each kind of bad reply is classified (the same failure classes the RTU bus master counts)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from firmware import regmap
from gateway.south.modbus_bus import ExchangeError
from gateway.south.modbus_tcp_client import TcpRequester

# What the server does with one request frame: the bytes to send back (b"" = say nothing), or
# None to close the connection.
Script = Callable[[bytes], bytes | None]


def reply(request: bytes, pdu: bytes, *, tid: bytes | None = None, unit: int | None = None) -> bytes:
    """A reply frame to `request` carrying `pdu` (same transaction id and unit unless told)."""
    t = request[0:2] if tid is None else tid
    u = request[6] if unit is None else unit
    return t + b"\x00\x00" + (len(pdu) + 1).to_bytes(2, "big") + bytes((u,)) + pdu


def registers(values: list[int]) -> bytes:
    return b"".join(v.to_bytes(2, "big") for v in values)


async def with_server(script: Script, body: Callable[[TcpRequester, list[bytes]], Awaitable[None]]) -> None:
    """Serve `script` on a loopback port, connect a TcpRequester, run `body`; `seen` collects the
    request frames as they arrive."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(6)
                frame = head + await reader.readexactly(int.from_bytes(head[4:6], "big"))
                seen.append(frame)
                out = script(frame)
                if out is None:
                    break
                writer.write(out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    requester = TcpRequester("127.0.0.1", port)
    try:
        assert await requester.connect() and requester.connected
        await body(requester, seen)
    finally:
        requester.close()
        server.close()
        await server.wait_closed()


def run(script: Script, body: Callable[[TcpRequester, list[bytes]], Awaitable[None]]) -> None:
    asyncio.run(with_server(script, body))


async def failure(call: Awaitable[object]) -> tuple[str, str]:
    with pytest.raises(ExchangeError) as info:
        await call
    return info.value.reason, info.value.detail


def test_a_poll_is_one_fc04_frame_and_its_reply_the_registers() -> None:
    image = list(range(100, 100 + regmap.POLL_COUNT))

    async def body(r: TcpRequester, seen: list[bytes]) -> None:
        assert await r.read_input(7, 0, regmap.POLL_COUNT, 1.0) == tuple(image)
        assert await r.read_input(7, 0, regmap.POLL_COUNT, 1.0) == tuple(image)
        # MBAP: transaction id (counts up), protocol 0, length 6, unit; PDU: FC04, start 0, count.
        assert seen == [bytes.fromhex("0001 0000 0006 07 04 0000 0020"),
                        bytes.fromhex("0002 0000 0006 07 04 0000 0020")]
        assert r.exchanges == 2 and r.failures == {}

    run(lambda req: reply(req, bytes((4, 2 * len(image))) + registers(image)), body)


def test_writes_are_fc06_and_fc16_frames_confirmed_by_their_echo() -> None:
    async def body(r: TcpRequester, seen: list[bytes]) -> None:
        await r.write_single(3, regmap.HR_HEARTBEAT, 0x1234, 1.0)
        await r.write_multiple(3, regmap.HR_ASSIGNED_LIMIT, [160, 300, 60], 1.0)
        assert seen == [bytes.fromhex("0001 0000 0006 03 06 0003 1234"),
                        bytes.fromhex("0002 0000 000d 03 10 0000 0003 06 00a0 012c 003c")]

    run(lambda req: reply(req, req[7:12]), body)   # the echo: fc and the first four bytes


def test_an_echo_that_does_not_match_is_wrong_length() -> None:
    async def body(r: TcpRequester, _seen: list[bytes]) -> None:
        assert (await failure(r.write_multiple(1, 0, [100, 60], 1.0)))[0] == "wrong_length"
        assert (await failure(r.write_single(1, 3, 9, 1.0)))[0] == "wrong_length"
        assert r.failures == {"wrong_length": 2}

    run(lambda req: reply(req, bytes((req[7],)) + b"\x00\x05\x00\x09"), body)   # address 5, not 0/3


def test_a_single_write_echoed_with_another_value_is_not_confirmed() -> None:
    """FC06 echoes address and value: the right address with another value is a column that did
    not take the value written (or a reply to another request), not a confirmation."""
    async def body(r: TcpRequester, _seen: list[bytes]) -> None:
        assert await failure(r.write_single(1, 3, 9, 1.0)) == ("wrong_length", "echo 0003000a")

    run(lambda req: reply(req, b"\x06\x00\x03\x00\x0a"), body)   # address 3 as asked, value 10 not 9


def test_a_reply_with_too_few_registers_is_wrong_length() -> None:
    async def body(r: TcpRequester, _seen: list[bytes]) -> None:
        reason, detail = await failure(r.read_input(1, 0, regmap.POLL_COUNT, 1.0))
        assert (reason, detail) == ("wrong_length", "40 bytes for 32 registers")

    run(lambda req: reply(req, b"\x04\x28" + bytes(40)), body)


def test_an_exception_reply_is_counted_with_its_code() -> None:
    async def body(r: TcpRequester, _seen: list[bytes]) -> None:
        assert await failure(r.read_input(1, 0, regmap.POLL_COUNT, 1.0)) == ("exception", "exception code 2")
        assert r.failures == {"exception": 1}

    run(lambda req: reply(req, b"\x84\x02"), body)


def test_silence_is_a_timeout_and_half_a_frame_is_garbled() -> None:
    answers = iter([b"", b"\x00\x02\x00\x00\x00\x43\x01\x04"])   # nothing; then a header and a bit

    async def body(r: TcpRequester, _seen: list[bytes]) -> None:
        assert (await failure(r.read_input(1, 0, regmap.POLL_COUNT, 0.1)))[0] == "timeout"
        assert (await failure(r.read_input(1, 0, regmap.POLL_COUNT, 0.1)))[0] == "garbled"
        assert r.failures == {"timeout": 1, "garbled": 1}

    run(lambda _req: next(answers), body)


def _first_answered_late(image: list[int]) -> Callable[[bytes], bytes]:
    """A column that answers its first request only together with its second."""
    held: list[bytes] = []

    def script(req: bytes) -> bytes:
        if not held:
            held.append(req)
            return b""
        late = reply(held[0], b"\x04\x40" + registers([0xDEAD] * 32))
        return late + reply(req, b"\x04\x40" + registers(image))
    return script


def test_a_late_reply_is_ignored_and_the_next_request_gets_its_own() -> None:
    image = list(range(regmap.POLL_COUNT))
    script = _first_answered_late(image)

    async def body(r: TcpRequester, _seen: list[bytes]) -> None:
        assert (await failure(r.read_input(1, 0, regmap.POLL_COUNT, 0.1)))[0] == "timeout"
        assert await r.read_input(1, 0, regmap.POLL_COUNT, 1.0) == tuple(image)

    run(script, body)


def test_a_reply_from_another_unit_is_garbled() -> None:
    async def body(r: TcpRequester, _seen: list[bytes]) -> None:
        assert await failure(r.read_input(1, 0, 2, 1.0)) == ("garbled", "reply from unit 9")

    run(lambda req: reply(req, b"\x04\x04\x00\x01\x00\x02", unit=9), body)


def test_an_invalid_header_is_garbled_and_drops_the_connection() -> None:
    async def body(r: TcpRequester, _seen: list[bytes]) -> None:
        assert await failure(r.read_input(1, 0, 2, 1.0)) == ("garbled", "invalid MBAP header")
        await asyncio.sleep(0.05)
        assert not r.connected
        assert (await failure(r.read_input(1, 0, 2, 1.0)))[0] == "disconnected"

    run(lambda req: req[0:2] + b"\x00\x07" + req[4:], body)   # protocol id 7


def test_a_server_that_hangs_up_leaves_it_disconnected() -> None:
    async def body(r: TcpRequester, _seen: list[bytes]) -> None:
        assert (await failure(r.read_input(1, 0, 2, 1.0)))[0] == "disconnected"
        assert not r.connected

    run(lambda _req: None, body)


def test_nothing_listening_is_no_connection() -> None:
    async def main() -> None:
        server = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        requester = TcpRequester("127.0.0.1", port)
        assert not await requester.connect() and not requester.connected
        assert (await failure(requester.read_input(1, 0, 2, 1.0)))[0] == "disconnected"

    asyncio.run(main())


# -- requests sent with a callback (the adapter's poll slots) --------------------------------

Outcome = tuple[object, object, "ExchangeError | None"]


class Outcomes:
    """Collects done(arg, value, error) calls; `next()` waits for the next one."""

    def __init__(self) -> None:
        self.got: list[Outcome] = []
        self._event = asyncio.Event()

    def __call__(self, arg: object, value: object, exc: ExchangeError | None) -> None:
        self.got.append((arg, value, exc))
        self._event.set()

    async def next(self, timeout_s: float = 2.0) -> Outcome:
        async with asyncio.timeout(timeout_s):
            while not self.got:
                self._event.clear()
                await self._event.wait()
        return self.got.pop(0)


def reason_of(outcome: Outcome) -> str:
    assert outcome[2] is not None, outcome
    return outcome[2].reason


def test_a_sent_poll_is_the_same_frame_and_its_registers_come_to_the_callback() -> None:
    image = list(range(200, 200 + regmap.POLL_COUNT))

    async def body(r: TcpRequester, seen: list[bytes]) -> None:
        done = Outcomes()
        assert r.send_read_input(7, 0, regmap.POLL_COUNT, done, "col") == 1
        assert await done.next() == ("col", tuple(image), None)
        assert r.send_read_input(7, 0, regmap.POLL_COUNT, done, "col") == 2
        assert await done.next() == ("col", tuple(image), None)
        assert seen == [bytes.fromhex("0001 0000 0006 07 04 0000 0020"),
                        bytes.fromhex("0002 0000 0006 07 04 0000 0020")]
        assert r.exchanges == 2 and r.failures == {}

    run(lambda req: reply(req, bytes((4, 2 * len(image))) + registers(image)), body)


def test_a_sent_heartbeat_is_fc06_confirmed_by_its_echo_or_wrong_length() -> None:
    answers = iter([None, b"\x06\x00\x03\x00\x0a"])   # the echo; then another value

    async def body(r: TcpRequester, seen: list[bytes]) -> None:
        done = Outcomes()
        r.send_write_single(3, regmap.HR_HEARTBEAT, 9, done, 1)
        assert await done.next() == (1, None, None)
        r.send_write_single(3, regmap.HR_HEARTBEAT, 9, done, 2)
        assert reason_of(await done.next()) == "wrong_length"
        assert seen[0] == bytes.fromhex("0001 0000 0006 03 06 0003 0009")
        assert r.failures == {"wrong_length": 1}

    def script(req: bytes) -> bytes:
        pdu = next(answers)
        return reply(req, req[7:12] if pdu is None else pdu)

    run(script, body)


def test_a_sent_request_expires_as_a_timeout_at_its_own_deadline_only() -> None:
    async def body(r: TcpRequester, _seen: list[bytes]) -> None:
        done = Outcomes()
        tid = r.send_read_input(1, 0, regmap.POLL_COUNT, done, None)
        await asyncio.sleep(0.05)
        r.expire(tid + 1)                      # another request's deadline: not this one's
        assert not done.got
        r.expire(tid)
        assert reason_of(await done.next()) == "timeout"
        r.expire(tid)                          # twice: nothing more
        await asyncio.sleep(0.01)
        assert not done.got and r.connected and r.failures == {"timeout": 1}

    run(lambda _req: b"", body)


def test_a_reply_after_its_sent_request_expired_is_ignored() -> None:
    image = list(range(regmap.POLL_COUNT))
    script = _first_answered_late(image)

    async def body(r: TcpRequester, _seen: list[bytes]) -> None:
        done = Outcomes()
        r.expire(r.send_read_input(1, 0, regmap.POLL_COUNT, done, "a"))
        assert reason_of(await done.next()) == "timeout"
        r.send_read_input(1, 0, regmap.POLL_COUNT, done, "b")
        assert await done.next() == ("b", tuple(image), None)
        await asyncio.sleep(0.01)
        assert not done.got

    run(script, body)


def test_a_sent_request_with_part_of_a_frame_back_expires_garbled() -> None:
    async def body(r: TcpRequester, _seen: list[bytes]) -> None:
        done = Outcomes()
        tid = r.send_read_input(1, 0, regmap.POLL_COUNT, done, None)
        await asyncio.sleep(0.3)
        r.expire(tid)
        assert reason_of(await done.next()) == "garbled"

    run(lambda req: req[0:2] + b"\x00\x00\x00\x43\x01\x04", body)


def test_a_sent_request_fails_at_once_without_a_connection_and_on_hang_up() -> None:
    async def body(r: TcpRequester, _seen: list[bytes]) -> None:
        done = Outcomes()
        r.send_read_input(1, 0, 2, done, "x")
        assert reason_of(await done.next()) == "disconnected"   # the server hung up
        assert not r.connected
        assert r.send_read_input(1, 0, 2, done, "y") == -1
        assert done.got and done.got[0][0] == "y" and reason_of(done.got[0]) == "disconnected"

    run(lambda _req: None, body)


def test_one_request_at_a_time_on_a_connection() -> None:
    """A second request while one is pending would take the first one's reply: refused."""
    async def body(r: TcpRequester, _seen: list[bytes]) -> None:
        done = Outcomes()
        r.send_read_input(1, 0, 2, done, None)
        with pytest.raises(RuntimeError):
            r.send_write_single(1, regmap.HR_HEARTBEAT, 1, done, None)
        with pytest.raises(RuntimeError):
            await r.read_input(1, 0, 2, 1.0)
        assert await done.next() == (None, (1, 2), None)

    run(lambda req: reply(req, b"\x04\x04\x00\x01\x00\x02"), body)
