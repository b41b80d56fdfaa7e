# Meter reader (firmware.meter, firmware.sdm) fed with recorded and hand-built wire bytes.
# Runs under CPython and the MicroPython unix port (see conftest.py).
import struct

from fwtest import IS_MICROPYTHON, hexbytes, raises

from firmware import meter as meter_mod
from firmware import sdm
from firmware.crc import crc16
from firmware.meter import Meter, read_request, ticks_diff

# The published real exchange (STANDARDS.md): read voltage L1 -> 230.2 V.
STD_REQUEST = "01 04 00 00 00 02 71 CB"
STD_REPLY = "01 04 04 43 66 33 34 1B 38"

SDM630_REQUEST = "01 04 00 00 00 4C F1 FF"          # 76 registers from 0x0000
SDM120_REQUESTS = (STD_REQUEST,                        # V 0x0000
                   "01 04 00 06 00 02 91 CA",          # I 0x0006
                   "01 04 00 0C 00 02 B1 C8",          # P 0x000C
                   "01 04 00 46 00 06 91 DD")          # F, import, export 0x0046..0x004B


class Bus:
    """Collects what the meter writes; no allocation in write beyond the list slot."""

    def __init__(self):
        self.sent = []

    def write(self, data):
        self.sent.append(bytes(data))


def frame(addr, fc, payload):
    """addr, fc, payload and CRC (low byte first)."""
    out = bytearray([addr, fc]) + bytearray(payload)
    crc = crc16(out)
    out.append(crc & 0xFF)
    out.append(crc >> 8)
    return bytes(out)


def reply(start, count, values, addr=1):
    """A normal FC04 reply for registers start..start+count with float32 values {reg: x}."""
    data = bytearray(2 * count)
    for reg in values:
        struct.pack_into(">f", data, 2 * (reg - start), values[reg])
    return frame(addr, 4, bytearray([2 * count]) + data)


SDM630_VALUES = {
    0x00: 230.2, 0x02: 231.0, 0x04: 229.5,      # V
    0x06: 16.0, 0x08: 15.94, 0x0A: 0.0,         # A
    0x0C: 3683.0, 0x0E: 3660.5, 0x10: -12.25,   # W
    0x34: 7331.25,                              # total W
    0x46: 49.98,                                # Hz
    0x48: 1234.567, 0x4A: 0.5,                  # kWh
}


def sdm630_reply(values=None, **changes):
    vals = dict(SDM630_VALUES)
    if values:
        vals.update(values)
    return reply(0, 76, vals, **changes)


def sdm120_replies(*, v=230.2, i=10.0, p=2302.0, f=50.0, imp=12.5, exp=0.0):
    return (reply(0x00, 2, {0x00: v}), reply(0x06, 2, {0x06: i}), reply(0x0C, 2, {0x0C: p}),
            reply(0x46, 6, {0x46: f, 0x48: imp, 0x4A: exp}))


def sdm630(**kw):
    bus = Bus()
    return Meter(sdm.SDM630, 1, bus.write, **kw), bus


def good_cycle(m, now, rep=None):
    assert m.poll(now)
    m.on_bytes(rep or sdm630_reply(), now + 200)


# -- register map and codecs ---------------------------------------------------------------
def test_register_map_matches_standards_table():
    assert sdm.REG_VOLTAGE == (0x0000, 0x0002, 0x0004)
    assert sdm.REG_CURRENT == (0x0006, 0x0008, 0x000A)
    assert sdm.REG_POWER == (0x000C, 0x000E, 0x0010)
    assert (sdm.REG_TOTAL_POWER, sdm.REG_FREQUENCY) == (0x0034, 0x0046)
    assert (sdm.REG_IMPORT_KWH, sdm.REG_EXPORT_KWH, sdm.REG_TOTAL_KWH) == (0x0048, 0x004A, 0x0156)
    assert sdm.BLOCKS[sdm.SDM630] == ((0x0000, 76),)
    # Every SDM120 block holds defined registers only (its map has holes).
    defined = [r for r in sdm.FIELDS[sdm.SDM120] if r >= 0]
    for start, count in sdm.BLOCKS[sdm.SDM120]:
        for reg in range(start, start + count, 2):
            assert reg in defined, hex(reg)
    for start, count in sdm.BLOCKS[sdm.SDM630] + sdm.BLOCKS[sdm.SDM120]:
        assert count <= 80


def test_request_builder_matches_recorded_request():
    assert read_request(1, 0x0000, 2) == hexbytes(STD_REQUEST)
    assert read_request(1, 0x0000, 76) == hexbytes(SDM630_REQUEST)


def test_decode_f32_recorded_and_edge_values():
    assert sdm.decode_f32(hexbytes("43 66 33 34"), 0, 10) == 2302        # 230.2 V -> dV
    assert sdm.decode_f32(hexbytes(STD_REPLY), 3, 10) == 2302
    buf = bytearray(4)
    for value, scale, want in ((49.98, 100, 4998), (1234.567, 1000, 1234567), (0.0, 10, 0),
                               (-1500.5, 1, -1501), (1500.5, 1, 1501), (0.0004, 1000, 0),
                               (0.0005, 1000, 1), (99999.99, 1000, 99999992), (1.0, 1, 1)):
        struct.pack_into(">f", buf, 0, value)
        assert sdm.decode_f32(buf, 0, scale) == want, (value, scale)
    assert sdm.decode_f32(hexbytes("7F C0 00 00"), 0, 10) is None       # NaN
    assert sdm.decode_f32(hexbytes("FF 80 00 00"), 0, 10) is None       # -inf
    assert sdm.decode_f32(hexbytes("5F 00 00 00"), 0, 1) is None        # 2^63: implausible
    assert sdm.decode_f32(hexbytes("00 00 00 01"), 0, 1000) == 0        # subnormal
    assert sdm.decode_f32(hexbytes("80 00 00 00"), 0, 1000) == 0        # -0.0


def test_ticks_diff_across_wrap():
    assert ticks_diff(5, (1 << 30) - 5) == 10
    assert ticks_diff((1 << 30) - 5, 5) == -10
    assert ticks_diff((1 << 62) + 3, (1 << 62) - 7) == 10


def test_bad_configuration_raises_at_construction():
    raises(ValueError, Meter, "sdm999", 1, Bus().write)
    raises(ValueError, Meter, sdm.SDM630, 0, Bus().write)
    raises(ValueError, Meter, sdm.SDM630, 248, Bus().write)


# -- whole cycles ---------------------------------------------------------------------------
def test_sdm120_cycle_reproduces_recorded_exchange():
    bus = Bus()
    m = Meter(sdm.SDM120, 1, bus.write)
    assert m.poll(0)
    assert bus.sent == [hexbytes(STD_REQUEST)]
    m.on_bytes(hexbytes(STD_REPLY), 30)
    assert m.replies == 1 and m.is_stale(30)          # one block of four: nothing applied yet
    assert m.voltage_dv == [0, 0, 0]
    reps = sdm120_replies(i=10.04, p=2311.0, f=50.01, imp=12.5, exp=0.25)
    now = 30
    for k in range(1, 4):
        assert not m.poll(now + 4)                     # bus gap first
        assert m.poll(now + 5)
        assert bus.sent[k] == hexbytes(SDM120_REQUESTS[k])
        now += 30
        m.on_bytes(reps[k], now)
    assert m.cycles == 1 and not m.is_stale(now)
    assert m.voltage_dv == [2302, 0, 0]
    assert m.current_da == [100, 0, 0]
    assert m.power_phase_w == [2311, 0, 0] and m.power_w == 2311
    assert (m.freq_chz, m.energy_wh, m.export_wh, m.last_ok_ms) == (5001, 12500, 250, now)
    assert (m.requests, m.replies) == (4, 4)
    assert not m.poll(now + 100)                       # next cycle one interval after the first
    assert m.poll(1000)
    assert bus.sent[-1] == hexbytes(STD_REQUEST)


def test_sdm630_cycle_decodes_every_field():
    m, bus = sdm630()
    assert m.is_stale(0)                              # stale before the first read
    assert m.poll(0)
    assert bus.sent == [hexbytes(SDM630_REQUEST)]
    m.on_bytes(sdm630_reply(), 190)
    assert m.voltage_dv == [2302, 2310, 2295]
    assert m.current_da == [160, 159, 0]
    assert m.power_phase_w == [3683, 3661, -12]       # 3660.5 rounds away from zero
    assert m.power_w == 7331
    assert (m.freq_chz, m.energy_wh, m.export_wh) == (4998, 1234567, 500)
    assert (m.cycles, m.replies, m.last_ok_ms, m.busy) == (1, 1, 190, False)
    assert not m.is_stale(190)


def test_split_reply_across_chunks():
    rep = sdm630_reply()
    # Byte by byte.
    m, _ = sdm630()
    m.poll(0)
    for i in range(len(rep)):
        m.on_bytes(rep[i:i + 1], 10 + i)
    assert m.cycles == 1 and m.voltage_dv[0] == 2302
    # Uneven chunks, as memoryviews of a reused buffer with a count (the UART readinto way).
    m, _ = sdm630()
    m.poll(0)
    buf = bytearray(128)
    cuts = (0, 1, 2, 3, 60, 61, 155, 156, len(rep))
    for a, b in zip(cuts, cuts[1:]):  # noqa: RUF007 (no itertools on MicroPython)
        for j in range(b - a):
            buf[j] = rep[a + j]
        m.on_bytes(memoryview(buf), 50, b - a)
    assert m.cycles == 1 and m.energy_wh == 1234567
    # A slow reply keeps the transaction alive: the timeout runs from the last byte.
    m, _ = sdm630(timeout_ms=300)
    m.poll(0)
    m.on_bytes(rep[:100], 250)
    m.poll(500)
    assert m.timeouts == 0
    m.on_bytes(rep[100:], 520)
    assert m.cycles == 1


# -- faults ----------------------------------------------------------------------------------
def test_crc_error_is_counted_and_retried():
    m, bus = sdm630()
    m.poll(0)
    bad = bytearray(sdm630_reply())
    bad[-1] ^= 0x01
    m.on_bytes(bad, 180)
    assert (m.crc_errors, m.cycles, m.voltage_dv[0]) == (1, 0, 0)
    assert not m.poll(184)                        # waits for a quiet bus
    assert m.poll(185)
    assert bus.sent == [hexbytes(SDM630_REQUEST)] * 2
    m.on_bytes(sdm630_reply(), 370)
    assert (m.cycles, m.voltage_dv[0], m.requests) == (1, 2302, 2)
    # A flipped data bit is caught by the CRC as well.
    m, bus = sdm630()
    m.poll(0)
    bad = bytearray(sdm630_reply())
    bad[4] ^= 0x10
    m.on_bytes(bad, 180)
    assert m.crc_errors == 1 and m.cycles == 0


def test_wrong_address_function_or_length_is_dropped():
    for rep in (sdm630_reply(addr=2),                         # another slave
                frame(1, 3, bytearray([152]) + bytearray(152)),  # function 03
                frame(1, 4, bytearray([4, 0x43, 0x66, 0x33, 0x34]))):  # wrong byte count
        m, bus = sdm630()
        m.poll(0)
        m.on_bytes(rep, 100)
        assert (m.bad_replies, m.cycles, m.replies) == (1, 0, 0), rep[:3]
        m.on_bytes(b"\x00" * 20, 110)             # rest of that frame: drained, not parsed
        assert not m.poll(114)
        assert m.poll(115) and len(bus.sent) == 2  # retry once the bus is quiet
        m.on_bytes(sdm630_reply(), 300)
        assert m.cycles == 1 and m.bad_replies == 1


def test_exception_reply_counted_then_cycle_fails():
    m, _ = sdm630(retries=2)
    m.poll(0)
    m.on_bytes(hexbytes("01 84 02 C2 C1"), 20)        # illegal data address
    assert (m.exceptions, m.last_exception, m.replies) == (1, 2, 0)
    assert m.poll(25)
    m.on_bytes(hexbytes("01 84 04 42 C3"), 45)        # device failure
    assert m.poll(50)
    m.on_bytes(hexbytes("01 84 04 42 C3"), 70)
    assert not m.poll(75)                             # 1 + 2 retries used up
    assert (m.exceptions, m.last_exception, m.failed_cycles, m.requests) == (3, 4, 1, 3)
    assert m.is_stale(75) and not m.busy
    # An exception with a bad CRC is a CRC error, not an exception.
    m, _ = sdm630()
    m.poll(0)
    m.on_bytes(hexbytes("01 84 02 C2 C2"), 20)
    assert (m.exceptions, m.crc_errors) == (0, 1)


def test_timeout_retry_then_failed_cycle():
    m, bus = sdm630(timeout_ms=300, retries=2, poll_interval_ms=1000)
    assert m.poll(0)
    assert not m.poll(299)
    assert m.poll(300) and m.timeouts == 1       # retry 1
    assert m.poll(600) and m.timeouts == 2       # retry 2
    assert not m.poll(900)                        # given up
    assert (m.timeouts, m.failed_cycles, m.requests) == (3, 1, 3)
    assert bus.sent == [hexbytes(SDM630_REQUEST)] * 3
    assert not m.poll(999)
    assert m.poll(1000) and m.requests == 4       # next cycle on schedule
    m.on_bytes(sdm630_reply(), 1190)              # the meter is back
    assert m.cycles == 1 and not m.is_stale(1190)
    # A late reply to a timed-out request still completes the (identical) retry.
    m, _ = sdm630(timeout_ms=300)
    m.poll(0)
    m.poll(300)
    m.on_bytes(sdm630_reply(), 310)
    assert m.cycles == 1 and m.timeouts == 1


def test_stale_detection():
    m, _ = sdm630(stale_ms=5000)
    assert m.is_stale(0)                          # before the first read
    good_cycle(m, 0)
    assert not m.is_stale(200) and not m.is_stale(5199)
    assert m.is_stale(5200)
    # Latched: a later ticks value that wraps back near last_ok_ms does not revive it.
    assert m.is_stale(200 + (1 << 30))
    good_cycle(m, 6000)
    assert not m.is_stale(6300)


def test_stale_across_ticks_wrap():
    start = (1 << 30) - 300                       # a board's ticks_ms wraps at 2^30
    m, _ = sdm630(stale_ms=5000)
    good_cycle(m, start)
    now = (start + 200 + 4000) & ((1 << 30) - 1)   # 4 s later, after the wrap
    assert now < start and not m.is_stale(now)
    assert m.poll(start + 1000 - (1 << 30))        # next cycle due across the wrap
    m.on_bytes(sdm630_reply({0x48: 1234.6}), (start + 1200) & ((1 << 30) - 1))
    assert m.cycles == 2 and m.energy_wh == 1234600
    assert m.is_stale((start + 6200) & ((1 << 30) - 1))


def test_energy_never_goes_backwards():
    m, _ = sdm630()
    good_cycle(m, 0, sdm630_reply({0x48: 1000.0, 0x4A: 2.0}))
    assert (m.energy_wh, m.export_wh) == (1000000, 2000)
    good_cycle(m, 1000, sdm630_reply({0x48: 999.9, 0x4A: 2.0, 0x00: 100.0}))
    assert m.meter_backwards == 1
    assert (m.energy_wh, m.voltage_dv[0], m.last_ok_ms, m.cycles) == (1000000, 2302, 200, 1)
    good_cycle(m, 2000, sdm630_reply({0x48: 1000.0, 0x4A: 1.5}))   # export backwards
    assert m.meter_backwards == 2 and m.export_wh == 2000
    good_cycle(m, 3000, sdm630_reply({0x48: 1000.01, 0x4A: 2.0}))
    assert (m.energy_wh, m.cycles, m.last_ok_ms) == (1000010, 2, 3200)


def test_energy_jump_is_bounded_by_max_power():
    m, _ = sdm630(max_power_w=36000)             # 36 kW: 10 Wh per second, plus 20 Wh slack
    good_cycle(m, 0, sdm630_reply({0x48: 100.0}))
    good_cycle(m, 1000, sdm630_reply({0x48: 100.031}))     # +31 Wh in 1 s: > 10 + 20
    assert (m.meter_jumps, m.energy_wh) == (1, 100000)
    good_cycle(m, 2000, sdm630_reply({0x48: 100.04}))      # +40 Wh in 2 s: <= 20 + 20
    assert (m.meter_jumps, m.energy_wh) == (1, 100040)
    # After the meter went stale the size of the step is not judged, only its direction.
    good_cycle(m, 60000, sdm630_reply({0x48: 150.0}))
    assert (m.meter_jumps, m.energy_wh) == (1, 150000)


def test_nan_or_negative_energy_rejected():
    m, _ = sdm630()
    good_cycle(m, 0, sdm630_reply({0x00: float("nan")}))
    assert (m.bad_replies, m.cycles) == (1, 0)
    m, _ = sdm630()
    good_cycle(m, 0, sdm630_reply({0x48: -1.0}))
    assert (m.bad_replies, m.cycles) == (1, 0)


def test_write_error_becomes_a_retry():
    calls = [0]

    def flaky(data):
        calls[0] += 1
        if calls[0] == 1:
            raise OSError(11)

    m = Meter(sdm.SDM630, 1, flaky)
    assert m.poll(0)
    assert m.write_errors == 1
    assert m.poll(300) and m.timeouts == 1 and calls[0] == 2
    m.on_bytes(sdm630_reply(), 400)
    assert m.cycles == 1


def test_garbage_never_raises():
    seed = [12345]

    def rnd(n):
        seed[0] = (seed[0] * 1103515245 + 12345) & 0x7FFFFFFF
        return seed[0] % n

    m, _ = sdm630(timeout_ms=50)
    now = 0
    for _ in range(400):
        now += rnd(40)
        m.poll(now)
        k = rnd(20)
        chunk = bytearray(k)
        for j in range(k):
            chunk[j] = rnd(256)
        if k and rnd(3) == 0:
            chunk[0] = 1                          # looks like our meter more often
            if k > 1:
                chunk[1] = 4 if rnd(2) else 0x84
        m.on_bytes(chunk, now)
    assert m.cycles == 0 and m.requests > 10
    assert m.timeouts + m.bad_replies + m.crc_errors > 10
    m.on_bytes(b"", now)
    # Still working afterwards.
    while m.busy:
        now += 60
        m.poll(now)
    now += 1000
    assert m.poll(now)
    m.on_bytes(sdm630_reply(), now + 5)
    assert m.cycles == 1


def test_bytes_while_idle_are_stray():
    m, _ = sdm630()
    m.on_bytes(sdm630_reply(), 0)
    assert (m.stray_bytes, m.cycles, m.bad_replies) == (157, 0, 0)
    good_cycle(m, 10)
    m.on_bytes(b"\x01\x02", 300)
    assert m.stray_bytes == 159
    # Trailing bytes after a complete reply are stray too.
    m, _ = sdm630()
    m.poll(0)
    m.on_bytes(sdm630_reply() + b"\x00\x00\x00", 100)
    assert m.cycles == 1 and m.stray_bytes == 3


def test_hot_path_allocates_nothing():
    if not IS_MICROPYTHON:
        return                                    # heap_lock exists only in MicroPython
    import micropython

    box = [None]
    req = hexbytes(SDM630_REQUEST)

    def write(data):
        box[0] = data

    m = Meter(sdm.SDM630, 1, write)
    rep = sdm630_reply()
    good_cycle(m, 0, rep)                         # warm up
    micropython.heap_lock()
    try:
        sent = m.poll(1000)
        m.on_bytes(rep, 1100)
        m.poll(1150)
        stale = m.is_stale(1150)
    finally:
        micropython.heap_unlock()
    assert sent and box[0] == req
    assert m.cycles == 2 and not stale and m.voltage_dv[0] == 2302


def test_module_constants_are_importable():
    # The gateway and HIL read these names; keep them public.
    assert meter_mod.Meter is Meter
    assert sdm.KINDS == ("sdm630", "sdm120")
    assert sdm.reply_len(76) == 157
