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
