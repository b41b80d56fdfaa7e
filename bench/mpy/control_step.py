# The control step under both interpreters: allocations per step (MicroPython: every step of a
# charging session runs between micropython.heap_lock() and heap_unlock(), so a step that
# allocates raises MemoryError and is counted) and time per step (both interpreters, the same
# session replayed REPEATS times). Prints one JSON line. Runs as a script:
#
#   control_step.py STEPS REPEATS
#
# MicroPython-compatible code only (it runs in the unix port from the .mpy bundle).
import gc
import json
import sys

from firmware.controller import DEFAULTS, Controller
from firmware.status import CP_A, CP_B, CP_C

MPY = sys.implementation.name == "micropython"
if MPY:
    import time

    import micropython

    def now_us():
        return time.ticks_us()

    def diff_us(a, b):
        return time.ticks_diff(a, b)
else:
    import time

    def now_us():
        return time.perf_counter_ns() // 1000

    def diff_us(a, b):
        return a - b

_HIGH_MV = (12000, 9000, 6000)   # CP high plateau in states A, B, C
_PERIOD_MS = 10                  # the app's control period


class Session:
    """A car that plugs in, charges under changing limits and leaves: a whole session in
    `length` steps. step() allocates nothing itself (ints only, preallocated state)."""

    def __init__(self, length):
        cfg = dict(DEFAULTS)
        cfg["heartbeat_timeout_s"] = 3600
        cfg["pwm_min_change_interval_s"] = 0
        cfg["min_pause_s"] = 0
        self.ctl = Controller(cfg)
        self.length = length
        self.i = 0
        self.t = 0
        self.energy_wh = 1000

    def step(self):
        c = self.ctl
        i = self.i % self.length
        phase = i * 10 // self.length          # 0..9 through the session
        ev = CP_A if phase in (0, 9) else (CP_B if phase == 1 else CP_C)
        if i % 500 == 0:                       # the gateway's limit and heartbeat, every 5 s
            c.heartbeat(self.t)
            c.assign_limit(100 + (i // 500) % 3 * 30, 600, self.t)
        high = _HIGH_MV[ev]
        low = -12000 if c.pwm_on or ev == CP_A else high
        draw = c.offered_da if c.contactor_on else 0
        if draw:
            self.energy_wh += 1
        c.step(self.t, high, low, 220, draw, draw, draw, True, self.energy_wh, False, c.contactor_on)
        self.t += _PERIOD_MS
        self.i += 1


def locked_failures(sess, steps):
    """Steps (of `steps`) that allocated: each runs under the heap lock on its own."""
    failures = 0
    for _ in range(steps):
        micropython.heap_lock()
        try:
            sess.step()
        except MemoryError:
            failures += 1
        finally:
            micropython.heap_unlock()
    return failures


def heap_lock_works():
    """The proof can fail: a list made under the lock raises MemoryError."""
    micropython.heap_lock()
    try:
        probe = [0, 1, 2]
        del probe
    except MemoryError:
        return True
    finally:
        micropython.heap_unlock()
    return False


def bytes_per_session(sess, steps):
    """Heap bytes taken by `steps` steps with the collector off (0 when nothing allocates)."""
    gc.collect()
    gc.disable()
    before = gc.mem_alloc()
    for _ in range(steps):
        sess.step()
    used = gc.mem_alloc() - before
    gc.enable()
    return used


def main():
    steps = int(sys.argv[1])
    repeats = int(sys.argv[2])
    out = {"interpreter": sys.implementation.name, "steps": steps, "repeats": repeats}
    sess = Session(steps)
    for _ in range(50):                        # warm-up outside any lock or timing
        sess.step()
    if MPY:
        out["heap_lock_catches_allocations"] = heap_lock_works()
        out["steps_that_allocated"] = locked_failures(sess, steps)
        out["bytes_allocated"] = bytes_per_session(sess, steps)
    times = []
    for _ in range(repeats):
        t0 = now_us()
        for _ in range(steps):
            sess.step()
        times.append(diff_us(now_us(), t0))
    out["us_per_repeat"] = times
    out["sessions_seen"] = sess.ctl.session_id      # sessions the car went through (sanity)
    print(json.dumps(out))


main()
