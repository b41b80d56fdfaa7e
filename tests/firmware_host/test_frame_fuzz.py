"""Frame and message fuzzing of firmware.frames and firmware.cbor_link.

The properties (checked inside frame_fuzz_peer.py and here): nothing raises, every frame
the reader returns is on the wire with a good CRC, only such frames reach a handler, every
call inserted intact is served once and in order, every call the link sends is answered
once (result, error or timeout), and everything the link writes is one good frame.
The same seeded run gives identical counters in process, under CPython and in MicroPython.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import frame_fuzz_peer  # beside this file (MicroPython-compatible, also run as a script)
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.frames import MAX_PAYLOAD, FrameReader, encode_frame
from hil.rig.firmware_proc import INTERPRETERS, run_firmware

HERE = Path(__file__).resolve().parent
PEER = HERE / "frame_fuzz_peer.py"
SEED = 20240611
ROUNDS = 400


@cache
def expected_summary() -> dict[str, object]:
    return frame_fuzz_peer.run(SEED, ROUNDS)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=2 ** 32 - 1))
def test_random_seeds_keep_every_property(seed: int) -> None:
    summary = frame_fuzz_peer.run(seed, 25)
    assert summary["internal_errors"] == 0 and summary["handler_errors"] == 0


segments = st.lists(
    st.one_of(st.tuples(st.just("frame"), st.binary(min_size=1, max_size=80)),
              st.tuples(st.just("noise"), st.binary(min_size=1, max_size=40)),
              st.tuples(st.just("sync"), st.binary(max_size=6).map(lambda b: b"\xc5" + b)),
              st.tuples(st.just("cut"), st.binary(min_size=1, max_size=40))),
    max_size=25)


@settings(max_examples=200, deadline=None)
@given(segments, st.lists(st.integers(min_value=1, max_value=100), min_size=1, max_size=20))
def test_reader_returns_exactly_the_intact_frames(parts: list[tuple[str, bytes]], sizes: list[int]) -> None:
    stream = bytearray()
    intact: list[bytes] = []
    for kind, data in parts:
        if kind == "frame":
            intact.append(data)
            stream += encode_frame(data)
        elif kind == "cut":  # a frame broken off part way
            wire = encode_frame(data)
            stream += wire[: len(data) % (len(wire) - 1) + 1]
        else:
            stream += data
    reader = FrameReader()
    got: list[bytes] = []
    window = bytes(stream)
    pos = 0
    i = 0

    def take() -> None:
        nonlocal window
        while (frame := reader.next_frame()) is not None:
            wire = frame_fuzz_peer.ref_frame(bytes(frame))
            at = window.find(wire)
            assert at >= 0, "returned a frame that is not on the wire with a good CRC"
            window = window[at + len(wire):]
            got.append(bytes(frame))

    while pos < len(stream):
        n = sizes[i % len(sizes)]
        i += 1
        reader.feed(bytes(stream[pos:pos + n]))
        pos += n
        take()
    while reader.pending:  # the line went quiet
        reader.abort()
        take()
    assert reader.dropped == 0
    extra = list(got)
    for payload in intact:
        if payload in extra:
            extra.remove(payload)
    if not extra:  # no accidental good-CRC frame in the noise, so nothing was lost
        assert got == intact


def test_reader_handles_the_largest_frames_back_to_back() -> None:
    payloads = [bytes([n]) * MAX_PAYLOAD for n in (0xC5, 0x00, 0xFF)]
    reader = FrameReader()
    reader.feed(b"".join(encode_frame(p) for p in payloads))
    got = []
    while (frame := reader.next_frame()) is not None:
        got.append(bytes(frame))
    assert got == payloads and reader.garbage_bytes == 0


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_seeded_fuzz_run_is_identical_under_both_interpreters(interp: str, tmp_path: Path) -> None:
    expected = expected_summary()
    done = run_firmware(interp, PEER, [str(SEED), str(ROUNDS)], heap="128K", timeout_s=120, cwd=tmp_path,
                        extra_paths=[HERE])
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, output
    summary = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert summary == expected
    # The run exercised every kind of bad input.
    for name in ("bad_crc", "oversize", "garbage_bytes", "bad_cbor", "bad_messages", "unknown_actions",
                 "unsupported", "unmatched", "rx_stale", "errors_sent", "rx_results", "rx_errors"):
        assert summary[name] > 0, name
    assert summary["dispatched"] == summary["clean"] == summary["rx_calls"] > 100
    assert summary["internal_errors"] == summary["handler_errors"] == summary["tx_failures"] == 0
