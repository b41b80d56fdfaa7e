"""Bus faults: the manipulator on its own (seeded, counted), on a real SerialPair, and
1 % corrupted bytes on the link of the real firmware (MicroPython), where Modbus keeps
working through retries."""

from __future__ import annotations

import os
import select
import time

import pytest

from firmware import regmap
from hil.bus_faults import BusFaults, LineSplice
from hil.replay.column_link import ModbusBus, TargetError
from hil.replay.mpy import MpyTarget
from hil.replay.realtime import Column, RealtimeColumns
from hil.rig.serial_pair import SerialPair
from tests.hil.test_mpy_target import CONFIG, Session


def _frames(n: int, size: int = 64) -> list[bytes]:
    return [bytes((i * 7 + k) & 0xFF for k in range(size)) for i in range(n)]


def test_corruption_flips_one_bit_per_byte_at_the_rate_asked() -> None:
    faults = BusFaults(seed=3, corrupt_rate=0.01)
    sent = _frames(3000)
    got = [faults("ab", f) for f in sent]
    flipped = 0
    for a, b in zip(sent, got, strict=True):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            if x != y:
                assert bin(x ^ y).count("1") == 1
                flipped += 1
    counts = faults.counts()
    assert counts.corrupted == flipped
    assert 1700 <= flipped <= 2300  # 192,000 bytes at 1 %: 1,920 expected
    assert counts.bytes_in == counts.bytes_out == 3000 * 64 and counts.chunks == 3000


def test_the_same_seed_does_the_same_damage() -> None:
    def run(seed: int) -> list[bytes]:
        faults = BusFaults(seed=seed, drop_rate=0.02, corrupt_rate=0.02, split_rate=0.1)
        return [faults("ab" if i % 2 else "ba", f) for i, f in enumerate(_frames(200))]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_dropped_bytes_are_counted() -> None:
    faults = BusFaults(seed=1, drop_rate=0.1)
    out = b"".join(faults("ab", f) for f in _frames(100))
    assert faults.counts().dropped == 6400 - len(out) > 0


def test_a_split_chunk_sends_its_tail_with_the_next_chunk_in_that_direction() -> None:
    faults = BusFaults(seed=5, split_rate=1.0, directions=("ab",))
    head = faults("ab", b"\x01\x03\x00\x00\x00\x02\xc4\x0b")
    assert 1 <= len(head) < 8
    assert faults("ba", b"reply") == b"reply"    # the other direction is not held up
    faults.split_rate = 0.0
    assert head + faults("ab", b"next") == b"\x01\x03\x00\x00\x00\x02\xc4\x0bnext"
    assert faults.counts().split == 1


def test_a_silent_column_swallows_only_what_it_sends() -> None:
    faults = BusFaults(silent=True, column_side="b")
    assert faults("ab", b"request") == b"request"
    assert faults("ba", b"reply") == b""
    faults.silence(False)
    assert faults("ba", b"reply") == b"reply"
    assert faults.counts().silenced == 5


def test_a_delay_holds_the_chunk() -> None:
    faults = BusFaults(delay_rate=1.0, delay_s=0.05, directions=("ba",))
    t0 = time.monotonic()
    assert faults("ab", b"x") == b"x"
    assert time.monotonic() - t0 < 0.04
    assert faults("ba", b"y") == b"y"
    assert time.monotonic() - t0 >= 0.05
    assert faults.counts().delayed == 1


@pytest.mark.parametrize("kwargs", [{"corrupt_rate": 1.5}, {"drop_rate": -0.1}, {"delay_s": -1},
                                    {"column_side": "c"}, {"directions": ("ac",)}])
def test_bad_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BusFaults(**kwargs)  # type: ignore[arg-type]


def _read(fd: int, n: int, timeout_s: float = 2.0) -> bytes:
    got = b""
    deadline = time.monotonic() + timeout_s
    while len(got) < n and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.05)[0]:
            got += os.read(fd, 4096)
    return got


def test_faults_on_a_serial_pair_spliced_in_front_of_another_line() -> None:
    # a --(faulty pair)-- b ~splice~ c --(plain pair)-- d
    faults = BusFaults(seed=2, corrupt_rate=0.5, directions=("ab",))
    with SerialPair(manipulator=faults) as wire, SerialPair() as far, \
            LineSplice(wire.b_path, far.a_path):
        a = os.open(wire.a_path, os.O_RDWR | os.O_NOCTTY)
        d = os.open(far.b_path, os.O_RDWR | os.O_NOCTTY)
        try:
            os.write(a, bytes(100))
            damaged = _read(d, 100)
            assert len(damaged) == 100 and damaged != bytes(100)
            assert sum(1 for x in damaged if x) == faults.counts().corrupted
            os.write(d, b"clean reply")            # "ba" is not in the faulty directions
            assert _read(a, 11) == b"clean reply"
        finally:
            os.close(a)
            os.close(d)


def test_modbus_to_the_firmware_works_through_one_percent_corrupted_bytes() -> None:
    faults = BusFaults(seed=7, corrupt_rate=0.01)
    target = MpyTarget(interp="micropython", link_faults=faults, timeout_s=0.1, retries=3)
    try:
        target.start({"col-1": CONFIG})
        s = Session(target, "col-1")
        target.assign_limit("col-1", 0, 16.0, 120, failsafe_a=8.0)
        s.wait("the assignment", lambda o: not o.failsafe_active, 3000)
        s.inputs(cp_mv=6000)
        s.wait("charging at 16 A", lambda o: o.status == "Charging" and o.offered_a == 16.0
               and o.limit_source == "gateway", 3000)
        target.assign_limit("col-1", s.now, 10.0, 120, failsafe_a=8.0)
        s.wait("10 A", lambda o: o.offered_a == 10.0, 2000)
        for _ in range(30):
            s.step(100)
        stats = target.stats("col-1")
        regs = target.registers("col-1")
    finally:
        target.close()
    counts = faults.counts()
    assert counts.corrupted > 0
    assert stats.assignments == 2 and stats.writes_rejected == 0
    assert stats.retries > 0                          # the harness repeated requests...
    assert stats.reads_ok > 2 * stats.reads_failed    # ...and most polls got through
    assert regs is not None and regs[regmap.IR_BAD_FRAMES] > 0   # the column counted the bad requests


def test_trace_noise_windows_drive_the_wire() -> None:
    # The engine's link_fault hook: a delivery-level rate becomes a per-byte rate on the
    # wire for the window's length, then the wire is clean again.
    wire = BusFaults()
    target = RealtimeColumns(speed="max")
    target.columns["c1"] = Column("c1", CONFIG, ModbusBus("/dev/null"), faults=wire)
    target.columns["c2"] = Column("c2", CONFIG, ModbusBus("/dev/null"))   # no wire on its link
    assert target.link_fault("c1", 1000, "corrupt", 5000, {"rate": 0.2})
    assert 1 - (1 - wire.corrupt_rate) ** 23 == pytest.approx(0.2)   # a 23-byte exchange: 20 %
    assert target.link_fault("c1", 2000, "delay", 1000, {"rate": 1.0, "delay_ms": 250})
    assert (wire.delay_rate, wire.delay_s) == (1.0, 0.25)
    target.advance(3500)
    assert wire.delay_rate == 0.0 and wire.corrupt_rate > 0.0   # the delay window is over
    target.advance(6000)
    assert wire.corrupt_rate == 0.0
    assert not target.link_fault("c1", 6000, "silent", 1000, {})   # silence is gateway_silent's
    assert not target.link_fault(None, 6000, "drop", 1000, {})     # c2 has no wire: the engine models it
    with pytest.raises(TargetError, match="rate must be a number from 0 to 1"):
        target.link_fault("c1", 7000, "drop", 1000, {"rate": 2})
