# The TCP links' socket primitives under CPython (tests, the HIL's column farm): a task
# waits on the running loop's selector instead of MicroPython's asyncio I/O queue
# (tcp_link.py) or a poll every few ms (modbus_tcp.py's server).
# Imported only by their `except ImportError` fallbacks, which a board never runs, so
# tools/firmware_build.py leaves it out of every bundle.
import asyncio


def _wake(done):
    if not done.done():
        done.set_result(None)


async def wait(sock, out):
    """Await it: the task sleeps until sock can be read (or written, out=1) or fails."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    (loop.add_writer if out else loop.add_reader)(sock, _wake, done)
    try:
        await done
    finally:
        (loop.remove_writer if out else loop.remove_reader)(sock)


def recv(sock, buf):
    """Bytes read into buf, without waiting: None when there are none yet, 0 when the
    peer has closed."""
    try:
        return sock.recv_into(buf)
    except BlockingIOError:
        return None


def send(sock, data):
    """Bytes of data sent, without waiting: None when the socket takes none now."""
    try:
        return sock.send(data)
    except BlockingIOError:
        return None


# -- modbus_tcp's server: one task for the port and every connection ----------------------

class Stream:
    """A connection's socket with the calls modbus_tcp makes on a board's (MicroPython
    stream methods): readinto(buf) and write(buf[, n]) return None when they would wait."""

    def __init__(self, sock):
        self.sock = sock

    def fileno(self):
        return self.sock.fileno()

    def readinto(self, buf):
        return recv(self.sock, buf)

    def write(self, buf, n=-1):
        return send(self.sock, buf if n < 0 else memoryview(buf)[0:n])

    def close(self):
        self.sock.close()


def poller(lsock):
    """Nothing: accept() tries the port itself."""
    return None


def accept(lsock, ready):
    """A waiting connection (non-blocking, as a Stream); None when there is none."""
    try:
        sock = lsock.accept()[0]
    except BlockingIOError:
        return None
    sock.setblocking(False)
    return Stream(sock)


async def idle(lsock, conns):
    """Await it: until the port or a connection can be read, or a connection whose reply
    waits (conn[1]) can be written, or one fails."""
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
