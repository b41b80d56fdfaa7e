"""modbus-fw: the column's Modbus RTU framer and slave against hypothesis-made request streams.

Every input goes through fuzz/fw/modbus_harness.py, whose model of the register map fails
the test on a wrong reply, a missing or extra reply, or a limit changed by an invalid write.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fuzz_support import EXAMPLES, Fuzzed, damaged, open_harness
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware import regmap
from firmware.modbus_slave import ModbusSlave
from fuzz.engine import Finding
from fuzz.fw import common, modbus_harness
from fuzz.fw.common import QUIET
from fuzz.targets.modbus_fw import read_holding, read_inputs, write_multiple, write_single

UNIT = modbus_harness.UNIT


@pytest.fixture(scope="module")
def fw() -> Iterator[Fuzzed]:
    yield from open_harness("modbus-fw")


words = st.integers(0, 0xFFFF) | st.sampled_from((0, 1, 6, 59, 60, 799, 800, 801, 0xA5A5, 0xFFFF))
units = st.sampled_from((UNIT, UNIT, UNIT, 0, 1, 247))


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    """What a master may send: the gateway's requests with any address, count or value,
    sometimes with a broken CRC or cut short."""
    unit = draw(units)
    kind = draw(st.sampled_from(("read_in", "read_hold", "single", "multiple", "table")))
    address = draw(st.integers(0, 20) | st.integers(0, 0xFFFF))
    if kind == "read_in":
        frame = read_inputs(unit, address, draw(st.integers(1, 125)))
    elif kind == "read_hold":
        frame = read_holding(unit, address, draw(st.integers(1, 125)))
    elif kind == "single":
        frame = write_single(unit, address, draw(words))
    elif kind == "multiple":
        frame = write_multiple(unit, address, draw(st.lists(words, min_size=1, max_size=12)))
    else:   # a broadcast limit table around this column's entry
        start = regmap.BROADCAST_TABLE + draw(st.integers(0, 247))
        frame = write_multiple(0, start, draw(st.lists(words, min_size=1, max_size=30)))
    damage = draw(st.sampled_from(("none", "none", "crc", "cut")))
    if damage == "crc":
        frame = frame[:-1] + bytes([frame[-1] ^ 0x5A])
    elif damage == "cut":
        frame = frame[:draw(st.integers(1, len(frame) - 1))]
    return frame


streams = st.lists(st.tuples(st.sampled_from((QUIET, QUIET, 0, QUIET | 1 << 3, QUIET | 4 << 3)),
                             requests() | st.binary(max_size=40)), min_size=1, max_size=8)


@settings(max_examples=EXAMPLES, deadline=None)
@given(streams)
def test_request_streams_get_the_documented_answers(fw: Fuzzed,
                                                    parts: list[tuple[int, bytes]]) -> None:
    _target, harness = fw
    harness.run(common.encode(parts))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_damaged_gateway_traffic(fw: Fuzzed, data: st.DataObject) -> None:
    target, harness = fw
    harness.run(data.draw(damaged(target.seeds())))


@settings(max_examples=100, deadline=None)
@given(st.integers(regmap.MAX_LIMIT_DA + 1, 0xFFFF), st.integers(0, 0xFFFF))
def test_an_out_of_range_limit_is_refused_and_changes_nothing(fw: Fuzzed,
                                                             limit_da: int, validity_s: int) -> None:
    _target, harness = fw
    good = write_multiple(UNIT, regmap.HR_ASSIGNED_LIMIT, [160, 120])
    bad = write_multiple(UNIT, regmap.HR_ASSIGNED_LIMIT, [limit_da, validity_s])
    label = harness.run(common.encode([(QUIET, good), (QUIET, bad)]))
    assert label == "exception illegal value to write multiple"   # and the model saw no change


def test_the_oracle_catches_a_slave_that_stores_out_of_range_values(fw: Fuzzed,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness is not a test that cannot fail: a slave without its range check is caught."""
    _target, harness = fw
    real = ModbusSlave._write

    def unchecked(self: ModbusSlave, start: int, count: int, pdu: Any, at: int, *_now: int) -> int:
        for i in range(count):
            self.holding[start + i] = (pdu[at + 2 * i] << 8) | pdu[at + 2 * i + 1]
        return 0

    monkeypatch.setattr(ModbusSlave, "_write", unchecked)
    with pytest.raises(Finding, match="request"):
        harness.run(common.encode([(QUIET, write_multiple(UNIT, regmap.HR_ASSIGNED_LIMIT, [900, 60]))]))
    monkeypatch.setattr(ModbusSlave, "_write", real)
    harness.run(common.encode([(QUIET, write_multiple(UNIT, regmap.HR_ASSIGNED_LIMIT, [900, 60]))]))
