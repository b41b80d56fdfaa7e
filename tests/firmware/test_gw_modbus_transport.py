# The Modbus link by transport: an RTU column parses the bus and reports the damaged frames
# in its bad_frames register; a TCP column (its connections frame their own requests)
# carries no RTU parser, whose frame buffer would be RAM held for nothing, and reports 0.
# CPython and MicroPython.
import json

import machine

from firmware import app as firmware_app
from firmware import regmap, wiring

CONFIG = {
    "column_id": "tr-col", "bus_address": 4, "phases": 3,
    "hardware_rating_a": 32, "installation_rating_a": 32, "failsafe_a": 6,
    "meter": {"type": "sdm630"}, "link": {"mode": "modbus-rtu", "baud": 19200},
}


def _app():
    machine.board.clear()
    with open("column.json", "w") as f:
        f.write(json.dumps(CONFIG))
    return firmware_app.App(machine, "column.json", use_wdt=False, log=lambda *a: None)


def test_a_tcp_column_has_no_rtu_parser_and_reports_no_bad_frames():
    app = _app()
    link = wiring.link(app, "modbus-tcp")
    assert link.parser is None and link.bad_frames() == 0
    link.inputs[regmap.IR_BAD_FRAMES] = 7
    link.refresh(1000)
    assert link.inputs[regmap.IR_BAD_FRAMES] == 0


def test_an_rtu_column_reports_its_damaged_frames():
    app = _app()
    link = wiring.link(app, "modbus-rtu")
    assert link.parser is not None
    link.parser.feed(b"\x04\x04\x00\x00\x00\x01\x00\x00")   # read inputs with a wrong CRC
    link.parser.gap()
    while link.parser.next_request():
        pass
    link.refresh(1000)
    assert link.bad_frames() >= 1
    assert link.inputs[regmap.IR_BAD_FRAMES] == link.bad_frames()
