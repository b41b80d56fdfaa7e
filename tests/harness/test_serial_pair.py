"""Serial line pairs behave like a null-modem cable that pyserial opens on both ends."""

from __future__ import annotations

import time

import serial

from hil.rig.serial_pair import SerialPair


def test_bytes_flow_both_ways(serial_pair: SerialPair) -> None:
    a = serial.Serial(serial_pair.a_path, 115200, timeout=2)
    b = serial.Serial(serial_pair.b_path, 115200, timeout=2)
    try:
        frame = bytes.fromhex("01 04 00 00 00 02 71 CB")
        a.write(frame)
        assert b.read(len(frame)) == frame
        b.write(b"\x00\xff\x11\x13")  # binary bytes, including XON/XOFF, pass untouched
        assert a.read(4) == b"\x00\xff\x11\x13"
    finally:
        a.close()
        b.close()


def test_baud_pacing_makes_the_wire_take_its_time() -> None:
    with SerialPair(baud=9600) as pair:
        a = serial.Serial(pair.a_path, 9600, timeout=3)
        b = serial.Serial(pair.b_path, 9600, timeout=3)
        try:
            start = time.monotonic()
            a.write(b"x" * 96)
            assert len(b.read(96)) == 96
            # 96 characters x 11 bits at 9600 baud = 110 ms on a real wire.
            assert time.monotonic() - start >= 0.105
        finally:
            a.close()
            b.close()


def test_manipulator_can_corrupt_and_drop() -> None:
    def flip_first_byte(direction: str, chunk: bytes) -> bytes:
        if direction == "ab":
            return bytes([chunk[0] ^ 0xFF]) + chunk[1:]
        return b""  # drop everything going back

    with SerialPair(manipulator=flip_first_byte) as pair:
        a = serial.Serial(pair.a_path, 9600, timeout=0.3)
        b = serial.Serial(pair.b_path, 9600, timeout=0.3)
        try:
            a.write(b"\x01\x02")
            assert b.read(2) == b"\xfe\x02"
            b.write(b"reply")
            assert a.read(5) == b""
        finally:
            a.close()
            b.close()
