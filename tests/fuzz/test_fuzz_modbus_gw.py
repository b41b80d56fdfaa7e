"""modbus-gw: the gateway's Modbus master (RTU and TCP) against hypothesis-made replies.

The harness (fuzz/targets/modbus_gw.py) fails the test when a request ends other than in a
result or a documented failure reason, or when a reading or a write confirmation comes
from bytes that hold no good reply to that very request.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fuzz_support import EXAMPLES, Fuzzed, damaged, open_harness
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.crc import crc16
from fuzz.targets.modbus_gw import LEAN, TCP, UNIT


@pytest.fixture(scope="module")
def gw() -> Iterator[Fuzzed]:
    yield from open_harness("modbus-gw")


def rtu(body: bytes) -> bytes:
    return body + crc16(body).to_bytes(2, "little")


def mbap(tid: int, unit: int, pdu: bytes, length: int | None = None) -> bytes:
    n = len(pdu) + 1 if length is None else length
    return tid.to_bytes(2, "big") + b"\0\0" + n.to_bytes(2, "big") + bytes([unit]) + pdu


@st.composite
def replies(draw: st.DrawFn) -> bytes:
    """[op][split][reply]: a reply with any function code, unit, byte count and registers, a
    good or a bad CRC (RTU), a right or a wrong MBAP length and transaction id (TCP)."""
    op = draw(st.integers(0, 15))
    fc = draw(st.sampled_from((3, 4, 4, 6, 16, 0x84, 0x86, 0x90, 0x83)) | st.integers(0, 255))
    count = draw(st.integers(0, 40))
    if fc in (3, 4):
        pdu = bytes([fc, draw(st.sampled_from((2 * count, 2 * count + 1, 0, 255)))]) + \
            draw(st.binary(min_size=2 * count, max_size=2 * count))
    elif fc & 0x80:
        pdu = bytes([fc, draw(st.integers(0, 12))])
    else:
        pdu = bytes([fc]) + draw(st.binary(min_size=0, max_size=8))
    if op & TCP:
        reply = mbap(draw(st.sampled_from((1, 1, 0, 2))), draw(st.sampled_from((1, 1, 0, 7))), pdu,
                     draw(st.none() | st.integers(0, 300)))
    else:
        body = bytes([draw(st.sampled_from((UNIT, UNIT, 0, 3)))]) + pdu
        reply = rtu(body) if draw(st.booleans()) else body + draw(st.binary(min_size=2, max_size=2))
    if draw(st.booleans()):   # bytes around it: another station, noise
        reply = draw(st.binary(max_size=6)) + reply + draw(st.binary(max_size=6))
    return bytes([op, draw(st.integers(0, len(reply)))]) + reply


@settings(max_examples=EXAMPLES, deadline=None)
@given(replies())
def test_any_reply_is_a_result_or_a_documented_failure(gw: Fuzzed, value: bytes) -> None:
    _target, harness = gw
    harness.run(value)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_damaged_column_replies(gw: Fuzzed, data: st.DataObject) -> None:
    target, harness = gw
    harness.run(data.draw(damaged(target.seeds())))


@pytest.mark.parametrize("op", [0, TCP, TCP | LEAN])
def test_a_reply_to_another_request_is_no_reading(gw: Fuzzed, op: int) -> None:
    """A good FC03 frame answering the FC04 poll (the holding image, not the inputs)."""
    _target, harness = gw
    pdu = bytes([3, 64]) + bytes(range(64))
    reply = mbap(1, 1, pdu) if op & TCP else rtu(bytes([UNIT]) + pdu)
    label = harness.run(bytes([op, 0]) + reply)
    assert label is not None and label.startswith("garbled"), label
