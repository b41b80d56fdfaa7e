# Millisecond ticks that behave the same on a board, the unix port and CPython.
# Boards wrap ticks_ms at 2^30 (the unix port at 2^62): compare times only through
# ticks_diff, never with < on raw values. Tasks sleep with sleep_ms(int): asyncio.sleep(s)
# makes a float at every call on MicroPython.

_TICKS_MASK = 0x3FFFFFFF
_TICKS_HALF = 0x20000000


def elapsed_ms(now_ms, then_ms):
    """Signed ms from then_ms to now_ms for pure logic fed with ticks_ms values: correct
    across a board's 2**30 wrap (and the unix port's larger one) for spans under 2**29 ms
    (6 days). The one place firmware compares two times."""
    d = (now_ms - then_ms) & _TICKS_MASK
    if d >= _TICKS_HALF:
        d = d - _TICKS_MASK - 1  # two steps: 2**30 itself is not a small int on a board
    return d


try:
    from asyncio import sleep_ms  # noqa: F401
    from time import ticks_diff, ticks_ms  # noqa: F401
except ImportError:  # CPython (firmware/cpython.py: monotonic ms, no wrap in practice)
    from .cpython import sleep_ms, ticks_diff, ticks_ms  # noqa: F401
