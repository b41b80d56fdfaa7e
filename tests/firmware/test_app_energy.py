# The column's energy register follows the meter's import register by its positive
# deltas, from the first reading the meter actually delivered: a freshly booted column
# must not count the meter's whole lifetime register (or the zeros its reader holds
# before the first good poll) as energy charged. Runs the real App on the virtual board.
import json

import machine

from firmware import app as firmware_app
from firmware.meter import Meter

CONFIG = {
    "column_id": "energy-test", "bus_address": 4, "phases": 3,
    "hardware_rating_a": 32, "installation_rating_a": 32, "failsafe_a": 6,
    "meter": {"type": "sdm630", "address": 1, "baud": 9600},
    "link": {"mode": "modbus-rtu", "baud": 19200},
}


def _app():
    machine.board.clear()
    with open("column.json", "w") as f:
        f.write(json.dumps(CONFIG))
    column = firmware_app.App(machine, "column.json", use_wdt=False, log=lambda *a: None)
    column.meter = Meter("sdm630", 1, lambda data: None)
    return column


def _good_cycle(meter, energy_wh):
    """What a completed poll cycle leaves in the reader."""
    meter.energy_wh = energy_wh
    meter.cycles += 1


def test_the_first_reading_is_the_baseline_not_a_delta():
    column = _app()
    start = column.energy_wh
    column._account_energy(0)           # no good cycle yet: the reader's zeros are no baseline
    _good_cycle(column.meter, 1234567)  # the meter's lifetime register
    column._account_energy(10)
    assert column.energy_wh == start
    _good_cycle(column.meter, 1234577)
    column._account_energy(20)
    assert column.energy_wh == start + 10


def test_a_register_going_back_adds_nothing():
    column = _app()
    _good_cycle(column.meter, 5000)
    column._account_energy(0)
    _good_cycle(column.meter, 4990)
    column._account_energy(10)
    _good_cycle(column.meter, 5000)
    column._account_energy(20)
    assert column.energy_wh == 10  # only the rise from the new baseline (4990 -> 5000)
