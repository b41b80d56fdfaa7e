"""modbus-gw: the gateway's Modbus master reply handling on mutated replies.

The paths under test are the gateway's own: gateway/south/modbus_bus.Requester (the RTU bus
master's and the site meter's request wrapper, with its failure classification) over a real
pymodbus client (its RTU or socket framer and PDU decoder), the columns' lean Modbus TCP
client (gateway/south/modbus_tcp_client.TcpRequester), then gateway/south/types.decode_inputs
for a poll. Only the transport is replaced: the request goes to an in-memory transport that
answers with the input's bytes (in one or two reads) and then stays silent, as a device that
said all it will say.

Input: [op][split][reply bytes]. op bits 0-1: the request (0 a poll of POLL_COUNT input
registers, 1 a heartbeat write, 2 a limit write of three registers, 3 the column id read);
bit 2: Modbus TCP instead of RTU; bit 3 with bit 2: the columns' TCP client instead of
pymodbus's. split: where the reply is cut into two reads (0: none).

Properties: every request ends in a result or an ExchangeError with one of the documented
failure reasons, nothing else; a reading or a write confirmation comes only from a reply
frame for that very request (unit, function code, byte count, address or count, CRC on RTU)
found in the bytes, with exactly the registers it holds (pymodbus's tolerances, named in
confirmed_by, are allowed on its paths only); the reading decodes. Exceptions that
pymodbus lets escape into the event loop (what a real transport would log, and on TCP
answer by closing the connection) are counted as errors, not crashes; from the gateway's
own TCP client they are crashes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.framer import FramerSocket, FramerType
from pymodbus.pdu import DecodePDU

from firmware import regmap
from firmware.crc import crc16
from fuzz import mutate
from fuzz.engine import Finding, Harness, Target
from fuzz.fw import modbus_harness
from fuzz.targets.modbus_fw import read_inputs, write_multiple, write_single
from gateway.south.modbus_bus import ExchangeError, Requester
from gateway.south.modbus_tcp_client import TcpRequester, _Link
from gateway.south.types import FAILURE_REASONS, decode_inputs

UNIT = modbus_harness.UNIT
TCP_UNIT = 1
LIMIT = (160, 120, 60)
# op -> (function code, address, count or value)
OPS = ((4, 0, regmap.POLL_COUNT), (6, regmap.HR_HEARTBEAT, 1), (16, regmap.HR_ASSIGNED_LIMIT, len(LIMIT)),
       (4, regmap.IR_COLUMN_ID, regmap.COLUMN_ID_WORDS))
TCP = 4
LEAN = 8   # with TCP: the columns' own Modbus TCP client


def _u16(b: bytes, i: int) -> int:
    return (b[i] << 8) | b[i + 1]


def good_frames(data: bytes, tcp: bool, unit: int) -> list[bytes]:
    """Every reply frame for `unit` in data, as its PDU (from the function code)."""
    out = []
    if tcp:
        for i in range(max(0, len(data) - 7)):
            if _u16(data, i) in (0, 1) and _u16(data, i + 2) == 0 and data[i + 6] == unit:
                n = _u16(data, i + 4)
                if n >= 2 and i + 6 + n <= len(data):
                    out.append(data[i + 7:i + 6 + n])
        return out
    for i in range(len(data)):
        if data[i] != unit:
            continue
        for end in range(i + 4, len(data) + 1):
            if crc16(data, i, end) == 0:
                out.append(data[i + 1:end - 2])
    return out


def confirmed_by(pdus: list[bytes], fc: int, address: int, arg: int, regs: list[int] | None, *,
                 lenient: bool, surplus_ok: bool) -> bool:
    """Whether one of the PDUs is the reply to this request (and holds exactly `regs`).

    What pymodbus tolerates (lenient): a read reply whose byte count is one more than its
    registers (it reads the whole registers and drops the odd byte); over TCP (surplus_ok)
    bytes after a complete PDU inside the MBAP length. The columns' own TCP client takes
    neither; on RTU the CRC covers the frame the byte count spans."""
    for p in pdus:
        if not p or p[0] != fc:
            continue
        if fc == 4:
            bc = p[1] if len(p) > 1 else -1
            if not (bc == 2 * arg or (lenient and bc == 2 * arg + 1)):
                continue
            size = 2 + bc
        else:
            size = 5
        if len(p) < size or (len(p) > size and not surplus_ok):
            continue
        if fc == 4 and regs is not None and [_u16(p, 2 + 2 * k) for k in range(arg)] == regs:
            return True
        if fc == 6 and _u16(p, 1) == address:
            return True
        if fc == 16 and _u16(p, 1) == address and _u16(p, 3) == arg:
            return True
    return False


class _Transport(asyncio.Transport):
    """What the client writes to; each request is answered with the input's pieces."""

    def __init__(self, on_write: Callable[[bytes], None]) -> None:
        super().__init__()
        self.on_write = on_write
        self.closed = False

    def write(self, data: bytes) -> None:
        self.on_write(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class ModbusGatewayHarness(Harness[bytes]):
    def __init__(self) -> None:
        # pymodbus logs every bad frame at ERROR with a dump of the last frames: that is its
        # report to a human, not the outcome checked here (and it would cost most of the time).
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL + 1)
        self.loop = asyncio.new_event_loop()
        self.escaped: list[str] = []
        self.requesters: dict[bool, Requester] = self.loop.run_until_complete(self._make())
        self.lean = TcpRequester("fuzz.invalid", 502)

    async def _make(self) -> dict[bool, Requester]:
        # Made as ModbusRtuBus and the Modbus TCP adapter make theirs (gateway/south/).
        rtu = Requester(lambda trace: AsyncModbusSerialClient(
            "/dev/null", framer=FramerType.RTU, baudrate=19200, timeout=5.0, retries=0, reconnect_delay=0,
            trace_packet=trace), rtu=True)
        tcp = Requester(lambda trace: AsyncModbusTcpClient(
            "127.0.0.1", port=502, timeout=5.0, retries=0, reconnect_delay=0, trace_packet=trace), rtu=False)
        return {False: rtu, True: tcp}

    def close(self) -> None:
        self.loop.close()

    def run(self, value: bytes) -> str | None:
        if len(value) < 2:
            return "empty input"
        return self.loop.run_until_complete(self._run(value))

    async def _run(self, value: bytes) -> str | None:
        op, split, reply = value[0], value[1], bytes(value[2:])
        tcp = bool(op & TCP)
        lean = tcp and bool(op & LEAN)
        fc, address, arg = OPS[op & 3]
        pieces = [reply[:split], reply[split:]] if 0 < split < len(reply) else [reply]
        unit = TCP_UNIT if tcp else UNIT
        self.escaped = []
        requester = self._lean(pieces) if lean else self._pymodbus(tcp, pieces)
        call: Awaitable[Any]
        timeout_s = 0.0 if lean else 5.0   # lean: its timer runs after the answer (pymodbus: see _pymodbus)
        if fc == 4:
            call = requester.read_input(unit, address, arg, timeout_s)
        elif fc == 6:
            call = requester.write_single(unit, address, arg, timeout_s)
        else:
            call = requester.write_multiple(unit, address, LIMIT, timeout_s)
        try:
            result = await call
        except ExchangeError as exc:
            if exc.reason not in FAILURE_REASONS:
                raise Finding("request failed with an undocumented reason %r" % exc.reason) from None
            return "\n".join([exc.reason + (": " + exc.detail if exc.detail else "")] +
                             ["escaped into the event loop: " + e for e in self.escaped])
        regs = list(result) if fc == 4 else None
        pdus = good_frames(reply, tcp, unit)
        if not confirmed_by(pdus, fc, address, arg, regs, lenient=not lean, surplus_ok=tcp and not lean):
            raise Finding("%s accepted a reply that is not a good reply to it: %s -> %r"
                          % ("lean TCP" if lean else "TCP" if tcp else "RTU", reply.hex(), result))
        if fc == 4 and address == 0:
            assert regs is not None
            decode_inputs("c", regs, 0)
        if self.escaped:
            return "\n".join("escaped into the event loop: " + e for e in self.escaped)
        return None

    def _pymodbus(self, tcp: bool, pieces: list[bytes]) -> Requester:
        requester = self.requesters[tcp]
        ctx = requester.client.ctx
        loop = asyncio.get_running_loop()

        def answer() -> None:
            for piece in pieces:
                if not piece or ctx.transport is None:
                    continue
                try:
                    ctx.data_received(piece)
                except Exception as exc:   # what the event loop would catch and log
                    self.escaped.append(type(exc).__name__)
                    if tcp:   # asyncio's socket transport closes the connection on it
                        ctx.connection_lost(exc)
            if not ctx.response_future.done():   # silence from now on: pymodbus's own timeout
                ctx.response_future.set_exception(TimeoutError())

        ctx.transport = _Transport(lambda _data: loop.call_soon(answer))
        ctx.callback_connected()   # a fresh connection: transaction ids start over
        ctx.recv_buffer = b""
        return requester

    def _lean(self, pieces: list[bytes]) -> TcpRequester:
        link = _Link()
        loop = asyncio.get_running_loop()

        def answer() -> None:
            for piece in pieces:
                if piece and link.transport is not None:
                    link.data_received(piece)   # gateway code: an exception here is a crash

        link.connection_made(_Transport(lambda _data: loop.call_soon(answer)))
        lean = self.lean
        lean._link = link
        lean._tid = 0     # a fresh connection: the first transaction id is 1
        return lean


def _column_replies() -> dict[tuple[int, bool], bytes]:
    """The column's own answers (firmware ModbusSlave and ModbusTcpConnection) to what the
    gateway's pymodbus client sends: op, tcp -> reply bytes."""
    from firmware.modbus_tcp import ModbusTcpConnection
    from firmware.modbus_tcp_serve import feed

    app = modbus_harness.App("/nonexistent")   # no address move here: the file is never read
    link = modbus_harness.ModbusLink(app, UNIT, modbus_harness.RtuRequestParser())
    link.refresh(modbus_harness.START_MS)
    out = {}
    tcp_framer = FramerSocket(DecodePDU(False))
    for op, (fc, address, arg) in enumerate(OPS):
        for tcp in (False, True):
            unit = TCP_UNIT if tcp else UNIT
            if fc == 4:
                rtu_req = read_inputs(unit, address, arg)
            elif fc == 6:
                rtu_req = write_single(unit, address, arg)
            else:
                rtu_req = write_multiple(unit, address, LIMIT)
            if not tcp:
                parser = link.parser
                parser.feed(rtu_req)
                n = parser.next_request()
                r = link.slave.handle(parser.unit, parser.fc, parser.pdu, modbus_harness.START_MS)
                out[op, tcp] = bytes(link.slave.out[:r])
                parser.gap()
                assert n == len(rtu_req)
                continue
            link.slave.unit_id = TCP_UNIT
            pdu = rtu_req[1:-2]
            req = tcp_framer.encode(pdu, TCP_UNIT, 1)
            conn = ModbusTcpConnection(link.slave)
            feed(conn, req)
            r = conn.next_reply(modbus_harness.START_MS)
            out[op, tcp] = bytes(conn.out[:r])
            link.slave.unit_id = UNIT
    return out


class ModbusGatewayTarget(Target[bytes]):
    name = "modbus-gw"
    about = "gateway Modbus master reply handling (Requester over pymodbus RTU/TCP framers, decode_inputs)"

    def seeds(self) -> list[bytes]:
        replies = _column_replies()
        out = [bytes([op | (TCP if tcp else 0), 0]) + reply for (op, tcp), reply in replies.items()]
        out += [bytes([op | (TCP if tcp else 0), 3]) + reply for (op, tcp), reply in replies.items()]
        out += [bytes([op | TCP | LEAN, 0]) + reply for (op, tcp), reply in replies.items() if tcp]
        exc = bytes([UNIT, 0x84, 0x02])
        out.append(bytes([0, 0]) + exc + crc16(exc).to_bytes(2, "little"))
        out.append(bytes([0, 0]))   # silence
        return out

    def mutate(self, rng: random.Random, value: bytes, corpus: Sequence[bytes]) -> bytes:
        op, split, reply = value[0] if value else 0, value[1] if len(value) > 1 else 0, bytearray(value[2:])
        for _ in range(1 + int(rng.random() ** 2 * 3)):
            r = rng.random()
            if r < 0.45:
                reply = bytearray(mutate.mutate_bytes(rng, bytes(reply), max_len=600))
            elif r < 0.52 and len(reply) > 4:   # another function code: a reply to another request
                at = 7 if op & TCP else 1
                if at < len(reply):
                    reply[at] = rng.choice((3, 4, 6, 16, 0x83, 0x84, 0x86, 0x90, 0x2B, rng.randrange(256)))
                if not op & TCP:
                    reply[-2:] = crc16(reply, 0, len(reply) - 2).to_bytes(2, "little")
            elif r < 0.6 and len(reply) > 4:   # fix the CRC (RTU) or the MBAP length (TCP)
                if op & TCP:
                    n = len(reply) - 6
                    reply[4:6] = n.to_bytes(2, "big") if 0 <= n < 65536 else reply[4:6]
                else:
                    reply[-2:] = crc16(reply, 0, len(reply) - 2).to_bytes(2, "little")
            elif r < 0.7:
                op = rng.randrange(16) if rng.random() < 0.5 else op ^ rng.choice((TCP, LEAN))
            elif r < 0.8:
                split = rng.randrange(len(reply) + 1) if reply else 0
            elif r < 0.9:   # a reply from another column or another request in front of it
                other = rng.choice(corpus)[2:]
                reply = bytearray(other + reply if rng.random() < 0.5 else reply + other)
            else:
                reply = bytearray(mutate.splice(rng, bytes(reply), rng.choice(corpus)[2:]))
        return bytes([op & 0xFF, split & 0xFF]) + bytes(reply[:600])

    def harness(self, workdir: Path) -> Harness[bytes]:
        return ModbusGatewayHarness()


TARGET = ModbusGatewayTarget()
