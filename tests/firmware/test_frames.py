# firmware.frames: exact wire bytes, and a reader that recovers from any garbage.
from fwtest import IS_MICROPYTHON, hexbytes, raises

from firmware.frames import MAX_PAYLOAD, SYNC, FrameReader, encode_frame

# Wire bytes checked against pymodbus' CRC-16/MODBUS.
EMPTY_MAP = hexbytes("c5 00 01 a0 70 28")
HEARTBEAT = hexbytes("c5 00 0e 84 02 01 69 48 65 61 72 74 62 65 61 74 a0 84 f5")
SYNCS = hexbytes("c5 00 02 c5 c5 32 e7")  # payload full of SYNC bytes


def drain(reader):
    out = []
    while True:
        frame = reader.next_frame()
        if frame is None:
            return out
        out.append(bytes(frame))


def frames_of(reader, *chunks):
    out = []
    for chunk in chunks:
        reader.feed(chunk)
        out += drain(reader)
    return out


def test_encode_frame_exact_bytes():
    assert SYNC == 0xC5
    assert encode_frame(b"\xa0") == EMPTY_MAP
    assert encode_frame(HEARTBEAT[3:-2]) == HEARTBEAT
    assert encode_frame(b"\xc5\xc5") == SYNCS
    big = encode_frame(bytes(MAX_PAYLOAD))
    assert len(big) == MAX_PAYLOAD + 5
    assert big[:3] == hexbytes("c5 04 00") and big[-2:] == hexbytes("30 8a")


def test_encode_frame_rejects_empty_and_oversized_payloads():
    raises(ValueError, encode_frame, b"")
    raises(ValueError, encode_frame, bytes(MAX_PAYLOAD + 1))
    raises(ValueError, encode_frame, b"abc", 2)


def test_one_frame_in_one_chunk():
    r = FrameReader()
    frame = None
    r.feed(HEARTBEAT)
    frame = r.next_frame()
    assert isinstance(frame, memoryview)
    assert bytes(frame) == HEARTBEAT[3:-2]
    assert r.next_frame() is None
    assert (r.frames, r.bad_crc, r.oversize, r.garbage_bytes, r.pending) == (1, 0, 0, 0, 0)


def test_frames_split_at_every_byte_and_back_to_back():
    stream = HEARTBEAT + EMPTY_MAP + SYNCS
    r = FrameReader()
    got = frames_of(r, *[stream[i:i + 1] for i in range(len(stream))])
    assert got == [HEARTBEAT[3:-2], b"\xa0", b"\xc5\xc5"]
    for cut in range(1, len(stream)):
        r = FrameReader()
        assert frames_of(r, stream[:cut], stream[cut:]) == got
        assert r.garbage_bytes == 0


def test_garbage_before_between_and_after_frames():
    r = FrameReader()
    got = frames_of(r, b"\x00\xff" + HEARTBEAT + b"\x13\x37\x42" + EMPTY_MAP + b"\x99")
    assert got == [HEARTBEAT[3:-2], b"\xa0"]
    assert r.garbage_bytes == 6 and r.frames == 2 and r.pending == 0


def test_bad_crc_frame_is_dropped_and_the_next_frame_found():
    bad = bytearray(HEARTBEAT)
    bad[5] ^= 0x01
    r = FrameReader()
    assert frames_of(r, bytes(bad) + EMPTY_MAP) == [b"\xa0"]
    assert r.bad_crc == 1 and r.frames == 1
    assert r.garbage_bytes == len(bad)


def test_false_sync_with_plausible_length_swallowing_a_real_frame():
    # c5 00 08 claims 8 payload bytes: the real frame that follows is read as its body,
    # the CRC fails, and the resync finds the real frame inside the buffered bytes.
    r = FrameReader()
    got = frames_of(r, hexbytes("c5 00 08") + EMPTY_MAP + EMPTY_MAP)
    assert got == [b"\xa0", b"\xa0"]
    assert r.bad_crc == 1 and r.garbage_bytes == 3
    # Same, with garbage read ahead behind the recovered frame.
    r = FrameReader()
    r.feed(hexbytes("c5 00 08") + EMPTY_MAP + hexbytes("00 11") + HEARTBEAT)
    first = r.next_frame()
    assert bytes(first) == b"\xa0" and r.pending == 4  # 00 11 c5 00 read ahead
    assert bytes(r.next_frame()) == HEARTBEAT[3:-2]
    assert r.next_frame() is None
    assert r.bad_crc == 1 and r.garbage_bytes == 5 and r.frames == 2 and r.pending == 0


def test_sync_inside_a_corrupted_payload_is_tried_and_rejected():
    bad = bytearray(SYNCS)
    bad[-1] ^= 0xFF
    r = FrameReader()
    assert frames_of(r, bytes(bad) + HEARTBEAT) == [HEARTBEAT[3:-2]]
    assert r.bad_crc == 1 and r.frames == 1


def test_oversized_and_zero_lengths_are_rejected_then_resynced():
    r = FrameReader()
    assert frames_of(r, hexbytes("c5 04 01") + EMPTY_MAP) == [b"\xa0"]
    assert r.oversize == 1
    r = FrameReader()
    assert frames_of(r, hexbytes("c5 00 00") + EMPTY_MAP) == [b"\xa0"]
    assert r.oversize == 1
    r = FrameReader(max_payload=8)
    assert frames_of(r, HEARTBEAT + EMPTY_MAP) == [b"\xa0"]
    assert r.oversize == 1 and r.bad_crc == 0


def test_largest_frame_accepted():
    payload = bytes([i & 0xFF for i in range(MAX_PAYLOAD)])
    r = FrameReader()
    assert frames_of(r, encode_frame(payload) + EMPTY_MAP) == [payload, b"\xa0"]


def test_frame_is_a_view_valid_until_the_next_call():
    r = FrameReader()
    r.feed(EMPTY_MAP + HEARTBEAT)
    first = r.next_frame()
    assert bytes(first) == b"\xa0"
    second = r.next_frame()
    assert bytes(second) == HEARTBEAT[3:-2]


def test_feeding_again_before_draining_counts_the_dropped_bytes():
    r = FrameReader()
    r.feed(EMPTY_MAP + EMPTY_MAP)
    assert bytes(r.next_frame()) == b"\xa0"
    r.feed(HEARTBEAT)
    assert r.dropped == len(EMPTY_MAP)
    assert bytes(r.next_frame()) == HEARTBEAT[3:-2]


def test_abort_gives_up_a_stale_partial_frame():
    r = FrameReader()
    assert frames_of(r, hexbytes("c5 03 ff 00") + EMPTY_MAP) == []
    assert r.pending == 4 + len(EMPTY_MAP)
    r.abort()
    assert drain(r) == [b"\xa0"]
    assert r.pending == 0 and r.garbage_bytes == 4
    r.abort()  # nothing pending: no effect
    assert r.garbage_bytes == 4


def test_reset_forgets_partial_frame():
    r = FrameReader()
    assert frames_of(r, HEARTBEAT[:7]) == []
    r.reset()
    assert frames_of(r, EMPTY_MAP) == [b"\xa0"]


def test_only_sync_bytes():
    r = FrameReader()
    assert frames_of(r, bytes([SYNC]) * 50) == []
    assert r.oversize > 0
    assert frames_of(r, EMPTY_MAP) == [b"\xa0"]


def test_per_byte_paths_allocate_nothing():
    if not IS_MICROPYTHON:
        return
    import micropython
    bad = bytearray(HEARTBEAT)
    bad[4] ^= 0x40
    stream = b"\x00\x11" + hexbytes("c5 ff ff") + bytes(bad) + HEARTBEAT[:9]
    r = FrameReader()
    micropython.heap_lock()
    try:
        r.feed(stream)
        frame = r.next_frame()
    finally:
        micropython.heap_unlock()
    assert frame is None
    assert r.bad_crc == 1 and r.oversize == 1 and r.pending == 9
