# Modbus framing for the column's slave side: RTU request parsing, response building
# (PDU + CRC or MBAP header) and exception replies. Pure: no I/O, no clock. Buffers are
# owned by the objects that create them and reused; nothing here allocates per byte or
# per frame, so it can run under micropython.heap_lock().
from firmware.crc import crc16

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

RTU_MAX = const(256)   # bytes in one RTU frame, address + PDU + CRC
TCP_MAX = const(260)   # bytes in one Modbus TCP frame, MBAP (7) + PDU (253)
MBAP_LEN = const(7)

# Exception codes (the reply's function code gets the top bit set).
EX_ILLEGAL_FUNCTION = const(1)
EX_ILLEGAL_ADDRESS = const(2)
EX_ILLEGAL_VALUE = const(3)
EX_DEVICE_FAILURE = const(4)
EX_BUSY = const(6)

# Request frame length (address + PDU + CRC) by function code 0..24, so a request is
# recognised as soon as its last byte arrives, without waiting for the line to go
# silent. 0 = unknown here (judged at the next gap), 0xFF / 0xFE = 9 / 13 + the byte
# count at offset 6 / 10 (FC15, FC16 / FC23). Unknown codes still get exception 01.
_REQ_LEN = (b"\x00\x08\x08\x08\x08\x08\x08\x04\x08\x00\x00\x04\x04"   # FC 0..12
            b"\x00\x00\xff\xff\x04\x00\x00\x00\x00\x0a\xfe\x06")      # FC 13..24
_NEED_MORE = const(0)
_NOT_A_REQUEST = const(-1)


def _request_length(buf, pos, n):
    """Frame length of a request starting at buf[pos], 0 if more bytes are needed to
    know it, -1 if no request can start here."""
    if n - pos < 2:
        return _NEED_MORE
    fc = buf[pos + 1]
    if fc >= len(_REQ_LEN):
        return _NOT_A_REQUEST
    need = _REQ_LEN[fc]
    if need >= 0xFE:
        at = 6 if need == 0xFF else 10
        if n - pos <= at:
            return _NEED_MORE
        need = (9 if need == 0xFF else 13) + buf[pos + at]
        if need > RTU_MAX:
            return _NOT_A_REQUEST
    elif need == 0:
        return _NOT_A_REQUEST
    return need


def _unknown_function(fc):
    """A request function code with no known length (replies have the top bit set)."""
    if fc >= 0x80:
        return False
    return fc >= len(_REQ_LEN) or _REQ_LEN[fc] == 0


class RtuRequestParser:
    """Collects bytes from the bus and finds the requests in them.

    The transport calls `feed()` with what it read and `gap()` whenever the line has
    been silent for more than 1.5 character times (1.75 ms above 19200 baud); then it
    calls `next_request()` until it returns 0. A request is the frame `frame[0:n]`
    (address at 0, function code at 1, CRC at the end); `unit`, `fc` and `pdu` (a view
    from the function code on) describe it until the next call into the parser.

    Known function codes are recognised as soon as their last byte arrives with a good
    CRC. Bytes that do not start a valid request are stepped over one at a time (resync
    after noise); at a gap whatever is left is judged as a whole: a complete frame with a
    good CRC and an unknown function code is delivered (the slave answers exception 01),
    another station's reply is counted as `foreign`, the rest as an error.
    """

    def __init__(self):
        self._buf = bytearray(RTU_MAX)
        self.frame = memoryview(self._buf)
        self.pdu = self.frame[1:]
        self._n = 0          # bytes held, starting at 0 = the start of the current chunk
        self._pos = 0        # candidate frame start; positions before it are rejected
        self._taken = 0      # length of the frame last returned, dropped on the next call
        self._pending = 0    # length of a whole-chunk frame accepted at a gap
        self._broken = False  # the chunk overflowed: do not judge it as one frame
        self.unit = 0
        self.fc = 0
        self.frames = 0      # requests delivered
        self.bad_crc = 0     # a complete request-shaped frame with a wrong CRC
        self.truncated = 0   # a gap inside a frame
        self.garbage = 0     # runs of bytes that started no frame (resync after noise)
        self.too_long = 0    # more than RTU_MAX bytes without a frame or a gap
        self.foreign = 0     # good frames that are not requests (other stations' replies)

    def errors(self):
        """Frames dropped as damaged: what the bad_frames register reports."""
        return self.bad_crc + self.truncated + self.garbage + self.too_long

    def _shift(self, k):
        """Drop the first k bytes (a byte loop: slicing would allocate)."""
        buf = self._buf
        n = self._n - k
        for i in range(n):
            buf[i] = buf[i + k]
        self._n = n
        self._pos = 0 if self._pos <= k else self._pos - k

    def _drop_taken(self):
        if self._taken:
            self._shift(self._taken)
            self._taken = 0
            self._broken = False

    def feed(self, data, start=0, end=-1):
        """Take data[start:end] (end -1 = to the end); returns how many bytes were taken.
        A caller with more than RTU_MAX bytes at once calls next_request() in between."""
        self._drop_taken()
        if end < 0:
            end = len(data)
        buf = self._buf
        n = self._n
        if n == RTU_MAX:
            # Full and no frame in it: keep what might still start one, or start over.
            self.too_long += 1
            self._broken = True
            if self._pos > 0:
                self._shift(self._pos)
            else:
                self._n = 0
            n = self._n
        room = RTU_MAX - n
        if end - start > room:
            end = start + room
        for i in range(start, end):
            buf[n] = data[i]
            n += 1
        self._n = n
        return end - start

    def next_request(self):
        """Length of the next complete request in `frame`, or 0."""
        self._drop_taken()
        if self._pending:
            n = self._pending
            self._pending = 0
            return self._deliver(n)
        buf = self._buf
        n = self._n
        pos = self._pos
        while pos < n:
            need = _request_length(buf, pos, n)
            if need == _NEED_MORE or (need > 0 and n - pos < need):
                break
            if need > 0 and crc16(buf, pos, pos + need) == 0:
                if pos > 0:
                    # What was skipped may be a whole frame whose gap went unnoticed
                    # (another station's reply right before this request).
                    if pos >= 4 and crc16(buf, 0, pos) == 0:
                        self.foreign += 1
                    else:
                        self.garbage += 1
                    self._shift(pos)
                return self._deliver(need)
            pos += 1
        self._pos = pos
        return 0

    def _deliver(self, n):
        self._taken = n
        self._pos = 0
        self.unit = self._buf[0]
        self.fc = self._buf[1]
        self.frames += 1
        return n

    def gap(self):
        """The line went silent: judge and drop whatever is left of the current chunk."""
        self._drop_taken()
        buf = self._buf
        n = self._n
        if n == 0:
            return
        if not self._broken:
            if n >= 4 and crc16(buf, 0, n) == 0:
                fc = buf[1]
                if _unknown_function(fc):
                    self._pending = n  # an unknown function: the slave answers 01
                    return
                self.foreign += 1
            else:
                need = _request_length(buf, 0, n)
                if need > 0 and n >= need:
                    self.bad_crc += 1
                elif need >= 0:
                    self.truncated += 1
                else:
                    self.garbage += 1
        self._n = 0
        self._pos = 0
        self._broken = False


# -- response building: PDU at `off` in a caller's buffer -------------------------------

def u16(buf, off):
    """Big-endian word at buf[off] (unpack_from would allocate a tuple)."""
    return (buf[off] << 8) | buf[off + 1]


def put_u16(buf, off, value):
    buf[off] = (value >> 8) & 0xFF
    buf[off + 1] = value & 0xFF


def exception_pdu(out, off, fc, code):
    """Exception reply PDU: function code with the top bit, then the code. Returns 2."""
    out[off] = (fc | 0x80) & 0xFF
    out[off + 1] = code
    return 2


def read_pdu(out, off, fc, image, start, count):
    """FC03/FC04 reply PDU: fc, byte count, then count words from image[start:]."""
    out[off] = fc
    out[off + 1] = count * 2
    o = off + 2
    for i in range(start, start + count):
        v = image[i]
        out[o] = v >> 8
        out[o + 1] = v & 0xFF
        o += 2
    return 2 + count * 2


def echo_pdu(out, off, fc, first, second):
    """FC06 (address, value) / FC16 (start, count) reply PDU. Returns 5."""
    out[off] = fc
    put_u16(out, off + 1, first)
    put_u16(out, off + 3, second)
    return 5


def finish_rtu(out, unit, pdu_len):
    """Complete an RTU reply whose PDU is at out[1:]: address first, CRC low byte last.
    Returns the frame length."""
    out[0] = unit
    end = 1 + pdu_len
    crc = crc16(out, 0, end)
    out[end] = crc & 0xFF
    out[end + 1] = crc >> 8
    return end + 2


def mbap_frame_length(buf, n):
    """Length of the Modbus TCP frame at buf[0:n]: 0 if the header is incomplete, -1 if
    the header is invalid (protocol id not 0, or a length outside 2..254 bytes)."""
    if n < MBAP_LEN:
        return 0
    length = u16(buf, 4)
    if u16(buf, 2) != 0 or length < 2 or length > TCP_MAX - 6:
        return -1
    return 6 + length


def finish_mbap(out, tid, unit, pdu_len):
    """Complete a TCP reply whose PDU is at out[7:]: same transaction id, protocol 0.
    Returns the frame length."""
    put_u16(out, 0, tid)
    put_u16(out, 2, 0)
    put_u16(out, 4, pdu_len + 1)
    out[6] = unit
    return MBAP_LEN + pdu_len
