"""site-config: the gateway's site file loader (gateway/config.py load_config) on mutated TOML.

Input: the bytes of a site.toml, loaded from a folder holding the secret files it names
(so that [mqtt] and [dno] get past their file checks). Properties: load_config returns a
GatewayConfig or raises ConfigError whose `errors` are non-empty "key.path: problem" lines;
nothing else escapes (a TOML parser error, a bad number or a datetime where a number
belongs included); a config it accepts has every column within 6..80 A.
"""

from __future__ import annotations

import os
import random
import re
import zlib
from collections.abc import Sequence
from pathlib import Path

from fuzz import mutate
from fuzz.engine import REPO, Finding, Harness, Target
from gateway.config import KNOWN_SECTIONS, ConfigError, load_config
from gateway.core.site_config import ConfigIssue, SiteConfigError, load_site_file
from hil.rig.site_files import toml_text, write_secrets

_VALUE = re.compile(rb"=[ \t]*([^\n#]*)")
# TOML values of every type and at the edges of the checks; a datetime, inline tables,
# numbers TOML reads as inf/nan or as ints beyond 64 bits (a TOML error).
HOSTILE_TOML = (
    b"0", b"-1", b"6", b"5.99", b"80", b"80.5", b"81", b"1e400", b"-1e400", b"nan", b"inf", b"-inf", b"+nan",
    b"99999999999999999999", b"9223372036854775807", b"-9223372036854775808", b"0x7fffffff", b"0o777",
    b"0b101", b"1_000", b"true", b"false", b'""', b'"x"', b"'..'", b'"c01"', b'"/dev/null"', b'"L1L1L1"',
    b'"L4"', b"[]", b"[1, 2]", b"[0, 0, 0]", b"[1, 2, 3, 4]", b'["a"]', b"[[1]]", b"{}", b"{ a = 1 }",
    b"1979-05-27T07:32:00Z", b"07:32:00", b"1979-05-27", b'"""multi\nline"""', b"'''lit'''",
    b'"\\u0000"', b'"\\uD800"', b'"' + b"x" * 300 + b'"')
HEADERS = (*(b"[%s]" % s.encode() for s in KNOWN_SECTIONS),
           b"[[columns]]", b"[[site]]", b"[columns]", b"[circuits.x]", b"[circuits.site]", b"[buses.b]",
           b"[mqtt.tls]", b"[mqtt.outbox]", b"[mqqt]", b"[site.id]", b"[buses.rs485-a.x]", b"[[buses]]")
KEY = bytes(range(16, 48))


def _demo_site() -> dict[str, object]:
    """A second seed written with the rigs' own TOML writer (hil/rig/site_files.py)."""
    return {
        "site": {"id": "fuzz-site", "capacity_a": [63, 63, 50], "voltage_v": 230, "dno_failsafe_a": 25,
                 "dno_failsafe_duration_s": 3600},
        "circuits": {"f1": {"rating_a": 40}, "f2": {"rating_a": [32, 32, 25], "parent": "f1"}},
        "buses": {"b1": {"device": "/dev/ttyUSB0", "baud": 9600, "parity": "E", "stopbits": 1}},
        "meter": {"kind": "sdm630", "link": "modbus-tcp", "host": "10.0.0.9", "port": 502, "unit": 1},
        "allocation": {"increase_delay_max_s": 0, "dno_restore_without_delay": True, "min_pause_s": 60},
        "columns": [
            {"id": "a1", "circuit": "f2", "phases": 1, "rotation": "L2", "hardware_a": 16,
             "link": "modbus-rtu", "bus": "b1", "address": 1},
            {"id": "a2", "phases": 3, "hardware_a": 32, "installation_a": 20, "link": "cbor-tcp",
             "host": "10.0.0.2", "port": 7000},
            {"id": "a3", "phases": 3, "rotation": "L3L1L2", "hardware_a": 80, "link": "cbor-serial",
             "device": "/dev/ttyS1"},
        ],
        "mqtt": {"host": "localhost", "protocol": "3.1.1", "username": "u",
                 "password_file": "secrets/mqtt-password",
                 "outbox": {"path": "outbox.sqlite3", "durability": "normal"}},
        "dno": {"keys_file": "secrets/dno-keys", "audit_path": "audit.jsonl", "window_s": 60},
        "gateway": {"control_interval_s": 0.5, "telemetry_interval_s": 5, "limit_validity_s": 30},
    }


def _small_site() -> dict[str, object]:
    """The least a site file needs: most inputs start from it (parsing is most of the cost)."""
    return {
        "site": {"id": "s", "capacity_a": 40},
        "columns": [{"id": "c", "hardware_a": 16, "link": "cbor-tcp", "host": "h", "port": 1}],
        "mqtt": {"host": "b", "outbox": {"path": "o"}},
        "dno": {"keys_env": "EVEDGE_FUZZ_KEYS", "audit_path": "a"},
    }


def example_data() -> bytes:
    """examples/site.toml without its comments: the same site, a third of the parsing (the
    comments are two thirds of the file, and TOML comments are not the gateway's code)."""
    text = (REPO / "examples" / "site.toml").read_bytes()
    lines = [line.split(b"#")[0].rstrip() for line in text.split(b"\n")]   # (no '#' inside its values)
    return b"\n".join(line for line in lines if line) + b"\n"


def _lines(value: bytes) -> list[bytes]:
    return value.split(b"\n")


def mutate_toml(rng: random.Random, value: bytes, corpus: Sequence[bytes]) -> bytes:
    r = rng.random()
    lines = _lines(value)
    if r < 0.45:   # one value replaced
        spots = [i for i, line in enumerate(lines) if _VALUE.search(line)]
        if spots:
            i = rng.choice(spots)
            m = _VALUE.search(lines[i])
            assert m is not None
            new = rng.choice(HOSTILE_TOML) if rng.random() < 0.8 else mutate.mutate_bytes(rng, m.group(1))
            lines[i] = lines[i][:m.start(1)] + new + lines[i][m.end(1):]
            return b"\n".join(lines)
    if r < 0.6 and lines:   # a line dropped, doubled, moved or its key renamed
        i = rng.randrange(len(lines))
        k = rng.randrange(4)
        if k == 0:
            del lines[i]
        elif k == 1:
            lines.insert(i, lines[i])
        elif k == 2:
            lines.insert(rng.randrange(len(lines) + 1), lines.pop(i))
        else:
            lines[i] = rng.choice(HEADERS) if rng.random() < 0.5 else b"x_" + lines[i]
        return b"\n".join(lines)
    if r < 0.93:
        return mutate.mutate_bytes(rng, value, max_len=16384)
    return mutate.splice(rng, value, rng.choice(corpus))


class SiteConfigHarness(Harness[bytes]):
    def __init__(self, workdir: Path) -> None:
        self.folder = workdir / "site"
        write_secrets(self.folder, KEY, password="fuzz-password")
        os.environ["EVEDGE_FUZZ_KEYS"] = "k1:" + KEY.hex()   # the small seed's keys_env
        self.path = self.folder / "site.toml"

    def run(self, value: bytes) -> str | None:
        self.path.write_bytes(value)
        if zlib.crc32(value) % 4 == 0:   # the site part alone (the failsafe planner's loader), now and then
            try:
                load_site_file(self.path)
            except SiteConfigError as exc:
                if not exc.errors or not all(isinstance(e, ConfigIssue) and e.path and e.message
                                             for e in exc.errors):
                    raise Finding("SiteConfigError without named problems: %r" % (exc.errors,)) from None
        try:
            config = load_config(self.path)
        except ConfigError as exc:
            errors = exc.errors
            if not isinstance(errors, list) or not errors:
                raise Finding("ConfigError without errors: %r" % (errors,)) from None
            for err in errors:
                if not isinstance(err, str) or ": " not in err or err.startswith(": "):
                    raise Finding("error line does not name a key: %r" % (err,)) from None
            return "\n".join(errors)
        for col in config.site.columns:
            if not 6 <= col.max_a <= 80:
                raise Finding("accepted column %s rated %r A" % (col.id, col.max_a))
        return None


class SiteConfigTarget(Target[bytes]):
    name = "site-config"
    about = "gateway/config.py load_config (site, circuits, columns, mqtt, dno) on mutated TOML"

    def seeds(self) -> list[bytes]:
        small = toml_text(_small_site()).encode()
        return [example_data(), toml_text(_demo_site()).encode(), small,
                small.replace(b"cbor-tcp", b"modbus-tcp")]

    def mutate(self, rng: random.Random, value: bytes, corpus: Sequence[bytes]) -> bytes:
        for _ in range(1 + int(rng.random() ** 3 * 3)):
            value = mutate_toml(rng, value, corpus)
        return value

    def harness(self, workdir: Path) -> Harness[bytes]:
        return SiteConfigHarness(workdir)


TARGET = SiteConfigTarget()
