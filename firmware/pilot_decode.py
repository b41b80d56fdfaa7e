# The pilot seen from the car's side, for tests and the HIL: the current a car may draw
# at a duty (the inverse of pilot.duty_for_current_da), the PWM register value of a duty
# and the state of a PP reading. A board never imports this module (it only signals), so
# its bundle does not carry it; firmware/pilot.py holds what the column itself runs.
from .pilot import MAX_CURRENT_DA, cable_rating_da

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name


def current_da_for_duty(duty):
    """Maximum current (da) a car may draw at a duty; 0 where no current is encoded."""
    if duty < 1000:
        return 0  # state F, digital communication (3-7 %) or invalid: no current
    if duty <= 8500:
        return (duty * 6) // 100
    if duty <= 9600:
        return (duty - 6400) // 4
    if duty <= 9700:
        return MAX_CURRENT_DA
    return 0  # above 97 % up to constant +V: no current


def duty_u16(duty):
    """PWM.duty_u16 value for a duty in 0.01 % (0..10000)."""
    if duty <= 0:
        return 0
    if duty >= 10000:
        return 65535
    return (duty * 65535) // 10000


# PP states (pilot.cable_rating_da gives the current; 0 there is no cable or an invalid one).
PP_NONE = const(0)     # open: no cable plugged
PP_OK = const(1)
PP_INVALID = const(2)  # outside every band: no current, flagged
PP_OPEN_OHMS = const(5000)


def pp_state(pp_ohms):
    if pp_ohms is None:
        return PP_OK  # no PP circuit (tethered cable): covered by the hardware rating
    if pp_ohms >= PP_OPEN_OHMS:
        return PP_NONE
    if cable_rating_da(pp_ohms) > 0:
        return PP_OK
    return PP_INVALID
