# A config write cut where MicroPython's FAT driver leaves a gap: it renames over an
# existing file by removing it first, so a cut between the removal and the rename leaves
# no column.json, only the complete column.json.tmp. The column must boot with that new
# config (and put it in place), not fall into ConfigError; a temp file that is torn or
# does not validate is never used. Runs under CPython and MicroPython.
import json
import os

import machine

from firmware import app as firmware_app
from firmware import config_runtime
from firmware.config import load_config, save_config

OLD = {
    "column_id": "col-7", "bus_address": 7, "phases": 3,
    "hardware_rating_a": 32, "installation_rating_a": 25, "failsafe_a": 10,
    "meter": {"type": "sdm630"}, "link": {"mode": "modbus-tcp", "tcp_port": 502},
}
NEW = dict(OLD, column_id="col-8", failsafe_a=16)


class PowerCut(BaseException):
    """Not an Exception: save_config must not get to clean up, as after a real cut."""


class FatOs:
    """os as MicroPython's FAT driver behaves on rename over a file; the power goes after
    the removal."""

    def sync(self):
        pass

    def rename(self, a, b):
        os.remove(b)
        raise PowerCut()


def _cut_between_remove_and_rename():
    assert save_config("column.json", OLD) == []
    config_runtime.os = FatOs()
    try:
        save_config("column.json", NEW)
        raise AssertionError("no cut")
    except PowerCut:
        pass
    finally:
        config_runtime.os = os
    names = os.listdir(".")
    assert "column.json" not in names and "column.json.tmp" in names


def _write(name, text):
    with open(name, "w") as f:
        f.write(text)


def test_the_complete_temp_file_is_the_new_config_and_is_put_in_place():
    _cut_between_remove_and_rename()
    cfg, errors = load_config("column.json")
    assert errors == [] and cfg["column_id"] == "col-8" and cfg["failsafe_a"] == 16
    names = os.listdir(".")
    assert "column.json" in names and "column.json.tmp" not in names
    assert load_config("column.json")[0]["column_id"] == "col-8"


def test_the_column_boots_with_it_and_is_not_faulted():
    _cut_between_remove_and_rename()
    machine.board.clear()
    column = firmware_app.App(machine, "column.json", use_wdt=False, log=lambda *a: None)
    assert not column.config_errors and column.cfg["column_id"] == "col-8"
    assert column.ctl.limits.failsafe_da == 160


def test_a_torn_or_invalid_temp_file_is_never_used():
    for text in (json.dumps(NEW)[:40], "\xff" * 12, json.dumps(dict(NEW, failsafe_a=30)), "[1, 2]"):
        for name in ("column.json", "column.json.tmp"):
            try:
                os.remove(name)
            except OSError:
                pass
        _write("column.json.tmp", text)
        errors = load_config("column.json")[1]
        assert len(errors) == 1 and errors[0].startswith("config: cannot read column.json"), errors
        assert "column.json" not in os.listdir(".")  # nothing renamed into place


def test_the_old_file_wins_over_a_complete_temp_file_next_to_it():
    # A cut after the temp file was written but before the rename (any file system).
    assert save_config("column.json", OLD) == []
    _write("column.json.tmp", json.dumps(NEW))
    cfg, errors = load_config("column.json")
    assert errors == [] and cfg["column_id"] == "col-7"
    assert save_config("column.json", NEW) == [] and load_config("column.json")[0]["column_id"] == "col-8"
