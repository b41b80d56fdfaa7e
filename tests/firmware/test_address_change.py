# Commissioning over Modbus: the column id in the input image, and a bus address change
# that needs a write of the new address with its confirm value, validates and saves the
# config before it takes effect, and changes nothing when any part of it is wrong. Runs
# the real App and its Modbus link on the virtual board, with exact wire frames (CPython
# and MicroPython).
import json
import os
import sys

import machine
from fwtest import hexbytes

from firmware import app as firmware_app
from firmware import regmap, regmap_tables
from firmware.crc import crc16
from firmware.gw_modbus import ModbusLink
from firmware.modbus import RtuRequestParser

CONFIG = {
    "column_id": "P1-north-03", "bus_address": 4, "phases": 3,
    "hardware_rating_a": 32, "installation_rating_a": 25, "failsafe_a": 10,
    "meter": {"type": "sdm630", "address": 1, "baud": 9600},
    "link": {"mode": "modbus-rtu", "baud": 19200},
}


def _link(config=None):
    machine.board.clear()
    with open("column.json", "w") as f:
        f.write(json.dumps(config or CONFIG))
    logs = []
    column = firmware_app.App(machine, "column.json", use_wdt=False, log=logs.append)
    link = ModbusLink(column, (config or CONFIG)["bus_address"])
    column.link = link
    return link, logs


def _crc(body):
    crc = crc16(body)
    return body + bytes([crc & 0xFF, crc >> 8])


def _frame(unit, fc, *words):
    """An RTU request: unit, fc, then 16-bit words (FC16: start, count, then the values)."""
    body = bytearray([unit, fc])
    for i, w in enumerate(words):
        body += bytes([w >> 8, w & 0xFF])
        if fc == 16 and i == 1:
            body.append(2 * w)
    return _crc(bytes(body))


def _ask(link, frame, now_ms=1000):
    parser = RtuRequestParser()
    parser.feed(frame)
    n = parser.next_request()
    if n == 0:
        parser.gap()
        n = parser.next_request()
    assert n == len(frame), "not a request: %s" % frame
    r = link.slave.handle(parser.unit, parser.fc, parser.pdu, now_ms)
    return bytes(link.slave.out[0:r])


def _move(link, unit, new, confirm=None):
    if confirm is None:
        confirm = regmap.address_confirm(unit, new)
    return _ask(link, _frame(unit, 16, regmap.HR_NEW_ADDRESS, 2, new, confirm))


def _column_id(link):
    return regmap_tables.get_ascii(link.inputs, regmap.IR_COLUMN_ID, regmap.COLUMN_ID_WORDS)


def _file():
    with open("column.json") as f:
        return f.read()


def _unchanged(link, unit, text):
    """Nothing moved: same unit, same image, same file, no holding register left set."""
    assert link.slave.unit_id == unit
    assert link.inputs[regmap.IR_BUS_ADDRESS] == unit
    assert link.app.cfg["bus_address"] == unit
    assert _file() == text
    assert link.holding[regmap.HR_NEW_ADDRESS] == 0 and link.holding[regmap.HR_ADDRESS_CONFIRM] == 0


def test_the_column_id_is_in_the_input_image_as_ascii():
    link, _ = _link()
    reply = _ask(link, _frame(4, 4, regmap.IR_COLUMN_ID, regmap.COLUMN_ID_WORDS))
    text = b"P1-north-03" + bytes(21)
    assert reply == _crc(bytes([4, 4, 32]) + text)
    assert _column_id(link) == "P1-north-03"


def test_a_32_char_column_id_fills_every_word():
    link, _ = _link(dict(CONFIG, column_id="c" * 31 + "Z"))
    assert _column_id(link) == "c" * 31 + "Z"
    assert link.inputs[regmap.IR_COLUMN_ID + 15] == 0x635A


def test_confirm_names_both_addresses():
    assert regmap.address_confirm(4, 9) == 0x0409 ^ 0xA5A5 == 0xA1AC
    assert regmap.address_confirm(247, 1) == 0xF701 ^ 0xA5A5


def test_a_confirmed_move_saves_the_config_and_answers_on_the_new_address():
    link, logs = _link()
    before = "firmware.config" in sys.modules
    # The reply still comes from the old address: the master asked it there.
    assert _move(link, 4, 9) == _crc(hexbytes("04 10 00 07 00 02"))
    assert link.slave.unit_id == 9 and link.inputs[regmap.IR_BUS_ADDRESS] == 9
    assert link.app.cfg["bus_address"] == 9
    saved = json.loads(_file())
    assert saved == dict(CONFIG, bus_address=9)  # the technician's file, no defaults merged in
    assert not [n for n in os.listdir(".") if n.endswith(".tmp")]
    assert logs[-1] == "bus address changed from 4 to 9"
    assert ("firmware.config" in sys.modules) == before  # the validator is unloaded again
    # Old address: silence; new address: the image, which says 9.
    assert _ask(link, _frame(4, 4, 0, 2)) == b""
    reply = _ask(link, _frame(9, 4, regmap.IR_BUS_ADDRESS, 1))
    assert reply == _crc(hexbytes("09 04 02 00 09"))


def test_the_move_also_moves_the_broadcast_table_entry():
    link, _ = _link()
    _move(link, 4, 9)
    table = [regmap.NO_CHANGE] * 10
    table[3] = 80    # entry of address 4 (the old one)
    table[8] = 120   # entry of address 9 (the new one)
    body = bytearray([0, 16, 0x01, 0x00, 0, 11, 22, 0, 60])  # validity 60 s, then addresses 1..10
    for v in table:
        body += bytes([v >> 8, v & 0xFF])
    assert _ask(link, _crc(bytes(body))) == b""
    assert link.holding[regmap.HR_ASSIGNED_LIMIT] == 120


def test_the_two_step_form_works_and_a_stale_new_address_does_not():
    link, _ = _link()
    assert _ask(link, _frame(4, 6, regmap.HR_NEW_ADDRESS, 9)) == _frame(4, 6, regmap.HR_NEW_ADDRESS, 9)
    assert link.slave.unit_id == 4  # the new address alone does nothing
    # A confirm for another address than the one written is refused.
    reply = _ask(link, _frame(4, 6, regmap.HR_ADDRESS_CONFIRM, regmap.address_confirm(4, 10)))
    assert reply == _crc(hexbytes("04 86 03"))
    assert link.slave.unit_id == 4 and json.loads(_file())["bus_address"] == 4
    confirm = regmap.address_confirm(4, 9)
    assert _ask(link, _frame(4, 6, regmap.HR_ADDRESS_CONFIRM, confirm)) == \
        _frame(4, 6, regmap.HR_ADDRESS_CONFIRM, confirm)
    assert link.slave.unit_id == 9 and json.loads(_file())["bus_address"] == 9


def test_a_wrong_confirm_is_refused_and_changes_nothing():
    link, _ = _link()
    text = _file()
    for confirm in (0, 0x0409, regmap.address_confirm(9, 4), regmap.address_confirm(4, 9) ^ 1,
                    regmap.RESET_MAGIC):
        assert _move(link, 4, 9, confirm) == _crc(hexbytes("04 90 03")), confirm
        _unchanged(link, 4, text)


def test_an_out_of_range_address_is_refused_and_changes_nothing():
    link, _ = _link()
    text = _file()
    for new in (0, 248, 255, 0x0104):
        assert _move(link, 4, new, regmap.address_confirm(4, new & 0xFF)) == _crc(hexbytes("04 90 03"))
        _unchanged(link, 4, text)
    assert _ask(link, _frame(4, 6, regmap.HR_NEW_ADDRESS, 0)) == _crc(hexbytes("04 86 03"))
    _unchanged(link, 4, text)


def test_a_move_written_with_other_registers_is_refused():
    link, _ = _link()
    text = _file()
    reply = _ask(link, _frame(4, 16, regmap.HR_COMMAND_SEQ, 3, 77, 9, regmap.address_confirm(4, 9)))
    assert reply == _crc(hexbytes("04 90 03"))
    _unchanged(link, 4, text)
    assert link.holding[regmap.HR_COMMAND_SEQ] == 0


def test_a_config_that_would_not_validate_is_refused_and_left_alone():
    link, _ = _link()
    bad = dict(CONFIG, phasez=3)  # the file changed on flash since boot: a typo
    with open("column.json", "w") as f:
        f.write(json.dumps(bad))
    text = _file()
    assert _move(link, 4, 9) == _crc(hexbytes("04 90 03"))
    _unchanged(link, 4, text)


def test_a_config_that_cannot_be_read_is_a_device_failure():
    link, _ = _link()
    os.remove("column.json")
    assert _move(link, 4, 9) == _crc(hexbytes("04 90 04"))
    assert link.slave.unit_id == 4 and "column.json" not in os.listdir(".")


def test_the_same_address_is_a_no_op():
    link, logs = _link()
    os.remove("column.json")  # proves nothing is read or written
    assert _move(link, 4, 4) == _crc(hexbytes("04 10 00 07 00 02"))
    assert link.slave.unit_id == 4 and not logs


def test_a_column_with_a_broken_config_takes_no_move():
    link, _ = _link(dict(CONFIG, failsafe_a=3))
    text = _file()
    assert link.app.config_errors
    assert _move(link, 4, 9) == _crc(hexbytes("04 90 04"))
    assert link.slave.unit_id == 4 and _file() == text


def test_a_moved_column_boots_on_its_new_address():
    link, _ = _link()
    _move(link, 4, 200)
    column = firmware_app.App(machine, "column.json", use_wdt=False, log=lambda *a: None)
    assert not column.config_errors and column.cfg["bus_address"] == 200
    reboot = ModbusLink(column, column.cfg["bus_address"])
    assert reboot.inputs[regmap.IR_BUS_ADDRESS] == 200
    assert _column_id(reboot) == "P1-north-03"
