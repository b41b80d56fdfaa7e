# The column's TCP links over real loopback sockets: Modbus TCP (firmware/modbus_tcp.py's
# server) and the CBOR link (firmware/cbor_tcp.py's), both on the TCP transport
# (firmware/tcp_link.py), served by the app's own wiring, with the gateway's end played by
# plain non-blocking sockets in the same asyncio loop. A reply for every request, split or
# joined, and for each connection its own while the Modbus connections share one frame
# buffer; a bad header closes that
# connection only; beyond the client limit the oldest Modbus connection gives way and a
# second CBOR gateway is turned away; a gateway that stops reading loses the link instead
# of filling the column's RAM; cancelling the server closes the port and its connections.
# Runs under CPython and MicroPython. (The servers with stand-in sockets:
# test_modbus_tcp_server.py, test_cbor_tcp_server.py.)
import asyncio
import json

import machine
from fwtest import cbor_frames

from firmware import app as firmware_app
from firmware import clock, regmap, wiring
from firmware.frames import FrameReader

MPY_TIMEOUT_S = 90
BASE = {
    "column_id": "tl-col", "bus_address": 4, "phases": 3,
    "hardware_rating_a": 32, "installation_rating_a": 32, "failsafe_a": 6,
    "meter": {"type": "sdm630"},
}
READ_VERSION = bytes([0x12, 0x34, 0, 0, 0, 6, 4, 4, 0, regmap.IR_FW_VERSION, 0, 1])   # FC04, tid 0x1234
_port_seq = [0]


def _serve(mode):
    """An app of `mode` on the virtual board and its TCP server task, on a free port."""
    for _ in range(20):
        _port_seq[0] += 1
        port = 20000 + (clock.ticks_ms() * 7 + _port_seq[0] * 131) % 20000
        machine.board.clear()
        with open("column.json", "w") as f:
            f.write(json.dumps(dict(BASE, link={"mode": mode, "tcp_port": port, "host": "127.0.0.1"})))
        app = firmware_app.App(machine, "column.json", use_wdt=False, log=lambda *a: None)
        wiring.link(app, mode)
        try:
            return app, port, wiring.serve_tcp(app, mode)
        except OSError:   # taken: another one
            continue
    raise AssertionError("no free port")


def _connect(port):
    import socket

    sock = socket.socket()
    sock.connect(socket.getaddrinfo("127.0.0.1", port)[0][-1])   # the listener's backlog takes it
    sock.setblocking(False)
    return sock


def _run(mode, body):
    """Run `await body(app, port, server, connect)` with an app of `mode` serving: connect(port)
    opens a gateway-side socket. Afterwards every socket it opened is closed and the server
    cancelled, whatever the body did."""
    async def main():
        app, port, server = _serve(mode)
        socks = []

        def connect(port):
            sock = _connect(port)
            socks.append(sock)
            return sock

        try:
            await body(app, port, server, connect)
        finally:
            for sock in socks:
                sock.close()
            server.cancel()
            await asyncio.sleep(0.02)

    asyncio.run(main())


async def _read(sock, want, timeout_ms=5000):
    """(bytes, closed): up to `want` bytes, or what came before the peer closed / the timeout."""
    data = b""
    t0 = clock.ticks_ms()
    while len(data) < want and clock.ticks_diff(clock.ticks_ms(), t0) < timeout_ms:
        try:
            chunk = sock.recv(min(want - len(data), 512))
        except OSError as exc:   # nothing yet (EAGAIN), or reset by the column (a close)
            if exc.args[0] != 11:
                return data, True
            await asyncio.sleep(0.005)
            continue
        if not chunk:
            return data, True
        data += chunk
    return data, False


async def _closed(sock, timeout_ms=5000):
    return (await _read(sock, 1 << 16, timeout_ms))[1]


def _version_reply(app):
    v = (app.version[0] << 8) | app.version[1]
    return bytes([0x12, 0x34, 0, 0, 0, 5, 4, 4, 2, v >> 8, v & 0xFF])


def test_modbus_tcp_answers_every_request_split_or_joined():
    async def body(app, port, server, connect):
        sock = connect(port)
        sock.send(READ_VERSION)
        assert await _read(sock, 11) == (_version_reply(app), False)
        sock.send(READ_VERSION[:5])          # a request in two segments
        await asyncio.sleep(0.05)
        sock.send(READ_VERSION[5:])
        assert await _read(sock, 11) == (_version_reply(app), False)
        sock.send(READ_VERSION + READ_VERSION)   # two in one
        assert await _read(sock, 22) == (_version_reply(app) * 2, False)
        # A write reaches the controller (FC06 to unit 0xFF: the failsafe limit, 7.0 A).
        write = bytes([0, 9, 0, 0, 0, 6, 0xFF, 6, 0, regmap.HR_FAILSAFE_LIMIT, 0, 70])
        sock.send(write)
        assert await _read(sock, 12) == (write, False)   # FC06 echoes the request
        assert app.ctl.limits.failsafe_da == 70

    _run("modbus-tcp", body)


def test_a_bad_modbus_header_closes_that_connection_only():
    async def body(app, port, server, connect):
        good = connect(port)
        bad = connect(port)
        bad.send(bytes([0, 1, 0, 7, 0, 6, 4, 4, 0, 0, 0, 1]))   # protocol id 7
        assert await _closed(bad)
        good.send(READ_VERSION)
        assert await _read(good, 11) == (_version_reply(app), False)

    _run("modbus-tcp", body)


def test_beyond_four_modbus_connections_the_oldest_gives_way():
    async def body(app, port, server, connect):
        socks = []
        for _ in range(5):
            sock = connect(port)
            socks.append(sock)
            sock.send(READ_VERSION)    # answered: accepted, in this order
            assert await _read(sock, 11) == (_version_reply(app), False)
        assert await _closed(socks[0])
        for sock in socks[1:]:
            sock.send(READ_VERSION)
            assert await _read(sock, 11) == (_version_reply(app), False)

    _run("modbus-tcp", body)


def test_cancelling_the_server_closes_the_port_and_its_connections():
    async def body(app, port, server, connect):
        sock = connect(port)
        sock.send(READ_VERSION)
        assert await _read(sock, 11) == (_version_reply(app), False)
        server.cancel()
        assert await _closed(sock)
        refused = False
        try:
            connect(port)
        except OSError:
            refused = True
        assert refused

    _run("modbus-tcp", body)


def test_modbus_connections_share_one_frame_buffer_without_mixing_requests():
    """A request split across passes on one connection, with another connection's whole
    requests answered in between: each gets its own replies."""
    async def body(app, port, server, connect):
        a = connect(port)
        b = connect(port)
        a.send(READ_VERSION[:9])
        await asyncio.sleep(0.05)
        b.send(READ_VERSION + READ_VERSION[:3])
        assert await _read(b, 11) == (_version_reply(app), False)
        a.send(READ_VERSION[9:] + READ_VERSION)
        b.send(READ_VERSION[3:])
        assert await _read(a, 22) == (_version_reply(app) * 2, False)
        assert await _read(b, 11) == (_version_reply(app), False)

    _run("modbus-tcp", body)


async def _boot_frames(app, sock):
    """The column's frames after its next refresh (a fresh connection: BootNotification)."""
    reader = FrameReader()
    t0 = clock.ticks_ms()
    while clock.ticks_diff(clock.ticks_ms(), t0) < 5000:
        app.link.refresh(clock.ticks_ms())
        data, closed = await _read(sock, 512, 50)
        assert not closed
        frames = cbor_frames(reader, data)
        if frames:
            return frames
    return []


def test_cbor_tcp_serves_one_gateway_at_a_time():
    async def body(app, port, server, connect):
        first = connect(port)
        frames = await _boot_frames(app, first)
        assert frames and frames[0][2] == "BootNotification"
        second = connect(port)
        assert await _closed(second)          # turned away while the first is there
        first.close()
        await asyncio.sleep(0.1)
        third = connect(port)
        frames = await _boot_frames(app, third)
        assert frames and frames[0][2] == "BootNotification"   # boots again on the new one

    _run("cbor-tcp", body)


def test_a_cbor_gateway_that_dials_again_at_once_is_served():
    """A gateway that closes its connection and connects again straight away (a restart) is
    not a second gateway: the new connection gets the link, with no pause in between."""
    async def body(app, port, server, connect):
        for _ in range(3):
            sock = connect(port)
            frames = await _boot_frames(app, sock)
            assert frames and frames[0][2] == "BootNotification"
            sock.close()

    _run("cbor-tcp", body)


def test_a_cbor_gateway_that_stops_reading_loses_the_link():
    async def body(app, port, server, connect):
        stalled = connect(port)
        assert await _boot_frames(app, stalled)
        link = app.link
        block = bytes(4096)
        failed = 0
        for _ in range(20000):        # at most 80 MB: far beyond any socket buffer
            try:
                link._out(block)
            except OSError:
                failed += 1
                break
        assert failed == 1 and link._out is None
        stalled.send(b"\x00")        # its next bytes wake the connection, which closes
        await asyncio.sleep(0.2)
        fresh = connect(port)
        frames = await _boot_frames(app, fresh)
        assert frames and frames[0][2] == "BootNotification"

    _run("cbor-tcp", body)
