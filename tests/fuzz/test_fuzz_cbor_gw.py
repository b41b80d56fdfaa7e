"""cbor-gw: the gateway's CBOR column channel against hypothesis-made column traffic.

The harness (fuzz/targets/cbor_gw.py) fails the test when anything escapes or is counted as
an internal error, when the gateway writes anything but good frames of valid messages, when
an event carries a value outside its type, or when a limit is reported applied without the
column's Accepted answer to that call.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cbor2
import pytest
from fuzz_support import EXAMPLES, Fuzzed, damaged, open_harness
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.frames import encode_frame
from fuzz.fw import common
from fuzz.fw.common import LATER, QUIET
from fuzz.targets.cbor_gw import CALL


@pytest.fixture(scope="module")
def gw() -> Iterator[Fuzzed]:
    yield from open_harness("cbor-gw")


scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.sampled_from((0, 1, 3, 16, 80, 81, "Charging", "C", "NoError", "gateway", "col-1"))
           | st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=6)
PAYLOADS = {
    "BootNotification": {"columnId": "col-1", "firmwareVersion": "1.0.0", "model": "m", "phases": 3,
                         "hardwareRatingA": 32, "busAddress": 0},
    "StatusNotification": {"status": "Charging", "errorCode": "NoError", "cpState": "C", "offeredA": 16,
                           "limitSource": "gateway"},
    "MeterValues": {"energyWh": 10, "sessionEnergyWh": 1, "powerW": 3680, "currentA": [16, 0, 0],
                    "voltageV": [230, 0, 0], "offeredA": 16, "seq": 1},
    "StartTransaction": {"sessionId": 1, "meterStartWh": 10},
    "StopTransaction": {"sessionId": 1, "meterStopWh": 20, "reason": "Local"},
    "Heartbeat": {},
}


@st.composite
def column_messages(draw: st.DrawFn) -> bytes:
    """A column's call with one field changed to anything, or an answer to the gateway's call."""
    if draw(st.integers(0, 3)) == 0:
        msg: Any = [3, draw(st.integers(0, 3)), draw(st.fixed_dictionaries(
            {}, optional={"status": st.sampled_from(("Accepted", "Rejected", "x")), "appliedA": values}))]
    else:
        action = draw(st.sampled_from(sorted(PAYLOADS)))
        payload = dict(PAYLOADS[action])
        if payload and draw(st.booleans()):
            payload[draw(st.sampled_from(sorted(payload)))] = draw(values)
        msg = [2, draw(st.integers(0, 2**31 - 1)), action, payload]
    return encode_frame(cbor2.dumps(msg)[:1024])


streams = st.lists(st.tuples(st.sampled_from((QUIET, QUIET | CALL, 0, QUIET | LATER, CALL | 3 << 3)),
                             column_messages() | st.binary(max_size=30)), min_size=1, max_size=6)


@settings(max_examples=EXAMPLES, deadline=None)
@given(streams)
def test_column_messages_with_any_value(gw: Fuzzed, parts: list[tuple[int, bytes]]) -> None:
    _target, harness = gw
    harness.run(common.encode(parts))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_damaged_column_traffic(gw: Fuzzed, data: st.DataObject) -> None:
    target, harness = gw
    harness.run(data.draw(damaged(target.seeds())))


@pytest.mark.parametrize("answer", [{"status": "Accepted", "appliedA": 81}, {"status": "Accepted"},
                                    {"status": "Accepted", "appliedA": float("nan")},
                                    {"status": "OK", "appliedA": 6}])
def test_an_invalid_answer_is_no_applied_limit(gw: Fuzzed, answer: dict[str, Any]) -> None:
    _target, harness = gw
    boot = cbor2.dumps([2, 50, "BootNotification", PAYLOADS["BootNotification"]])
    label = harness.run(common.encode([(QUIET, encode_frame(boot)),
                                       (QUIET | CALL, encode_frame(cbor2.dumps([3, 1, answer])))]))
    assert label is not None and "limit garbled" in label
