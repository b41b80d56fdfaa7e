# The CBOR link (firmware/gw_cbor.py) served over TCP: the gateway connects to the column, one
# gateway at a time. ONE task serves the port and the gateway's connection on the TCP transport
# (firmware/tcp_link.py), as Modbus TCP's server does, reading into one preallocated buffer;
# frames go out at once from whichever task makes them. Only a cbor-tcp board loads this
# module (firmware/links.py), so a serial board does not carry the TCP transport, nor a TCP
# board the serial one's (firmware/cbor_serial.py).
import asyncio

from .tcp_link import accept, idle, listen, poller

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

_RX_CHUNK = const(64)  # bytes read from the socket at a time
_READS = const(8)      # reads of the gateway per pass: a flood must not hold the loop
_DRAIN = const(256)    # ... while another connection waits (see _serve)


def serve_tcp(link, port, host):
    """Serve the CborLink `link` on host:port (an OSError here: the port cannot be had), one
    gateway at a time (another is closed at once): returns the server task, which never
    ends by itself; cancelling it closes the port and the connection."""
    return asyncio.create_task(_serve(listen(host, port), link))


def _writer(link, sock):
    def write(data):
        # Frames go out at once, from whichever task makes them. One the socket cannot
        # take whole (the gateway has stopped reading) drops the link: a frame cut short
        # would corrupt the stream. The server closes the connection at its next pass.
        if (sock.write(data) or 0) < len(data):
            link._out = None
            raise OSError("link stalled")
    return write


async def _serve(lsock, link):
    # A pass reads what the gateway sent, then takes a waiting connection if nobody has the
    # link. A gateway that closed its connection and dialled again at once is no second
    # gateway: its close came before its new connection, so while one waits the old
    # connection is read to its end (up to _DRAIN reads) before the new one is judged.
    clock = link.app.clock
    rx = bytearray(_RX_CHUNK)   # handed over as a view, taken whole (see cbor_serial.py)
    view = memoryview(rx)
    conns = []     # [[socket, None]] while a gateway has the link (tcp_link.idle()'s shape)
    write = None   # that gateway's link._out
    ready = poller(lsock)
    try:
        while True:
            new = accept(lsock, ready)
            if conns:
                sock = conns[0][0]
                alive = link._out is write   # not once dropped (a stalled gateway)
                reads = _READS if new is None else _DRAIN
                try:
                    while alive and reads:
                        reads -= 1
                        n = sock.readinto(rx)
                        if n is None:
                            break
                        if n:
                            link.on_bytes(view[0:n], clock.ticks_ms())
                            alive = link._out is write   # an answer may have stalled
                        else:
                            alive = False   # the gateway closed
                except Exception:   # reset by the peer, ...
                    alive = False
                if not alive:
                    conns.pop()
                    sock.close()
                    link._out = None
                    link.accepted = False
            if new is not None:
                if conns:
                    new.close()   # a second gateway
                else:
                    conns.append([new, None])
                    write = _writer(link, new)
                    link.connected(write, clock.ticks_ms())
            await idle(lsock, conns)
    finally:
        lsock.close()
        if conns:
            conns[0][0].close()
            link._out = None
            link.accepted = False
