"""Fuzz firmware.config.validate with arbitrary JSON-like configs (hypothesis).

In-process (CPython): validate never raises, every error names a key, and whatever it
accepts satisfies the safety rules checked here independently. The same batches also run
through validate in the MicroPython unix port, which must give the same verdicts.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware import config
from firmware.config import schema_keys, validate
from hil.rig.firmware_proc import INTERPRETERS, firmware_command, firmware_env

EXAMPLE = json.loads((Path(__file__).resolve().parents[2] / "examples" / "column.json").read_text())
SECTIONS = ("meter", "link")
ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
HOST_RE = re.compile(r"[A-Za-z0-9.:-]{1,253}")
BAUDS = {2400, 4800, 9600, 19200, 38400, 57600, 115200}
# The documented ranges (docs/brief), written out again here instead of read from config.py.
INT_RANGES = {
    "heartbeat_timeout_s": (10, 3600), "min_pause_s": (0, 3600), "overdraw_tolerance_pct": (0, 50),
    "overdraw_grace_s": (1, 60), "meter_stale_s": (2, 120), "energy_quantum_wh": (1, 1000),
    "energy_quantum_s": (10, 3600), "bus_address": (1, 247),
}


def scalars(cross: bool = False) -> st.SearchStrategy[Any]:
    floats = st.floats(allow_nan=not cross, allow_infinity=not cross)
    if cross:  # JSON-safe, and few digits: MicroPython's float parser is not correctly rounded
        floats = st.floats(min_value=-1e6, max_value=1e6).map(lambda x: round(x, 3))
    return st.one_of(
        st.none(), st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from([0, 1, 3, 6, 7, 16, 32, 80, 81, 247, 248, 502, 9600, 65535, 65536]),
        floats,
        st.text(max_size=40),
        st.sampled_from(["sdm630", "sdm120", "modbus-rtu", "modbus-tcp", "cbor-serial", "cbor-tcp",
                         "col-1", "10.0.0.2", "", "a b"]),
    )


def json_values(cross: bool = False) -> st.SearchStrategy[Any]:
    return st.recursive(scalars(cross),
                        lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                st.dictionaries(st.text(max_size=12), inner, max_size=4)),
                        max_leaves=6)


KEY_NAMES = st.one_of(st.sampled_from(schema_keys() + list(SECTIONS)), st.text(max_size=12))


@st.composite
def mutations(draw: st.DrawFn, cross: bool = False) -> tuple[dict[str, Any], set[str]]:
    """The example config with a few keys set to arbitrary values, deleted or added; and
    the names of the keys touched."""
    cfg = json.loads(json.dumps(EXAMPLE))
    touched: set[str] = set()
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        name = draw(KEY_NAMES)
        section, _, key = name.rpartition(".") if name.count(".") == 1 else ("", "", name)
        target = cfg.get(section) if section else cfg
        if not isinstance(target, dict):
            continue
        touched.add(name)
        if draw(st.integers(0, 5)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(json_values(cross))
    return cfg, touched


def mutated_configs(cross: bool = False) -> st.SearchStrategy[dict[str, Any]]:
    return mutations(cross).map(lambda m: m[0])


RATINGS = {"hardware_rating_a", "installation_rating_a", "failsafe_a"}


def related(name: str) -> set[str]:
    """Error names a change to `name` may cause: itself, its section's keys, and the keys
    tied to it by a rule (the ratings; the link mode and its settings)."""
    if name in RATINGS:
        return set(RATINGS)
    section = name.split(".", 1)[0]
    if section not in SECTIONS:
        return {name}
    if section in ("link", name):  # a whole section, or the link (its mode decides what it needs)
        return {name, section} | {n for n in schema_keys() if n.startswith(section + ".")}
    return {name, section}


def any_configs(cross: bool = False) -> st.SearchStrategy[Any]:
    return st.one_of(mutated_configs(cross),
                     st.dictionaries(KEY_NAMES, json_values(cross), max_size=10),
                     json_values(cross))


def allowed_names(data: Any) -> set[str]:
    """Names an error may start with: the file, the schema's keys, and keys present."""
    names = {"config", *schema_keys(), *SECTIONS}
    if isinstance(data, dict):
        names.update(k for k in data if isinstance(k, str))
        for section in SECTIONS:
            if isinstance(data.get(section), dict):
                names.update(f"{section}.{k}" for k in data[section] if isinstance(k, str))
    return names


def is_int(v: Any) -> bool:
    return type(v) is int


def is_num(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def assert_safe(cfg: dict[str, Any]) -> None:
    """What a config validate() accepted must satisfy (independent of config.py)."""
    assert isinstance(cfg["column_id"], str) and ID_RE.fullmatch(cfg["column_id"])
    assert cfg["phases"] in (1, 3) and is_int(cfg["phases"])
    hw, inst, fs = cfg["hardware_rating_a"], cfg["installation_rating_a"], cfg["failsafe_a"]
    assert is_num(hw) and is_num(inst) and is_num(fs)
    assert 6 <= inst <= hw <= 80
    assert fs == 0 or 6 <= fs <= inst
    meter, link = cfg["meter"], cfg["link"]
    assert meter["type"] in ("sdm630", "sdm120")
    assert "address" not in meter or (is_int(meter["address"]) and 1 <= meter["address"] <= 247)
    assert "baud" not in meter or (is_int(meter["baud"]) and meter["baud"] in BAUDS)
    assert link["mode"] in ("modbus-rtu", "modbus-tcp", "cbor-serial", "cbor-tcp")
    if link["mode"] == "cbor-tcp":
        assert isinstance(link["host"], str) and HOST_RE.fullmatch(link["host"])
    if "tcp_port" in link:
        assert is_int(link["tcp_port"]) and 1 <= link["tcp_port"] <= 65535
    for key, (lo, hi) in INT_RANGES.items():
        if key in cfg:
            assert is_int(cfg[key]) and lo <= cfg[key] <= hi, key
    if "overdraw_offset_a" in cfg:
        assert is_num(cfg["overdraw_offset_a"]) and 0 <= cfg["overdraw_offset_a"] <= 5
    known = set(schema_keys())
    for key, value in cfg.items():
        if isinstance(value, dict):
            assert all(f"{key}.{k}" in known for k in value)
        else:
            assert key in known


def check_errors(data: Any, errors: list[str]) -> None:
    assert isinstance(errors, list)
    names = allowed_names(data)
    for err in errors:
        assert isinstance(err, str)
        assert any(err.startswith(name + ": ") for name in names), err


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(any_configs())
def test_validate_never_raises_and_names_keys(data: Any) -> None:
    errors = validate(data)
    check_errors(data, errors)
    if not errors:
        assert_safe(data)
    cfg, same = config.check(data)
    assert same == errors and isinstance(cfg, dict)


@settings(max_examples=100, deadline=None)
@given(mutations())
def test_a_changed_key_is_the_one_reported(mutation: tuple[dict[str, Any], set[str]]) -> None:
    data, touched = mutation
    errors = validate(data)
    check_errors(data, errors)
    allowed = set().union(*(related(name) for name in touched))
    # (an unknown key nested in a changed section is named with its own key)
    prefixes = [n + ": " for n in allowed] + [t + "." for t in touched]
    for err in errors:
        assert any(err.startswith(p) for p in prefixes), (err, touched)
    if not errors:
        assert_safe(data)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(INT_RANGES)), scalars())
def test_ranges_match_the_documentation(key: str, value: Any) -> None:
    lo, hi = INT_RANGES[key]
    cfg = json.loads(json.dumps(EXAMPLE))
    cfg[key] = value
    ok = is_int(value) and lo <= value <= hi
    errors = validate(cfg)
    assert (errors == []) == ok, (key, value, errors)
    if not ok:
        assert len(errors) == 1 and errors[0].startswith(key + ": ")


# Validates one JSON config per stdin line, answers one JSON list of errors per line.
SERVER = """
import json, sys
from firmware.config import validate
while True:
    line = sys.stdin.readline()
    if not line:
        break
    sys.stdout.write(json.dumps(validate(json.loads(line))) + "\\n")
    sys.stdout.flush()
"""


class Validator:
    """A firmware-side validate() running in its own interpreter process."""

    def __init__(self, interp: str, workdir: Path) -> None:
        script = workdir / "validate_server.py"
        script.write_text(SERVER)
        self.proc = subprocess.Popen(firmware_command(interp, script), cwd=workdir, env=firmware_env(),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def validate(self, data: Any) -> list[str]:
        assert self.proc.stdin and self.proc.stdout
        # UTF-8, not \u escapes: MicroPython's json does not join surrogate pairs
        self.proc.stdin.write(json.dumps(data, ensure_ascii=False).encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, (self.proc.stderr.read() if self.proc.stderr else b"").decode(errors="replace")
        return json.loads(line)

    def close(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module", params=INTERPRETERS)
def firmware_validator(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    validator = Validator(request.param, tmp_path_factory.mktemp("validator"))
    yield validator
    validator.close()


def _name(err: str) -> str:
    return err.split(": ", 1)[0]


@settings(max_examples=100, deadline=None)
@given(data=any_configs(cross=True))
def test_same_verdicts_in_both_interpreters(firmware_validator: Validator, data: Any) -> None:
    got = firmware_validator.validate(data)
    mine = validate(data)
    check_errors(data, got)
    # names, not whole messages: MicroPython renders non-ASCII strings differently
    assert [_name(e) for e in got] == [_name(e) for e in mine], (data, got, mine)
