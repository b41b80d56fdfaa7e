# Who may change a column over Modbus (docs/firmware.md, "Who may change what"), on the
# real App and its ModbusLink on the virtual board, with RTU frames in and out: a reset
# only by its magic value, addressed to this unit, never by broadcast; the broadcast
# reaches nothing but the limit table; a column with a broken config takes no write at
# all. (Confirmed address changes: test_address_change.py.) CPython and MicroPython.
import json

import machine

from firmware import app as firmware_app
from firmware import regmap
from firmware.crc import crc16
from firmware.gw_modbus import ModbusLink
from firmware.modbus import RtuRequestParser

CONFIG = {
    "column_id": "sec-col", "bus_address": 4, "phases": 3,
    "hardware_rating_a": 32, "installation_rating_a": 25, "failsafe_a": 10,
    "meter": {"type": "sdm630"}, "link": {"mode": "modbus-rtu", "baud": 19200},
}


def _app(config=None):
    machine.board.clear()
    with open("column.json", "w") as f:
        f.write(json.dumps(config or CONFIG))
    return firmware_app.App(machine, "column.json", use_wdt=False, log=lambda *a: None)


def _file():
    with open("column.json") as f:
        return f.read()


def _rtu(unit, fc, *words):
    body = bytearray([unit, fc])
    for i, w in enumerate(words):
        body += bytes([w >> 8, w & 0xFF])
        if fc == 16 and i == 1:
            body.append(2 * w)
    crc = crc16(body)
    return bytes(body) + bytes([crc & 0xFF, crc >> 8])


def _ask(link, frame):
    """The column's reply bytes to one RTU request ("" when it stays silent)."""
    parser = RtuRequestParser()
    parser.feed(frame)
    if parser.next_request() == 0:
        parser.gap()
        assert parser.next_request() == len(frame)
    n = link.slave.handle(parser.unit, parser.fc, parser.pdu, 1000)
    return bytes(link.slave.out[0:n])


def test_modbus_reset_only_by_its_value_and_only_for_this_unit():
    app = _app()
    link = ModbusLink(app, 4)
    for frame in (_rtu(0, 6, regmap.HR_RESET, regmap.RESET_MAGIC),        # broadcast
                  _rtu(0, 16, 0, 9, 100, 60, 60, 1, 1, regmap.RESET_MAGIC, 0, 9,
                       regmap.address_confirm(4, 9)),                     # broadcast, all registers
                  _rtu(5, 6, regmap.HR_RESET, regmap.RESET_MAGIC)):       # another unit
        assert _ask(link, frame) == b""
    assert link.slave.broadcast_rejected == 2 and link.slave.unit_id == 4
    for value in (1, 0xA5A4, 0x5A5A, 0xFFFF):
        assert _ask(link, _rtu(4, 6, regmap.HR_RESET, value))[1] == 0x86  # exception 03
    assert not app._reset_requested and link.holding[regmap.HR_RESET] == 0
    assert _ask(link, _rtu(4, 6, regmap.HR_RESET, regmap.RESET_MAGIC)) == \
        _rtu(4, 6, regmap.HR_RESET, regmap.RESET_MAGIC)
    assert app._reset_requested


def test_modbus_a_column_with_a_broken_config_takes_no_write_at_all():
    app = _app(dict(CONFIG, failsafe_a=30))
    assert app.config_errors
    link = ModbusLink(app, 4)
    text = _file()
    for frame in (_rtu(4, 6, regmap.HR_RESET, regmap.RESET_MAGIC),
                  _rtu(4, 6, regmap.HR_FAILSAFE_LIMIT, 60),
                  _rtu(4, 16, regmap.HR_NEW_ADDRESS, 2, 9, regmap.address_confirm(4, 9))):
        reply = _ask(link, frame)
        assert reply[1] & 0x80 and reply[2] == 4, reply  # device failure
    assert not app._reset_requested and link.slave.unit_id == 4 and _file() == text
