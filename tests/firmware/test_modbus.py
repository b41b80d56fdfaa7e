# Modbus RTU request parsing and reply building with exact wire frames (CPython and
# MicroPython). The slave's behaviour is in test_modbus_slave.py.
from fwtest import IS_MICROPYTHON, hexbytes

from firmware.crc import crc16
from firmware.modbus import RTU_MAX, RtuRequestParser
from firmware.modbus_slave import echo_pdu, exception_pdu, finish_rtu, read_pdu
from firmware.modbus_tcp import MBAP_LEN, finish_mbap, mbap_frame_length

READ_IR = "01 04 00 00 00 02 71 CB"            # read input registers 0..1 of unit 1
WRITE_2 = "01 10 00 00 00 02 04 00 A0 00 3C F3 9C"  # write 160, 60 to holding 0..1
SDM_REPLY = "01 04 04 43 66 33 34 1B 38"      # a meter's reply (STANDARDS.md), not a request


def feed_all(parser, data):
    taken = 0
    while taken < len(data):
        taken += parser.feed(data, taken)


def requests_in(parser):
    """Every request the parser holds, as (unit, fc, frame bytes)."""
    found = []
    while True:
        n = parser.next_request()
        if n == 0:
            return found
        found.append((parser.unit, parser.fc, bytes(parser.frame[0:n])))


def test_read_request_is_recognised_at_its_last_byte():
    p = RtuRequestParser()
    frame = hexbytes(READ_IR)
    for i in range(len(frame) - 1):
        p.feed(frame, i, i + 1)
        assert p.next_request() == 0
    p.feed(frame, 7, 8)
    assert p.next_request() == 8
    assert (p.unit, p.fc) == (1, 4)
    assert bytes(p.pdu[0:5]) == hexbytes("04 00 00 00 02")
    assert p.next_request() == 0
    assert p.frames == 1 and p.errors() == 0


def test_write_multiple_length_comes_from_its_byte_count():
    p = RtuRequestParser()
    frame = hexbytes(WRITE_2)
    p.feed(frame, 0, 12)
    assert p.next_request() == 0
    p.feed(frame, 12)
    assert p.next_request() == 13
    assert p.fc == 16 and p.pdu[5] == 4


def test_bad_crc_is_dropped_and_counted_at_the_gap():
    p = RtuRequestParser()
    p.feed(hexbytes("01 04 00 00 00 02 71 CC"))
    assert p.next_request() == 0
    p.gap()
    assert p.bad_crc == 1 and p.frames == 0
    # The line is clean again: the next frame goes through.
    p.feed(hexbytes(READ_IR))
    assert p.next_request() == 8


def test_gap_inside_a_frame_discards_the_partial_frame():
    p = RtuRequestParser()
    p.feed(hexbytes("01 04 00 00"))
    p.gap()
    assert p.truncated == 1
    p.feed(hexbytes("00 02 71 CB"))   # the rest alone is no request
    assert p.next_request() == 0
    p.gap()
    p.feed(hexbytes(READ_IR))
    assert requests_in(p) == [(1, 4, hexbytes(READ_IR))]
    assert p.errors() == 2


def test_resync_after_garbage_without_a_gap():
    p = RtuRequestParser()
    p.feed(hexbytes("FF 13 00 01 04 99") + hexbytes(READ_IR))
    assert requests_in(p) == [(1, 4, hexbytes(READ_IR))]
    assert p.garbage == 1


def test_back_to_back_frames_in_one_read():
    p = RtuRequestParser()
    p.feed(hexbytes(READ_IR) + hexbytes(WRITE_2) + hexbytes(READ_IR))
    found = requests_in(p)
    assert [f[1] for f in found] == [4, 16, 4]
    assert found[1][2] == hexbytes(WRITE_2)


def test_another_stations_reply_is_foreign_not_an_error():
    p = RtuRequestParser()
    p.feed(hexbytes(SDM_REPLY))
    assert p.next_request() == 0
    p.gap()
    assert p.foreign == 1 and p.errors() == 0
    p.feed(hexbytes("02 84 02 32 C1"))  # someone's exception reply (top bit set)
    p.gap()
    assert requests_in(p) == [] and p.foreign == 2


def test_a_reply_glued_to_the_next_request_is_foreign_not_garbage():
    # A transport that noticed no silence between another station's reply and the next
    # request still finds the request, and does not count the reply as damage.
    p = RtuRequestParser()
    p.feed(hexbytes(SDM_REPLY) + hexbytes(READ_IR))
    assert requests_in(p) == [(1, 4, hexbytes(READ_IR))]
    assert p.foreign == 1 and p.errors() == 0


def test_unknown_function_is_delivered_after_the_gap():
    # FC43 read device identification: no length rule, so the silence delimits it.
    p = RtuRequestParser()
    p.feed(hexbytes("01 2B 0E 01 00 70 77"))
    assert p.next_request() == 0
    p.gap()
    assert requests_in(p) == [(1, 0x2B, hexbytes("01 2B 0E 01 00 70 77"))]


def test_stream_longer_than_a_frame_is_counted_and_recovers():
    p = RtuRequestParser()
    noise = bytearray(300)   # zeros: function code 0 starts no request
    feed_all(p, noise)
    assert p.next_request() == 0
    assert p.too_long == 1
    p.gap()
    p.feed(hexbytes(READ_IR))
    assert p.next_request() == 8


def test_feed_takes_no_more_than_fits():
    p = RtuRequestParser()
    block = bytearray(RTU_MAX + 10)
    assert p.feed(block) == RTU_MAX
    assert p.feed(block, RTU_MAX) == 10   # overflow handling made room


def test_exception_reply_frame():
    out = bytearray(RTU_MAX)
    n = finish_rtu(out, 1, exception_pdu(out, 1, 4, 2))
    assert bytes(out[0:n]) == hexbytes("01 84 02 C2 C1")


def test_read_reply_frame():
    out = bytearray(RTU_MAX)
    image = [0x4366, 0x3334]
    n = finish_rtu(out, 1, read_pdu(out, 1, 4, image, 0, 2))
    assert bytes(out[0:n]) == hexbytes(SDM_REPLY)   # the meter's published reply
    assert crc16(out, 0, n) == 0


def test_echo_reply_frame():
    out = bytearray(RTU_MAX)
    n = finish_rtu(out, 1, echo_pdu(out, 1, 16, 0, 2))
    assert bytes(out[0:n]) == hexbytes("01 10 00 00 00 02 41 C8")


def test_mbap_header():
    req = hexbytes("12 34 00 00 00 06 01 04 00 00 00 02")
    assert mbap_frame_length(req, 6) == 0            # header incomplete
    assert mbap_frame_length(req, len(req)) == 12
    assert mbap_frame_length(hexbytes("12 34 00 01 00 06 01"), 7) == -1   # protocol id 1
    assert mbap_frame_length(hexbytes("12 34 00 00 01 00 01"), 7) == -1   # 256 > 254
    assert mbap_frame_length(hexbytes("12 34 00 00 00 01 01"), 7) == -1   # no function code
    out = bytearray(260)
    n = finish_mbap(out, 0x1234, 1, exception_pdu(out, MBAP_LEN, 4, 2))
    assert bytes(out[0:n]) == hexbytes("12 34 00 00 00 03 01 84 02")


def test_parsing_allocates_nothing():
    if not IS_MICROPYTHON:
        return
    import micropython

    p = RtuRequestParser()
    good = hexbytes(READ_IR + " " + WRITE_2)
    bad = hexbytes("01 04 00 00 00 02 71 CC 33")
    reply = hexbytes(SDM_REPLY)
    out = bytearray(RTU_MAX)
    image = bytearray(4)
    counts = [0, 0]
    micropython.heap_lock()
    try:
        for _ in range(3):
            p.feed(good)
            while p.next_request():
                counts[0] += 1
            p.feed(bad)
            p.next_request()
            p.gap()
            p.feed(reply)
            p.gap()
            counts[1] = finish_rtu(out, 1, read_pdu(out, 1, 4, image, 0, 2))
    finally:
        micropython.heap_unlock()
    assert counts == [6, 9]
    assert p.bad_crc == 3 and p.foreign == 3
