# The same register map over Modbus TCP: MBAP framing around the RTU slave's `respond`.
# A `ModbusTcpConnection` per client holds that client's bytes and its reply buffer
# (pure, no I/O). The column's app wires connections into its own asyncio streams;
# scripts and tests use the poll loop in modbus_tcp_serve.py, which a board never loads.
# Unit ids: the column's bus address or 0xFF address the column; unit 0 is a broadcast as
# on the RTU bus (limit table only, no reply).
try:
    from micropython import const
except ImportError:  # CPython
    const = lambda x: x

from firmware.modbus import (
    EX_ILLEGAL_VALUE,
    MBAP_LEN,
    TCP_MAX,
    exception_pdu,
    finish_mbap,
    mbap_frame_length,
    u16,
)

_ANY_UNIT = const(0xFF)
NEED_MORE = const(-1)
CLOSE = const(-2)


class ModbusTcpConnection:
    """One client's stream: feed() its bytes, then next_reply() until NEED_MORE."""

    def __init__(self, slave):
        self.slave = slave
        self._buf = bytearray(TCP_MAX)
        self.frame = memoryview(self._buf)
        self.pdu = self.frame[MBAP_LEN:]
        self.out = bytearray(MBAP_LEN + slave.pdu_max)
        self._n = 0
        self._taken = 0
        self.frames = 0
        self.bad_header = 0   # invalid MBAP header: the connection must be closed

    def _drop_taken(self):
        k = self._taken
        if k:
            buf = self._buf
            n = self._n - k
            for i in range(n):
                buf[i] = buf[i + k]
            self._n = n
            self._taken = 0

    def feed(self, data, start=0, end=-1):
        """Take data[start:end]; returns how many bytes fitted (call next_reply between)."""
        self._drop_taken()
        if end < 0:
            end = len(data)
        room = TCP_MAX - self._n
        if end - start > room:
            end = start + room
        buf = self._buf
        n = self._n
        for i in range(start, end):
            buf[n] = data[i]
            n += 1
        self._n = n
        return end - start

    def next_reply(self, now_ms):
        """Handle the next complete frame: reply length in `out` (0 = no reply), NEED_MORE
        when no complete frame is held, CLOSE on a header that makes the stream unusable."""
        self._drop_taken()
        length = mbap_frame_length(self._buf, self._n)
        if length < 0:
            self.bad_header += 1
            self._n = 0
            return CLOSE
        if length == 0 or self._n < length:
            return NEED_MORE
        self._taken = length
        self.frames += 1
        buf = self._buf
        unit = buf[6]
        fc = buf[7]
        pdu_len = length - MBAP_LEN
        slave = self.slave
        addressed = slave.unit_id if unit == _ANY_UNIT else unit
        if _pdu_length_ok(fc, self.pdu, pdu_len):
            n = slave.respond(addressed, fc, self.pdu, now_ms, self.out, MBAP_LEN)
        elif addressed == slave.unit_id:
            slave.requests += 1
            slave.exceptions += 1
            n = exception_pdu(self.out, MBAP_LEN, fc, EX_ILLEGAL_VALUE)
        else:
            n = 0
        if n == 0:
            return 0
        return finish_mbap(self.out, u16(buf, 0), unit, n)


def _pdu_length_ok(fc, pdu, pdu_len):
    """RTU frames are length-checked by the parser; MBAP only gives a total length."""
    if fc == 3 or fc == 4 or fc == 6:
        return pdu_len == 5
    if fc == 16:
        return pdu_len >= 6 and pdu_len == 6 + pdu[5]
    return True  # other functions are refused by the slave without reading fields
