# The column's TCP transport, one for both TCP links: Modbus TCP (firmware/modbus_tcp.py) and
# the CBOR link (firmware/cbor_tcp.py) each serve their port and its connections from ONE task
# that makes a pass over them, as the RTU server polls its UART: a task, its coroutine and a
# buffer per connection would cost about 1 KB of RAM each, and MicroPython's asyncio lets a
# task wait on one socket at a time. On a board a pass comes every _POLL_MS; connections are
# plain non-blocking sockets with MicroPython's stream calls (readinto() and write() return
# None when they would wait), no asyncio streams. Under CPython (tests, the HIL's column farm)
# the same names come from cpython.py, which waits on the running loop's selector and
# which firmware_build leaves out of a board's bundle. Only a TCP board loads this module
# (firmware/links.py).
import socket

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

_POLL_MS = const(5)    # between two passes over the port and the connections (a board)

try:
    from asyncio import sleep_ms  # MicroPython
except ImportError:  # CPython (tests, the HIL's column farm): never on a board
    from .cpython import accept, idle, poller
else:
    import select

    def poller(lsock):
        """What accept() asks: a non-blocking accept() with no connection waiting would
        raise, and an exception allocates."""
        p = select.poll()
        p.register(lsock, select.POLLIN)
        return p

    def accept(lsock, ready):
        """A waiting connection's socket, non-blocking; None when there is none (or it was
        gone before it was taken)."""
        for _ in ready.ipoll(0):
            try:
                sock = lsock.accept()[0]
            except OSError:
                return None
            sock.setblocking(False)
            return sock
        return None

    def idle(lsock, conns):
        """Await it: the next pass. (conns: [socket, unsent bytes or None, ...] each.)"""
        return sleep_ms(_POLL_MS)


def listen(host, port):
    """The non-blocking listening socket of host:port (an OSError here: the port cannot
    be had)."""
    addr = socket.getaddrinfo(host, port)[0]
    lsock = socket.socket(addr[0])
    try:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind(addr[-1])
        lsock.listen(2)
        lsock.setblocking(False)
    except BaseException:
        lsock.close()
        raise
    return lsock
