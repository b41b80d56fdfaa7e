# The column's Modbus TCP server (firmware/modbus_tcp.py: one task and one frame buffer for
# every connection) with stand-in sockets in place of the port's: a reply its peer does
# not take yet keeps its bytes while other connections are answered, holds back the
# connection's next request, and arrives whole when the socket takes it in pieces; a pass
# over the connections allocates nothing (MicroPython, under heap_lock); requests cut
# anywhere, interleaved over three connections, get each connection its own replies. Real loopback
# sockets: test_tcp_link_serve.py. Runs under CPython and MicroPython.
import asyncio

from fwtest import IS_MICROPYTHON, tcp_column

from firmware import clock, regmap

READ_VERSION = bytes([0x12, 0x34, 0, 0, 0, 6, 4, 4, 0, regmap.IR_FW_VERSION, 0, 1])   # FC04, tid 0x1234


def _version_reply(app):
    v = (app.version[0] << 8) | app.version[1]
    return bytes([0x12, 0x34, 0, 0, 0, 5, 4, 4, 2, v >> 8, v & 0xFF])


class _Peer:
    """A connection's socket as the Modbus server sees it (readinto, write, close), with no
    allocation of its own: the bytes it will read (`inbox`), what it took (`sent`), how many
    writes take nothing (`stalls`: a peer that does not read) and at most how many bytes a
    write takes (`chunk`); `reads_while_waiting` counts reads made while a reply waited.
    Reads stop at `upto` (all of the inbox unless a test reveals it bit by bit)."""

    def __init__(self, inbox, stalls=0, chunk=1 << 16, out_size=256):
        self.inbox = inbox
        self.upto = len(inbox)
        self.at = 0
        self.stalls = stalls
        self.chunk = chunk
        self.out = bytearray(out_size)
        self.n_out = 0
        self.waiting = False
        self.reads_while_waiting = 0
        self.closed = False

    def readinto(self, buf):
        if self.waiting:
            self.reads_while_waiting += 1
        n = min(self.upto - self.at, len(buf))
        if n <= 0:
            return None
        for i in range(n):
            buf[i] = self.inbox[self.at + i]
        self.at += n
        return n

    def write(self, buf, n=-1):
        if n < 0:
            n = len(buf)
        if self.stalls > 0:
            self.stalls -= 1
            self.waiting = True
            return None
        n = min(n, self.chunk)
        for i in range(n):
            self.out[self.n_out + i] = buf[i]
        self.n_out += n
        self.waiting = False
        return n

    def sent(self):
        return bytes(self.out[0:self.n_out])

    def close(self):
        self.closed = True


class _Port:
    def close(self):
        pass


def _with_fake_sockets(peers, idle, body):
    """Run body(app, link) with the Modbus server's port primitives replaced: accept()
    hands out `peers` in turn, idle() is `idle`. Restored afterwards."""
    from firmware import modbus_tcp

    pending = list(reversed(peers))

    def accept(lsock, ready):
        return pending.pop() if pending else None

    app, link, restore = tcp_column("modbus-tcp", modbus_tcp, accept, idle, "mt-col")
    try:
        link.refresh(clock.ticks_ms())
        body(app, link)
    finally:
        restore()


async def _next_pass(lsock, conns):
    await asyncio.sleep(0.005)


def test_a_modbus_reply_waiting_for_its_socket_keeps_its_bytes_and_its_turn():
    """Every connection's replies are made in the slave's one reply buffer and its requests
    pass through one frame buffer: a reply that has to wait (its peer takes nothing) must
    not be overwritten by another connection's reply made meanwhile, the request behind it
    is not handled (nor more read) before it is out, and a reply its socket takes in
    pieces arrives whole."""
    from firmware import modbus_tcp

    write = bytes([0, 9, 0, 0, 0, 6, 0xFF, 6, 0, regmap.HR_FAILSAFE_LIMIT, 0, 70])
    slow = _Peer(READ_VERSION + write, stalls=3)          # its first reply waits three times
    other = bytes([0, 7, 0, 0, 0, 6, 4, 4, 0, regmap.IR_BUS_ADDRESS, 0, 1])
    fast = _Peer(other)
    piecemeal = _Peer(READ_VERSION, chunk=3)
    seen = []

    def body(app, link):
        async def main():
            server = asyncio.create_task(modbus_tcp._serve(_Port(), link))
            for _ in range(100):
                await asyncio.sleep(0.01)
                if slow.waiting:
                    seen.append(app.ctl.limits.failsafe_da)
                if slow.n_out >= 23 and fast.n_out and piecemeal.n_out >= 11:
                    break
            server.cancel()
            await asyncio.sleep(0.02)

        asyncio.run(main())
        assert seen and 70 not in seen                      # the write waited for the reply
        assert app.ctl.limits.failsafe_da == 70             # and was handled after it
        assert fast.sent() == bytes([0, 7, 0, 0, 0, 5, 4, 4, 2, 0, 4])   # bus address 4
        assert piecemeal.sent() == _version_reply(app)
        assert slow.sent() == _version_reply(app) + write   # FC06 echoes the request
        assert slow.reads_while_waiting == 0
        assert slow.closed and fast.closed and piecemeal.closed   # cancelling closed them

    _with_fake_sockets([slow, fast, piecemeal], _next_pass, body)


def _once():
    yield


def test_a_modbus_server_pass_allocates_nothing():
    """MicroPython: a pass over a connection with nothing to read, and one that answers a
    whole request, run under heap_lock (the control loop shares the heap with them)."""
    if not IS_MICROPYTHON:
        return
    import micropython

    from firmware import modbus_tcp

    peer = _Peer(b"")
    state = [False, 0, micropython]   # heap locked, passes (one closed-over cell: a call
                                      # of a closure over more allocates its arguments)

    def idle(lsock, conns):
        if state[0]:
            state[2].heap_unlock()
            state[0] = False
        state[1] += 1
        return _once()

    def body(app, link):
        coro = modbus_tcp._serve(_Port(), link)
        coro.send(None)             # the first pass accepts the peer (that allocates)
        try:
            for inbox in (b"", READ_VERSION, b"", READ_VERSION):
                peer.inbox = inbox
                peer.upto = len(inbox)
                peer.at = 0
                state[0] = True
                micropython.heap_lock()
                coro.send(None)
                assert not peer.closed     # (a MemoryError in a pass would close it)
        finally:
            if state[0]:
                micropython.heap_unlock()
            coro.close()
        assert state[1] == 5
        assert peer.sent() == _version_reply(app) * 2

    _with_fake_sockets([peer], idle, body)


def _lcg(seed):
    """A small deterministic random source (the same on both interpreters)."""
    state = [seed]

    def below(n):
        state[0] = (state[0] * 1103515245 + 12345) & 0x7FFFFFFF
        return (state[0] >> 8) % n

    return below


REQUESTS = (
    READ_VERSION,
    bytes([0, 2, 0, 0, 0, 6, 4, 4, 0, regmap.IR_BUS_ADDRESS, 0, 1]),
    bytes([0, 3, 0, 0, 0, 6, 0xFF, 4, 0, regmap.IR_COLUMN_ID, 0, 4]),       # unit 0xFF: the column
    bytes([0, 4, 0, 0, 0, 6, 4, 3, 0, regmap.HR_FAILSAFE_LIMIT, 0, 1]),     # FC03
    bytes([0, 5, 0, 0, 0, 2, 4, 0x2B]),                                      # unknown function
    bytes([0, 6, 0, 0, 0, 6, 9, 4, 0, 0, 0, 1]),                             # another unit: silence
    bytes([0, 7, 0, 0, 0, 6, 4, 4, 0, 0x70, 0, 1]),                          # illegal address
)


def test_requests_cut_anywhere_over_interleaved_connections_get_their_own_replies():
    """Three connections' requests arrive cut at random points, a few bytes of each between
    passes: every connection gets exactly the replies its requests get sent whole on their
    own, in order, though one frame buffer passes between them."""
    from firmware import modbus_tcp
    from firmware.modbus_tcp_serve import feed

    below = _lcg(7)
    picks = [[below(len(REQUESTS)) for _ in range(12)] for _ in range(3)]
    peers = [_Peer(b"".join(REQUESTS[k] for k in pick), out_size=512) for pick in picks]
    for peer in peers:
        peer.upto = 0

    async def reveal(lsock, conns):
        for peer in peers:
            peer.upto = min(len(peer.inbox), peer.upto + 1 + below(14))
        await asyncio.sleep(0.001)

    def body(app, link):
        ref = modbus_tcp.ModbusTcpConnection(link.slave)
        replies = []
        for request in REQUESTS:
            feed(ref, request)
            n = ref.next_reply(clock.ticks_ms())
            replies.append(bytes(ref.out[0:n]))
        assert replies[5] == b"" and replies[4][7] == 0x80 | 0x2B and replies[6][7] == 0x84
        expected = [b"".join(replies[k] for k in pick) for pick in picks]

        async def main():
            server = asyncio.create_task(modbus_tcp._serve(_Port(), link))
            for _ in range(500):
                await asyncio.sleep(0.002)
                if all(p.n_out >= len(e) for p, e in zip(peers, expected)):
                    break
            await asyncio.sleep(0.02)     # nothing more may come
            open_till_the_end = not any(p.closed for p in peers)
            server.cancel()
            await asyncio.sleep(0.01)
            return open_till_the_end

        assert asyncio.run(main())
        for peer, want in zip(peers, expected):
            assert peer.at == len(peer.inbox)
            assert peer.sent() == want

    _with_fake_sockets(peers, reveal, body)
