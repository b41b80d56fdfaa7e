# The commissioning config: every key's errors, defaults from the controller, the example
# file, and atomic saving under power cuts. Runs under CPython and MicroPython.
import json
import os

from firmware import config, config_runtime
from firmware.config import load_config, save_config, schema_keys, validate
from firmware.controller import DEFAULTS

_HERE = __file__.rsplit("/", 1)[0] if "/" in __file__ else "."
EXAMPLE = _HERE + "/../../examples/column.json"


def _minimal():
    """Only the keys that never have a default."""
    return {
        "column_id": "col-7",
        "bus_address": 7,
        "phases": 3,
        "hardware_rating_a": 32,
        "installation_rating_a": 25,
        "failsafe_a": 10,
        "meter": {"type": "sdm630"},
        "link": {"mode": "modbus-tcp", "tcp_port": 502},
    }


def _with(dotted, value):
    cfg = _minimal()
    if "." in dotted:
        section, key = dotted.split(".")
        cfg[section][key] = value
    else:
        cfg[dotted] = value
    return cfg


def _without(dotted):
    cfg = _minimal()
    if "." in dotted:
        section, key = dotted.split(".")
        del cfg[section][key]
    else:
        del cfg[dotted]
    return cfg


def _default_of(dotted):
    if "." in dotted:
        section, key = dotted.split(".")
        return DEFAULTS.get(section, {}).get(key)
    return DEFAULTS.get(dotted)


def test_example_config_is_valid():
    cfg, errors = load_config(EXAMPLE)
    assert errors == [], errors
    assert cfg["column_id"] == "P1-north-03" and cfg["bus_address"] == 3
    assert cfg["meter"]["type"] == "sdm630" and cfg["link"]["mode"] == "modbus-rtu"
    assert cfg["heartbeat_timeout_s"] == 90  # set in the file
    assert cfg["overdraw_grace_s"] == DEFAULTS["overdraw_grace_s"]  # from the defaults


def test_minimal_config_gets_the_controller_defaults():
    cfg, errors = config.check(_minimal())
    assert errors == [], errors
    for name in schema_keys():
        d = _default_of(name)
        if d is None or name in ("hardware_rating_a", "installation_rating_a", "failsafe_a"):
            continue
        section, key = name.split(".") if "." in name else (None, name)
        value = cfg[section][key] if section else cfg[key]
        assert value == d, (name, value, d)
    assert cfg["hardware_rating_a"] == 32 and cfg["failsafe_a"] == 10  # not the defaults


def test_every_default_is_a_config_key_within_its_range():
    keys = schema_keys()
    full = _minimal()
    for name, value in DEFAULTS.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                assert name + "." + sub in keys, name + "." + sub
                full[name][sub] = v
        else:
            assert name in keys, name
            full[name] = value
    full["installation_rating_a"] = full["hardware_rating_a"]
    assert validate(full) == []


def test_ratings_and_identity_are_never_defaulted():
    for name in ("column_id", "bus_address", "phases", "hardware_rating_a",
                 "installation_rating_a", "failsafe_a", "meter", "link", "meter.type", "link.mode"):
        assert name + ": missing" in validate(_without(name)), name


def test_schema_keys():
    assert schema_keys() == [
        "column_id", "bus_address", "phases", "hardware_rating_a", "installation_rating_a",
        "failsafe_a", "meter.type", "meter.address", "meter.baud", "link.mode", "link.baud",
        "link.tcp_port", "link.host", "heartbeat_timeout_s", "min_pause_s",
        "overdraw_tolerance_pct", "overdraw_offset_a", "overdraw_grace_s", "meter_stale_s",
        "energy_quantum_wh", "energy_quantum_s", "cp_debounce_ms", "pwm_min_change_interval_s",
        "contactor_feedback_ms"]


# (key, bad value, the exact error)
BAD = (
    ("column_id", "", "column_id: length 0 is out of range 1..32"),
    ("column_id", "c" * 33, "column_id: length 33 is out of range 1..32"),
    ("column_id", "col 7", "column_id: 'col 7' may only hold A-Z a-z 0-9 _ -"),
    ("column_id", "col/7", "column_id: 'col/7' may only hold A-Z a-z 0-9 _ -"),
    ("column_id", 7, "column_id: expected a string, got 7"),
    ("bus_address", 0, "bus_address: 0 is out of range 1..247"),
    ("bus_address", 248, "bus_address: 248 is out of range 1..247"),
    ("bus_address", "7", "bus_address: expected an integer, got '7'"),
    ("bus_address", 7.0, "bus_address: expected an integer, got 7.0"),
    ("bus_address", True, "bus_address: expected an integer, got true"),
    ("bus_address", None, "bus_address: expected an integer, got null"),
    ("phases", 2, "phases: 2 is not one of 1, 3"),
    ("phases", 3.0, "phases: 3.0 is not one of 1, 3"),
    ("phases", True, "phases: true is not one of 1, 3"),
    ("hardware_rating_a", 5.9, "hardware_rating_a: 5.9 is out of range 6..80"),
    ("hardware_rating_a", 81, "hardware_rating_a: 81 is out of range 6..80"),
    ("hardware_rating_a", [32], "hardware_rating_a: expected a number, got a list"),
    ("installation_rating_a", 5, "installation_rating_a: 5 is out of range 6..80"),
    ("installation_rating_a", 40, "installation_rating_a: 40 is above hardware_rating_a 32"),
    ("failsafe_a", 3, "failsafe_a: 3 is out of range (0 or 6..installation_rating_a)"),
    ("failsafe_a", 25.5, "failsafe_a: 25.5 is above installation_rating_a 25"),
    ("failsafe_a", -1, "failsafe_a: -1 is out of range 0..80"),
    ("meter", 5, "meter: expected an object, got 5"),
    ("meter", [], "meter: expected an object, got a list"),
    ("meter.type", "sdm72", "meter.type: 'sdm72' is not one of sdm630, sdm120"),
    ("meter.address", 300, "meter.address: 300 is out of range 1..247"),
    ("meter.address", 0, "meter.address: 0 is out of range 1..247"),
    ("meter.baud", 1200, "meter.baud: 1200 is not one of 2400, 4800, 9600, 19200, 38400, 57600, 115200"),
    ("meter.baud", "9600", "meter.baud: '9600' is not one of 2400, 4800, 9600, 19200, 38400, 57600, 115200"),
    ("link", "tcp", "link: expected an object, got 'tcp'"),
    ("link.mode", "ocpp", "link.mode: 'ocpp' is not one of modbus-rtu, modbus-tcp, cbor-serial, cbor-tcp"),
    ("link.baud", 14400, "link.baud: 14400 is not one of 2400, 4800, 9600, 19200, 38400, 57600, 115200"),
    ("link.tcp_port", 0, "link.tcp_port: 0 is out of range 1..65535"),
    ("link.tcp_port", 65536, "link.tcp_port: 65536 is out of range 1..65535"),
    ("link.host", "", "link.host: length 0 is out of range 1..253"),
    ("link.host", "gw host", "link.host: 'gw host' may only hold A-Z a-z 0-9 . - :"),
    ("heartbeat_timeout_s", 9, "heartbeat_timeout_s: 9 is out of range 10..3600"),
    ("heartbeat_timeout_s", 3601, "heartbeat_timeout_s: 3601 is out of range 10..3600"),
    ("min_pause_s", -1, "min_pause_s: -1 is out of range 0..3600"),
    ("min_pause_s", 3601, "min_pause_s: 3601 is out of range 0..3600"),
    ("overdraw_tolerance_pct", 51, "overdraw_tolerance_pct: 51 is out of range 0..50"),
    ("overdraw_tolerance_pct", 10.5, "overdraw_tolerance_pct: expected an integer, got 10.5"),
    ("overdraw_offset_a", 5.5, "overdraw_offset_a: 5.5 is out of range 0..5"),
    ("overdraw_offset_a", -0.1, "overdraw_offset_a: -0.1 is out of range 0..5"),
    ("overdraw_grace_s", 0, "overdraw_grace_s: 0 is out of range 1..60"),
    ("overdraw_grace_s", 61, "overdraw_grace_s: 61 is out of range 1..60"),
    ("meter_stale_s", 1, "meter_stale_s: 1 is out of range 2..120"),
    ("meter_stale_s", 121, "meter_stale_s: 121 is out of range 2..120"),
    ("energy_quantum_wh", 0, "energy_quantum_wh: 0 is out of range 1..1000"),
    ("energy_quantum_wh", 1001, "energy_quantum_wh: 1001 is out of range 1..1000"),
    ("energy_quantum_s", 9, "energy_quantum_s: 9 is out of range 10..3600"),
    ("energy_quantum_s", 3601, "energy_quantum_s: 3601 is out of range 10..3600"),
    ("cp_debounce_ms", 9, "cp_debounce_ms: 9 is out of range 10..1000"),
    ("pwm_min_change_interval_s", 61, "pwm_min_change_interval_s: 61 is out of range 0..60"),
    ("contactor_feedback_ms", 49, "contactor_feedback_ms: 49 is out of range 50..3000"),
)


def test_each_bad_value_is_named():
    for name, value, message in BAD:
        errors = validate(_with(name, value))
        assert errors == [message], (name, value, errors)


def test_range_edges_are_accepted():
    cfg = _minimal()
    cfg["hardware_rating_a"] = cfg["installation_rating_a"] = cfg["failsafe_a"] = 6
    assert validate(cfg) == []
    good = (("bus_address", 1), ("bus_address", 247), ("phases", 1),
            ("hardware_rating_a", 80), ("failsafe_a", 0), ("failsafe_a", 6), ("failsafe_a", 25),
            ("installation_rating_a", 32), ("installation_rating_a", 16.5), ("column_id", "A-z_09"),
            ("column_id", "c" * 32), ("meter.type", "sdm120"), ("meter.baud", 115200),
            ("link.host", "10.0.0.1"), ("link.host", "fe80::1"), ("overdraw_offset_a", 0),
            ("overdraw_offset_a", 5), ("min_pause_s", 0), ("energy_quantum_s", 3600))
    for name, value in good:
        assert validate(_with(name, value)) == [], (name, value)


def test_not_a_number_and_infinity_are_refused():
    for value in (float("nan"), float("inf"), -float("inf")):
        errors = validate(_with("hardware_rating_a", value))
        assert len(errors) == 1 and errors[0].startswith("hardware_rating_a: "), errors
        assert validate(_with("overdraw_offset_a", value))[0].startswith("overdraw_offset_a: ")


def test_non_ascii_id_is_refused():
    errors = validate(_with("column_id", "S\u00e4ule-1"))
    assert len(errors) == 1 and errors[0].startswith("column_id: ")


def test_ratings_cannot_exceed_the_hardware():
    cfg = _minimal()
    cfg["installation_rating_a"] = 40
    cfg["failsafe_a"] = 40
    errors = validate(cfg)
    assert errors == ["installation_rating_a: 40 is above hardware_rating_a 32",
                      "failsafe_a: 40 is above hardware_rating_a 32"], errors


def test_unknown_keys_are_errors():
    cfg = _minimal()
    cfg["heartbeat_timout_s"] = 30  # typo
    cfg["meter"]["adress"] = 2
    cfg["link"]["zz"] = 1
    assert validate(cfg) == ["meter.adress: unknown key", "link.zz: unknown key",
                             "heartbeat_timout_s: unknown key"]
    assert validate({1: 2, "column_id": "x"})[-1] == "1: unknown key"


def test_link_mode_needs_its_settings():
    cfg = _minimal()
    cfg["link"] = {"mode": "cbor-tcp"}
    assert validate(cfg) == ["link.tcp_port: missing (needed for cbor-tcp)"]
    cfg["link"] = {"mode": "cbor-tcp", "tcp_port": 7000}
    assert validate(cfg) == []  # the column listens on every interface
    cfg["link"]["host"] = "127.0.0.1"
    assert validate(cfg) == []
    cfg["link"] = {"mode": "modbus-tcp"}
    assert validate(cfg) == ["link.tcp_port: missing (needed for modbus-tcp)"]
    cfg["link"] = {"mode": "modbus-rtu"}
    assert validate(cfg) == ["link.baud: missing (needed for modbus-rtu)"]
    cfg["link"] = {"mode": "cbor-serial", "baud": 115200}
    assert validate(cfg) == []


def test_meter_bus_settings_default():
    cfg, errors = config.check(_minimal())
    assert errors == []
    assert cfg["meter"] == {"type": "sdm630", "address": 1, "baud": 9600}


def test_many_errors_are_all_reported():
    cfg = _minimal()
    del cfg["phases"]
    cfg["bus_address"] = 0
    cfg["meter"]["address"] = 300
    errors = validate(cfg)
    assert errors == ["bus_address: 0 is out of range 1..247", "phases: missing",
                      "meter.address: 300 is out of range 1..247"], errors


def test_config_with_errors_keeps_good_values_and_defaults():
    cfg = _with("heartbeat_timeout_s", 5)
    cfg["meter"]["address"] = 0
    merged, errors = config.check(cfg)
    assert len(errors) == 2
    assert merged["heartbeat_timeout_s"] == DEFAULTS["heartbeat_timeout_s"]
    assert merged["meter"]["address"] == 1
    assert merged["bus_address"] == 7 and merged["link"]["tcp_port"] == 502  # link can report


def test_validate_never_raises():
    odd = (None, [], "x", 3, {"meter": None, "link": []}, {"meter": {"type": None}},
           {"column_id": {"a": 1}, "phases": [3]}, {"link": {"mode": ["cbor-tcp"]}},
           {"hardware_rating_a": "32", "installation_rating_a": 6, "failsafe_a": 6})
    for data in odd:
        errors = validate(data)
        assert errors and type(errors) is list
    assert validate(None)[0] == "config: expected an object, got null"


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def test_load_reports_broken_files():
    cfg, errors = load_config("nope.json")
    assert errors[0].startswith("config: cannot read nope.json") and type(cfg) is dict
    _write("bad.json", '{"column_id": "x",')
    cfg, errors = load_config("bad.json")
    assert len(errors) == 1 and errors[0].startswith("config: invalid JSON in bad.json")
    assert cfg["meter"]["address"] == 1  # defaults still there for the safe state
    _write("list.json", "[1, 2]")
    assert load_config("list.json")[1] == ["config: expected an object, got a list"]
    _write("empty.json", "")
    assert load_config("empty.json")[1][0].startswith("config: invalid JSON")


def test_save_and_load_round_trip():
    cfg = _minimal()
    cfg["min_pause_s"] = 120
    assert save_config("column.json", cfg) == []
    loaded, errors = load_config("column.json")
    assert errors == [] and loaded["min_pause_s"] == 120 and loaded["column_id"] == "col-7"
    assert "column.json.tmp" not in os.listdir(".")


def test_save_refuses_an_invalid_config_and_keeps_the_old_file():
    assert save_config("column.json", _minimal()) == []
    errors = save_config("column.json", _with("phases", 2))
    assert errors == ["phases: 2 is not one of 1, 3"]
    assert load_config("column.json")[0]["phases"] == 3


class PowerCut(BaseException):
    """Not an Exception: save_config must not get to clean up, as after a real cut."""


class _CutFile:
    def __init__(self, path, budget):
        self.f = open(path, "w")
        self.budget = budget

    def write(self, text):
        if len(text) > self.budget:
            self.f.write(text[:self.budget])
            self.f.close()
            raise PowerCut()
        self.budget -= len(text)
        return self.f.write(text)

    def flush(self):
        self.f.flush()

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()


def test_power_cut_while_saving_leaves_old_or_new():
    old = _minimal()
    new = _with("column_id", "col-8")
    text = json.dumps(new)
    assert save_config("column.json", old) == []
    for budget in range(0, len(text) + 1, 3):
        config_runtime.open = lambda path, mode="r", b=budget: (_CutFile(path, b) if "w" in mode
                                                                else open(path, mode))
        try:
            save_config("column.json", new)
            cut = False
        except PowerCut:
            cut = True
        finally:
            del config_runtime.open
        cfg, errors = load_config("column.json")
        assert errors == [], (budget, errors)
        assert cfg["column_id"] == ("col-7" if cut else "col-8"), budget
        if not cut:
            assert save_config("column.json", old) == []
    # a stale temp file from a cut does not stop the next save
    assert "column.json.tmp" in os.listdir(".")
    assert save_config("column.json", new) == [] and load_config("column.json")[0]["column_id"] == "col-8"


def test_cut_before_the_rename_keeps_the_old_file():
    class CutOs:
        def rename(self, a, b):
            raise PowerCut()

    assert save_config("column.json", _minimal()) == []
    real_os = config_runtime.os
    config_runtime.os = CutOs()
    try:
        save_config("column.json", _with("column_id", "col-8"))
        raise AssertionError("no cut")
    except PowerCut:
        pass
    finally:
        config_runtime.os = real_os
    assert load_config("column.json")[0]["column_id"] == "col-7"


def test_write_error_is_reported_not_raised():
    os.mkdir("column.json.tmp")  # the temp file cannot be created
    errors = save_config("column.json", _minimal())
    assert len(errors) == 1 and errors[0].startswith("config: cannot write column.json")
