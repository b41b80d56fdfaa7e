"""Many cheap Modbus TCP columns in one process, for columns_per_core: not the firmware, just a
static input image behind a minimal asyncio server, so the simulated columns cost little next
to the gateway that polls them.

    python -m bench.modbus_farm --listeners N --ports-file PORTS.json --stats-file STATS.json

Listens on N loopback ports (chosen by the OS, written to PORTS.json once listening); every
unit id on every connection answers: FC03/FC04 from the image (a charging column, built from
firmware.regmap so the register map stays the firmware's), FC06/FC16 with their echo, anything
else with exception 01. The image is static except that a limit write (FC16 to
HR_ASSIGNED_LIMIT: limit, validity[, failsafe]) shows in the connection's copy of the offered
current, the assignment's remaining validity and the failsafe, and the car follows the offer
(draws 0.2 A less, nothing below 6 A), as a column would show them: the gateway sees its writes
held and settles into its steady state (polls, heartbeats, refreshes) instead of resending.
SIGUSR1 writes the counters (requests by function code, CPU seconds) to STATS.json; SIGTERM or
SIGINT writes them and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import signal
import struct
import sys
import time
from pathlib import Path

from firmware import regmap, status, status_names
from gateway.recv_into import RecvIntoProtocol

_MBAP = struct.Struct(">HHHB")


def column_image() -> bytes:
    """The input registers of a column charging at 16 A on three phases, big-endian."""
    image = [0] * regmap.INPUT_COUNT
    image[regmap.IR_STATUS] = status.ST_CHARGING
    image[regmap.IR_CP_STATE] = status_names.CP_NAMES.index("C")
    image[regmap.IR_LIMIT_SOURCE] = status.SRC_GATEWAY
    image[regmap.IR_OFFERED_CURRENT] = 160
    for i in range(3):
        image[regmap.IR_CURRENT_L1 + i] = 158
        image[regmap.IR_VOLTAGE_L1 + i] = 2301
    regmap.put_u32(image, regmap.IR_POWER, 10900)
    regmap.put_u32(image, regmap.IR_ENERGY, 1_234_567)
    regmap.put_u32(image, regmap.IR_SESSION_ENERGY, 4321)
    image[regmap.IR_SESSION_ID] = 7
    image[regmap.IR_FW_VERSION] = 1
    image[regmap.IR_ASSIGNED_REMAINING] = 100
    image[regmap.IR_FAILSAFE_LIMIT] = 60
    image[regmap.IR_BOOTS] = 1
    image[regmap.IR_PHASES] = 3
    image[regmap.IR_HARDWARE_RATING] = 320
    image[regmap.IR_CABLE_RATING] = 320
    regmap.put_u32(image, regmap.IR_UPTIME, 3600)
    return struct.pack(">%dH" % len(image), *image)


class Stats:
    def __init__(self) -> None:
        self.connections = 0
        self.requests: dict[int, int] = {}


class Column(RecvIntoProtocol):
    """One client connection; any unit id answers from the same image."""

    def __init__(self, image: bytes, stats: Stats) -> None:
        self.init_reads(512)   # reads into a buffer of its own, as the gateway's client does
        self.image = bytearray(image)   # this connection's column
        self.stats = stats
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        # Read replies by (unit, pdu) without the transaction id: a poll asks the same every
        # second, so the farm answers it with one dict lookup (cleared when a write changes
        # the image); the simulated columns must cost far less than the gateway polling them.
        self.replies: dict[tuple[int, bytes], bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.stats.connections += 1

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        out = []
        while len(buf) >= 8:
            tid, _proto, length, unit = _MBAP.unpack_from(buf)
            end = 6 + length
            if length < 2 or length > 254:
                buf = b""
                break
            if len(buf) < end:
                break
            pdu = buf[7:end]
            cached = self.replies.get((unit, pdu))
            if cached is not None:
                self.stats.requests[pdu[0]] = self.stats.requests.get(pdu[0], 0) + 1
                out.append(buf[0:2] + cached)
            else:
                frame = self._answer(tid, unit, pdu)
                if pdu[0] in (3, 4):
                    self.replies[(unit, pdu)] = frame[2:]
                out.append(frame)
            buf = buf[end:]
        self.buf = buf
        if out and self.transport is not None:
            self.transport.write(b"".join(out))

    def _answer(self, tid: int, unit: int, pdu: bytes) -> bytes:
        fc = pdu[0]
        self.stats.requests[fc] = self.stats.requests.get(fc, 0) + 1
        if fc in (3, 4) and len(pdu) >= 5:
            start, count = struct.unpack_from(">HH", pdu, 1)
            regs = bytes(self.image[2 * start:2 * (start + count)]) if fc == 4 else bytes(2 * count)
            body = bytes((fc, len(regs))) + regs.ljust(2 * count, b"\0")
        elif fc == 6 and len(pdu) >= 5:
            body = pdu[:5]
        elif fc == 16 and len(pdu) >= 5:
            body = pdu[:5]
            self.replies.clear()
            start, count = struct.unpack_from(">HH", pdu, 1)
            if start == regmap.HR_ASSIGNED_LIMIT and 2 <= count <= 3 and len(pdu) >= 6 + 2 * count:
                values = struct.unpack_from(">%dH" % count, pdu, 6)
                offered = min(values[0], 320) if values[0] >= 60 else 0
                struct.pack_into(">H", self.image, 2 * regmap.IR_OFFERED_CURRENT, offered)
                drawn = max(0, offered - 2)
                for i in range(3):
                    struct.pack_into(">H", self.image, 2 * (regmap.IR_CURRENT_L1 + i), drawn)
                struct.pack_into(">HH", self.image, 2 * regmap.IR_POWER, *divmod(3 * drawn * 23, 0x10000))
                struct.pack_into(">H", self.image, 2 * regmap.IR_ASSIGNED_REMAINING, values[1])
                if count == 3:
                    struct.pack_into(">H", self.image, 2 * regmap.IR_FAILSAFE_LIMIT, values[2])
        else:
            body = bytes((fc | 0x80, 1))
        return _MBAP.pack(tid, 0, len(body) + 1, unit) + body

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.connections -= 1


async def serve(listeners: int, ports_file: Path, stats_file: Path) -> None:
    image = column_image()
    stats = Stats()
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(lambda: Column(image, stats), "127.0.0.1", 0, backlog=1024)
               for _ in range(listeners)]
    ports = [s.sockets[0].getsockname()[1] for s in servers]
    ports_file.write_text(json.dumps(ports))
    stop = asyncio.Event()

    def dump() -> None:
        stats_file.write_text(json.dumps({"requests": {str(k): v for k, v in stats.requests.items()},
                                          "connections": stats.connections, "cpu_s": time.process_time()}))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, dump)
    await stop.wait()
    dump()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.modbus_farm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listeners", type=int, default=1)
    p.add_argument("--ports-file", type=Path, required=True)
    p.add_argument("--stats-file", type=Path, required=True)
    args = p.parse_args(argv)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve(args.listeners, args.ports_file, args.stats_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
