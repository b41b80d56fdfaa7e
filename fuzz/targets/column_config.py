"""column-config: the firmware's config loader and validator (firmware/config.py load_config).

Input: the bytes of a column.json. Properties: load_config never raises; it returns a dict
and a list of "name: problem" strings naming a schema key, a key present in the file or
"config"; every value in the cleaned dict passed its own check; and a config with no
errors satisfies every documented range, above all installation <= hardware <= 80 A and a
failsafe of 0 or 6 A..installation (checked here independently of config.py).
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from firmware import config
from fuzz import mutate
from fuzz.engine import REPO, Finding, Harness, Target

ID_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")
HOST_RE = re.compile(r"[A-Za-z0-9.:-]{1,253}")
BAUDS = (2400, 4800, 9600, 19200, 38400, 57600, 115200)
# The documented ranges (docs/firmware.md), written out here rather than read from config.py.
INT_RANGES = {
    "bus_address": (1, 247), "heartbeat_timeout_s": (10, 3600), "min_pause_s": (0, 3600),
    "overdraw_tolerance_pct": (0, 50), "overdraw_grace_s": (1, 60), "meter_stale_s": (2, 120),
    "energy_quantum_wh": (1, 1000), "energy_quantum_s": (10, 3600), "cp_debounce_ms": (10, 1000),
    "pwm_min_change_interval_s": (0, 60), "contactor_feedback_ms": (50, 3000),
}
NUM_RANGES = {"hardware_rating_a": (6, 80), "installation_rating_a": (6, 80), "failsafe_a": (0, 80),
              "overdraw_offset_a": (0, 5)}
SECTIONS = ("meter", "link")
KEYS = tuple(config.schema_keys())


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_num(v: Any) -> bool:
    return (type(v) is int or type(v) is float) and math.isfinite(v)


def _value_ok(name: str, v: Any) -> bool:
    """The per-key check (no rule between keys)."""
    if name in INT_RANGES:
        lo, hi = INT_RANGES[name]
        return _is_int(v) and lo <= v <= hi
    if name in NUM_RANGES:
        lo, hi = NUM_RANGES[name]
        return _is_num(v) and lo <= v <= hi
    if name == "column_id":
        return type(v) is str and ID_RE.fullmatch(v) is not None
    if name == "phases":
        return _is_int(v) and v in (1, 3)
    if name == "meter.type":
        return v in ("sdm630", "sdm120") and type(v) is str
    if name == "meter.address":
        return _is_int(v) and 1 <= v <= 247
    if name in ("meter.baud", "link.baud"):
        return _is_int(v) and v in BAUDS
    if name == "link.mode":
        return type(v) is str and v in ("modbus-rtu", "modbus-tcp", "cbor-serial", "cbor-tcp")
    if name == "link.tcp_port":
        return _is_int(v) and 1 <= v <= 65535
    if name == "link.host":
        return type(v) is str and HOST_RE.fullmatch(v) is not None
    return False


def check_accepted(cfg: dict[str, Any]) -> None:
    """What a config load_config found no error in must satisfy."""
    for name in ("column_id", "bus_address", "phases", "hardware_rating_a", "installation_rating_a",
                 "failsafe_a", "meter", "link"):
        if name not in cfg:
            raise Finding("accepted a config without %s" % name)
    for key, value in cfg.items():
        if isinstance(value, dict) and key in SECTIONS:
            for sub, v in value.items():
                if not _value_ok(key + "." + sub, v):
                    raise Finding("accepted %s.%s = %r" % (key, sub, v))
        elif not _value_ok(key, value):
            raise Finding("accepted %s = %r" % (key, value))
    hw, inst, fs = cfg["hardware_rating_a"], cfg["installation_rating_a"], cfg["failsafe_a"]
    if not (6 <= inst <= hw <= config.MAX_HARDWARE_A):
        raise Finding("accepted ratings above the hardware rating: installation %r, hardware %r" % (inst, hw))
    if not (fs == 0 or 6 <= fs <= inst):
        raise Finding("accepted failsafe_a %r with installation_rating_a %r" % (fs, inst))
    if "type" not in cfg["meter"] or "mode" not in cfg["link"]:
        raise Finding("accepted a config without meter.type or link.mode")
    mode = cfg["link"]["mode"]
    if mode in ("modbus-rtu", "cbor-serial") and "baud" not in cfg["link"]:
        raise Finding("accepted a serial link without a baud rate")
    if mode in ("modbus-tcp", "cbor-tcp") and "tcp_port" not in cfg["link"]:
        raise Finding("accepted a TCP link without a port")


def allowed_names(data: Any) -> set[str]:
    names = {"config", *KEYS, *SECTIONS}
    if isinstance(data, dict):
        names.update(k if type(k) is str else repr(k) for k in data)
        for section in SECTIONS:
            if isinstance(data.get(section), dict):
                names.update("%s.%s" % (section, k) for k in data[section])
    return names


class ColumnConfigHarness(Harness[bytes]):
    def __init__(self, workdir: Path) -> None:
        self.path = str(workdir / "column.json")

    def run(self, value: bytes) -> str | None:
        with open(self.path, "wb") as f:
            f.write(value)
        cfg, errors = config.load_config(self.path)
        if not isinstance(cfg, dict) or not isinstance(errors, list) or \
                not all(isinstance(e, str) for e in errors):
            raise Finding("load_config returned %r, %r" % (type(cfg).__name__, type(errors).__name__))
        for key, v in cfg.items():  # the cleaned dict: only values that passed their own check
            if isinstance(v, dict) and key in SECTIONS:
                bad = [k for k, sv in v.items() if not _value_ok(key + "." + k, sv)]
                if bad:
                    raise Finding("cleaned config keeps a bad %s.%s = %r" % (key, bad[0], v[bad[0]]))
            elif key not in ("meter", "link") and not _value_ok(key, v):
                raise Finding("cleaned config keeps a bad %s = %r" % (key, v))
        if not errors:
            check_accepted(cfg)
            return None
        try:
            data = json.loads(value)
        except (ValueError, RecursionError):
            data = None
        names = allowed_names(data)
        for err in errors:
            if not any(err.startswith(name + ": ") and len(err) > len(name) + 2 for name in names):
                raise Finding("error does not name a key: %r" % err[:200])
        return "\n".join(errors)


def _dumps(cfg: dict[str, Any]) -> bytes:
    return json.dumps(cfg).encode()  # what firmware/config.save_config writes


class ColumnConfigTarget(Target[bytes]):
    name = "column-config"
    about = "firmware/config.py load_config on mutated column.json"

    def seeds(self) -> list[bytes]:
        example = json.loads((REPO / "examples" / "column.json").read_text())
        out = [_dumps(example)]
        for mode, extra in (("modbus-tcp", {"tcp_port": 502}), ("cbor-serial", {"baud": 115200}),
                            ("cbor-tcp", {"tcp_port": 7301, "host": "0.0.0.0"})):
            cfg = dict(example, link=dict(mode=mode, **extra))
            out.append(_dumps(cfg))
        full = dict(example, hardware_rating_a=80, installation_rating_a=80, failsafe_a=0,
                    meter={"type": "sdm120", "address": 247, "baud": 115200}, overdraw_offset_a=0.5,
                    overdraw_tolerance_pct=10, overdraw_grace_s=7, meter_stale_s=5, energy_quantum_wh=10,
                    energy_quantum_s=60, cp_debounce_ms=40, pwm_min_change_interval_s=5,
                    contactor_feedback_ms=300, phases=1)
        out.append(_dumps(full))
        out.append(json.dumps(example, indent=2).encode())
        return out

    def mutate(self, rng: random.Random, value: bytes, corpus: Sequence[bytes]) -> bytes:
        r = rng.random()
        if r < 0.55:
            try:
                data = json.loads(value)
            except (ValueError, RecursionError):
                return mutate.mutate_bytes(rng, value)
            for _ in range(1 + int(rng.random() ** 2 * 3)):
                data = mutate.mutate_tree(rng, data, KEYS + SECTIONS)
            try:
                return json.dumps(data).encode()  # NaN and Infinity come out as such: CPython reads them
            except (ValueError, RecursionError):
                return value
        if r < 0.9:
            return mutate.mutate_bytes(rng, value)
        if r < 0.95:
            return mutate.splice(rng, value, rng.choice(corpus))
        return mutate.deep_json(rng, rng.choice((20, 500, 5000, 100000))).encode()

    def harness(self, workdir: Path) -> Harness[bytes]:
        return ColumnConfigHarness(workdir)


TARGET = ColumnConfigTarget()
