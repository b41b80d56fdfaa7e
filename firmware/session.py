# Charging session state machine: debounced CP state + offer + safety inputs ->
# PWM on/off, contactor, OCPP-like status and error, session start/stop events.
#
# Contactor rules (IEC 61851-1 Table A.6 as cited by reference implementations):
# - closes only in C/D, with the PWM offering current and the EV diode seen (the low
#   level of the running PWM near -12 V); it closes in the step that sees all three,
#   well within the 3 s allowed after B->C;
# - opens in the step the (debounced) CP leaves C/D: within 100 ms of the EV's change
#   as long as cp_debounce_ms + the step period stay below 100 ms;
# - opens at once on any fault (RCD, CP short/state E or F, missing diode, contactor
#   feedback, internal), which is inside the 3 s the standard allows for state E;
# - after the PWM stops (pause, limit, overdraw, meter, disable, remote stop) the EV
#   gets 6 s to leave C; if it stays in C/D the contactor opens under load (counted).
#
# Sessions start at plug-in (CP leaves A) and stop on unplug, a fault, a remote stop
# or disable; a session open at a power loss is closed by the app at boot through
# record_power_loss(). Events go into a preallocated ring the app drains.
from .pilot import elapsed_ms
from .status import (
    CP_A,
    CP_B,
    CP_C,
    CP_D,
    CP_E,
    CP_F,
    ERR_CONTACTOR,
    ERR_CP_SHORT,
    ERR_DIODE,
    ERR_GROUND,
    ERR_NONE,
    ST_AVAILABLE,
    ST_CHARGING,
    ST_FAULTED,
    ST_FINISHING,
    ST_PREPARING,
    ST_SUSPENDED_EV,
    ST_SUSPENDED_EVSE,
    ST_UNAVAILABLE,
)

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

# Event kinds in the ring.
EV_SESSION_START = const(1)
EV_SESSION_STOP = const(2)
EV_ERROR = const(3)          # reason = the error code raised (status.ERR_*)

# Stop reasons (OCPP names). A fault stop is preceded by an EV_ERROR event naming it.
STOP_NONE = const(0)
STOP_EV_DISCONNECTED = const(1)
STOP_REMOTE = const(2)
STOP_POWER_LOSS = const(3)
STOP_EMERGENCY = const(4)
# Their contract names: firmware/status_names.py STOP_NAMES (the CBOR link's only).

# Diode check result handed in by the controller.
DIODE_UNKNOWN = const(0)     # the PWM was not running: the low level says nothing
DIODE_OK = const(1)
DIODE_MISSING = const(2)

_PWM_OFF_OPEN_MS = const(6000)  # EV still in C this long after PWM off: open under load
_MAX_ID = const(0x3FFFFFFF)


class EventRing:
    """Fixed-size ring of (kind, session_id, energy_wh, reason); the oldest is
    overwritten when full (counted in `lost`). push() allocates nothing."""

    def __init__(self, size=16):
        self._size = size
        self._ev = [0] * (4 * size)  # 4 slots an event: kind, session_id, energy_wh, reason
        self._head = 0   # next event to write
        self.count = 0
        self.lost = 0

    def __len__(self):
        return self.count

    def push(self, kind, session_id, energy_wh, reason):
        i = self._head
        ev = self._ev
        j = 4 * i
        ev[j] = kind
        ev[j + 1] = session_id
        ev[j + 2] = energy_wh
        ev[j + 3] = reason
        i += 1
        self._head = 0 if i == self._size else i
        if self.count == self._size:
            self.lost += 1
        else:
            self.count += 1

    def pop(self):
        """Oldest event as a tuple, or None (called by the app, not in the step)."""
        if self.count == 0:
            return None
        i = self._head - self.count
        if i < 0:
            i += self._size
        self.count -= 1
        j = 4 * i
        return tuple(self._ev[j:j + 4])


class Session:
    def __init__(self, cfg, next_id=1, ring_size=16):
        self._debounce_ms = int(cfg["cp_debounce_ms"])
        self._fb_limit_ms = int(cfg["contactor_feedback_ms"])
        self.events = EventRing(ring_size)
        self.next_id = next_id if 0 < next_id <= _MAX_ID else 1
        self.session_id = 0          # current or last session, 0 = none yet
        self.active = False
        self.charged = False         # the EV asked for energy (C/D) in this session
        self.energy_start_wh = 0
        self.energy_wh = 0           # energy of the current or last session
        self.fault = ERR_NONE        # latched fault (ERR_*), ERR_NONE when healthy
        self.pwm_on = False
        self.contactor_on = False
        self.status = ST_AVAILABLE
        self.error = ERR_NONE
        self.open_under_load_count = 0
        self._finishing = False      # remote stop: no new session until unplug
        self._remote_stop = False
        # Start of a missing diode / a feedback mismatch, -1 while there is none (ticks
        # are >= 0): one attribute each instead of a flag and a time (RAM on a board).
        self._diode_ms = -1
        self._fb_ms = -1
        self._pwm_off = True
        self._pwm_off_ms = 0
        self._pwm_off_long = True

    def remote_stop(self):
        """Stop the session at the next step; no new one until the EV is unplugged."""
        self._remote_stop = True

    def record_power_loss(self, session_id, energy_wh):
        """The app closes a session that was open when the power went (at boot)."""
        self.events.push(EV_SESSION_STOP, session_id, energy_wh, STOP_POWER_LOSS)

    # --- sessions -----------------------------------------------------------------------
    def _stop(self, energy_wh, reason):
        self.active = False
        self.events.push(EV_SESSION_STOP, self.session_id, energy_wh, reason)

    # --- the step -----------------------------------------------------------------------
    def step(self, now_ms, cp, diode, offer_da, enabled, rcd, fb, energy_wh, hold_error, fail_error):
        """One control step. offer_da: the arbiter's offer; hold_error: the arbiter's error
        (overdraw, meter) reported while not faulted; fail_error: a latched internal or
        config error from the app (ERR_NONE normally)."""
        connected = cp == CP_B or cp == CP_C or cp == CP_D
        in_c = cp == CP_C or cp == CP_D
        f = self.fault
        # Clear a fault once its cause is gone (ground, diode and contactor need an unplug).
        if f == ERR_CP_SHORT:
            if cp != CP_E and cp != CP_F:
                f = ERR_NONE
        elif f == ERR_GROUND or f == ERR_DIODE:
            if cp == CP_A and not rcd:
                f = ERR_NONE
        elif f == ERR_CONTACTOR:
            if cp == CP_A and not fb:
                f = ERR_NONE
        # Contactor feedback disagreeing with the command for contactor_feedback_ms.
        mismatch = False
        if fb is None or (fb and self.contactor_on) or (not fb and not self.contactor_on):
            self._fb_ms = -1
        elif self._fb_ms < 0:
            self._fb_ms = now_ms
        else:
            mismatch = elapsed_ms(now_ms, self._fb_ms) >= self._fb_limit_ms
        # The EV's diode missing (connected, PWM running) for cp_debounce_ms.
        missing = False
        if diode != DIODE_MISSING or not connected:
            self._diode_ms = -1
        elif self._diode_ms < 0:
            self._diode_ms = now_ms
        else:
            missing = elapsed_ms(now_ms, self._diode_ms) >= self._debounce_ms
        # New faults, most severe first; a latched fault is only replaced by a worse one.
        if fail_error != ERR_NONE:
            f = fail_error
        elif rcd:
            f = ERR_GROUND
        elif mismatch and f != ERR_GROUND:
            f = ERR_CONTACTOR
        elif f == ERR_NONE or f == ERR_DIODE:
            if cp == CP_E or cp == CP_F:
                f = ERR_CP_SHORT   # a short, a level outside every band, or -12 V we did not drive
            elif missing:
                f = ERR_DIODE
        self.fault = f
        faulted = f != ERR_NONE
        err = f if faulted else hold_error
        if err != self.error and err != ERR_NONE:
            self.events.push(EV_ERROR, self.session_id, energy_wh, err)
        self.error = err

        if cp == CP_A:
            self._finishing = False
        if self.active:
            e = energy_wh - self.energy_start_wh
            self.energy_wh = e if e > 0 else 0
            if cp == CP_A:
                self._stop(energy_wh, STOP_EV_DISCONNECTED)
            elif faulted:
                self._stop(energy_wh, STOP_EMERGENCY)
            elif not enabled or self._remote_stop:
                self._stop(energy_wh, STOP_REMOTE)
                self._finishing = self._remote_stop
        elif connected and enabled and not faulted and not self._finishing:
            sid = self.next_id
            self.next_id = 1 if sid >= _MAX_ID else sid + 1
            self.session_id = sid
            self.active = True
            self.charged = False
            self.energy_start_wh = energy_wh
            self.energy_wh = 0
            self.events.push(EV_SESSION_START, sid, energy_wh, STOP_NONE)
        self._remote_stop = False
        if self.active and in_c:
            self.charged = True

        pwm = self.active and offer_da > 0
        if pwm:
            self._pwm_off = False
        elif not self._pwm_off:
            self._pwm_off = True
            self._pwm_off_ms = now_ms
            self._pwm_off_long = False
        elif not self._pwm_off_long and elapsed_ms(now_ms, self._pwm_off_ms) >= _PWM_OFF_OPEN_MS:
            self._pwm_off_long = True
        self.pwm_on = pwm

        close = self.contactor_on
        if rcd or faulted or not in_c:
            close = False
        elif pwm:
            if diode == DIODE_OK:
                close = True
        elif self._pwm_off_long:
            close = False
        if self.contactor_on and not close and in_c:
            self.open_under_load_count += 1
        self.contactor_on = close

        if faulted:
            st = ST_FAULTED
        elif not enabled:
            st = ST_UNAVAILABLE
        elif cp == CP_A:
            st = ST_AVAILABLE
        elif self._finishing:
            st = ST_FINISHING
        elif not pwm:
            st = ST_SUSPENDED_EVSE
        elif in_c:
            st = ST_CHARGING
        elif self.charged:
            st = ST_SUSPENDED_EV
        else:
            st = ST_PREPARING
        self.status = st
