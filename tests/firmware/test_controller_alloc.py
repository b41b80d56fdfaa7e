# The control step allocates nothing: a whole session (plug in, charge, limit changes,
# failsafe, meter failure, overdraw, unplug, a CP short, an RCD trip) runs between
# micropython.heap_lock() and heap_unlock(). Any allocation in there raises MemoryError
# on the MicroPython leg and fails the test. The CPython leg checks the same scenario's
# behaviour (CPython has no heap lock).
from fwtest import IS_MICROPYTHON
from test_session import Rig, cfg

from firmware.status import (
    CP_A,
    CP_B,
    CP_C,
    CP_E,
    ERR_CP_SHORT,
    ERR_GROUND,
    ERR_OVER_CURRENT,
    ERR_POWER_METER,
    SRC_FAILSAFE,
    SRC_GATEWAY,
    ST_AVAILABLE,
    ST_CHARGING,
    ST_FAULTED,
    ST_PREPARING,
    ST_SUSPENDED_EVSE,
)

if IS_MICROPYTHON:
    import micropython

_N_MARKS = 24


def _scenario(rig, marks):
    """Runs the session; stores observations into the preallocated marks list."""
    c = rig.ctl
    rig.ev = CP_B
    rig.run(500)
    marks[0] = c.status                          # Preparing
    rig.ev = CP_C
    rig.draw_da = 150
    rig.run(2000)
    marks[1] = c.status                          # Charging
    marks[2] = 1 if c.contactor_on else 0
    c.assign_limit(100, 600, rig.t)              # decrease: at once
    rig.draw_da = 100
    rig.step()
    marks[3] = c.offered_da                      # 100
    c.assign_limit(160, 600, rig.t)              # increase: rate limited
    rig.run(6000)
    marks[4] = c.offered_da                      # 160
    marks[5] = c.limit_source                    # gateway
    rig.draw_da = 60                             # a car that can follow the failsafe at once
    rig.run(11000)                               # gateway silent past its 10 s timeout
    marks[6] = 1 if c.failsafe_active else 0
    marks[7] = c.offered_da                      # failsafe 6 A
    marks[8] = c.limit_source
    c.heartbeat(rig.t)
    c.assign_limit(160, 600, rig.t)
    rig.meter_ok = False                         # meter fails: pause
    rig.run(6000)
    marks[9] = c.error                           # PowerMeterFailure
    marks[10] = c.status                         # SuspendedEVSE
    rig.meter_ok = True
    c.heartbeat(rig.t)
    rig.run(2000)                                # min pause holds (2 s configured)
    c.heartbeat(rig.t)
    rig.run(6000)                                # after the pause the offer comes back
    marks[11] = c.offered_da
    marks[12] = 1 if c.contactor_on else 0
    rig.draw_da = 250                            # overdraw: ignores the 16 A offer
    c.heartbeat(rig.t)
    rig.run(8000)
    marks[13] = c.error                          # OverCurrentFailure
    rig.run(7000)                                # still in C 6 s after PWM off: opened
    marks[14] = 1 if c.contactor_on else 0
    rig.ev = CP_A                                # unplug
    rig.draw_da = 0
    rig.run(500)
    marks[15] = c.status                         # Available
    rig.ev = CP_B
    rig.run(300)
    rig.ev = CP_E                                # CP short
    rig.run(300)
    marks[16] = c.error
    rig.ev = CP_B
    rig.run(300)
    rig.rcd = True                               # residual current
    rig.run(100)
    marks[17] = c.error
    marks[18] = c.status
    rig.rcd = False
    rig.ev = CP_A
    rig.run(300)
    marks[19] = c.status


def _check(marks, rig):
    assert marks[0] == ST_PREPARING, marks
    assert marks[1] == ST_CHARGING and marks[2] == 1, marks
    assert marks[3] == 100 and marks[4] == 160 and marks[5] == SRC_GATEWAY, marks
    assert marks[6] == 1 and marks[7] == 60 and marks[8] == SRC_FAILSAFE, marks
    assert marks[9] == ERR_POWER_METER and marks[10] == ST_SUSPENDED_EVSE, marks
    assert marks[11] == 160 and marks[12] == 1, marks
    assert marks[13] == ERR_OVER_CURRENT and marks[14] == 0, marks
    assert marks[15] == ST_AVAILABLE, marks
    assert marks[16] == ERR_CP_SHORT, marks
    assert marks[17] == ERR_GROUND and marks[18] == ST_FAULTED, marks
    assert marks[19] == ST_AVAILABLE, marks
    kinds = []
    while True:
        e = rig.ctl.events.pop()
        if e is None:
            break
        kinds.append(e[0])
    assert len(kinds) >= 8, kinds                # starts, stops and errors were recorded
    assert rig.ctl.events.lost == 0


def _rig():
    return Rig(cfg(heartbeat_timeout_s=10, min_pause_s=2, meter_stale_s=5), pp_ohms=220)


def test_step_allocates_nothing():
    rig = _rig()
    marks = [0] * _N_MARKS
    rig.ctl.assign_limit(160, 600, rig.t)
    rig.step()                                   # warm-up outside the lock
    if IS_MICROPYTHON:
        micropython.heap_lock()
        try:
            _scenario(rig, marks)
        finally:
            micropython.heap_unlock()
    else:
        _scenario(rig, marks)
    _check(marks, rig)


def _allocate():
    return [1, 2, 3]


def test_heap_lock_catches_an_allocation():
    # Proves the test above can fail: an allocation under the lock raises MemoryError.
    if not IS_MICROPYTHON:
        return
    caught = False
    micropython.heap_lock()
    try:
        _allocate()
    except MemoryError:
        caught = True
    finally:
        micropython.heap_unlock()
    assert caught
