# The same register map over Modbus TCP: MBAP framing around the RTU slave's `respond`.
# A `ModbusTcpConnection` per client holds that client's bytes and its reply buffer
# (pure, no I/O). serve_tcp() serves a column's ModbusLink with one per connection on
# firmware/tcp_link.py; scripts and tests also use the poll loop in modbus_tcp_serve.py,
# which a board never loads. Only a modbus-tcp board loads this module (firmware/links.py).
# Unit ids: the column's bus address or 0xFF address the column; unit 0 is a broadcast as
# on the RTU bus (limit table only, no reply).
from firmware import tcp_link
from firmware.modbus import (
    EX_ILLEGAL_VALUE,
    MBAP_LEN,
    TCP_MAX,
    exception_pdu,
    finish_mbap,
    mbap_frame_length,
    u16,
)

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

_ANY_UNIT = const(0xFF)
NEED_MORE = const(-1)
CLOSE = const(-2)
# Connections served at once; a new one beyond closes the oldest (a gateway that restarted
# without closing its connection left it open here: a column only writes when asked).
_MAX_CLIENTS = const(4)


def serve_tcp(link, port, host):
    """Serve the ModbusLink `link` (firmware/gw_modbus.py) over Modbus TCP on host:port:
    returns the server task (firmware/tcp_link.py)."""
    return tcp_link.start(host, port, _MAX_CLIENTS, _client, link, True)


async def _client(sock, link):
    """One connection: its requests read straight into its frame buffer, each reply sent
    whole before the next request is read. Ends at the peer's close, a socket error or a
    header that makes the stream unusable (counted in bad_header), closing sock."""
    conn = ModbusTcpConnection(link.slave)
    clock = link.app.clock
    try:
        while True:
            n = tcp_link.recv(sock, conn.room())
            if n is None:
                await tcp_link.wait(sock, 0)
                continue
            if not n:
                return
            conn.filled(n)
            while True:
                r = conn.next_reply(clock.ticks_ms())
                if r == NEED_MORE:
                    break
                if r == CLOSE:
                    return
                out = memoryview(conn.out)[0:r]
                while out:
                    n = tcp_link.send(sock, out)
                    if n is None:
                        await tcp_link.wait(sock, 1)
                    else:
                        out = out[n:]
    except Exception:  # reset by the peer, ...: this connection ends, the link goes on
        pass
    finally:
        sock.close()


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

    def room(self):
        """The free end of the frame buffer, to read into; then filled(n). Never empty
        after next_reply() said NEED_MORE: a full buffer holds a whole frame."""
        self._drop_taken()
        return self.frame[self._n:]

    def filled(self, n):
        self._n += n

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
