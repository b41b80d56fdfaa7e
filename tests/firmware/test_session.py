# Charging session state machine: contactor timings (100 ms / 3 s / 6 s), faults,
# statuses, session start/stop events. Driven through the Controller with an EV rig.
from firmware.controller import DEFAULTS, Controller
from firmware.pilot import DUTY_NO_CURRENT
from firmware.session import (
    EV_ERROR,
    EV_SESSION_START,
    EV_SESSION_STOP,
    STOP_EMERGENCY,
    STOP_EV_DISCONNECTED,
    STOP_NONE,
    STOP_POWER_LOSS,
    STOP_REMOTE,
    EventRing,
    Session,
)
from firmware.status import (
    CP_A,
    CP_B,
    CP_C,
    CP_D,
    CP_E,
    ERR_CONTACTOR,
    ERR_CP_SHORT,
    ERR_DIODE,
    ERR_GROUND,
    ERR_NONE,
    ERR_OVER_CURRENT,
    ERR_POWER_METER,
    ST_AVAILABLE,
    ST_CHARGING,
    ST_FAULTED,
    ST_FINISHING,
    ST_PREPARING,
    ST_SUSPENDED_EV,
    ST_SUSPENDED_EVSE,
    ST_UNAVAILABLE,
)

# CP high level the EV's resistors produce, by state A..F.
_HIGH_MV = (12000, 9000, 6000, 3000, 0, -12000)
FB_FOLLOWS = 0      # contactor feedback follows the command (healthy relay)
FB_STUCK_CLOSED = 1
FB_STUCK_OPEN = 2
FB_NONE = 3         # board without feedback input


class Rig:
    """A controller with a simulated EV, meter, RCD and contactor feedback; 10 ms steps.
    step() allocates nothing (the allocation test runs it under heap_lock)."""

    def __init__(self, cfg=None, pp_ohms=680):
        self.ctl = Controller(cfg)
        self.t = 0
        self.period = 10
        self.ev = CP_A
        self.diode = True
        self.draw_da = 0          # drawn while the contactor is closed
        self.meter_ok = True
        self.energy_wh = 1000
        self.rcd = False
        self.fb = FB_FOLLOWS
        self.pp_ohms = pp_ohms

    def step(self):
        c = self.ctl
        ev = self.ev
        high = _HIGH_MV[ev]
        if c.duty == 0:                       # we drive state F ourselves
            high = -12000
            low = -12000
        elif ev == CP_E:
            low = 0
        elif not c.pwm_on:
            low = high                        # constant +V: no low half-wave
        elif self.diode or ev == CP_A:
            low = -12000
        else:
            low = -high                       # no diode: the EV's resistor pulls the low level too
        if self.fb == FB_FOLLOWS:
            fb = c.contactor_on
        elif self.fb == FB_STUCK_CLOSED:
            fb = True
        elif self.fb == FB_STUCK_OPEN:
            fb = False
        else:
            fb = None
        i = self.draw_da if c.contactor_on else 0
        if i > 0:
            self.energy_wh += 1
        c.step(self.t, high, low, self.pp_ohms, i, i, i, self.meter_ok, self.energy_wh, self.rcd, fb)
        self.t += self.period

    def run(self, ms):
        end = self.t + ms
        while self.t < end:
            self.step()

    def until(self, attr, value, max_ms):
        """Step until ctl.<attr> == value; the ms it took, or -1 if it did not happen."""
        start = self.t
        while self.t - start <= max_ms:
            if getattr(self.ctl, attr) == value:
                return self.t - start
            self.step()
        return -1

    def charging(self, assign_da=160):
        """Plug in, get an offer, go to C: returns with the contactor closed."""
        self.ctl.assign_limit(assign_da, 3600, self.t)
        self.ev = CP_B
        self.run(200)
        self.ev = CP_C
        self.draw_da = assign_da
        assert self.until("contactor_on", True, 3000) >= 0
        self.run(100)
        assert self.ctl.status == ST_CHARGING

    def events(self):
        out = []
        while True:
            e = self.ctl.events.pop()
            if e is None:
                return out
            out.append(e)


def cfg(**overrides):
    c = dict(DEFAULTS)
    c["heartbeat_timeout_s"] = 3600
    c.update(overrides)
    return c


def test_plug_in_starts_a_session_and_the_pilot():
    rig = Rig(cfg())
    rig.run(200)
    assert rig.ctl.status == ST_AVAILABLE and not rig.ctl.pwm_on
    assert rig.ctl.duty == DUTY_NO_CURRENT and rig.ctl.offered_da == 0
    rig.ev = CP_B
    rig.run(100)
    assert rig.ctl.status == ST_PREPARING
    assert rig.ctl.pwm_on and rig.ctl.duty == 1000        # failsafe 6 A
    assert rig.ctl.session_id == 1 and rig.ctl.session_active
    assert rig.events() == [(EV_SESSION_START, 1, 1000, STOP_NONE)]


def test_contactor_closes_within_3_s_of_b_to_c_and_not_before_c():
    rig = Rig(cfg())
    rig.ev = CP_B
    rig.run(2000)
    assert not rig.ctl.contactor_on                       # never in B
    rig.ev = CP_C
    took = rig.until("contactor_on", True, 3000)
    assert 40 <= took <= 3000, took                       # after the debounce, inside 3 s
    assert rig.ctl.cp_state == CP_C and rig.ctl.status == ST_CHARGING


def test_contactor_closes_in_d_too():
    rig = Rig(cfg())
    rig.ev = CP_B
    rig.run(200)
    rig.ev = CP_D
    assert 0 <= rig.until("contactor_on", True, 3000)
    assert rig.ctl.status == ST_CHARGING


def test_contactor_opens_within_100_ms_when_the_ev_leaves_c():
    for leave_to in (CP_B, CP_A):
        rig = Rig(cfg())
        rig.charging()
        rig.ev = leave_to
        took = rig.until("contactor_on", False, 1000)
        assert 0 <= took <= 100, (leave_to, took)


def test_no_diode_no_contactor():
    rig = Rig(cfg())
    rig.diode = False
    rig.ev = CP_B
    rig.run(200)
    assert rig.ctl.status == ST_FAULTED and rig.ctl.error == ERR_DIODE
    assert not rig.ctl.pwm_on
    rig.ev = CP_C
    rig.run(5000)
    assert not rig.ctl.contactor_on
    rig.ev = CP_A                                         # unplug clears it
    rig.run(200)
    assert rig.ctl.status == ST_AVAILABLE and rig.ctl.error == ERR_NONE
    rig.diode = True
    rig.ev = CP_B
    rig.run(200)
    assert rig.ctl.status == ST_PREPARING


def test_no_diode_straight_into_c_never_closes():
    # The PWM's first step says nothing about the diode: the contactor must wait for it.
    rig = Rig(cfg())
    rig.diode = False
    rig.ev = CP_C
    n = 0
    while n < 300:
        rig.step()
        assert not rig.ctl.contactor_on, rig.t
        n += 1
    assert rig.ctl.error == ERR_DIODE


def test_diode_lost_while_charging_opens():
    rig = Rig(cfg())
    rig.charging()
    rig.diode = False
    took = rig.until("contactor_on", False, 1000)
    assert 0 <= took <= 100, took
    assert rig.ctl.error == ERR_DIODE


def test_pwm_off_in_c_opens_under_load_after_6_s():
    rig = Rig(cfg())
    rig.charging()
    rig.ctl.assign_limit(0, 3600, rig.t)                  # pause: PWM off
    rig.step()
    assert not rig.ctl.pwm_on and rig.ctl.duty == DUTY_NO_CURRENT
    off_at = rig.t - rig.period
    assert rig.ctl.status == ST_SUSPENDED_EVSE
    rig.run(5980)                                         # the EV ignores it and stays in C
    assert rig.ctl.contactor_on
    took = rig.until("contactor_on", False, 500)
    assert took >= 0
    assert 6000 <= rig.t - rig.period - off_at <= 6020
    assert rig.ctl.session.open_under_load_count == 1


def test_pwm_off_and_ev_returns_to_b_opens_without_load():
    rig = Rig(cfg())
    rig.charging()
    rig.ctl.assign_limit(0, 3600, rig.t)
    rig.run(2000)
    assert rig.ctl.contactor_on
    rig.ev = CP_B
    assert 0 <= rig.until("contactor_on", False, 100)
    assert rig.ctl.session.open_under_load_count == 0


def test_state_e_opens_within_3_s_and_recovers():
    rig = Rig(cfg())
    rig.charging()
    rig.events()
    rig.ev = CP_E
    took = rig.until("contactor_on", False, 3000)
    assert 0 <= took <= 3000, took
    rig.run(100)
    assert rig.ctl.status == ST_FAULTED and rig.ctl.error == ERR_CP_SHORT
    ev = rig.events()
    assert [e[0] for e in ev] == [EV_ERROR, EV_SESSION_STOP]
    assert ev[0][3] == ERR_CP_SHORT and ev[1][3] == STOP_EMERGENCY
    rig.ev = CP_B                                         # short gone: a new session
    rig.run(200)
    assert rig.ctl.status == ST_PREPARING and rig.ctl.session_id == 2


def test_rcd_opens_at_once_and_latches_until_unplug():
    rig = Rig(cfg())
    rig.charging()
    rig.rcd = True
    rig.step()
    assert not rig.ctl.contactor_on                       # the same step
    assert rig.ctl.status == ST_FAULTED and rig.ctl.error == ERR_GROUND
    rig.rcd = False
    rig.run(1000)
    assert rig.ctl.status == ST_FAULTED and not rig.ctl.pwm_on
    rig.ev = CP_A
    rig.run(200)
    assert rig.ctl.status == ST_AVAILABLE


def test_welded_contactor_faults():
    rig = Rig(cfg())
    rig.charging()
    rig.fb = FB_STUCK_CLOSED
    rig.ev = CP_B
    rig.run(200)
    assert not rig.ctl.contactor_on and rig.ctl.status != ST_FAULTED
    rig.run(200)                                          # 300 ms of disagreement
    assert rig.ctl.status == ST_FAULTED and rig.ctl.error == ERR_CONTACTOR
    rig.ev = CP_A
    rig.run(500)
    assert rig.ctl.status == ST_FAULTED                   # still welded: stays faulted
    rig.fb = FB_FOLLOWS
    rig.run(100)
    assert rig.ctl.status == ST_AVAILABLE


def test_contactor_that_does_not_close_faults():
    rig = Rig(cfg())
    rig.fb = FB_STUCK_OPEN
    rig.ctl.assign_limit(160, 3600, 0)
    rig.ev = CP_B
    rig.run(200)
    rig.ev = CP_C
    rig.run(1000)
    assert rig.ctl.status == ST_FAULTED and rig.ctl.error == ERR_CONTACTOR
    assert not rig.ctl.contactor_on


def test_no_feedback_input_is_not_checked():
    rig = Rig(cfg())
    rig.fb = FB_NONE
    rig.charging()
    rig.run(2000)
    assert rig.ctl.status == ST_CHARGING


def test_status_sequence_of_a_normal_session():
    rig = Rig(cfg())
    seen = []

    def note():
        if not seen or seen[-1] != rig.ctl.status:
            seen.append(rig.ctl.status)

    for ev, ms in ((CP_A, 200), (CP_B, 500), (CP_C, 2000), (CP_B, 1000), (CP_C, 1000), (CP_A, 300)):
        rig.ev = ev
        end = rig.t + ms
        while rig.t < end:
            rig.step()
            note()
    assert seen == [ST_AVAILABLE, ST_PREPARING, ST_CHARGING, ST_SUSPENDED_EV, ST_CHARGING, ST_AVAILABLE]


def test_session_energy_at_start_and_stop():
    rig = Rig(cfg())
    rig.energy_wh = 5000
    rig.charging()
    rig.run(1000)                                         # +1 Wh per step while drawing (fake meter)
    during = rig.ctl.session_energy_wh
    assert during > 0
    rig.ev = CP_A
    rig.run(200)
    ev = rig.events()
    assert ev[0] == (EV_SESSION_START, 1, 5000, STOP_NONE)
    assert ev[-1][0] == EV_SESSION_STOP and ev[-1][1] == 1 and ev[-1][3] == STOP_EV_DISCONNECTED
    assert ev[-1][2] == rig.energy_wh
    assert rig.ctl.session_energy_wh == rig.energy_wh - 5000
    assert not rig.ctl.session_active and rig.ctl.session_id == 1


def test_remote_stop_finishes_until_unplug():
    rig = Rig(cfg())
    rig.charging()
    rig.events()
    rig.ctl.session.remote_stop()
    rig.step()
    assert rig.ctl.status == ST_FINISHING and not rig.ctl.pwm_on
    assert rig.events()[-1][3] == STOP_REMOTE
    rig.ev = CP_B
    rig.run(1000)
    assert not rig.ctl.contactor_on and rig.ctl.status == ST_FINISHING
    assert not rig.ctl.session_active
    rig.ev = CP_A
    rig.run(200)
    rig.ev = CP_B
    rig.run(200)
    assert rig.ctl.status == ST_PREPARING and rig.ctl.session_id == 2


def test_disable_is_unavailable_and_stops_the_session():
    rig = Rig(cfg())
    rig.charging()
    rig.events()
    rig.ctl.limits.set_enabled(False)
    rig.step()
    assert rig.ctl.status == ST_UNAVAILABLE and not rig.ctl.pwm_on
    assert rig.events() == [(EV_SESSION_STOP, 1, rig.energy_wh, STOP_REMOTE)]
    rig.ctl.limits.set_enabled(True)
    rig.run(100)
    assert rig.ctl.session_id == 2 and rig.ctl.status == ST_CHARGING


def test_overdraw_suspends_until_unplug():
    rig = Rig(cfg())
    rig.charging(assign_da=100)
    rig.draw_da = 200                                     # ignores the pilot: 20 A on a 10 A offer
    rig.run(6900)
    assert rig.ctl.status == ST_CHARGING
    rig.run(300)
    assert rig.ctl.status == ST_SUSPENDED_EVSE and rig.ctl.error == ERR_OVER_CURRENT
    assert rig.ctl.limits.overdraw_count == 1
    assert EV_ERROR in [e[0] for e in rig.events()]
    rig.run(6100)                                         # still in C 6 s after PWM off
    assert not rig.ctl.contactor_on
    rig.run(60000)
    assert rig.ctl.error == ERR_OVER_CURRENT and not rig.ctl.pwm_on
    rig.ev = CP_A
    rig.draw_da = 0
    rig.run(200)
    assert rig.ctl.status == ST_AVAILABLE and rig.ctl.error == ERR_NONE
    rig.ev = CP_B
    rig.run(200)
    assert rig.ctl.pwm_on


def test_meter_stale_suspends_with_power_meter_failure():
    rig = Rig(cfg())
    rig.charging()
    rig.meter_ok = False
    rig.run(4900)
    assert rig.ctl.status == ST_CHARGING
    rig.run(200)
    assert rig.ctl.status == ST_SUSPENDED_EVSE and rig.ctl.error == ERR_POWER_METER
    assert not rig.ctl.pwm_on and rig.ctl.paused


def test_event_ring_keeps_the_newest():
    ring = EventRing(4)
    for i in range(6):
        ring.push(EV_SESSION_START, i, 100 * i, 0)
    assert len(ring) == 4 and ring.lost == 2
    assert [ring.pop()[1] for _ in range(4)] == [2, 3, 4, 5]
    assert ring.pop() is None
    ring.push(EV_SESSION_STOP, 9, 1, STOP_REMOTE)
    assert ring.pop() == (EV_SESSION_STOP, 9, 1, STOP_REMOTE)


def test_power_loss_stop_and_session_id_wrap():
    s = Session(DEFAULTS, next_id=0x3FFFFFFF)
    s.record_power_loss(41, 12345)
    assert s.events.pop() == (EV_SESSION_STOP, 41, 12345, STOP_POWER_LOSS)
    s.step(0, CP_B, 0, 60, True, False, None, 0, ERR_NONE, ERR_NONE)
    assert s.session_id == 0x3FFFFFFF and s.next_id == 1
    assert Session(DEFAULTS, next_id=0).next_id == 1
