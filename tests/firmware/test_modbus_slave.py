# The column's Modbus slave, RTU and TCP, with exact wire frames (CPython and MicroPython):
# reads, validated writes, exceptions, the broadcast limit table, and no allocation.
from array import array

from fwtest import IS_MICROPYTHON, hexbytes

from firmware import regmap
from firmware.crc import crc16
from firmware.modbus import RtuRequestParser, next_reply
from firmware.modbus_slave import ModbusSlave
from firmware.modbus_tcp import CLOSE, NEED_MORE, ModbusTcpConnection
from firmware.modbus_tcp_serve import feed


class App:
    """Stands in for the controller: records callbacks, can refuse with a code."""

    def __init__(self):
        self.writes = []
        self.limits = []
        self.refuse = 0

    def on_write(self, start, count, now_ms):
        self.writes.append((start, count, now_ms))
        return self.refuse

    def on_broadcast_limit(self, limit_da, validity_s, now_ms):
        self.limits.append((limit_da, validity_s, now_ms))
        return self.refuse


def make(unit=1, broadcast=True):
    app = App()
    inputs = array("H", [0] * regmap.INPUT_COUNT)
    holding = array("H", [0] * regmap.HOLDING_COUNT)
    holding[regmap.HR_FAILSAFE_LIMIT] = 100
    holding[regmap.HR_ENABLE] = 1
    slave = ModbusSlave(unit, inputs, holding, app.on_write,
                        app.on_broadcast_limit if broadcast else None)
    return slave, app


def with_crc(text):
    body = hexbytes(text)
    crc = crc16(body)
    return body + bytes([crc & 0xFF, crc >> 8])


def ask(slave, frame, now_ms=1000):
    """Run one RTU request frame through a parser and the slave; the reply bytes."""
    parser = RtuRequestParser()
    parser.feed(frame)
    n = parser.next_request()
    if n == 0:
        parser.gap()
        n = parser.next_request()
    assert n == len(frame), "not a request: %s" % frame
    r = slave.handle(parser.unit, parser.fc, parser.pdu, now_ms)
    return bytes(slave.out[0:r])


def test_read_input_registers():
    slave, _ = make()
    slave.inputs[regmap.IR_STATUS] = 2           # Charging
    slave.inputs[regmap.IR_CP_STATE] = 1
    assert ask(slave, hexbytes("01 04 00 00 00 02 71 CB")) == hexbytes("01 04 04 00 02 00 01 9B 84")
    assert slave.requests == 1 and slave.exceptions == 0


def test_read_32_bit_input_is_high_word_first():
    slave, _ = make()
    regmap.put_u32(slave.inputs, regmap.IR_ENERGY, 123456)
    reply = ask(slave, with_crc("01 04 00 0D 00 02"))
    assert reply == with_crc("01 04 04 00 01 E2 40")


def test_read_holding_registers():
    slave, _ = make()
    reply = ask(slave, hexbytes("01 03 00 00 00 07 04 08"))
    assert reply == with_crc("01 03 0E 00 00 00 00 00 64 00 00 00 01 00 00 00 00")


def test_read_out_of_range_is_illegal_address():
    slave, _ = make()
    # Input registers 46..47 are the last two; 46..48 runs past the end.
    assert ask(slave, with_crc("01 04 00 2E 00 02"))[1] == 0x04
    assert ask(slave, with_crc("01 04 00 2E 00 03")) == with_crc("01 84 02")
    assert ask(slave, with_crc("01 03 00 09 00 01")) == with_crc("01 83 02")
    assert slave.exceptions == 2


def test_read_count_outside_1_to_125_is_illegal_value():
    slave, _ = make()
    assert ask(slave, with_crc("01 04 00 00 00 00")) == hexbytes("01 84 03 03 01")
    assert ask(slave, with_crc("01 04 00 00 00 7E")) == hexbytes("01 84 03 03 01")


def test_write_single_limit_is_echoed_and_reported():
    slave, app = make()
    assert ask(slave, hexbytes("01 06 00 00 00 A0 89 B2"), 5000) == hexbytes("01 06 00 00 00 A0 89 B2")
    assert slave.holding[regmap.HR_ASSIGNED_LIMIT] == 160
    assert app.writes == [(0, 1, 5000)]


def test_write_single_out_of_range_stores_nothing():
    slave, app = make()
    assert ask(slave, with_crc("01 06 00 00 03 21")) == hexbytes("01 86 03 02 61")   # 801
    assert ask(slave, with_crc("01 06 00 04 00 02")) == hexbytes("01 86 03 02 61")   # enable 2
    assert ask(slave, with_crc("01 06 00 05 00 01")) == hexbytes("01 86 03 02 61")   # reset 1
    assert ask(slave, with_crc("01 06 00 09 00 01")) == hexbytes("01 86 02 C3 A1")   # no reg 9
    assert ask(slave, with_crc("01 06 01 01 00 10")) == hexbytes("01 86 02 C3 A1")   # table
    assert slave.holding[regmap.HR_ASSIGNED_LIMIT] == 0
    assert slave.holding[regmap.HR_ENABLE] == 1
    assert app.writes == []


def test_reset_accepts_only_the_magic_value():
    slave, app = make()
    assert ask(slave, hexbytes("01 06 00 05 A5 A5 22 E0")) == hexbytes("01 06 00 05 A5 A5 22 E0")
    assert app.writes == [(regmap.HR_RESET, 1, 1000)]


def test_write_multiple_limit_and_validity():
    slave, app = make()
    reply = ask(slave, hexbytes("01 10 00 00 00 02 04 00 A0 00 3C F3 9C"), 7000)
    assert reply == hexbytes("01 10 00 00 00 02 41 C8")
    assert list(slave.holding[0:2]) == [160, 60]
    assert app.writes == [(0, 2, 7000)]


def test_write_multiple_with_one_bad_value_stores_nothing():
    slave, app = make()
    # limit 160 is fine, failsafe 900 is not: neither is stored.
    reply = ask(slave, with_crc("01 10 00 00 00 03 06 00 A0 00 3C 03 84"))
    assert reply == with_crc("01 90 03")
    assert list(slave.holding[0:3]) == [0, 0, 100]
    assert app.writes == []


def test_write_multiple_malformed_counts():
    slave, _ = make()
    assert ask(slave, with_crc("01 10 00 00 00 02 02 00 A0")) == with_crc("01 90 03")  # bytes != 2*n
    assert ask(slave, with_crc("01 10 00 00 00 00 00")) == with_crc("01 90 03")        # n = 0
    assert ask(slave, with_crc("01 10 00 08 00 02 04 00 01 00 02")) == with_crc("01 90 02")


def test_refusal_from_the_app_rolls_the_write_back():
    slave, app = make()
    app.refuse = 4
    assert ask(slave, hexbytes("01 06 00 00 00 A0 89 B2")) == hexbytes("01 86 04 43 A3")
    assert ask(slave, hexbytes("01 10 00 00 00 02 04 00 A0 00 3C F3 9C")) == with_crc("01 90 04")
    assert list(slave.holding[0:2]) == [0, 0]
    assert len(app.writes) == 2


def test_a_failing_callback_answers_device_failure():
    def broken(start, count, now_ms):
        raise ValueError("bug")

    inputs = array("H", [0] * regmap.INPUT_COUNT)
    holding = array("H", [0] * regmap.HOLDING_COUNT)
    slave = ModbusSlave(1, inputs, holding, broken)
    assert ask(slave, hexbytes("01 06 00 00 00 A0 89 B2")) == hexbytes("01 86 04 43 A3")
    assert slave.callback_errors == 1 and holding[0] == 0


def test_unknown_function_is_illegal_function():
    slave, _ = make()
    assert ask(slave, hexbytes("01 01 00 00 00 01 FD CA")) == hexbytes("01 81 01 81 90")
    assert ask(slave, hexbytes("01 2B 0E 01 00 70 77")) == hexbytes("01 AB 01 9E F0")


def test_other_units_get_no_reply():
    slave, _ = make(unit=2)
    assert ask(slave, hexbytes("01 04 00 00 00 02 71 CB")) == b""
    assert slave.ignored == 1 and slave.requests == 0


TABLE = "00 10 01 00 00 04 08 01 2C 00 64 FF FF 00 C8 29 8F"  # validity 300 s; 1: 10 A, 2: -, 3: 20 A


def test_broadcast_table_sets_each_columns_own_entry():
    results = {}
    for unit in (1, 2, 3, 4):
        slave, app = make(unit)
        assert ask(slave, hexbytes(TABLE), 9000) == b""
        results[unit] = (app.limits, list(slave.holding[0:2]))
        assert slave.broadcasts == 1 and slave.broadcast_rejected == 0
    assert results[1] == ([(100, 300, 9000)], [100, 300])
    assert results[2] == ([], [0, 0])           # 0xFFFF: no change
    assert results[3] == ([(200, 300, 9000)], [200, 300])
    assert results[4] == ([], [0, 0])           # not covered by this write


def test_broadcast_table_starting_higher_carries_its_validity_first():
    # Starts at 0x0100 + 2: validity 60 s, then addresses 3 and 4.
    frame = with_crc("00 10 01 02 00 03 06 00 3C 00 50 00 5A")
    got = {}
    for unit in (2, 3, 4):
        slave, app = make(unit)
        ask(slave, frame)
        got[unit] = app.limits
    assert got == {2: [], 3: [(80, 60, 1000)], 4: [(90, 60, 1000)]}


def test_broadcast_out_of_range_entry_is_dropped():
    slave, app = make(1)
    ask(slave, with_crc("00 10 01 00 00 02 04 01 2C 03 84"))       # 90 A for unit 1
    ask(slave, with_crc("00 06 00 00 00 A0"))                       # FC06 broadcast
    ask(slave, with_crc("00 10 00 00 00 02 04 00 A0 00 3C"))       # outside the table
    assert app.limits == [] and app.writes == []
    assert list(slave.holding[0:2]) == [0, 0]
    assert slave.broadcasts == 3 and slave.broadcast_rejected == 3


def test_broadcast_refused_by_the_app_is_rolled_back():
    slave, app = make(1)
    app.refuse = 6
    ask(slave, hexbytes(TABLE))
    assert list(slave.holding[0:2]) == [0, 0] and slave.broadcast_rejected == 1


def test_broadcast_without_its_own_callback_is_a_write_of_registers_0_and_1():
    slave, app = make(3, broadcast=False)
    ask(slave, hexbytes(TABLE), 42)
    assert app.writes == [(0, 2, 42)] and list(slave.holding[0:2]) == [200, 300]


def test_next_reply_answers_everything_the_parser_holds():
    slave, _ = make()
    parser = RtuRequestParser()
    parser.feed(hexbytes("01 04 00 00 00 02 71 CC"))   # damaged
    parser.gap()
    parser.feed(hexbytes("01 04 00 00 00 02 71 CB") + hexbytes(TABLE))
    replies = []
    while True:
        n = next_reply(slave, parser, 0)
        if n < 0:
            break
        replies.append(bytes(slave.out[0:n]))
    assert replies == [hexbytes("01 04 04 00 00 00 00 FB 84"), b""]
    assert slave.bad_crc == 1 and slave.holding[0] == 100


# -- Modbus TCP ----------------------------------------------------------------------------

def tcp_ask(conn, frame, now_ms=0):
    feed(conn, frame)
    n = conn.next_reply(now_ms)
    return n if n < 0 else bytes(conn.out[0:n])


def test_tcp_read_keeps_the_transaction_id():
    slave, _ = make()
    slave.inputs[0] = 2
    conn = ModbusTcpConnection(slave)
    reply = tcp_ask(conn, hexbytes("BE EF 00 00 00 06 01 04 00 00 00 02"))
    assert reply == hexbytes("BE EF 00 00 00 07 01 04 04 00 02 00 00")
    # Unit 0xFF addresses the column too (the TCP convention), and is echoed.
    reply = tcp_ask(conn, hexbytes("00 02 00 00 00 06 FF 06 00 00 00 A0"))
    assert reply == hexbytes("00 02 00 00 00 06 FF 06 00 00 00 A0")
    assert tcp_ask(conn, hexbytes("00 03 00 00 00 06 01 04 00 30 00 01")) == \
        hexbytes("00 03 00 00 00 03 01 84 02")


def test_tcp_frames_split_and_joined():
    slave, _ = make()
    conn = ModbusTcpConnection(slave)
    one = hexbytes("00 01 00 00 00 06 01 03 00 02 00 01")
    two = hexbytes("00 02 00 00 00 06 01 03 00 04 00 01")
    feed(conn, one, 0, 5)
    assert conn.next_reply(0) == NEED_MORE
    feed(conn, one, 5)
    feed(conn, two)
    n = conn.next_reply(0)
    assert bytes(conn.out[0:n]) == hexbytes("00 01 00 00 00 05 01 03 02 00 64")
    n = conn.next_reply(0)
    assert bytes(conn.out[0:n]) == hexbytes("00 02 00 00 00 05 01 03 02 00 01")
    assert conn.next_reply(0) == NEED_MORE


def test_tcp_length_mismatch_and_bad_header():
    slave, app = make()
    conn = ModbusTcpConnection(slave)
    # FC16 says 4 bytes of values but carries 2: refused, nothing written.
    reply = tcp_ask(conn, hexbytes("00 09 00 00 00 09 01 10 00 00 00 02 04 00 A0"))
    assert reply == hexbytes("00 09 00 00 00 03 01 90 03") and app.writes == []
    assert tcp_ask(conn, hexbytes("00 01 00 07 00 06 01 04 00 00 00 02")) == CLOSE
    assert conn.bad_header == 1


def test_tcp_broadcast_table_gets_no_reply():
    slave, app = make(3)
    conn = ModbusTcpConnection(slave)
    table = hexbytes(TABLE)[0:-2]            # the RTU table frame's body without its CRC
    frame = hexbytes("00 05 00 00 00 0F") + table
    assert tcp_ask(conn, frame, 77) == b""
    assert app.limits == [(200, 300, 77)]


# -- allocation -----------------------------------------------------------------------------

def test_request_path_allocates_nothing():
    if not IS_MICROPYTHON:
        return
    import micropython

    slave, app = make(1)
    app.writes = None            # callbacks that allocate nothing themselves
    calls = [0]

    def on_write(start, count, now_ms):
        calls[0] += 1
        return 0

    slave.on_write = on_write
    slave.on_broadcast_limit = None
    parser = RtuRequestParser()
    frames = [hexbytes("01 04 00 00 00 02 71 CB"), hexbytes("01 03 00 00 00 07 04 08"),
              hexbytes("01 06 00 00 00 A0 89 B2"), hexbytes("01 10 00 00 00 02 04 00 A0 00 3C F3 9C"),
              with_crc("01 06 00 00 03 21"), hexbytes("01 01 00 00 00 01 FD CA"), hexbytes(TABLE),
              hexbytes("02 04 00 00 00 02 71 F8")]
    conn = ModbusTcpConnection(slave)
    tcp = hexbytes("00 01 00 00 00 06 01 04 00 00 00 02")
    lengths = [0] * len(frames)
    tcp_len = [0]
    feed(conn, tcp)   # as a socket read into conn.room() (a board's TCP reads allocate a view)
    micropython.heap_lock()
    try:
        for i in range(len(frames)):
            parser.feed(frames[i])
            lengths[i] = next_reply(slave, parser, 123456)
        tcp_len[0] = conn.next_reply(123456)
    finally:
        micropython.heap_unlock()
    assert lengths == [9, 19, 8, 8, 5, 5, 0, 0]
    assert tcp_len[0] == 13 and calls[0] == 3
