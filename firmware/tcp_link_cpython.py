# tcp_link's three socket primitives under CPython (tests, the HIL's column farm): a task
# waits on the running loop's selector instead of MicroPython's asyncio I/O queue.
# Imported only by tcp_link's `except ImportError` fallback, which a board never runs, so
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
