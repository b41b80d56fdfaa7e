# The control step: pilot + limits + session wired together. The app calls step()
# every few ms with raw readings and applies the outputs (attributes) to the HAL.
# step() uses integers only and allocates nothing (tests/firmware/test_controller_alloc.py
# proves it under micropython.heap_lock()). Step period: the contactor must open within
# 100 ms of the EV leaving C, and that takes up to one period + cp_debounce_ms rounded up
# to whole periods (10 ms steps with the default 40 ms debounce: 50 ms). now_ms is a
# ticks_ms-style int (differences taken modulo 2**30, see pilot.elapsed_ms); call step()
# at least every few seconds so long timeouts latch before a difference could wrap.
from .limits import LimitArbiter
from .pilot import (
    DUTY_NO_CURRENT,
    DUTY_STATE_F,
    CpDetector,
    cable_rating_da,
    cp_state_for_mv,
    diode_ok,
    duty_for_current_da,
)
from .session import DIODE_MISSING, DIODE_OK, DIODE_UNKNOWN, Session
from .status import CP_A, ERR_NONE, SRC_SAFETY

# Every config key the control core reads, with its default (amps, seconds, percent).
# firmware/config.py validates a column's config against these keys. Written as keyword
# arguments on purpose: the keys become interned names (qstrs), which every module
# loaded later shares, where string literals would cost each module its own copies.
DEFAULTS = dict(
    hardware_rating_a=32,          # what the column's own parts carry
    installation_rating_a=32,      # the supply circuit the column sits on
    failsafe_a=6,                  # without a valid gateway limit (until it pre-assigns one)
    heartbeat_timeout_s=60,        # gateway silent this long -> failsafe
    min_pause_s=300,               # a pause that interrupted an offer lasts at least this long
    overdraw_tolerance_pct=10,     # overdraw: above offered + pct % + offset ...
    overdraw_offset_a=0.5,
    overdraw_grace_s=7,            # ... for longer than this -> suspended until unplug
    meter_stale_s=5,               # meter not ok this long -> pause (PowerMeterFailure)
    cp_debounce_ms=40,             # CP state (and missing diode) must hold this long
    pwm_min_change_interval_s=5,   # increases at most this often; decreases at once
    contactor_feedback_ms=300,     # feedback disagreeing this long -> ContactorFailure
    # Read by the energy store and the meter driver, not by the control step:
    energy_quantum_wh=10,          # energy register written after this much ...
    energy_quantum_s=60,           # ... or this long after a change
    meter=dict(address=1, baud=9600),   # Eastron default bus settings
)


class Controller:
    def __init__(self, cfg=None, next_session_id=1, ring_size=16):
        # The merged config is read here only: its parts keep the values they use (in ms
        # and deci-amps), so the dict is not kept (a board would hold it for nothing).
        # ring_size: session events held until popped (the app pops them every step).
        c = dict(DEFAULTS)
        if cfg:
            for key in DEFAULTS:
                if key in cfg:
                    c[key] = cfg[key]
        self.cp_detector = CpDetector(int(c["cp_debounce_ms"]))
        lim = self.limits = LimitArbiter(c)
        sess = self.session = Session(c, next_session_id, ring_size)
        c = None
        self.events = sess.events
        self._fail_error = ERR_NONE
        # Commands from the gateway link and the app go straight to the part that owns
        # them: bound methods cost a board less RAM than wrapper functions. Only the ones
        # a link or the boot code calls are kept here (each is an object and a slot in
        # this instance's dict); the rest are called on their owner (ctl.limits.set_enabled,
        # ctl.session.remote_stop).
        # assign_limit(limit_da, validity_s, now_ms) -> the limit applied (capped, 0 =
        # pause) or limits.REJECTED (-1); validity_s == 0 clears the assignment.
        self.assign_limit = lim.assign
        # set_failsafe(limit_da): pre-assigned failsafe, capped by the ratings; returns it
        # or limits.REJECTED.
        self.set_failsafe = lim.set_failsafe
        self.heartbeat = lim.heartbeat          # heartbeat(now_ms)
        self.record_power_loss = sess.record_power_loss  # (session_id, energy_wh)
        # Outputs (all set by step()): what the HAL applies and the links report. What
        # the limits allow is lim.offered; the raw CP state and the phase maximum are
        # not kept (nothing reads them).
        self.duty = DUTY_NO_CURRENT
        self.pwm_on = False
        self.contactor_on = False
        self.status = sess.status
        self.error = ERR_NONE
        self.offered_da = 0            # what the pilot signals now (0 when PWM is off)
        self.limit_source = lim.source
        self.paused = False
        self.failsafe_active = True
        self.cp_state = CP_A
        self.cable_da = 0              # 0: no cable or an invalid PP reading
        self.session_id = 0            # current or last session (0 = none yet)
        self.session_energy_wh = 0     # energy of the current or last session
        self.session_active = False

    def fail(self, error):
        """Latch an internal/config error: Faulted, state F, contactor open until reboot."""
        self._fail_error = error

    # --- the step -----------------------------------------------------------------------
    def step(self, now_ms, cp_high_mv, cp_low_mv, pp_ohms, i1_da, i2_da, i3_da, meter_ok,
             energy_wh, rcd_tripped, contactor_fb):
        """contactor_fb / pp_ohms may be None when the board has no feedback / PP input."""
        raw = cp_state_for_mv(cp_high_mv, cp_low_mv)
        cp = self.cp_detector.update(now_ms, raw)
        self.cp_state = cp
        # The low level says something about the diode only while our PWM runs.
        if not self.pwm_on:
            diode = DIODE_UNKNOWN
        elif diode_ok(cp_low_mv):
            diode = DIODE_OK
        else:
            diode = DIODE_MISSING
        cable = cable_rating_da(pp_ohms)
        self.cable_da = cable
        imax = i1_da
        if i2_da > imax:
            imax = i2_da
        if i3_da > imax:
            imax = i3_da

        lim = self.limits
        lim.cable_da = cable
        if cp == CP_A:
            lim.end_session()
        lim.supervise(now_ms, imax, meter_ok, self.offered_da)
        limit = lim.offered_da(now_ms)
        sess = self.session
        sess.step(now_ms, cp, diode, limit, lim.enabled, rcd_tripped, contactor_fb, energy_wh,
                  lim.error, self._fail_error)

        self.pwm_on = sess.pwm_on
        if self._fail_error != ERR_NONE:
            self.duty = DUTY_STATE_F
            self.offered_da = 0
        elif sess.pwm_on:
            self.duty = duty_for_current_da(limit)
            self.offered_da = limit
        else:
            self.duty = DUTY_NO_CURRENT
            self.offered_da = 0
        self.contactor_on = sess.contactor_on
        self.status = sess.status
        self.error = sess.error
        self.limit_source = SRC_SAFETY if sess.fault != ERR_NONE else lim.source
        self.paused = lim.paused
        self.failsafe_active = lim.failsafe_active
        self.session_id = sess.session_id
        self.session_energy_wh = sess.energy_wh
        self.session_active = sess.active
