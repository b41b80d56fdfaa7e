# IEC 61851-1 control pilot (CP) and proximity pilot (PP): amps -> duty, CP voltage ->
# state A-F with debouncing, PP resistor -> cable rating. Pure logic, integers only:
# currents in deci-amps (da), duty in 0.01 % units (0..10000), voltages in mV, time in ms.
# What only the car's side reads (duty -> amps, the PP state) is in pilot_decode.py,
# which a board never loads.
from .status import CP_A, CP_B, CP_C, CP_D, CP_E, CP_F

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

DUTY_NO_CURRENT = const(10000)  # constant +V: no current offered (PWM off)
DUTY_STATE_F = const(0)         # constant -12 V: state F, EVSE not available
MIN_CURRENT_DA = const(60)      # 6 A: the lowest current a PWM can offer
MAX_CURRENT_DA = const(800)     # 80 A: the highest current a PWM can offer

# Time arithmetic: times are ticks_ms-style ints. Differences are taken modulo 2**30,
# the ticks period of 32-bit boards (the unix port's 2**62 and CPython's unbounded
# virtual clock are multiples of it), so wrap-around is harmless and every
# intermediate value stays a small int (no heap allocation on a board). A difference
# is only meaningful below 2**29 ms (6.2 days): callers latch long timeouts as flags.
from .clock import elapsed_ms  # noqa: E402, F401  (limits and session import it from here)

# --- current <-> duty -------------------------------------------------------------
# 10 % <= D <= 85 %: I = 0.6 D    -> da = 6 * duty / 100
# 85 % <  D <= 96 %: I = 2.5 (D - 64) -> da = duty / 4 - 1600
# Rounding always goes towards the lower current: the car may never be offered more.

def duty_for_current_da(da):
    """Duty (0.01 %) for a current; DUTY_NO_CURRENT below 6 A (the caller pauses)."""
    if da < MIN_CURRENT_DA:
        return DUTY_NO_CURRENT
    if da > MAX_CURRENT_DA:
        da = MAX_CURRENT_DA
    if da <= 525:
        # 51 A .. 52.5 A cannot be signalled (the ranges do not meet): 51 A at 85 %.
        if da > 510:
            da = 510
        return (da * 50) // 3
    return 4 * da + 6400


# --- CP voltage -> state ---------------------------------------------------------
# Bands are nominal +-1 V (IEC 61851-1 Table A.4). A level outside every band is
# reported as E: the caller treats it as a pilot fault.

def cp_state_for_mv(high_mv, low_mv=None):
    """CP state from the high level (and the low level while PWM runs, for state F)."""
    if 11000 <= high_mv <= 13000:
        return CP_A
    if 8000 <= high_mv <= 10000:
        return CP_B
    if 5000 <= high_mv <= 7000:
        return CP_C
    if 2000 <= high_mv <= 4000:
        return CP_D
    if -13000 <= high_mv <= -11000:
        # Constant -12 V: both levels sit near -12 V.
        if low_mv is None or -13000 <= low_mv <= -11000:
            return CP_F
        return CP_E
    return CP_E  # 0 V (short) and anything outside the bands


def diode_ok(low_mv):
    """The EV's diode keeps the low level of a running PWM near -12 V."""
    return -13000 <= low_mv <= -11000


class CpDetector:
    """Debounced CP state: a new raw state is accepted after it held for debounce_ms."""

    def __init__(self, debounce_ms=40, initial=CP_A):
        self.debounce_ms = debounce_ms
        self.state = initial
        self._candidate = initial
        self._since_ms = 0

    def update(self, now_ms, raw):
        if raw == self.state:
            self._candidate = raw
            return self.state
        if raw != self._candidate:
            self._candidate = raw
            self._since_ms = now_ms
        if elapsed_ms(now_ms, self._since_ms) >= self.debounce_ms:
            self.state = raw
        return self.state


# --- PP resistor -> cable rating -----------------------------------------------------
# Nominal values from STANDARDS.md (unconfirmed): 1.5 kOhm 13 A, 680 Ohm 20 A,
# 220 Ohm 32 A, 100 Ohm 63 A. Bands around each (unconfirmed, configurable later);
# gaps between bands, a short (< 80 Ohm) and 2.46 k .. 5 k are invalid; an open line
# (pilot_decode.PP_OPEN_OHMS and above: no cable) gets 0 too.


def cable_rating_da(pp_ohms):
    """Cable rating (da) for a PP resistance; 0 for no cable or an invalid value.

    None means the column has no PP circuit (tethered cable whose rating is part of
    the hardware rating): the cable then never binds (80 A)."""
    if pp_ohms is None:
        return MAX_CURRENT_DA
    if 1100 <= pp_ohms <= 2460:
        return 130
    if 400 <= pp_ohms <= 936:
        return 200
    if 164 <= pp_ohms <= 308:
        return 320
    if 80 <= pp_ohms <= 140:
        return 630
    return 0
