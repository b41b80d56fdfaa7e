# Fills the Modbus input-register image from the controller, the meter and the store.
# Called every control step, so it allocates nothing: integer stores into an array('H').
from firmware import regmap

_U16 = 0xFFFF


def fill_inputs(image, ctl, meter, energy_wh, boots, bad_frames, uptime_s, remaining_s):
    image[regmap.IR_STATUS] = ctl.status
    image[regmap.IR_CP_STATE] = ctl.cp_state
    image[regmap.IR_ERROR] = ctl.error
    image[regmap.IR_LIMIT_SOURCE] = ctl.limit_source
    image[regmap.IR_OFFERED_CURRENT] = ctl.offered_da
    cur = meter.current_da if meter is not None else None
    volt = meter.voltage_dv if meter is not None else None
    for i in range(3):
        image[regmap.IR_CURRENT_L1 + i] = cur[i] & _U16 if cur is not None else 0
        image[regmap.IR_VOLTAGE_L1 + i] = volt[i] & _U16 if volt is not None else 0
    power = meter.power_w if meter is not None else 0
    regmap.put_u32(image, regmap.IR_POWER, power if power > 0 else 0)
    regmap.put_u32(image, regmap.IR_ENERGY, energy_wh)
    regmap.put_u32(image, regmap.IR_SESSION_ENERGY, ctl.session_energy_wh)
    image[regmap.IR_SESSION_ID] = ctl.session_id & _U16
    image[regmap.IR_ERROR_FLAGS] = error_flags(ctl)
    image[regmap.IR_ASSIGNED_REMAINING] = remaining_s & _U16
    image[regmap.IR_FAILSAFE_LIMIT] = ctl.limits.failsafe_da
    image[regmap.IR_BAD_FRAMES] = bad_frames & _U16
    image[regmap.IR_BOOTS] = boots & _U16
    image[regmap.IR_OVERDRAW_EVENTS] = ctl.limits.overdraw_count & _U16
    image[regmap.IR_CABLE_RATING] = ctl.cable_da
    regmap.put_u32(image, regmap.IR_UPTIME, uptime_s)


def error_flags(ctl):
    table = regmap.ERROR_FLAGS
    err = ctl.error
    flags = table[err] if err < len(table) else 0
    if ctl.failsafe_active:
        flags |= regmap.FLAG_FAILSAFE_ACTIVE
    if ctl.paused:
        flags |= regmap.FLAG_PAUSED
    if not ctl.limits.enabled:
        flags |= regmap.FLAG_DISABLED
    return flags
