# A tiny blocking poll loop serving the column's Modbus TCP connections
# (modbus_tcp.ModbusTcpConnection) on a listening socket, for scripts and tests on both
# interpreters. A column never runs it (its app serves them on firmware/tcp_link.py), so it
# lives apart from modbus_tcp.py and is never in a board's bundle or RAM; so does feed(),
# which copies bytes a caller already holds into a connection.
from .modbus_tcp import CLOSE, NEED_MORE, TCP_MAX, ModbusTcpConnection


def feed(conn, data, start=0, end=-1):
    """Copy data[start:end] (end -1 = to the end) into the ModbusTcpConnection conn as far
    as it fits, as a socket read into conn.room() does; returns how many bytes it took
    (call conn.next_reply() between)."""
    if end < 0:
        end = len(data)
    room = conn.room()
    n = min(end - start, len(room))
    for i in range(n):   # a byte loop: the same on both interpreters, whatever data is
        room[i] = data[start + i]
    conn.filled(n)
    return n


def _key(obj):
    # CPython's poll reports fds, MicroPython's the registered objects.
    return obj if isinstance(obj, int) else obj.fileno()


def serve(listener, slave, clock_ms, *, run_ms=-1, max_clients=4, poll_ms=20, should_stop=None):
    """Serve Modbus TCP on a bound, listening socket until run_ms have passed (-1 =
    forever) or should_stop() is true. clock_ms() returns milliseconds. Returns the
    number of frames handled. Blocking socket calls are only made after poll says ready."""
    import select

    poller = select.poll()
    poller.register(listener, select.POLLIN)
    clients = {}   # fd -> (socket, connection)
    t0 = clock_ms()
    frames = 0
    try:
        while run_ms < 0 or clock_ms() - t0 < run_ms:
            if should_stop is not None and should_stop():
                break
            for obj, event in poller.poll(poll_ms):
                key = _key(obj)
                if key == _key(listener):
                    sock, _addr = listener.accept()
                    if len(clients) >= max_clients:
                        sock.close()
                        continue
                    clients[_key(sock)] = (sock, ModbusTcpConnection(slave))
                    poller.register(sock, select.POLLIN)
                    continue
                sock, conn = clients[key]
                data = b""
                if event & select.POLLIN:
                    try:
                        data = sock.recv(TCP_MAX)
                    except OSError:
                        data = b""
                alive = len(data) > 0
                taken = 0
                while alive and taken < len(data):
                    taken += feed(conn, data, taken)
                    while True:
                        n = conn.next_reply(clock_ms())
                        if n == NEED_MORE:
                            break
                        if n == CLOSE:
                            alive = False
                            break
                        frames += 1
                        if n > 0:
                            sock.sendall(conn.out[0:n])
                if not alive:
                    poller.unregister(sock)
                    sock.close()
                    del clients[key]
    finally:
        for sock, _conn in clients.values():
            sock.close()
    return frames
