# Millisecond ticks that behave the same on a board, the unix port and CPython.
# Boards wrap ticks_ms at 2^30 (the unix port at 2^62): compare times only through
# ticks_diff, never with < on raw values.
import time

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
    ticks_ms = time.ticks_ms
    ticks_diff = time.ticks_diff
except AttributeError:  # CPython: monotonic ms, no wrap in practice
    def ticks_ms():
        return time.monotonic_ns() // 1000000

    def ticks_diff(a, b):
        return a - b
