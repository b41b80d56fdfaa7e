# Millisecond ticks that behave the same on a board, the unix port and CPython.
# Boards wrap ticks_ms at 2^30 (the unix port at 2^62): compare times only through
# ticks_diff, never with < on raw values.
import time

try:
    ticks_ms = time.ticks_ms
    ticks_diff = time.ticks_diff
    ticks_add = time.ticks_add
except AttributeError:  # CPython: monotonic ms, no wrap in practice
    def ticks_ms():
        return time.monotonic_ns() // 1000000

    def ticks_diff(a, b):
        return a - b

    def ticks_add(a, b):
        return a + b
