# A TCP server for the gateway link on plain non-blocking sockets, without asyncio streams:
# no stream object, read buffer or out buffer per connection, and no asyncio.stream module
# in RAM. A task waits for its socket as MicroPython's streams do, on the asyncio core's
# I/O queue; under CPython (tests, the HIL's column farm) on the running loop's selector
# (tcp_link_cpython.py, which firmware_build leaves out of a board's bundle).
# The CBOR link over TCP (firmware/cbor_tcp.py) serves its connection with it, reading into
# its own preallocated buffer. A connection is one task and its own frame (a suspended call
# costs RAM: no helper coroutines between). Modbus TCP, with up to four connections, serves
# them all from one task instead (firmware/modbus_tcp.py), so a modbus-tcp board does not
# carry this module.
import asyncio
import socket

try:
    from asyncio import core as _core  # MicroPython
except ImportError:  # CPython (tests, the HIL's column farm): never on a board
    from .tcp_link_cpython import recv, send, wait
else:
    def wait(sock, out):
        """Await it: the task sleeps until sock can be read (or written, out=1) or fails."""
        yield _core._io_queue.queue_write(sock) if out else _core._io_queue.queue_read(sock)

    def recv(sock, buf):
        """Bytes read into buf, without waiting: None when there are none yet, 0 when the
        peer has closed."""
        return sock.readinto(buf)

    def send(sock, data):
        """Bytes of data sent, without waiting: None when the socket takes none now."""
        return sock.write(data)


def start(host, port, max_clients, client, arg, evict=False):
    """Listen on host:port (an OSError here: the port cannot be had) and return the task
    that accepts connections, each served by a task of `client(sock, arg)`, which closes
    sock and never raises. Beyond max_clients a new connection is closed at once, or, with
    evict, the oldest one is cancelled for it (a peer that vanished without a word would
    hold its slot forever). Cancelling the task closes the port and every connection."""
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
    return asyncio.create_task(_serve(lsock, max_clients, client, arg, evict))


async def _serve(lsock, max_clients, client, arg, evict):
    clients = []   # the connections' tasks, oldest first (ended ones until the next accept)
    try:
        while True:
            try:
                sock, _ = lsock.accept()
            except OSError:   # none waiting (or a failed accept): wait for the next one
                await wait(lsock, 0)
                continue
            clients = [t for t in clients if not t.done()]
            if len(clients) >= max_clients:
                if not evict:
                    sock.close()
                    continue
                clients.pop(0).cancel()
            sock.setblocking(False)
            clients.append(asyncio.create_task(client(sock, arg)))
    finally:
        lsock.close()
        for task in clients:
            task.cancel()
