# Limit arbitration (firmware/limits.py): which source binds, expiry, heartbeat loss, pause,
# overdraw, meter. (Named test_limit_arbiter: tests/gateway/test_limits.py owns "test_limits".)
from firmware.controller import DEFAULTS
from firmware.limits import MAX_VALIDITY_S, REJECTED, LimitArbiter
from firmware.status import (
    ERR_NONE,
    ERR_OVER_CURRENT,
    ERR_POWER_METER,
    SRC_CABLE,
    SRC_FAILSAFE,
    SRC_GATEWAY,
    SRC_HARDWARE,
    SRC_INSTALLATION,
    SRC_PAUSE,
    SRC_SAFETY,
)


def make(**overrides):
    """An arbiter with the default config; the gateway stays alive for 2 h unless a test
    is about heartbeats (it passes its own heartbeat_timeout_s)."""
    cfg = dict(DEFAULTS)
    cfg["heartbeat_timeout_s"] = 7200
    cfg.update(overrides)
    return LimitArbiter(cfg)


# (hardware A, installation A, cable da, failsafe A, gateway da or None, offered da, source)
BINDING = (
    (16, 32, 320, 6, 250, 160, SRC_HARDWARE),
    (32, 32, 130, 6, 250, 130, SRC_CABLE),
    (32, 25, 320, 6, 300, 250, SRC_INSTALLATION),
    (32, 32, 320, 6, 100, 100, SRC_GATEWAY),
    (32, 32, 320, 8, None, 80, SRC_FAILSAFE),
    (32, 32, 320, 8, 300, 300, SRC_GATEWAY),     # a valid gateway limit replaces the failsafe
    (32, 32, 320, 30, 200, 200, SRC_GATEWAY),    # ... also when it is below the failsafe
    (80, 80, 800, 80, 630, 630, SRC_GATEWAY),    # high duty range
    (32, 20, 320, 32, None, 200, SRC_INSTALLATION),  # failsafe capped by the ratings
)


def test_each_source_binds_in_turn():
    for hw, inst, cable, fs, gw, offered, source in BINDING:
        arb = make(hardware_rating_a=hw, installation_rating_a=inst, failsafe_a=fs)
        arb.cable_da = cable
        if gw is not None:
            arb.assign(gw, 60, 0)
        got = arb.offered_da(10)
        assert (got, arb.source) == (offered, source), (hw, inst, cable, fs, gw, got, arb.source)
        assert arb.failsafe_active == (gw is None)
        assert not arb.paused


def test_assign_answers_the_applied_limit():
    arb = make(hardware_rating_a=32, installation_rating_a=25)
    assert arb.assign(1000, 60, 0) == 250      # capped by the installation rating
    assert arb.assign(160, 60, 0) == 160
    assert arb.assign(59, 60, 0) == 0          # below 6 A: the column pauses
    assert arb.assign(0, 60, 0) == 0
    assert arb.rejected_count == 0
    for limit, validity in ((-1, 60), (160, -1), (16.0, 60), (160, 1.5), (None, 60), ("16", 60)):
        assert arb.assign(limit, validity, 0) == REJECTED, (limit, validity)
    assert arb.rejected_count == 6
    assert arb.gateway_da == 0                 # rejected input changed nothing


def test_rejected_assignment_keeps_the_previous_limit():
    arb = make()
    arb.assign(100, 60, 0)
    assert arb.assign(-5, 60, 100) == REJECTED
    assert arb.offered_da(200) == 100
    assert arb.source == SRC_GATEWAY


def test_validity_zero_clears_the_assignment():
    arb = make(failsafe_a=8)
    arb.assign(200, 60, 0)
    assert arb.offered_da(0) == 200
    assert arb.assign(200, 0, 1000) == 80      # answers the failsafe now in force
    assert arb.offered_da(1000) == 80
    assert arb.source == SRC_FAILSAFE and arb.failsafe_active


def test_assignment_expires_to_failsafe():
    arb = make(failsafe_a=6)
    arb.assign(100, 10, 0)
    assert arb.offered_da(0) == 100
    assert arb.assignment_remaining_s(0) == 10
    assert arb.assignment_remaining_s(9001) == 1
    assert arb.offered_da(9999) == 100 and arb.source == SRC_GATEWAY
    assert arb.offered_da(10000) == 60 and arb.source == SRC_FAILSAFE
    assert arb.failsafe_active
    assert arb.assignment_remaining_s(10000) == 0


def test_expired_gateway_value_is_never_used_even_when_lower():
    arb = make(failsafe_a=12)
    arb.assign(70, 10, 0)
    assert arb.offered_da(5000) == 70
    assert arb.offered_da(10000) == 120        # the failsafe, not the old 7 A
    assert arb.source == SRC_FAILSAFE


def test_long_validity_is_cut_to_a_day():
    arb = make(heartbeat_timeout_s=3600)
    arb.assign(100, 10 * MAX_VALIDITY_S, 0)
    t = 0
    while t < MAX_VALIDITY_S * 1000:          # keep the gateway alive meanwhile
        arb.heartbeat(t)
        assert arb.offered_da(t) == 100, t
        t += 1800 * 1000
    arb.heartbeat(MAX_VALIDITY_S * 1000)
    assert arb.offered_da(MAX_VALIDITY_S * 1000) == 60
    assert arb.source == SRC_FAILSAFE


def test_heartbeat_loss_falls_to_failsafe_and_back():
    arb = make(heartbeat_timeout_s=60, failsafe_a=6)
    arb.assign(160, 3600, 0)                   # an assignment counts as a heartbeat
    arb.heartbeat(30000)
    assert arb.offered_da(89999) == 160 and not arb.failsafe_active
    assert arb.offered_da(90000) == 60 and arb.failsafe_active
    assert arb.source == SRC_FAILSAFE
    arb.heartbeat(100000)                      # the gateway is back, the assignment still runs
    assert arb.offered_da(159999) == 160 and arb.source == SRC_GATEWAY
    assert arb.offered_da(160000) == 60 and arb.source == SRC_FAILSAFE


def test_no_heartbeat_yet_means_failsafe():
    arb = make(failsafe_a=10)
    assert arb.failsafe_active
    assert arb.offered_da(0) == 100 and arb.source == SRC_FAILSAFE


def test_set_failsafe_clamps_to_ratings():
    arb = make(hardware_rating_a=16, installation_rating_a=32)
    assert arb.set_failsafe(1000) == 160
    assert arb.set_failsafe(80) == 80
    assert arb.set_failsafe(-1) == REJECTED
    assert arb.set_failsafe(8.0) == REJECTED
    assert arb.failsafe_da == 80
    assert arb.offered_da(0) == 80


def test_below_6_a_pauses_with_minimum_pause():
    arb = make(min_pause_s=300)
    arb.assign(100, 3600, 0)
    assert arb.offered_da(0) == 100
    arb.assign(50, 3600, 1000)
    assert arb.offered_da(1000) == 0
    assert arb.source == SRC_PAUSE and arb.paused
    arb.assign(160, 3600, 2000)                # enough again, but the pause holds
    assert arb.offered_da(2000) == 0 and arb.source == SRC_PAUSE
    assert arb.offered_da(300999) == 0 and arb.paused
    assert arb.offered_da(301000) == 160       # 300 s after the pause began
    assert arb.source == SRC_GATEWAY and not arb.paused


def test_pause_without_a_prior_offer_resumes_at_once():
    arb = make(min_pause_s=300)
    arb.assign(40, 3600, 0)                    # never offered anything: nothing to cycle
    assert arb.offered_da(0) == 0 and arb.source == SRC_PAUSE
    arb.assign(160, 3600, 1000)
    assert arb.offered_da(1000) == 160


def test_end_session_clears_the_pause():
    arb = make(min_pause_s=300)
    arb.assign(100, 3600, 0)
    arb.offered_da(0)
    arb.assign(0, 3600, 10)
    assert arb.offered_da(10) == 0
    arb.assign(100, 3600, 20)
    assert arb.offered_da(20) == 0
    arb.end_session()                          # unplugged: the next car starts at once
    assert arb.offered_da(30) == 100


def _offer(arb, now_ms):
    """offered_da() with the offer signalled to a car (the step calls supervise first)."""
    arb.supervise(now_ms, 0, True, arb.offered)
    return arb.offered_da(now_ms)


def test_increases_are_rate_limited_decreases_are_not():
    arb = make(pwm_min_change_interval_s=5)
    arb.assign(100, 3600, 0)
    assert _offer(arb, 0) == 100               # first offer: at once
    arb.assign(160, 3600, 1000)
    assert _offer(arb, 1000) == 100
    assert _offer(arb, 4999) == 100
    assert _offer(arb, 5000) == 160            # 5 s after the last change
    arb.assign(80, 3600, 6000)
    assert _offer(arb, 6000) == 80             # decrease at once
    arb.assign(120, 3600, 7000)
    assert _offer(arb, 7000) == 80
    assert _offer(arb, 10999) == 80
    assert _offer(arb, 11000) == 120
    arb.assign(200, 3600, 30000)               # long after the last change: at once
    assert _offer(arb, 30000) == 200


def test_a_pause_of_days_does_not_hold_the_resume():
    # 8 days > 2**29 ms: a pause timestamp kept that long would wrap; the latch must not.
    arb = make(min_pause_s=300)
    arb.assign(100, 3600, 0)
    assert _offer(arb, 0) == 100
    t = 1000
    while t < 8 * 86400 * 1000:                # paused by the gateway, stepped every minute
        if t % 3600000 == 1000:
            arb.assign(0, 7200, t)
        assert _offer(arb, t) == 0
        t += 60000
    arb.assign(160, 3600, t)
    assert _offer(arb, t) == 160 and arb.source == SRC_GATEWAY


def test_increases_without_a_car_are_not_held():
    arb = make(pwm_min_change_interval_s=5)
    assert arb.offered_da(0) == 60             # failsafe, nobody sees it
    arb.assign(160, 3600, 10)
    assert arb.offered_da(10) == 160


def test_no_cable_offers_nothing_without_pausing():
    arb = make()
    arb.cable_da = 0
    assert arb.offered_da(0) == 0
    assert arb.source == SRC_CABLE and not arb.paused
    arb.cable_da = 200
    assert arb.offered_da(10) == 60


def test_disable_and_enable():
    arb = make()
    arb.assign(160, 3600, 0)
    arb.offered_da(0)
    arb.set_enabled(False)
    assert arb.offered_da(10) == 0 and arb.source == SRC_SAFETY
    arb.set_enabled(True)
    assert arb.offered_da(20) == 160


def _supervise(arb, start, end, current, signalled, meter_ok=True, every=100):
    t = start
    while t <= end:
        arb.supervise(t, current, meter_ok, signalled)
        arb.offered_da(t)
        t += every


def test_overdraw_within_tolerance_is_fine():
    arb = make()
    arb.assign(160, 3600, 0)
    assert arb.offered_da(0) == 160
    _supervise(arb, 0, 60000, 181, 160)        # 160 + 10 % + 0.5 A = 181
    assert not arb.overdraw_suspended and arb.offered_da(60000) == 160


def test_overdraw_suspends_after_grace():
    arb = make(overdraw_grace_s=7)
    arb.assign(160, 3600, 0)
    arb.offered_da(0)
    _supervise(arb, 0, 6900, 182, 160)
    assert not arb.overdraw_suspended
    _supervise(arb, 7000, 7000, 182, 160)      # over for 7 s
    assert arb.overdraw_suspended and arb.overdraw_count == 1
    assert arb.offered_da(7000) == 0
    assert arb.source == SRC_SAFETY and arb.error == ERR_OVER_CURRENT
    _supervise(arb, 7100, 600000, 0, 0)        # the car stopped: still suspended
    assert arb.offered_da(600000) == 0 and arb.error == ERR_OVER_CURRENT
    arb.end_session()                          # unplug ends the suspension
    assert arb.offered_da(600100) == 160 and arb.error == ERR_NONE


def test_overdraw_timer_restarts_when_the_car_follows():
    arb = make(overdraw_grace_s=7)
    arb.assign(160, 3600, 0)
    arb.offered_da(0)
    _supervise(arb, 0, 6000, 250, 160)
    _supervise(arb, 6100, 6100, 150, 160)      # back inside the tolerance
    _supervise(arb, 6200, 13100, 250, 160)     # 6.9 s over again
    assert not arb.overdraw_suspended
    _supervise(arb, 13200, 13200, 250, 160)
    assert arb.overdraw_suspended


def test_drawing_while_nothing_is_offered_is_overdraw():
    arb = make(overdraw_grace_s=7)
    _supervise(arb, 0, 6900, 6, 0)             # 0.6 A with no offer: over the 0.5 A offset
    assert not arb.overdraw_suspended
    _supervise(arb, 7000, 7000, 6, 0)
    assert arb.overdraw_suspended


def test_meter_stale_pauses_then_min_pause():
    arb = make(meter_stale_s=5, min_pause_s=300)
    arb.assign(160, 3600, 0)
    _supervise(arb, 0, 1000, 100, 160)
    _supervise(arb, 1100, 6000, 100, 160, meter_ok=False)
    assert not arb.meter_stale and arb.offered_da(6000) == 160
    _supervise(arb, 6100, 6100, 100, 160, meter_ok=False)   # not ok for 5 s
    assert arb.meter_stale
    assert arb.offered_da(6100) == 0
    assert arb.source == SRC_SAFETY and arb.error == ERR_POWER_METER and arb.paused
    _supervise(arb, 6200, 6200, 0, 0)          # the meter answers again
    assert arb.offered_da(6200) == 0 and arb.source == SRC_PAUSE and arb.error == ERR_NONE
    assert arb.offered_da(306099) == 0
    assert arb.offered_da(306100) == 160


def test_meter_currents_are_ignored_while_failing():
    arb = make(meter_stale_s=60, overdraw_grace_s=7)
    arb.assign(160, 3600, 0)
    arb.offered_da(0)
    _supervise(arb, 0, 20000, 999, 160, meter_ok=False)
    assert not arb.overdraw_suspended


def test_expiry_across_a_ticks_wrap():
    top = 0x3FFFFFFF
    arb = make(failsafe_a=6, heartbeat_timeout_s=60)
    start = top - 999                          # 1 s before the wrap
    arb.assign(160, 10, start)
    assert arb.offered_da(start) == 160
    assert arb.offered_da(5000) == 160         # 6 s later, after the wrap
    assert arb.offered_da(8999) == 160
    assert arb.offered_da(9000) == 60          # 10 s later
    assert arb.source == SRC_FAILSAFE
