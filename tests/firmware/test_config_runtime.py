# A config change while the column runs (firmware/config_runtime.py: CBOR
# ChangeConfiguration) checks one key, not the whole config, because the full validator
# does not fit next to a running column. It must still accept exactly what the validator
# accepts, never a rating and never a failsafe above the ratings, and write atomically or
# not at all. Runs under CPython and MicroPython.
import gc
import json
import os
import sys

import machine

from firmware import app as firmware_app
from firmware.config import check, validate
from firmware.config_runtime import RUN_TIME, change

BASE = {
    "column_id": "rt-col", "bus_address": 7, "phases": 3,
    "hardware_rating_a": 32, "installation_rating_a": 25, "failsafe_a": 10,
    "meter": {"type": "sdm630"}, "link": {"mode": "cbor-tcp", "tcp_port": 7000},
}
# Values around every bound of every run-time key, and what no key may take.
NAN = float("nan")
VALUES = (-1, 0, 1, 2, 5, 5.9, 6, 9, 10, 24, 25, 25.5, 26, 32, 33, 79, 80, 81, 119, 120, 121,
          3599, 3600, 3601, 10.0, 120.5, True, False, None, "8", [8], {"a": 8}, NAN, float("inf"))


def _cfg(**over):
    """A config as the running column holds it: validated, defaults merged in."""
    data = dict(BASE)
    data.update(over)
    cfg, errors = check(data)
    assert errors == [], errors
    return cfg


def _write(cfg):
    with open("column.json", "w") as f:
        f.write(json.dumps(cfg))


def _read():
    with open("column.json") as f:
        return f.read()


def test_a_run_time_change_accepts_exactly_what_the_validator_accepts():
    for base in (_cfg(), _cfg(installation_rating_a=32),
                 _cfg(hardware_rating_a=80, installation_rating_a=80)):
        _write(base)
        for name, _kind, _lo, _hi in RUN_TIME:
            for value in VALUES:
                before = _read()
                new = change("column.json", base, name, value)
                expected = dict(base)
                expected[name] = value
                valid = validate(expected) == []
                assert (new is not False) == valid, (name, value, new, validate(expected))
                if valid:
                    assert new == expected and json.loads(_read()) == expected, (name, value)
                    _write(base)
                else:
                    assert _read() == before, (name, value)  # nothing written
                assert base["failsafe_a"] == 10, "the running config is not changed in place"


def test_the_failsafe_never_goes_above_the_ratings():
    cfg = _cfg()   # installation 25, hardware 32
    _write(cfg)
    for value in (25.1, 26, 32, 33, 80):
        assert change("column.json", cfg, "failsafe_a", value) is False, value
    assert change("column.json", cfg, "failsafe_a", 25)["failsafe_a"] == 25
    assert change("column.json", cfg, "failsafe_a", 0)["failsafe_a"] == 0  # no current without a gateway
    assert json.loads(_read())["failsafe_a"] == 0


def test_only_the_run_time_keys_change():
    cfg = _cfg()
    _write(cfg)
    text = _read()
    assert [e[0] for e in RUN_TIME] == ["failsafe_a", "heartbeat_timeout_s", "min_pause_s", "meter_stale_s"]
    for key, value in (("hardware_rating_a", 80), ("installation_rating_a", 32), ("hardware_rating_a", 6),
                       ("bus_address", 9), ("column_id", "evil"), ("phases", 1), ("link", {}),
                       ("energy_quantum_wh", 1000), ("meter.address", 3), ("nope", 1), ("", 1)):
        assert change("column.json", cfg, key, value) is None, key
    assert _read() == text


def test_a_write_that_fails_changes_nothing():
    cfg = _cfg()
    _write(cfg)
    text = _read()
    os.mkdir("column.json.tmp")  # the temp file cannot be created
    try:
        assert change("column.json", cfg, "min_pause_s", 60) is False
    finally:
        os.rmdir("column.json.tmp")
    assert _read() == text and cfg["min_pause_s"] == 300


def test_the_running_column_changes_a_key_without_loading_the_validator():
    machine.board.clear()
    _write(BASE)
    app = firmware_app.App(machine, "column.json", use_wdt=False, log=lambda *a: None)
    from firmware.gw_cbor import CborLink  # after the App, as a board loads it

    link = CborLink(app)
    link._on_boot({"status": "Accepted", "heartbeatIntervalS": 60})
    assert "firmware.config" not in sys.modules   # unloaded after boot
    for key, value, status in (("failsafe_a", 16, "Accepted"), ("meter_stale_s", 9, "RebootRequired"),
                               ("failsafe_a", 26, "Rejected"), ("hardware_rating_a", 80, "NotSupported")):
        serve = link.link.handlers["ChangeConfiguration"]
        assert serve({"key": key, "value": value}, 0) == {"status": status}, key
    assert "firmware.config" not in sys.modules
    assert app.ctl.limits.failsafe_da == 160 and app.cfg["failsafe_a"] == 16 and app.cfg["meter_stale_s"] == 9
    saved = json.loads(_read())
    assert saved["failsafe_a"] == 16 and saved["meter_stale_s"] == 9 and saved["installation_rating_a"] == 25
    # ... and the column boots with what was written.
    del app, link
    gc.collect()
    machine.board.clear()
    again = firmware_app.App(machine, "column.json", use_wdt=False, log=lambda *a: None)
    assert not again.config_errors and again.cfg["failsafe_a"] == 16 and again.cfg["meter_stale_s"] == 9
