# The CBOR link's TCP server (firmware/cbor_tcp.py: one task for the port and the gateway's
# connection, on firmware/tcp_link.py) with stand-in sockets in place of the port's, one pass
# at a time: one gateway at a time, a second one closed at once; a gateway that closed and
# dialled again in the same instant gets in, its last bytes read first; a gateway that stops
# reading loses the link and sees nothing after the frame that could not go out whole;
# cancelling closes the connection and drops the link; a pass allocates nothing (MicroPython,
# under heap_lock). Real loopback sockets: test_tcp_link_serve.py. Runs under CPython and
# MicroPython.

from fwtest import IS_MICROPYTHON, cbor_frames, tcp_column

from firmware import cbor, clock
from firmware.frames import FrameReader, encode_frame


class _Peer:
    """A connection's socket as the server sees it (readinto, write, close): it reads
    `inbox`, then None, or 0 (the peer closed) once `eof` is set; a write takes at most
    `room` bytes in all (a peer that stops reading), None once it takes none."""

    def __init__(self, inbox=b"", room=1 << 20):
        self.inbox = inbox
        self.at = 0
        self.eof = False
        self.room = room
        self.sent = bytearray(4096)
        self.n_sent = 0
        self.closed = False

    def readinto(self, buf):
        assert not self.closed
        n = min(len(self.inbox) - self.at, len(buf))
        if n <= 0:
            return 0 if self.eof else None
        for i in range(n):
            buf[i] = self.inbox[self.at + i]
        self.at += n
        return n

    def write(self, buf, n=-1):
        assert not self.closed
        n = min(len(buf) if n < 0 else n, self.room)
        if n <= 0:
            return None
        for i in range(n):
            self.sent[self.n_sent + i] = buf[i]
        self.n_sent += n
        self.room -= n
        return n

    def close(self):
        self.closed = True

    def frames(self):
        return cbor_frames(FrameReader(), bytes(self.sent[0:self.n_sent]))


class _Port:
    closed = False

    def close(self):
        self.closed = True


class _Pass:
    """What the stand-in idle() returns: the server's await yields once, so each
    send(None) to its coroutine is one pass."""

    def __await__(self):
        yield

    __iter__ = __await__


def _with_server(body, idle=None):
    """Run body(app, link, step, arrive, port): step() makes one pass of the server,
    arrive(peer) has the port hand `peer` out at the next pass. The server's port
    primitives are restored afterwards."""
    from firmware import cbor_tcp

    waiting = []
    one = _Pass()

    def accept(lsock, ready):
        return waiting.pop(0) if waiting else None

    pass_ = idle or (lambda lsock, conns: one)
    app, link, restore = tcp_column("cbor-tcp", cbor_tcp, accept, pass_, "ct-col")
    try:
        port = _Port()
        coro = cbor_tcp._serve(port, link)
        try:
            body(app, link, lambda: coro.send(None), waiting.append, port)
        finally:
            coro.close()
    finally:
        restore()


def _actions(peer):
    return [f[2] for f in peer.frames() if f[0] == 2]


def test_one_gateway_at_a_time_and_one_that_dialled_again_gets_in():
    def body(app, link, step, arrive, port):
        first = _Peer()
        arrive(first)
        step()
        link.refresh(clock.ticks_ms())
        assert _actions(first) == ["BootNotification"]
        second = _Peer()
        arrive(second)
        step()
        assert second.closed and second.n_sent == 0      # turned away while the first is there
        assert not first.closed and link._out is not None
        # The first closes, with its last bytes still unread, and dials again: both are
        # seen in the same pass.
        first.inbox = encode_frame(cbor.dumps([3, 999, {}]))   # an answer nobody waits for
        first.eof = True
        again = _Peer()
        arrive(again)
        step()
        assert first.closed and first.at == len(first.inbox)
        assert not again.closed and link._out is not None
        link.refresh(clock.ticks_ms())
        assert _actions(again) == ["BootNotification"]     # boots again on the new one
        assert _actions(first) == ["BootNotification"]     # and nothing more went to the old

    _with_server(body)


def test_a_gateway_that_stops_reading_loses_the_link_and_no_cut_frame_is_followed():
    def body(app, link, step, arrive, port):
        stalled = _Peer(room=10)          # takes 10 bytes, then nothing
        arrive(stalled)
        step()
        link.refresh(clock.ticks_ms())    # the BootNotification does not fit
        assert link._out is None and not link.accepted
        sent = stalled.n_sent
        assert 0 < sent <= 10
        link.refresh(clock.ticks_ms())
        step()
        assert stalled.closed              # closed at the next pass, nothing after the cut
        assert stalled.n_sent == sent
        fresh = _Peer()
        arrive(fresh)
        step()
        link.refresh(clock.ticks_ms())
        assert _actions(fresh) == ["BootNotification"]

    _with_server(body)


def test_a_gateway_that_closes_or_fails_frees_the_link():
    class _Reset(_Peer):
        def readinto(self, buf):
            raise OSError(104)   # ECONNRESET

    def body(app, link, step, arrive, port):
        for peer in (_Peer(), _Reset()):
            arrive(peer)
            step()
            assert link._out is not None and not peer.closed
            peer.eof = True
            step()
            assert peer.closed and link._out is None

    _with_server(body)


def test_cancelling_the_server_closes_the_port_and_the_connection():
    seen = []

    def body(app, link, step, arrive, port):
        peer = _Peer()
        arrive(peer)
        step()
        assert link._out is not None
        seen.append((link, port, peer))

    _with_server(body)            # closes the server's coroutine, as cancelling its task does
    link, port, peer = seen[0]
    assert port.closed and peer.closed and link._out is None and not link.accepted


def test_a_cbor_server_pass_allocates_nothing():
    """MicroPython: passes with no gateway, and with a gateway that sent nothing, run under
    heap_lock (the control loop shares the heap with them)."""
    if not IS_MICROPYTHON:
        return
    import micropython

    one = _Pass()
    state = [False, 0, micropython]   # heap locked, passes (one closed-over cell)

    def idle(lsock, conns):
        if state[0]:
            state[2].heap_unlock()
            state[0] = False
        state[1] += 1
        return one

    def locked(step):
        state[0] = True
        micropython.heap_lock()
        try:
            step()
        finally:
            if state[0]:
                micropython.heap_unlock()
                state[0] = False

    def body(app, link, step, arrive, port):
        step()                    # the first pass: the coroutine starts (that allocates)
        locked(step)
        locked(step)
        peer = _Peer()
        arrive(peer)
        step()                    # taking a gateway allocates (its write function)
        locked(step)
        locked(step)
        assert state[1] == 6
        assert not peer.closed and link._out is not None   # (a MemoryError would close it)

    _with_server(body, idle)
