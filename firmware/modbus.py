# The column's Modbus RTU side: request framing on the RS-485 bus (RtuRequestParser: pure,
# no I/O, no clock) and serve_rtu(), the task that answers the bus with a ModbusLink
# (firmware/gw_modbus.py). Only a modbus-rtu board loads this module (firmware/links.py);
# replies are built by the slave (firmware/modbus_slave.py), Modbus TCP framing is in
# modbus_tcp.py. Buffers are owned by the objects that create them and reused; nothing
# here allocates per byte or per frame, so it can run under micropython.heap_lock().
from .crc import crc16

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

RTU_MAX = const(256)   # bytes in one RTU frame, address + PDU + CRC
_RX_CHUNK = const(64)  # bytes read from the bus at a time

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


# -- serving the bus -------------------------------------------------------------------

async def serve_rtu(link, uart, de_pin, clock, asyncio, alive, gap_ms=2):
    """Serve the ModbusLink `link` (firmware/gw_modbus.py, with its RtuRequestParser) on
    the RS-485 line `uart`: poll it, answer requests for our unit; a silence marks a frame
    gap. `de_pin` drives the bus only while a reply is sent."""
    # A small read buffer emptied in a loop: the parser holds the frame (RTU_MAX bytes),
    # so a second buffer of that size would only copy it on its way there.
    rx = bytearray(_RX_CHUNK)
    parser = link.parser
    slave = link.slave
    write = link.app.rs485_writer(uart, de_pin)
    pending = False
    last_rx = clock.ticks_ms()
    while True:
        alive()
        n = uart.readinto(rx)
        now = clock.ticks_ms()
        if n:
            pending = True
            last_rx = now
            while n:
                taken = 0
                while taken < n:
                    taken += parser.feed(rx, taken, n)
                    _answer(slave, parser, write, now)
                n = uart.readinto(rx) if n == _RX_CHUNK else 0  # a full read: more may wait
        elif pending and clock.ticks_diff(now, last_rx) >= gap_ms:
            pending = False
            parser.gap()
            _answer(slave, parser, write, now)
        await clock.sleep_ms(1 if pending else 2)  # ints: asyncio.sleep(s) makes a float


def next_reply(slave, parser, now_ms):
    """Answer the parser's next request with the ModbusSlave `slave`: the reply's length in
    slave.out (0 = no reply), or -1 when the parser holds no request."""
    n = parser.next_request()
    slave.bad_crc = parser.bad_crc
    if n == 0:
        return -1
    return slave.handle(parser.unit, parser.fc, parser.pdu, now_ms)


def _answer(slave, parser, write, now):
    while True:
        r = next_reply(slave, parser, now)
        if r < 0:
            return
        if r > 0:
            write(memoryview(slave.out)[0:r])
