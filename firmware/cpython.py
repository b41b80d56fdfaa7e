# MicroPython-only names under CPython (tests, the HIL's column farm), for the firmware that
# runs unchanged on both: firmware/clock.py's ticks_ms(), ticks_diff() and sleep_ms() (monotonic
# ms, no wrap in practice), and the TCP transport's primitives (firmware/tcp_link.py), where
# the one task serving a port and its connections sleeps on the running loop's selector
# instead of polling every few ms as on a board.
# Imported only by `except ImportError` fallbacks, which a board never runs, so
# tools/firmware_build.py leaves it out of every bundle.
import asyncio
import time


def ticks_ms():
    return time.monotonic_ns() // 1000000


def ticks_diff(a, b):
    return a - b


def sleep_ms(ms):
    """Await it: asyncio.sleep() for ms milliseconds."""
    return asyncio.sleep(ms / 1000)


def _wake(done):
    if not done.done():
        done.set_result(None)


class Stream:
    """A connection's socket with the calls the servers make on a board's (MicroPython
    stream methods): readinto(buf) and write(buf[, n]) return None when they would wait."""

    def __init__(self, sock):
        self.sock = sock

    def fileno(self):
        return self.sock.fileno()

    def readinto(self, buf):
        try:
            return self.sock.recv_into(buf)
        except BlockingIOError:
            return None

    def write(self, buf, n=-1):
        try:
            return self.sock.send(buf if n < 0 else memoryview(buf)[0:n])
        except BlockingIOError:
            return None

    def close(self):
        self.sock.close()


def poller(lsock):
    """Nothing: accept() tries the port itself."""
    return None


def accept(lsock, ready):
    """A waiting connection (non-blocking, as a Stream); None when there is none (or it
    was gone before it was taken)."""
    try:
        sock = lsock.accept()[0]
    except OSError:
        return None
    sock.setblocking(False)
    return Stream(sock)


async def idle(lsock, conns):
    """Await it: until the port or a connection can be read, or a connection whose bytes
    wait (conn[1]) can be written, or one fails."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    reads = [lsock] + [conn[0] for conn in conns if conn[1] is None]
    writes = [conn[0] for conn in conns if conn[1] is not None]
    for sock in reads:
        loop.add_reader(sock, _wake, done)
    for sock in writes:
        loop.add_writer(sock, _wake, done)
    try:
        await done
    finally:
        for sock in reads:
            loop.remove_reader(sock)
        for sock in writes:
            loop.remove_writer(sock)
