# The same register map over Modbus TCP: MBAP framing around the RTU slave's `respond`,
# and the column's server. A `ModbusTcpConnection` frames a stream's bytes (pure, no I/O);
# replies are made in the slave's own reply buffer. serve_tcp() serves a column's
# ModbusLink with ONE task and ONE frame buffer for all its connections on the TCP
# transport (firmware/tcp_link.py): every pass it accepts a waiting connection and answers
# what each one sent, allocating nothing unless a connection opens, closes or leaves bytes
# behind. Scripts and tests also use the blocking poll loop in modbus_tcp_serve.py, which a
# board never loads. Only a modbus-tcp board loads this module (firmware/links.py).
# Unit ids: the column's bus address or 0xFF address the column; unit 0 is a broadcast as
# on the RTU bus (limit table only, no reply).
import asyncio

from .modbus_slave import EX_ILLEGAL_VALUE, exception_pdu, put_u16, u16
from .tcp_link import accept, idle, listen, poller

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

TCP_MAX = const(260)   # bytes in one Modbus TCP frame, MBAP (7) + PDU (253)
MBAP_LEN = const(7)
_ANY_UNIT = const(0xFF)
NEED_MORE = const(-1)
CLOSE = const(-2)
# Connections served at once; a new one beyond closes the oldest (a gateway that restarted
# without closing its connection left it open here: a column only writes when asked).
_MAX_CLIENTS = const(4)
_READS = const(4)      # reads of one connection per pass: a flood must not hold the loop


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
    """Serve the ModbusLink `link` (firmware/gw_modbus.py) over Modbus TCP on host:port (an
    OSError here: the port cannot be had): returns the server task, which never ends by
    itself; cancelling it closes the port and every connection."""
    return asyncio.create_task(_serve(listen(host, port), link))


async def _serve(lsock, link):
    # Every connection's requests pass through the one buffer of `fr`; a reply is sent
    # whole before that connection's next request is handled or more is read, and nothing
    # waits for a socket: a reply its peer does not take yet waits as a copy in conn[1]
    # (fr.out is every connection's), with the bytes behind it in conn[2], and that
    # connection is not read meanwhile. One coroutine frame for all of it: a function with
    # this many locals would take its frame from the heap at every call, every pass.
    fr = ModbusTcpConnection(link.slave)
    clock = link.app.clock
    conns = []   # [socket, unsent reply or None, bytes held or None], oldest first
    ready = poller(lsock)
    try:
        while True:
            sock = accept(lsock, ready)
            if sock is not None:
                if len(conns) >= _MAX_CLIENTS:
                    conns.pop(0)[0].close()
                conns.append([sock, None, None])
            i = 0
            while i < len(conns):
                conn = conns[i]
                sock = conn[0]
                alive = True
                try:
                    n = conn[1]
                    if n is not None:
                        r = sock.write(n)
                        if r is not None:
                            n = conn[1] = n[r:] if r < len(n) else None
                    if n is None:
                        fr.resume(conn[2])
                        reads = _READS
                        while True:
                            r = fr.next_reply(clock.ticks_ms()) if fr._n else NEED_MORE
                            if r == NEED_MORE:
                                if not reads:
                                    break
                                reads -= 1
                                n = sock.readinto(fr.room())
                                if n is None:
                                    break
                                if not n:   # the peer closed
                                    alive = False
                                    break
                                fr.filled(n)
                            elif r == CLOSE:   # a bad header (counted in fr.bad_header)
                                alive = False
                                break
                            elif r:
                                n = sock.write(fr.out, r) or 0
                                if n < r:
                                    conn[1] = fr.out[n:r]
                                    break
                        conn[2] = fr.rest()
                except Exception:   # reset by the peer, ...
                    alive = False
                if alive:
                    i += 1
                else:
                    conns.pop(i)
                    sock.close()
            await idle(lsock, conns)
    finally:
        lsock.close()
        for conn in conns:
            conn[0].close()


class ModbusTcpConnection:
    """A client's stream: its bytes go in through room() and filled() (or, on the host,
    modbus_tcp_serve.feed()), then next_reply() until NEED_MORE. A frame leaves the buffer
    once it is answered. The column's server passes every connection through one of them
    (resume() and rest())."""

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
        return self.frame[self._n:] if self._n else self.frame

    def filled(self, n):
        self._n += n

    def rest(self):
        """The bytes held (a request not yet whole, or not yet answered) as a copy, None
        when there are none; the buffer is empty after."""
        n = self._n
        self._n = 0
        return bytes(self.frame[0:n]) if n else None

    def resume(self, held):
        """Hold `held` (from rest(), or None) again, ahead of the bytes read next."""
        n = 0
        if held is not None:
            n = len(held)
            buf = self.frame
            for i in range(n):
                buf[i] = held[i]
        self._n = n

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
