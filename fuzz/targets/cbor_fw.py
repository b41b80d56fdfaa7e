"""cbor-fw: the column's CBOR link (firmware/frames.py, cbor.py, messages.py, cbor_link.py,
gw_cbor.py) on mutated gateway traffic.

Input: bursts of bytes from the gateway (fuzz/fw/common.py). The harness
(fuzz/fw/cbor_harness.py, MicroPython-compatible) checks that nothing escapes, that what the
column writes is good frames of valid messages, that only valid SetChargingLimit and
failsafe_a changes reach the limits (and set what they ask, capped by the ratings), and
that the ratings never change. Seeds are frames made with the contract's own encoders
(firmware/messages.py, firmware/cbor.py, firmware/frames.py): the boot answer, limit calls,
configuration, reset and trigger calls, answers to the column's calls.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import cbor2

from firmware import cbor, messages
from firmware.frames import SYNC, encode_frame
from fuzz import mutate, segments
from fuzz.fw import cbor_harness, common
from fuzz.fw.common import LATER, PERIODIC, QUIET
from fuzz.targets.firmware_target import FirmwareTarget

BOOT_OK = {"status": "Accepted", "heartbeatIntervalS": 20, "currentTimeMs": 1_700_000_000_000}
KEYS = ("limitA", "validityS", "failsafeA", "key", "value", "keys", "type", "requestedMessage", "status",
        "heartbeatIntervalS", "currentTimeMs")
# CBOR heads that claim far more than is there, nest deeply or are reserved.
HOSTILE_CBOR = (b"\x5b\x7f\xff\xff\xff\xff\xff\xff\xff", b"\x7a\xff\xff\xff\xff",
                b"\x9b\x00\x00\x00\x10\x00\x00\x00\x00", b"\xbb\x7f\xff\xff\xff\xff\xff\xff\xff",
                b"\x9f" * 40, b"\x81" * 40, b"\xa1\x00" * 20, b"\xc2\x5a\x7f\xff", b"\x1c", b"\xfc", b"\xff",
                b"\x5f\x41\x00\xff", b"\x7f\x61\x61\x40\xff", b"\xf9\x7e\x00", b"\xfb",
                b"\x62\xc3\x28", b"\x63\xed\xa0\x80", b"\xd9\xd9\xf7\x80")


def frame(msg: Any) -> bytes:
    return encode_frame(cbor.dumps(msg))


def call(msg_id: int, action: str, payload: dict[str, Any]) -> bytes:
    return frame(messages.call(msg_id, action, payload))


def result(msg_id: int, payload: dict[str, Any]) -> bytes:
    return frame(messages.result(msg_id, payload))


def seed_inputs() -> list[bytes]:
    boot = (PERIODIC, result(1, BOOT_OK))
    answers = (PERIODIC, result(2, {"currentTimeMs": 5}) + result(3, {}) + result(4, {}))
    limit = call(100, "SetChargingLimit", {"limitA": 16, "validityS": 120, "failsafeA": 6})
    inputs = [
        [boot, answers],
        [boot, (QUIET, limit), (PERIODIC, call(101, "GetConfiguration", {"keys": ["failsafe_a", "x"]}))],
        [boot, (QUIET, call(102, "TriggerMessage", {"requestedMessage": "StatusNotification"})), answers],
        [boot, (QUIET, call(7, "SetChargingLimit", {"limitA": 80, "validityS": 86400})),
         (QUIET | LATER, call(8, "SetChargingLimit", {"limitA": 5.5, "validityS": 0}))],
        [boot, (QUIET, call(9, "SetChargingLimit", {"limitA": 10.7, "validityS": 30, "failsafeA": 0}))],
        [boot, (QUIET, call(20, "ChangeConfiguration", {"key": "failsafe_a", "value": 8}))],
        [boot, (QUIET, call(21, "ChangeConfiguration", {"key": "hardware_rating_a", "value": 40})),
         (QUIET, call(22, "ChangeConfiguration", {"key": "heartbeat_timeout_s", "value": 120}))],
        [boot, (QUIET, call(23, "ChangeConfiguration", {"key": "failsafe_a", "value": 30}))],
        [boot, (QUIET, call(30, "Reset", {"type": "Soft"})), (QUIET, call(31, "GetConfiguration", {}))],
        [(QUIET, frame(messages.error(1, messages.SECURITY_ERROR, "not you"))), (PERIODIC | LATER, b"")],
        [boot, (0 | 1 << 3, limit[:9]), (QUIET, limit[9:]), (QUIET | 2 << 3, limit)],   # cut, then whole
        [(QUIET, result(1, dict(BOOT_OK, status="Rejected"))), (PERIODIC | LATER, limit)],
        [(QUIET, limit)],   # before the boot was answered: refused
    ]
    return [common.encode(parts) for parts in inputs]


def _messages(body: bytes) -> list[Any] | None:
    """The messages of a burst of whole frames, or None."""
    payloads = cbor_harness.parse_frames(body)
    if not payloads:
        return None
    try:
        return [cbor2.loads(p) for p in payloads]
    except Exception:
        return None


def random_call(rng: random.Random) -> bytes:
    action = rng.choice(("SetChargingLimit", "SetChargingLimit", "SetChargingLimit", "ChangeConfiguration",
                         "GetConfiguration", "Reset", "TriggerMessage", "Heartbeat", "Nope"))
    payload: dict[str, Any]
    if action == "SetChargingLimit":
        payload = {"limitA": mutate.hostile_value(rng) if rng.random() < 0.4 else rng.uniform(0, 90),
                   "validityS": mutate.hostile_value(rng) if rng.random() < 0.3 else rng.randrange(0, 90000)}
        if rng.random() < 0.4:
            payload["failsafeA"] = mutate.hostile_value(rng) if rng.random() < 0.4 else rng.uniform(0, 40)
    elif action == "ChangeConfiguration":
        key = rng.choice(("failsafe_a", "hardware_rating_a", "installation_rating_a", "min_pause_s",
                          "meter_stale_s", "bus_address", "x"))
        value = mutate.hostile_value(rng) if rng.random() < 0.5 else rng.choice((0, 6, 8.5, 25, 26, 32))
        payload = {"key": key, "value": value}
    else:
        payload = mutate.hostile_value(rng) if rng.random() < 0.3 else {}
    msg_id = rng.choice((0, 1, 2, 55, 2**31 - 1, 2**31, -1, rng.randrange(1000)))
    msg: Any = [2, msg_id, action, payload]
    try:
        return encode_frame(cbor2.dumps(msg))
    except Exception:
        return encode_frame(cbor.dumps([2, 5, action, {}]))


def _reframe(rng: random.Random, msg: Any) -> bytes:
    try:
        body = cbor2.dumps(msg) if rng.random() < 0.5 else cbor.dumps(msg)
    except Exception:
        return b""
    return encode_frame(body[:1024]) if body else b""


def mutate_burst(rng: random.Random, body: bytes) -> bytes:
    r = rng.random()
    msgs = _messages(body) if r < 0.5 else None
    if msgs:   # a value inside a message changed, framed again with a good CRC
        i = rng.randrange(len(msgs))
        msgs[i] = mutate.mutate_tree(rng, msgs[i], KEYS)
        return b"".join(_reframe(rng, m) for m in msgs)
    if r < 0.6:   # hostile CBOR inside a good frame
        payloads = cbor_harness.parse_frames(body) or [b"\x84\x02\x01"]
        p = rng.choice(payloads)
        k = rng.randrange(len(p) + 1)
        return encode_frame((p[:k] + rng.choice(HOSTILE_CBOR) + p[k:])[:1024] or b"\x00")
    if r < 0.9:
        return mutate.mutate_bytes(rng, body, max_len=1200)
    if r < 0.95:   # a header claiming a long frame, or a false sync
        return body + bytes([SYNC, rng.randrange(256), rng.randrange(256)])
    return body + mutate.mutate_bytes(rng, body)


def mutate_segments(rng: random.Random, value: bytes, corpus: Sequence[bytes]) -> bytes:
    parts = common.segments(value)
    if not parts:
        return common.encode([(QUIET, random_call(rng))])
    r = rng.random()
    i = rng.randrange(len(parts))
    flags, body = parts[i]
    if r < 0.5:
        parts[i] = (flags, mutate_burst(rng, body))
    elif r < 0.6:
        parts[i] = (segments.flip_flags(rng, flags), body)
    elif r < 0.78:
        parts.insert(rng.randrange(1, len(parts) + 1), (rng.choice((QUIET, PERIODIC, 0, QUIET | 3 << 3)),
                                                        random_call(rng)))
    elif r < 0.84 and len(parts) > 1:
        del parts[i]
    elif r < 0.88:
        parts.insert(i, parts[i])
    elif r < 0.94 and len(body) > 1:
        segments.split(rng, parts, i)
    elif r < 0.98:
        segments.splice(rng, parts, corpus)
    else:
        return mutate.mutate_bytes(rng, value, max_len=4096)
    return common.encode(parts[:10])


class CborFirmwareTarget(FirmwareTarget):
    name = "cbor-fw"
    about = "firmware CBOR frame reader, decoder, message validation and column link (also MicroPython)"
    fw_module = "cbor_harness"
    seed_inputs = staticmethod(seed_inputs)
    mutate_segments = staticmethod(mutate_segments)
    make_side = staticmethod(cbor_harness.Harness)


TARGET = CborFirmwareTarget()
