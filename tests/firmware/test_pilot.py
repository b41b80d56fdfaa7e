# IEC 61851 pilot mapping, CP bands and debouncing, PP cable ratings (CPython + MicroPython).
from firmware.pilot import (
    DUTY_NO_CURRENT,
    DUTY_STATE_F,
    CpDetector,
    cable_rating_da,
    cp_state_for_mv,
    diode_ok,
    duty_for_current_da,
    elapsed_ms,
)
from firmware.pilot_decode import PP_INVALID, PP_NONE, PP_OK, current_da_for_duty, duty_u16, pp_state
from firmware.status import CP_A, CP_B, CP_C, CP_D, CP_E, CP_F

# (current da, duty 0.01 %): 0.6 A per % up to 85 %, 2.5 A per % above, 80 A at 96 %.
DUTY_FOR_CURRENT = (
    (-10, DUTY_NO_CURRENT),
    (0, DUTY_NO_CURRENT),
    (59, DUTY_NO_CURRENT),    # below 6 A: not offerable, the caller pauses
    (60, 1000),               # 6 A = 10 %
    (100, 1666),              # 10 A = 16.67 %, rounded down (never offer more)
    (160, 2666),
    (320, 5333),
    (510, 8500),              # 51 A = 85 %: top of the low range
    (511, 8500),              # 51.1 .. 52.5 A cannot be signalled: 51 A
    (525, 8500),
    (526, 8504),              # first step of the high range: 2.5 * (85.04 - 64) = 52.6 A
    (630, 8920),              # 63 A
    (800, 9600),              # 80 A = 96 %
    (801, 9600),              # clamped to 80 A
    (5000, 9600),
)

# (duty, current da): edges 10/85/96/97 %, digital-communication and no-current levels.
CURRENT_FOR_DUTY = (
    (DUTY_STATE_F, 0),
    (300, 0), (500, 0), (700, 0),   # 3-7 %: digital communication, no current encoded
    (999, 0),
    (1000, 60),
    (1666, 99),
    (5000, 300),
    (8500, 510),
    (8501, 525),
    (8600, 550),
    (9600, 800),
    (9650, 800),
    (9700, 800),
    (9701, 0),
    (DUTY_NO_CURRENT, 0),
)


def test_constants():
    assert DUTY_NO_CURRENT == 10000
    assert DUTY_STATE_F == 0


def test_duty_for_current_table():
    for da, duty in DUTY_FOR_CURRENT:
        got = duty_for_current_da(da)
        assert got == duty, (da, got, duty)


def test_current_for_duty_table():
    for duty, da in CURRENT_FOR_DUTY:
        got = current_da_for_duty(duty)
        assert got == da, (duty, got, da)


def test_round_trip_never_offers_more():
    da = 60
    while da <= 800:
        back = current_da_for_duty(duty_for_current_da(da))
        assert back <= da, (da, back)
        if 510 < da <= 525:
            assert back == 510, (da, back)
        else:
            assert back >= da - 1, (da, back)   # one 0.01 % duty step of rounding at most
        da += 1


def test_duty_is_monotonic():
    prev = 0
    da = 60
    while da <= 800:
        d = duty_for_current_da(da)
        assert d >= prev, da
        prev = d
        da += 1


def test_duty_u16():
    assert duty_u16(DUTY_STATE_F) == 0
    assert duty_u16(DUTY_NO_CURRENT) == 65535
    assert duty_u16(5000) == 32767
    assert duty_u16(1000) == 6553
    assert duty_u16(-5) == 0
    assert duty_u16(20000) == 65535


# (high mV, low mV or None, state): bands are nominal +-1 V; anything else is E.
CP_BANDS = (
    (12000, None, CP_A), (11000, None, CP_A), (13000, None, CP_A),
    (13001, None, CP_E), (10999, None, CP_E),
    (9000, -12000, CP_B), (8000, None, CP_B), (10000, None, CP_B),
    (7999, None, CP_E), (7001, None, CP_E),
    (6000, -12000, CP_C), (5000, None, CP_C), (7000, None, CP_C),
    (4999, None, CP_E), (4001, None, CP_E),
    (3000, -12000, CP_D), (2000, None, CP_D), (4000, None, CP_D),
    (1999, None, CP_E), (0, 0, CP_E), (-1000, None, CP_E),
    (-12000, -12000, CP_F), (-12000, None, CP_F), (-11000, -13000, CP_F),
    (-12000, 0, CP_E),          # high at -12 V but the low level is not: no constant -12 V
    (-10999, None, CP_E), (-13001, None, CP_E),
)


def test_cp_bands():
    for high, low, state in CP_BANDS:
        got = cp_state_for_mv(high, low)
        assert got == state, (high, low, got, state)


def test_diode_check():
    for low, ok in ((-12000, True), (-11000, True), (-13000, True), (-10999, False),
                    (-13001, False), (-6000, False), (0, False), (9000, False)):
        assert diode_ok(low) == ok, low


def test_cp_debounce_accepts_a_stable_change_only():
    det = CpDetector(debounce_ms=40)
    assert det.state == CP_A
    # (now_ms, raw, expected debounced state)
    steps = (
        (0, CP_A, CP_A),
        (10, CP_B, CP_A),    # B seen first at 10 ms
        (30, CP_B, CP_A),
        (40, CP_A, CP_A),    # glitch back: B's timer restarts later
        (50, CP_B, CP_A),
        (80, CP_B, CP_A),
        (89, CP_B, CP_A),
        (90, CP_B, CP_B),    # held 40 ms since 50
        (100, CP_C, CP_B),
        (120, CP_D, CP_B),   # another candidate restarts the timer
        (150, CP_D, CP_B),
        (160, CP_D, CP_D),
        (170, CP_E, CP_D),
        (210, CP_E, CP_E),
    )
    for now, raw, expected in steps:
        assert det.update(now, raw) == expected, (now, raw, det.state, expected)


def test_cp_debounce_across_a_ticks_wrap():
    top = 0x3FFFFFFF          # the last ms before a 32-bit board's ticks_ms wraps to 0
    det = CpDetector(debounce_ms=40)
    assert det.update(top - 20, CP_B) == CP_A
    assert det.update(top, CP_B) == CP_A
    assert det.update(9, CP_B) == CP_A      # 30 ms after top - 20
    assert det.update(19, CP_B) == CP_B     # 40 ms
    assert elapsed_ms(5, top - 4) == 10
    assert elapsed_ms(top - 4, 5) == -10
    assert elapsed_ms(1000, 400) == 600
    big = 0x40000000 * 3 + 100              # a CPython virtual clock beyond 2**30
    assert elapsed_ms(big + 7000, big) == 7000


def test_cp_debounce_zero_follows_at_once():
    det = CpDetector(debounce_ms=0)
    assert det.update(0, CP_C) == CP_C
    assert det.update(1, CP_B) == CP_B


# (ohms, cable rating da, pp state); nominal values per STANDARDS.md (unconfirmed).
PP_TABLE = (
    (None, 800, PP_OK),       # no PP circuit: tethered cable, the hardware rating covers it
    (1500, 130, PP_OK), (1100, 130, PP_OK), (2460, 130, PP_OK),
    (680, 200, PP_OK), (400, 200, PP_OK), (936, 200, PP_OK),
    (220, 320, PP_OK), (164, 320, PP_OK), (308, 320, PP_OK),
    (100, 630, PP_OK), (80, 630, PP_OK), (140, 630, PP_OK),
    (5000, 0, PP_NONE), (100000, 0, PP_NONE),      # open: no cable
    (3000, 0, PP_INVALID), (2461, 0, PP_INVALID), (1000, 0, PP_INVALID),
    (350, 0, PP_INVALID), (150, 0, PP_INVALID), (79, 0, PP_INVALID), (0, 0, PP_INVALID),
    (-5, 0, PP_INVALID),
)


def test_pp_cable_ratings():
    for ohms, da, state in PP_TABLE:
        assert cable_rating_da(ohms) == da, (ohms, cable_rating_da(ohms), da)
        assert pp_state(ohms) == state, (ohms, pp_state(ohms), state)
