# The HAL against the virtual board's `machine`: pins, PWM duty, CP and PP sensing.
import machine

from firmware import hal


def _board():
    machine.board.clear()
    h = hal.Hal(machine)
    return h, machine.board


def test_cp_mv_round_trip_within_one_step():
    for mv in (-12000, -11000, 0, 3000, 6000, 9000, 12000):
        back = hal.cp_raw_to_mv(hal.cp_mv_to_raw(mv))
        assert abs(back - mv) <= 1, (mv, back)


def test_read_cp_sees_both_plateaus_while_pwm_runs():
    h, board = _board()
    board.adc_pwm[hal.PINS["cp_adc"]] = (hal.PINS["cp_pwm"], hal.cp_mv_to_raw(6000), hal.cp_mv_to_raw(-12000))
    h.set_duty(5000)  # 50 %: 30 A
    h.read_cp()
    assert abs(h.cp_high_mv - 6000) <= 2
    assert abs(h.cp_low_mv + 12000) <= 2


def test_constant_high_pwm_shows_no_low_plateau():
    h, board = _board()
    board.adc_pwm[hal.PINS["cp_adc"]] = (hal.PINS["cp_pwm"], hal.cp_mv_to_raw(9000), hal.cp_mv_to_raw(-12000))
    h.set_duty(10000)
    h.read_cp()
    assert abs(h.cp_high_mv - 9000) <= 2 and abs(h.cp_low_mv - 9000) <= 2


def test_duty_maps_onto_the_pwm_register():
    h, board = _board()
    pwm = board.pwm[hal.PINS["cp_pwm"]]
    h.set_duty(10000)
    assert pwm.duty_u16() == 65535
    h.set_duty(0)
    assert pwm.duty_u16() == 0
    h.set_duty(5000)
    assert pwm.duty_u16() == 32767
    assert pwm.freq() == 1000


def test_pp_resistance_and_open_line():
    h, board = _board()
    for ohms in (1500, 680, 220, 100):
        board.adc_u16[hal.PINS["pp_adc"]] = hal.pp_ohms_to_raw(ohms)
        got = h.read_pp_ohms()
        assert abs(got - ohms) <= 2 + ohms // 100, (ohms, got)
    board.adc_u16[hal.PINS["pp_adc"]] = 65535
    assert h.read_pp_ohms() == -1


def test_contactor_rcd_and_watchdog_pins():
    h, board = _board()
    assert board.pin_levels[hal.PINS["contactor"]] == 0  # starts open
    h.set_contactor(True)
    assert board.pin_levels[hal.PINS["contactor"]] == 1
    board.pin_levels[hal.PINS["contactor_fb"]] = 1
    assert h.contactor_closed()
    assert not h.rcd_tripped()
    board.pin_levels[hal.PINS["rcd"]] = 1
    assert h.rcd_tripped()
    h.feed_watchdog()
    h.feed_watchdog()
    assert board.wdt.feeds == 2


def test_pin_map_override():
    machine.board.clear()
    h = hal.Hal(machine, pins={"contactor": 13}, use_wdt=False)
    h.set_contactor(True)
    assert machine.board.pin_levels[13] == 1
    assert machine.board.wdt is None
