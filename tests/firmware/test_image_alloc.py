# Publishing the column's state into the Modbus register image runs in the control task
# every 10 ms, next to the control step, so it must not allocate either: the MicroPython
# leg runs it under micropython.heap_lock(). Both legs check the values it publishes.
from array import array

from fwtest import IS_MICROPYTHON

from firmware import regmap, regmap_tables, status
from firmware.controller import Controller
from firmware.gw_modbus import fill_inputs
from firmware.meter import Meter

if IS_MICROPYTHON:
    import micropython


def _column():
    ctl = Controller({"hardware_rating_a": 32, "installation_rating_a": 32, "failsafe_a": 10})
    meter = Meter("sdm630", 1, lambda data: None)
    for i in range(3):
        meter.current_da[i] = 151 + i
        meter.voltage_dv[i] = 2301 + i
    meter.power_w = 10400
    return ctl, meter


def test_fill_inputs_publishes_the_columns_state():
    ctl, meter = _column()
    ctl.step(0, 12000, 12000, -1, 0, 0, 0, True, 0, False, False)
    img = array("H", [0] * regmap.INPUT_COUNT)
    fill_inputs(img, ctl, meter, 123456789, 7, 3, 3600, 42)
    assert img[regmap.IR_STATUS] == status.ST_AVAILABLE
    assert img[regmap.IR_CP_STATE] == status.CP_A
    assert [img[regmap.IR_CURRENT_L1 + i] for i in range(3)] == [151, 152, 153]
    assert [img[regmap.IR_VOLTAGE_L1 + i] for i in range(3)] == [2301, 2302, 2303]
    assert regmap_tables.get_u32(img, regmap.IR_POWER) == 10400
    assert regmap_tables.get_u32(img, regmap.IR_ENERGY) == 123456789
    assert regmap_tables.get_u32(img, regmap.IR_UPTIME) == 3600
    assert img[regmap.IR_BOOTS] == 7 and img[regmap.IR_BAD_FRAMES] == 3
    assert img[regmap.IR_ASSIGNED_REMAINING] == 42
    assert img[regmap.IR_FAILSAFE_LIMIT] == 100
    assert img[regmap.IR_ERROR_FLAGS] & regmap.FLAG_FAILSAFE_ACTIVE


def test_fill_inputs_allocates_nothing():
    ctl, meter = _column()
    ctl.step(0, 12000, 12000, -1, 0, 0, 0, True, 0, False, False)
    img = array("H", [0] * regmap.INPUT_COUNT)
    fill_inputs(img, ctl, meter, 1, 1, 0, 1, 0)  # warm-up
    if IS_MICROPYTHON:
        micropython.heap_lock()
    try:
        for n in range(200):
            fill_inputs(img, ctl, meter, 1000 + n, 1, n, n, 0)
    finally:
        if IS_MICROPYTHON:
            micropython.heap_unlock()
    assert regmap_tables.get_u32(img, regmap.IR_ENERGY) == 1199
