"""cbor-fw: the column's CBOR link (frame reader, CBOR decoder, message validation, handlers)
against hypothesis-made gateway traffic.

The harness (fuzz/fw/cbor_harness.py) fails the test when anything escapes the link, when
a handler crashes, when the column writes anything but good frames of valid messages, when
an invalid SetChargingLimit or configuration change moves a limit, or when a valid one does
not set what it asked (capped by the ratings).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cbor2
import pytest
from fuzz_support import EXAMPLES, Fuzzed, damaged, open_harness
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware import cbor, messages, msg_link
from firmware.frames import encode_frame
from fuzz.engine import Finding
from fuzz.fw import cbor_harness, common
from fuzz.fw.common import LATER, PERIODIC, QUIET
from fuzz.targets.cbor_fw import BOOT_OK

BOOT = (PERIODIC, encode_frame(cbor.dumps(messages.result(1, BOOT_OK))))


@pytest.fixture(scope="module")
def fw() -> Iterator[Fuzzed]:
    yield from open_harness("cbor-fw")


scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.sampled_from((0, 6, 16, 32, 80, 80.5, 81, 86400, 86401, -1, 0.05))
           | st.text(max_size=8) | st.binary(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=10), inner, max_size=3), max_leaves=5)
limit_payloads = st.fixed_dictionaries(
    {"limitA": values | st.floats(0, 90), "validityS": values | st.integers(0, 90000)},
    optional={"failsafeA": values | st.floats(0, 40), "extra": values})


@st.composite
def calls(draw: st.DrawFn) -> bytes:
    action = draw(st.sampled_from(("SetChargingLimit", "SetChargingLimit", "ChangeConfiguration", "Reset",
                                   "GetConfiguration", "TriggerMessage", "Heartbeat", "Nope")))
    if action == "SetChargingLimit":
        payload: Any = draw(limit_payloads)
    elif action == "ChangeConfiguration":
        payload = {"key": draw(st.sampled_from(("failsafe_a", "hardware_rating_a", "installation_rating_a",
                                                 "min_pause_s", "x"))), "value": draw(values)}
    else:
        payload = draw(values)
    msg_id = draw(st.integers(0, 2**31 - 1) | st.integers(-5, 2**40))
    try:
        return encode_frame(cbor2.dumps([2, msg_id, action, payload])[:1024])
    except ValueError:   # an empty payload slice cannot happen; cbor2 may refuse nothing else
        return b""


streams = st.lists(st.tuples(st.sampled_from((QUIET, QUIET | PERIODIC, 0, QUIET | LATER, QUIET | 2 << 3)),
                             calls() | st.binary(max_size=40)), min_size=1, max_size=6)


@settings(max_examples=EXAMPLES, deadline=None)
@given(streams)
def test_gateway_calls_with_any_payload(fw: Fuzzed, parts: list[tuple[int, bytes]]) -> None:
    _target, harness = fw
    harness.run(common.encode([BOOT, *parts]))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_damaged_gateway_traffic(fw: Fuzzed, data: st.DataObject) -> None:
    target, harness = fw
    harness.run(data.draw(damaged(target.seeds())))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**31 - 1),
       st.sampled_from((81, 80.01, -0.1, float("nan"), float("inf"), True, "16", None)))
def test_an_invalid_limit_is_refused_and_changes_nothing(fw: Fuzzed, msg_id: int,
                                                         limit: Any) -> None:
    _target, harness = fw
    call = encode_frame(cbor2.dumps([2, msg_id, "SetChargingLimit", {"limitA": limit, "validityS": 60}]))
    label = harness.run(common.encode([BOOT, (QUIET, call)]))
    assert label is not None and "error sent: " in label   # refused with an error frame; the model: no change


def test_the_oracle_catches_a_handler_that_skips_validation(fw: Fuzzed,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """An invalid SetChargingLimit that reached the limits would be caught."""
    _target, harness = fw
    monkeypatch.setattr(msg_link, "validate_payload", lambda *a, **k: None)  # the contract the link checks
    call = encode_frame(cbor2.dumps([2, 7, "SetChargingLimit", {"limitA": 500, "validityS": 60}]))
    with pytest.raises(Finding, match="invalid SetChargingLimit"):
        harness.run(common.encode([BOOT, (QUIET, call)]))
    assert cbor_harness.limit_call_ok({"limitA": 16, "validityS": 60})
