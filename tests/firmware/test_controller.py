# The control step wired together: outputs a HAL applies (duty, contactor) and a link
# reports (status, offered, limit source, failsafe), config defaults, commands.
from test_session import Rig, cfg

from firmware.controller import DEFAULTS, Controller
from firmware.limits import REJECTED
from firmware.pilot import DUTY_NO_CURRENT, DUTY_STATE_F, duty_for_current_da
from firmware.pilot_decode import current_da_for_duty
from firmware.session import EV_ERROR, EV_SESSION_START, EV_SESSION_STOP, STOP_EMERGENCY, STOP_POWER_LOSS
from firmware.status import (
    CP_A,
    CP_B,
    CP_C,
    ERR_CONFIG,
    ERR_GROUND,
    ERR_NONE,
    SRC_CABLE,
    SRC_FAILSAFE,
    SRC_GATEWAY,
    SRC_HARDWARE,
    SRC_INSTALLATION,
    SRC_PAUSE,
    SRC_SAFETY,
    ST_FAULTED,
    ST_SUSPENDED_EVSE,
    ST_UNAVAILABLE,
)

CONFIG_KEYS = ("hardware_rating_a", "installation_rating_a", "failsafe_a", "heartbeat_timeout_s",
               "min_pause_s", "overdraw_tolerance_pct", "overdraw_offset_a", "overdraw_grace_s",
               "meter_stale_s", "cp_debounce_ms", "pwm_min_change_interval_s",
               "contactor_feedback_ms")


def test_defaults_hold_every_key():
    for key in CONFIG_KEYS:
        assert key in DEFAULTS, key
    assert DEFAULTS["min_pause_s"] == 300
    assert DEFAULTS["overdraw_tolerance_pct"] == 10
    assert DEFAULTS["overdraw_offset_a"] == 0.5
    assert DEFAULTS["overdraw_grace_s"] == 7
    assert DEFAULTS["pwm_min_change_interval_s"] == 5


def test_config_overrides_defaults_and_ignores_other_keys():
    c = Controller({"hardware_rating_a": 16, "column_id": "c-1", "installation_rating_a": 20.5})
    assert c.limits.hardware_da == 160 and c.limits.installation_da == 205
    # Keys left out take their defaults (min_pause_s 300 s, overdraw_grace_s 7 s) in the parts
    # that use them; the merged dict itself is not kept (RAM on a board).
    assert c.limits._min_pause_ms == 300000 and c.limits._grace_ms == 7000
    assert not hasattr(c, "cfg")
    assert Controller().limits.hardware_da == 320


def test_duty_follows_the_offer_in_both_ranges():
    rig = Rig(cfg(hardware_rating_a=80, installation_rating_a=80, pwm_min_change_interval_s=0),
              pp_ohms=100)                                      # 63 A cable
    rig.ev = CP_B
    rig.run(100)
    for assign, offered, source in ((160, 160, SRC_GATEWAY), (510, 510, SRC_GATEWAY),
                                    (700, 630, SRC_CABLE), (60, 60, SRC_GATEWAY),
                                    (59, 0, SRC_PAUSE)):
        rig.ctl.assign_limit(assign, 3600, rig.t)
        rig.step()
        c = rig.ctl
        assert (c.offered_da, c.limit_source) == (offered, source), (assign, c.offered_da, c.limit_source)
        assert c.duty == duty_for_current_da(offered)
        assert current_da_for_duty(c.duty) <= offered


def test_a_decrease_reaches_the_pilot_in_the_same_step():
    rig = Rig(cfg(), pp_ohms=220)
    rig.charging(assign_da=320)
    assert rig.ctl.duty == duty_for_current_da(320)
    rig.ctl.assign_limit(100, 3600, rig.t)
    rig.step()
    assert rig.ctl.duty == duty_for_current_da(100) and rig.ctl.offered_da == 100


def test_an_increase_waits_for_the_change_interval():
    rig = Rig(cfg())
    rig.charging(assign_da=100)                 # the offer became 10 A in the step at t = 0
    rig.run(1000)
    rig.ctl.assign_limit(130, 3600, rig.t)
    rig.step()
    assert rig.ctl.offered_da == 100            # held
    assert rig.until("offered_da", 130, 6000) >= 0
    assert rig.t - rig.period == 5000           # 5 s after the last change, not before


def test_no_offer_without_a_vehicle():
    rig = Rig(cfg())
    rig.run(200)
    c = rig.ctl
    assert c.cp_state == CP_A and c.duty == DUTY_NO_CURRENT and c.offered_da == 0
    assert c.limits.offered == 60 and c.limit_source == SRC_FAILSAFE and c.failsafe_active


def test_heartbeat_loss_via_the_controller():
    rig = Rig(cfg(heartbeat_timeout_s=60))
    rig.charging(assign_da=160)
    assert not rig.ctl.failsafe_active and rig.ctl.limit_source == SRC_GATEWAY
    rig.run(50000)
    rig.ctl.heartbeat(rig.t)
    rig.run(59000)
    assert rig.ctl.offered_da == 160
    rig.run(1100)
    assert rig.ctl.failsafe_active and rig.ctl.offered_da == 60
    assert rig.ctl.limit_source == SRC_FAILSAFE and rig.ctl.contactor_on


def test_commands_answer_what_applies():
    c = Controller(cfg(hardware_rating_a=16))
    assert c.assign_limit(320, 60, 0) == 160
    assert c.assign_limit(-1, 60, 0) == REJECTED
    assert c.set_failsafe(1000) == 160
    assert c.set_failsafe(-3) == REJECTED
    assert c.limits.rejected_count == 2


def test_cable_and_ratings_bind():
    for hw, inst, pp, limit, source in ((16, 32, 680, 160, SRC_HARDWARE),
                                        (32, 32, 1500, 130, SRC_CABLE),
                                        (32, 25, 220, 250, SRC_INSTALLATION)):
        rig = Rig(cfg(hardware_rating_a=hw, installation_rating_a=inst), pp_ohms=pp)
        rig.ctl.assign_limit(800, 3600, 0)
        rig.ev = CP_B
        rig.run(100)
        assert (rig.ctl.offered_da, rig.ctl.limit_source) == (limit, source), hw


def test_invalid_pp_reports_no_cable_and_offers_nothing():
    rig = Rig(cfg(), pp_ohms=3000)
    rig.ev = CP_B
    rig.run(200)
    c = rig.ctl
    assert c.cable_da == 0
    assert c.offered_da == 0 and not c.pwm_on and c.status == ST_SUSPENDED_EVSE
    assert c.limit_source == SRC_CABLE


def test_fail_drives_state_f_and_opens():
    rig = Rig(cfg())
    rig.charging()
    rig.ctl.fail(ERR_CONFIG)
    rig.step()
    c = rig.ctl
    assert c.duty == DUTY_STATE_F and not c.contactor_on and not c.pwm_on
    assert c.status == ST_FAULTED and c.error == ERR_CONFIG and c.limit_source == SRC_SAFETY
    rig.ev = CP_A
    rig.run(1000)
    assert c.status == ST_FAULTED and c.duty == DUTY_STATE_F


def test_disable_reports_unavailable_and_safety_source():
    rig = Rig(cfg())
    rig.ev = CP_B
    rig.ctl.limits.set_enabled(False)
    rig.run(200)
    c = rig.ctl
    assert c.status == ST_UNAVAILABLE and c.limit_source == SRC_SAFETY and c.offered_da == 0
    assert c.error == ERR_NONE


def test_overdraw_is_judged_on_the_highest_phase():
    # No offer signalled: 0.5 A (the default offset) is all a phase may draw.
    for currents, over in (((0, 6, 0), True), ((6, 3, 4), True), ((0, 0, 6), True),
                           ((5, 5, 5), False)):
        c = Controller(cfg(overdraw_grace_s=0))
        for t in range(0, 100, 10):             # CP state B debounced: no end_session() any more
            c.step(t, 9000, 9000, 680, 0, 0, 0, True, 0, False, False)
        assert c.cp_state == CP_B
        for t in (100, 110):
            c.step(t, 9000, 9000, 680, currents[0], currents[1], currents[2], True, 0, False, False)
        assert c.limits.overdraw_suspended == over, currents


def test_contactor_only_in_c_with_the_pilot_on():
    rig = Rig(cfg())
    rig.ctl.assign_limit(160, 3600, 0)
    for ev in (CP_A, CP_B, CP_C, CP_B, CP_A, CP_C):
        rig.ev = ev
        n = 0
        while n < 30:
            rig.step()
            if rig.ctl.contactor_on:
                assert rig.ctl.cp_state == CP_C and rig.ctl.pwm_on
            n += 1


def test_a_four_event_ring_popped_after_every_step_loses_no_session_event():
    # The app's ring (firmware/wiring.py): 4 events, popped after every step. A power cut
    # closed at boot, then sessions, a residual-current trip (its error and its stop in one
    # step) and unplugging: every event is told, in order.
    rig = Rig(cfg(min_pause_s=0, pwm_min_change_interval_s=0), pp_ohms=220)
    c = rig.ctl = Controller(cfg(min_pause_s=0, pwm_min_change_interval_s=0), 5, 4)
    c.record_power_loss(4, 900)
    told = []
    most = 0

    def run(ms):
        nonlocal most
        end = rig.t + ms
        while rig.t < end:
            rig.step()
            most = max(most, len(c.events))
            while len(c.events):
                told.append(c.events.pop())

    run(10)
    for _ in range(2):
        rig.ev = CP_B
        run(200)
        rig.ev = CP_C
        rig.draw_da = 60
        run(500)
        rig.rcd = True
        run(100)
        rig.rcd = False
        rig.ev = CP_A
        rig.draw_da = 0
        run(300)
    kinds = [(e[0], e[3]) for e in told]
    assert kinds[0] == (EV_SESSION_STOP, STOP_POWER_LOSS), kinds
    assert kinds.count((EV_ERROR, ERR_GROUND)) == 2, kinds
    assert kinds.count((EV_SESSION_STOP, STOP_EMERGENCY)) == 2, kinds
    assert [k for k, _ in kinds].count(EV_SESSION_START) == 2, kinds
    assert c.events.lost == 0 and 2 <= most <= 3, (c.events.lost, most)
