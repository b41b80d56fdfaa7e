# The same register map over Modbus TCP: MBAP framing around the RTU slave's `respond`.
# A `ModbusTcpConnection` per client holds that client's bytes (pure, no I/O); replies are
# made in the slave's own reply buffer, shared by every connection. serve_tcp() serves a
# column's ModbusLink with one per connection on firmware/tcp_link.py; scripts and tests
# also use the poll loop in modbus_tcp_serve.py, which a board never loads. Only a
# modbus-tcp board loads this module (firmware/links.py).
# Unit ids: the column's bus address or 0xFF address the column; unit 0 is a broadcast as
# on the RTU bus (limit table only, no reply).
from . import tcp_link
from .modbus_slave import EX_ILLEGAL_VALUE, exception_pdu, put_u16, u16

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

TCP_MAX = const(260)   # bytes in one Modbus TCP frame, MBAP (7) + PDU (253)
MBAP_LEN = const(7)
_ANY_UNIT = const(0xFF)
NEED_MORE = const(-1)
CLOSE = const(-2)
# Connections served at once; a new one beyond closes the oldest (a gateway that restarted
# without closing its connection left it open here: a column only writes when asked).
_MAX_CLIENTS = const(4)


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
                        # The reply buffer is every connection's: a reply that must wait for
                        # its socket (a peer that does not read) waits as a copy.
                        out = bytes(out)
                        await tcp_link.wait(sock, 1)
                    else:
                        out = out[n:]
    except Exception:  # reset by the peer, ...: this connection ends, the link goes on
        pass
    finally:
        sock.close()


class ModbusTcpConnection:
    """One client's stream: its bytes go in through room() and filled() (or, on the host,
    modbus_tcp_serve.feed()), then next_reply() until NEED_MORE. A frame leaves the buffer
    once it is answered."""

    def __init__(self, slave):
        self.slave = slave
        self.frame = memoryview(bytearray(TCP_MAX))   # the one view of the frame buffer
        self.pdu = self.frame[MBAP_LEN:]
        self.out = slave.out   # shared: read a reply before the next next_reply()
        self._n = 0
        self.bad_header = 0   # invalid MBAP header: the connection must be closed

    def room(self):
        """The free end of the frame buffer, to read into; then filled(n). Never empty
        after next_reply() said NEED_MORE: a full buffer holds a whole frame."""
        return self.frame[self._n:]

    def filled(self, n):
        self._n += n

    def next_reply(self, now_ms):
        """Handle the next complete frame: reply length in `out` (0 = no reply), NEED_MORE
        when no complete frame is held, CLOSE on a header that makes the stream unusable."""
        buf = self.frame
        n = self._n
        length = mbap_frame_length(buf, n)
        if length < 0:
            self.bad_header += 1
            self._n = 0
            return CLOSE
        if length == 0 or n < length:
            return NEED_MORE
        tid = u16(buf, 0)
        unit = buf[6]
        fc = buf[7]
        slave = self.slave
        addressed = slave.unit_id if unit == _ANY_UNIT else unit
        if _pdu_length_ok(fc, self.pdu, length - MBAP_LEN):
            r = slave.respond(addressed, fc, self.pdu, now_ms, self.out, MBAP_LEN)
        elif addressed == slave.unit_id:
            slave.requests += 1
            slave.exceptions += 1
            r = exception_pdu(self.out, MBAP_LEN, fc, EX_ILLEGAL_VALUE)
        else:
            r = 0
        # The frame is answered: drop it (a byte loop: slicing would allocate).
        n -= length
        for i in range(n):
            buf[i] = buf[i + length]
        self._n = n
        if r == 0:
            return 0
        return finish_mbap(self.out, tid, unit, r)


def _pdu_length_ok(fc, pdu, pdu_len):
    """RTU frames are length-checked by the parser; MBAP only gives a total length."""
    if fc == 3 or fc == 4 or fc == 6:
        return pdu_len == 5
    if fc == 16:
        return pdu_len >= 6 and pdu_len == 6 + pdu[5]
    return True  # other functions are refused by the slave without reading fields
