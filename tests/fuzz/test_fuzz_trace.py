"""trace: the HIL trace reader on truncated, corrupted and hostile traces.

The harness (fuzz/targets/trace.py) reads each input through TraceReader, summarise and the
`hil info` texts, and fails the test on any exception but a TraceError naming its byte
offset, or on records out of order or on undeclared channels.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fuzz_support import EXAMPLES, Fuzzed, damaged, open_harness
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz.targets.trace import HUGE_HEADS, RECORDS, _trace


@pytest.fixture(scope="module")
def reader() -> Iterator[Fuzzed]:
    yield from open_harness("trace")


WHOLE = _trace(RECORDS)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(0, len(WHOLE)))
def test_a_trace_cut_anywhere_is_an_error_with_its_offset(reader: Fuzzed, cut: int) -> None:
    _target, harness = reader
    label = harness.run(WHOLE[:cut])
    assert (label is None) == (cut == len(WHOLE)), label


# The self-described CBOR tag (d9 d9 f7) is transparent: inserted before an item it changes nothing.
BROKEN_HEADS = [h for h in HUGE_HEADS if h != b"\xd9\xd9\xf7"]


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(0, len(WHOLE)), st.sampled_from(BROKEN_HEADS))
def test_hostile_heads_anywhere_are_errors(reader: Fuzzed, at: int, head: bytes) -> None:
    _target, harness = reader
    assert harness.run(WHOLE[:at] + head + WHOLE[at:]) is not None


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.integers(0, len(WHOLE)), st.binary(min_size=1, max_size=9))
def test_any_bytes_anywhere(reader: Fuzzed, at: int, head: bytes) -> None:
    _target, harness = reader
    harness.run(WHOLE[:at] + head + WHOLE[at:])


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_damaged_traces(reader: Fuzzed, data: st.DataObject) -> None:
    target, harness = reader
    harness.run(data.draw(damaged(target.seeds())))
