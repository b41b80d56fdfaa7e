# CRC-16/MODBUS against published frames (runs on CPython and MicroPython).
from fwtest import hexbytes

from firmware.crc import crc16


def test_published_sdm_request_crc():
    # STANDARDS.md: read voltage L1 request 01 04 00 00 00 02 71 CB (CRC low byte first).
    crc = crc16(hexbytes("01 04 00 00 00 02"))
    assert crc == 0xCB71


def test_published_sdm_reply_crc():
    frame = hexbytes("01 04 04 43 66 33 34 1B 38")
    assert crc16(frame, 0, len(frame) - 2) == 0x381B
    # A whole frame including its CRC checks to zero: how receivers validate.
    assert crc16(frame) == 0


def test_crc_of_a_window_without_slicing():
    data = bytearray(b"\xaa\xaa" + hexbytes("01 04 00 00 00 02") + b"\xbb")
    assert crc16(data, 2, 8) == 0xCB71


def test_check_value():
    # The catalogue check value of CRC-16/MODBUS over "123456789".
    assert crc16(b"123456789") == 0x4B37
