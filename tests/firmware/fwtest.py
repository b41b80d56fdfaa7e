# Helpers for firmware tests that run under both CPython and MicroPython.
# Only MicroPython-compatible code here: no pytest, no typing, no CPython-only modules.
import sys

IS_MICROPYTHON = sys.implementation.name == "micropython"


def raises(exc_type, fn, *args, **kwargs):
    """Call fn and return the exception it raised; fail if it raised nothing or another type."""
    try:
        fn(*args, **kwargs)
    except exc_type as exc:
        return exc
    raise AssertionError("expected %s from %s" % (exc_type.__name__, fn))


def approx(a, b, tol=1e-6):
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def hexbytes(text):
    """b'...' from '01 04 00 00' so tests can quote wire frames as hex."""
    return bytes(int(h, 16) for h in text.split())


def cbor_frames(reader, data):
    """The CBOR messages in `data`, fed to the FrameReader `reader` (whole frames only; a
    frame cut short stays in the reader for the next call)."""
    from firmware import cbor

    reader.feed(data)
    out = []
    while True:
        frame = reader.next_frame()
        if frame is None:
            return out
        out.append(cbor.loads(bytes(frame)))


def tcp_column(mode, server, accept, idle, column_id):
    """A column (App) and its link for the TCP link `mode`, with the server module's port
    primitives replaced: no listening poller, accept(lsock, ready) and idle(lsock, conns) as
    given. Returns (app, link, restore); call restore() when done."""
    import json

    import machine

    from firmware import app as firmware_app
    from firmware import wiring

    saved = (server.poller, server.accept, server.idle)

    def restore():
        server.poller, server.accept, server.idle = saved

    server.poller, server.accept, server.idle = (lambda lsock: None), accept, idle
    try:
        machine.board.clear()
        config = {"column_id": column_id, "bus_address": 4, "phases": 3, "hardware_rating_a": 32,
                  "installation_rating_a": 32, "failsafe_a": 6, "meter": {"type": "sdm630"},
                  "link": {"mode": mode, "tcp_port": 1, "host": "127.0.0.1"}}
        with open("column.json", "w") as f:
            f.write(json.dumps(config))
        app = firmware_app.App(machine, "column.json", use_wdt=False, log=lambda *a: None)
        return app, wiring.link(app, mode), restore
    except BaseException:
        restore()
        raise
