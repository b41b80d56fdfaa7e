# The CBOR link (firmware/gw_cbor.py) served over TCP: the gateway connects to the column.
# Only a cbor-tcp board loads this module (firmware/links.py), so a serial board does not
# carry the TCP transport, nor a TCP board the serial one's (CborLink.serve_serial is short).
import asyncio

from . import tcp_link

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

_RX_CHUNK = const(64)  # bytes read from the socket at a time


def serve_tcp(link, port, host):
    """Serve the CborLink `link` on host:port, one connection at a time (another is closed
    at once): returns the server task (firmware/tcp_link.py); cancelling it closes the port."""
    return tcp_link.start(host, port, 2, _client, link)


async def _client(sock, link):
    # One gateway at a time: tcp_link lets a second connection in to be judged here. A
    # gateway that closed its connection and dialled again at once is no second one: the
    # old connection's task sees the close in the same round of the loop, so it gets a
    # moment to end first.
    for _ in range(3):
        if link._out is None:
            break
        await asyncio.sleep(0.01)
    if link._out is not None:
        sock.close()
        return
    clock = link.app.clock
    rx = bytearray(_RX_CHUNK)   # handed over as a view, taken whole (see CborLink.serve_serial)
    view = memoryview(rx)

    def write(data):
        # Frames go out at once, from whichever task makes them. One the socket cannot
        # take whole (the gateway has stopped reading) drops the link: a frame cut
        # short would corrupt the stream. The connection closes at its next wake-up.
        if (tcp_link.send(sock, data) or 0) < len(data):
            link._out = None
            raise OSError("link stalled")

    link.connected(write, clock.ticks_ms())
    try:
        while link._out is write:   # not once dropped, nor once a newer gateway has the link
            n = tcp_link.recv(sock, rx)
            if n is None:
                await tcp_link.wait(sock, 0)
            elif n:
                link.on_bytes(view[0:n], clock.ticks_ms())
            else:
                break   # the gateway closed
    except Exception:  # reset by the peer, ...: wait for the next gateway
        pass
    finally:
        if link._out is write or link._out is None:
            link._out = None
            link.accepted = False
        sock.close()
