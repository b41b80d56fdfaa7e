"""firmware.cbor against the cbor2 package, both ways, with hypothesis-generated values.

In process (CPython): cbor2 -> firmware decode, firmware encode -> cbor2 decode, and
hostile bytes that the firmware must refuse with CBORError only (agreeing with cbor2 on
what it accepts). Under both interpreters (subprocess, cbor_interop_peer.py): a batch of
cbor2-encoded values is decoded and re-encoded by the firmware codec, and the bytes must be
what the in-process codec produces and what cbor2 reads back as the original value. The
decoder takes what the message set can carry: ints within 64 bits, no tags, no indefinite
lengths (refused as bad input, with CBORError only); the encoder writes bignums as cbor2 does.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware import cbor
from firmware.cbor import CBORError
from hil.rig.firmware_proc import INTERPRETERS, run_firmware

HERE = Path(__file__).resolve().parent
PEER = HERE / "cbor_interop_peer.py"

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 64), max_value=2 ** 64 - 1)
           | st.integers(min_value=-(2 ** 32), max_value=2 ** 32)
           | st.floats(allow_nan=True, allow_infinity=True)
           | st.floats(width=32) | st.floats(width=16) | st.text(max_size=20) | st.binary(max_size=20))
keys = st.text(max_size=8) | st.integers(min_value=-(2 ** 40), max_value=2 ** 40) | st.binary(max_size=4)


def depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=25).filter(lambda v: depth(v) <= cbor.MAX_DEPTH)


def same(a: Any, b: Any) -> bool:
    """Value equality with NaN == NaN, 0.0 != -0.0, and no bool/int/float mixing."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def has_map(value: Any) -> bool:
    if isinstance(value, dict):
        return True
    return isinstance(value, list) and any(has_map(v) for v in value)


CASES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@CASES
@given(values, st.booleans())
def test_cbor2_encoded_values_decode_to_the_same_value(value: Any, canonical: bool) -> None:
    assert same(cbor.loads(cbor2.dumps(value, canonical=canonical)), value)


@CASES
@given(values)
def test_firmware_encoded_values_decode_in_cbor2_to_the_same_value(value: Any) -> None:
    data = cbor.dumps(value)
    assert same(cbor2.loads(data), value)
    assert cbor.dumps(cbor.loads(data)) == data
    if not has_map(value):  # cbor2 sorts map keys length-first, RFC 8949 bytewise
        assert data == cbor2.dumps(value, canonical=True)


@CASES
@given(st.integers(min_value=2 ** 64, max_value=2 ** 80)
       | st.integers(min_value=-(2 ** 80), max_value=-(2 ** 64) - 1))
def test_bignums_encode_as_cbor2_does_and_are_refused_as_input(value: int) -> None:
    data = cbor.dumps(value)
    assert data == cbor2.dumps(value) and cbor2.loads(data) == value
    with pytest.raises(CBORError, match="unsupported tag at byte 0"):
        cbor.loads(data)


def plain(value: Any) -> bool:
    """Only types the firmware codec returns (cbor2 adds tuples, sets, dates, tags, ...)."""
    if value is None or type(value) in (bool, int, float, str, bytes):
        return True
    if type(value) is list:
        return all(plain(v) for v in value)
    if type(value) is dict:
        return all(plain(k) and not isinstance(k, list | dict)
                   and not (isinstance(k, float) and math.isnan(k)) and plain(v) for k, v in value.items())
    return False


REFUSED = object()


def mutated(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, where, byte in edits:
        if not out:
            out.append(byte)
            continue
        i = where % len(out)
        if kind == 0:
            out[i] = byte
        elif kind == 1:
            del out[i]
        else:
            out.insert(i, byte)
    return bytes(out)


hostile = st.binary(max_size=64) | st.builds(
    mutated, values.map(cbor2.dumps),
    st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10 ** 6), st.integers(0, 255)),
             min_size=1, max_size=4))


@settings(max_examples=200, deadline=None)
@given(hostile)
def test_hostile_bytes_raise_cbor_error_only_and_agree_with_cbor2(data: bytes) -> None:
    try:
        mine, end = cbor.loads_from(data, 0)
    except CBORError as exc:
        assert f"at byte {exc.offset}" in str(exc)
        mine = exc
    else:  # loads() takes the same item, and refuses bytes after it
        if end == len(data):
            assert same(cbor.loads(data), mine)
        else:
            with pytest.raises(CBORError, match=f"trailing bytes at byte {end}"):
                cbor.loads(data)
    try:
        theirs = cbor2.loads(data)  # like loads_from: ignores what follows the first item
    except Exception:
        theirs = REFUSED
    untagged = not any(0xC0 <= b <= 0xDB for b in data)  # cbor2 gives some tags a meaning
    if isinstance(mine, CBORError):
        # The firmware may refuse more than cbor2 (simple values, keys it cannot hash, our
        # nesting limit, indefinite lengths), but not other plain data that cbor2 reads.
        if theirs is not REFUSED and plain(theirs) and untagged:
            refused = "nesting deeper" in str(mine) or "indefinite length" in str(mine)
            assert refused, (data.hex(), mine, theirs)
        return
    # Whatever the firmware accepts re-encodes to something it reads back the same.
    assert same(cbor.loads(cbor.dumps(mine)), mine)
    if untagged:
        assert theirs is not REFUSED, (data.hex(), mine)
        if plain(theirs):
            assert same(mine, theirs), (data.hex(), mine, theirs)


@cache
def value_batch() -> list[tuple[Any, bool]]:
    """One hypothesis-generated batch (value, canonical) shared by both interpreters."""
    batch: list[tuple[Any, bool]] = []

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(values, st.booleans())
    def collect(value: Any, canonical: bool) -> None:
        batch.append((value, canonical))

    collect()
    return batch


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_interpreter_decodes_and_reencodes_cbor2_values(interp: str, tmp_path: Path) -> None:
    batch = value_batch()
    src = tmp_path / "items.cbor"
    src.write_bytes(b"".join(cbor2.dumps(v, canonical=c) for v, c in batch))
    dst = tmp_path / "out.txt"
    done = run_firmware(interp, PEER, [str(src), str(dst)], heap="128K", timeout_s=60, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")
    lines = dst.read_text().splitlines()
    assert len(lines) == len(batch), lines[-1:]
    for (value, _), line in zip(batch, lines, strict=True):
        status, _, text = line.partition(" ")
        assert status == "ok", (value, line)
        data = bytes.fromhex(text)
        assert data == cbor.dumps(value), (value, text)  # same bytes as in-process CPython
        assert same(cbor2.loads(data), value), (value, text)
