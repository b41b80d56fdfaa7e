"""modbus-fw: the column's Modbus RTU framer and slave (firmware/modbus.py, modbus_slave.py,
gw_modbus.py) on mutated request streams, with a model of the register map as oracle.

Input: bursts of bus bytes (fuzz/fw/common.py), each maybe followed by a silent gap. The
harness (fuzz/fw/modbus_harness.py, MicroPython-compatible) checks every delivered request
against the model: the exact reply or exception (none for broadcasts and other units), the
assigned limit, validity, failsafe, enable flag, holding image and bus address after it.
Seeds are what the gateway sends: pymodbus-built requests (polls, heartbeats, limit writes,
broadcast limit tables from gateway/south/modbus_bus.plan_limits, an address move).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pymodbus.framer import FramerRTU
from pymodbus.pdu import DecodePDU, ModbusPDU
from pymodbus.pdu.register_message import (
    ReadHoldingRegistersRequest,
    ReadInputRegistersRequest,
    WriteMultipleRegistersRequest,
    WriteSingleRegisterRequest,
)

from firmware import regmap
from fuzz import mutate, segments
from fuzz.fw import common, modbus_harness
from fuzz.fw.common import LATER, PERIODIC, QUIET
from fuzz.targets.firmware_target import FirmwareTarget
from gateway.south.modbus_bus import plan_limits
from gateway.south.types import LimitCommand

UNIT = modbus_harness.UNIT
_FRAMER = FramerRTU(DecodePDU(False))
_UNITS = (UNIT, UNIT, UNIT, UNIT, 0, 0, 1, 6, 8, 247, 255)


def frame(pdu: ModbusPDU) -> bytes:
    """The wire bytes the gateway's pymodbus client sends for a request."""
    return bytes(_FRAMER.buildFrame(pdu))


def read_inputs(unit: int, address: int, count: int) -> bytes:
    return frame(ReadInputRegistersRequest(address=address, count=count, dev_id=unit))


def read_holding(unit: int, address: int, count: int) -> bytes:
    return frame(ReadHoldingRegistersRequest(address=address, count=count, dev_id=unit))


def write_single(unit: int, address: int, value: int) -> bytes:
    return frame(WriteSingleRegisterRequest(address=address, registers=[value], dev_id=unit))


def write_multiple(unit: int, address: int, values: Sequence[int]) -> bytes:
    return frame(WriteMultipleRegistersRequest(address=address, registers=list(values), dev_id=unit))


def broadcast_frames(limits: dict[int, float], validity_s: int) -> list[bytes]:
    """Limit table frames as the RTU bus master plans them for columns at these addresses."""
    cmds = [LimitCommand("c%d" % a, amps, validity_s) for a, amps in limits.items()]
    plan = plan_limits(cmds, {"c%d" % a: a for a in limits}, broadcast=True)
    return [write_multiple(0, f.start, f.values) for f in plan.broadcasts]


def _seg(body: bytes, flags: int = QUIET) -> tuple[int, bytes]:
    return flags, body


def seed_inputs() -> list[bytes]:
    poll = read_inputs(UNIT, 0, regmap.POLL_COUNT)
    limit = write_multiple(UNIT, regmap.HR_ASSIGNED_LIMIT, [160, 120, 60])
    table = broadcast_frames({a: 6.0 + a for a in range(1, 12)}, 120)
    high = broadcast_frames({a: 10.0 for a in (3, 7, 130, 131, 200)}, 60)
    move = write_multiple(UNIT, regmap.HR_NEW_ADDRESS, [9, regmap.address_confirm(UNIT, 9)])
    other_reply = common.with_crc(bytes([3, 4, 4, 0, 1, 0, 2]))
    inputs = [
        [_seg(poll)],
        [_seg(read_inputs(UNIT, regmap.IR_COLUMN_ID, regmap.COLUMN_ID_WORDS))],
        [_seg(read_holding(UNIT, 0, regmap.HOLDING_COUNT))],
        [_seg(write_single(UNIT, regmap.HR_HEARTBEAT, 1)), _seg(poll, QUIET | 3 << 3)],
        [_seg(limit), _seg(read_holding(UNIT, 0, 3)), _seg(poll, QUIET | LATER)],
        [_seg(write_multiple(UNIT, regmap.HR_ASSIGNED_LIMIT, [800, 86400 & 0xFFFF]))],
        [_seg(write_multiple(UNIT, regmap.HR_ASSIGNED_LIMIT, [320, 0]))],
        [*(_seg(f) for f in table), _seg(poll)],
        [*(_seg(f) for f in high), _seg(read_holding(UNIT, 0, 2))],
        [_seg(write_single(UNIT, regmap.HR_ENABLE, 0)), _seg(write_single(UNIT, regmap.HR_ENABLE, 1))],
        [_seg(write_single(UNIT, regmap.HR_RESET, regmap.RESET_MAGIC))],
        [_seg(move), _seg(read_inputs(9, regmap.IR_BUS_ADDRESS, 1))],
        [_seg(read_inputs(3, 0, 2)), _seg(other_reply), _seg(poll)],
        [_seg(poll + limit, QUIET | 1 << 3), _seg(poll, PERIODIC)],   # back to back, one byte a read
    ]
    return [common.encode(parts) for parts in inputs]


def _u16(v: int) -> bytes:
    return v.to_bytes(2, "big")


def random_request(rng: random.Random) -> bytes:
    unit = rng.choice(_UNITS)
    fc = rng.choice((3, 4, 4, 6, 16, 16, 16, rng.randrange(256)))
    addr = rng.choice((0, 1, 2, 3, 4, 5, 7, 8, 9, 31, 32, 47, 48, 0x100, 0x100 + UNIT, 0x101, 0x17A, 0x1F7,
                       rng.randrange(0x10000)))
    if fc in (3, 4):
        body = bytes([unit, fc]) + addr.to_bytes(2, "big") + _u16(rng.choice(mutate.INTERESTING_U16))
    elif fc == 16:
        count = rng.choice((1, 2, 3, 9, 10, 122, 123, 124, rng.randrange(1, 20)))
        values = [rng.choice(mutate.INTERESTING_U16) if rng.random() < 0.7 else rng.randrange(0x10000)
                  for _ in range(count)]
        bc = 2 * count if rng.random() < 0.9 else rng.randrange(256)
        body = bytes([unit, fc]) + addr.to_bytes(2, "big") + count.to_bytes(2, "big") + bytes([bc & 0xFF])
        body += b"".join(v.to_bytes(2, "big") for v in values)
    else:
        body = bytes([unit, fc]) + addr.to_bytes(2, "big") + _u16(rng.choice(mutate.INTERESTING_U16))
    return common.with_crc(body[:254])


def _fix_crc(body: bytes) -> bytes:
    return common.with_crc(body[:-2]) if len(body) >= 4 else body


def mutate_segments(rng: random.Random, value: bytes, corpus: Sequence[bytes]) -> bytes:
    parts = common.segments(value)
    if not parts:
        return common.encode([(QUIET, random_request(rng))])
    r = rng.random()
    i = rng.randrange(len(parts))
    flags, body = parts[i]
    if r < 0.35:   # bytes of one burst, often with the CRC made good again
        body = mutate.mutate_bytes(rng, body, max_len=600)
        parts[i] = (flags, _fix_crc(body) if rng.random() < 0.6 else body)
    elif r < 0.45:
        parts[i] = (segments.flip_flags(rng, flags), body)
    elif r < 0.65:
        parts.insert(rng.randrange(len(parts) + 1), (rng.choice((QUIET, QUIET, 0, QUIET | 1 << 3)),
                                                     random_request(rng)))
    elif r < 0.72 and len(parts) > 1:
        del parts[i]
    elif r < 0.78:
        parts.insert(i, parts[i])
    elif r < 0.86 and len(body) > 1:   # one burst split: a frame across reads with no gap
        segments.split(rng, parts, i)
    elif r < 0.92 and i + 1 < len(parts):   # two bursts joined: frames back to back
        parts[i:i + 2] = [(parts[i + 1][0], body + parts[i + 1][1])]
    elif r < 0.97:
        segments.splice(rng, parts, corpus)
    else:
        return mutate.mutate_bytes(rng, value, max_len=4096)
    return common.encode(parts[:64])


class ModbusFirmwareTarget(FirmwareTarget):
    name = "modbus-fw"
    about = "firmware Modbus RTU framer + slave + register image (also under MicroPython)"
    fw_module = "modbus_harness"
    seed_inputs = staticmethod(seed_inputs)
    mutate_segments = staticmethod(mutate_segments)
    make_side = staticmethod(modbus_harness.Harness)


TARGET = ModbusFirmwareTarget()
