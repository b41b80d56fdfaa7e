"""Site config: the [site], [circuits], [[columns]], [buses], [meter] and [allocation] tables.

``check_site(doc)`` validates a dict (from ``tomllib``) and collects every problem as a
``ConfigIssue`` naming the key path ("circuits.feeder2.parent: unknown circuit 'x'"); it never
raises. ``parse_site`` raises one ``SiteConfigError`` carrying the whole list. Other top-level
tables (mqtt, dno, ...) are left to their own loaders: the top-level loader combines the lists.

Decisions: a circuit or column rated above its parent is allowed (the parent still binds in the
allocation) but warned about; an installation rating above the hardware rating is warned about
and the lower one wins. Column indexes in paths are 0-based, as in the TOML array.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.core.site import (
    MIN_CURRENT_A,
    PHASE_NAMES,
    SITE_NODE,
    AllocationSettings,
    CborSerialLink,
    CborTcpLink,
    Circuit,
    Column,
    Link,
    ModbusRtuLink,
    ModbusTcpLink,
    PhaseCurrents,
    SerialBus,
    Site,
    SiteMeter,
)

SITE_SECTIONS = ("site", "circuits", "columns", "buses", "meter", "allocation")
LINK_KINDS = ("modbus-rtu", "modbus-tcp", "cbor-serial", "cbor-tcp")
METER_KINDS = ("sdm630",)
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # safe in MQTT topics and file names
_LINK_KEYS = {
    "modbus-rtu": ("bus", "address"),
    "modbus-tcp": ("host", "port", "unit"),
    "cbor-serial": ("device", "baud"),
    "cbor-tcp": ("host", "port"),
}
_MAX_DELAY_S = 1800.0


@dataclass(frozen=True)
class ConfigIssue:
    path: str
    message: str

    def __str__(self) -> str:
        return self.path + ": " + self.message


class SiteConfigError(Exception):
    """The config is unusable; ``errors`` lists every problem found, not just the first."""

    def __init__(self, errors: list[ConfigIssue]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


@dataclass(frozen=True)
class SiteCheck:
    site: Site | None  # None when there are errors
    errors: tuple[ConfigIssue, ...]
    warnings: tuple[ConfigIssue, ...]


@dataclass
class _Reader:
    """Typed getters that record a problem and return None instead of raising."""

    errors: list[ConfigIssue] = field(default_factory=list)
    warnings: list[ConfigIssue] = field(default_factory=list)
    # ("bus"|"circuit", name) declared in the file but invalid: already reported, so a
    # column that names one gets no second, misleading "unknown" error.
    broken: set[tuple[str, str]] = field(default_factory=set)

    def error(self, path: str, message: str) -> None:
        self.errors.append(ConfigIssue(path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(ConfigIssue(path, message))

    def table(self, value: Any, path: str, known: tuple[str, ...]) -> Mapping[str, Any] | None:
        if not isinstance(value, Mapping):
            self.error(path, "expected a table, got " + _kind(value))
            return None
        for key in value:
            if key not in known:
                self.error(_join(path, str(key)), "unknown key (expected one of: " + ", ".join(known) + ")")
        return value

    def text(self, t: Mapping[str, Any], key: str, path: str, *, default: str | None = None,
             choices: tuple[str, ...] | None = None, ident: bool = False) -> str | None:
        p = _join(path, key)
        if key not in t:
            if default is None:
                self.error(p, "missing")
            return default
        value = t[key]
        if not isinstance(value, str) or not value:
            self.error(p, "expected a non-empty string, got " + _kind(value))
            return None
        if choices is not None and value not in choices:
            self.error(p, "must be one of " + ", ".join(choices) + ", got '" + value + "'")
            return None
        if ident and not _ID_RE.match(value):
            self.error(p, "'" + value + "' is not a valid id (letters, digits, '_', '-', '.'; max 64)")
            return None
        return value

    def number(self, t: Mapping[str, Any], key: str, path: str, lo: float, hi: float, *,
               default: float | None = None, required: bool = True, integer: bool = False,
               lo_open: bool = False) -> float | None:
        p = _join(path, key)
        if key not in t:
            if default is None and required:
                self.error(p, "missing")
            return default
        return self.check_number(t[key], p, lo, hi, integer=integer, lo_open=lo_open)

    def check_number(self, value: Any, p: str, lo: float, hi: float, *, integer: bool = False,
                     lo_open: bool = False) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.error(p, "expected a number, got " + _kind(value))
            return None
        if integer and not isinstance(value, int):
            self.error(p, "expected an integer, got " + repr(value))
            return None
        if not math.isfinite(value):
            self.error(p, "must be a finite number, got " + repr(value))
            return None
        if value < lo or value > hi or (lo_open and value == lo):
            low = "above " if lo_open else "from "
            self.error(p, "must be " + low + _fmt(lo) + " to " + _fmt(hi) + ", got " + _fmt(value))
            return None
        return value

    def per_phase(self, t: Mapping[str, Any], key: str, path: str) -> PhaseCurrents | None:
        """A rating: one number for all three phases, or a list [L1, L2, L3]."""
        p = _join(path, key)
        if key not in t:
            self.error(p, "missing")
            return None
        value = t[key]
        if isinstance(value, list):
            if len(value) != 3:
                self.error(p, "expected 3 values (L1, L2, L3), got " + str(len(value)))
                return None
            got = [self.check_number(v, p + "[" + str(i) + "]", 0.0, 10000.0, lo_open=True)
                   for i, v in enumerate(value)]
            if any(g is None for g in got):
                return None
            return (float(got[0] or 0), float(got[1] or 0), float(got[2] or 0))
        one = self.check_number(value, p, 0.0, 10000.0, lo_open=True)
        return None if one is None else (float(one), float(one), float(one))

    def boolean(self, t: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        if key not in t:
            return default
        if not isinstance(t[key], bool):
            self.error(_join(path, key), "expected true or false, got " + _kind(t[key]))
            return default
        return bool(t[key])


def _join(path: str, key: str) -> str:
    return key if not path else path + "." + key


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__ + " " + repr(value)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def check_site(doc: Mapping[str, Any]) -> SiteCheck:
    """Validate the site part of a config document; collect every error and warning."""
    r = _Reader()
    site_t = None
    if "site" not in doc:
        r.error("site", "missing table [site]")
    else:
        site_t = r.table(doc["site"], "site", ("id", "capacity_a", "voltage_v", "dno_failsafe_a",
                                               "dno_failsafe_duration_s"))
    site_id = capacity = failsafe = duration = None
    voltage: float | None = 230.0
    if site_t is not None:
        site_id = r.text(site_t, "id", "site", ident=True)
        capacity = r.per_phase(site_t, "capacity_a", "site")
        voltage = r.number(site_t, "voltage_v", "site", 100.0, 480.0, default=230.0)
        failsafe = r.number(site_t, "dno_failsafe_a", "site", 0.0, 10000.0, required=False)
        duration = r.number(site_t, "dno_failsafe_duration_s", "site", 0.0, 7 * 86400.0,
                            required=False, lo_open=True)
        if "dno_failsafe_a" not in site_t:
            r.warn("site.dno_failsafe_a", "not set: DNO limits that expire while the DNO link is down "
                   "fall back to the connection capacity")
        elif failsafe is not None and capacity is not None and failsafe > max(capacity):
            r.warn("site.dno_failsafe_a", "above the connection capacity: it never binds")
    buses = _buses(r, doc.get("buses", {}))
    circuits = _circuits(r, doc.get("circuits", {}), capacity)
    meter = _meter(r, doc["meter"], buses) if "meter" in doc else None
    columns = _columns(r, doc.get("columns", []), circuits, buses, meter=meter, capacity=capacity)
    allocation = _allocation(r, doc.get("allocation", {}))
    used = {c.link.bus for c in columns if isinstance(c.link, ModbusRtuLink)}
    if meter is not None and isinstance(meter.link, ModbusRtuLink):
        used.add(meter.link.bus)
    for name in buses:
        if name not in used:
            r.warn("buses." + name, "no column or meter uses this bus")
    if r.errors or site_id is None or capacity is None or voltage is None or allocation is None:
        return SiteCheck(None, tuple(r.errors), tuple(r.warnings))
    site = Site(id=site_id, capacity_a=capacity, circuits=circuits, columns=tuple(columns),
                voltage_v=float(voltage), dno_failsafe_a=failsafe, dno_failsafe_duration_s=duration,
                buses=buses, meter=meter, allocation=allocation)
    return SiteCheck(site, (), tuple(r.warnings))


def parse_site(doc: Mapping[str, Any]) -> Site:
    """The site from a config document, or ``SiteConfigError`` with every problem."""
    check = check_site(doc)
    if check.site is None:
        raise SiteConfigError(list(check.errors))
    return check.site


def load_site_file(path: str | Path) -> Site:
    """Read a TOML file and parse its site part; unreadable or malformed files become errors too."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise SiteConfigError([ConfigIssue(str(path), "cannot read: " + reason)]) from None
    except tomllib.TOMLDecodeError as exc:
        raise SiteConfigError([ConfigIssue(str(path), "not valid TOML: " + str(exc))]) from None
    except UnicodeDecodeError as exc:   # TOML is UTF-8; tomllib lets the decode error through
        raise SiteConfigError([ConfigIssue(str(path), "not valid TOML: not UTF-8 text (byte "
                                           + str(exc.start) + ")")]) from None
    return parse_site(doc)


def _buses(r: _Reader, raw: Any) -> dict[str, SerialBus]:
    buses: dict[str, SerialBus] = {}
    table = r.table(raw, "buses", tuple(raw) if isinstance(raw, Mapping) else ())
    for name, value in (table or {}).items():
        path = "buses." + str(name)
        if not _ID_RE.match(str(name)):
            r.error(path, "'" + str(name) + "' is not a valid bus name")
        t = r.table(value, path, ("device", "baud", "parity", "stopbits"))
        if t is None:
            r.broken.add(("bus", str(name)))
            continue
        device = r.text(t, "device", path)
        baud = r.number(t, "baud", path, 1200, 921600, default=9600, integer=True)
        parity = r.text(t, "parity", path, default="N", choices=("N", "E", "O"))
        stop = r.number(t, "stopbits", path, 1, 2, default=1, integer=True)
        if device is not None and baud is not None and parity is not None and stop is not None:
            buses[str(name)] = SerialBus(str(name), device, int(baud), parity, int(stop))
        else:
            r.broken.add(("bus", str(name)))
    return buses


def _circuits(r: _Reader, raw: Any, capacity: PhaseCurrents | None) -> dict[str, Circuit]:
    circuits: dict[str, Circuit] = {}
    table = r.table(raw, "circuits", tuple(raw) if isinstance(raw, Mapping) else ())
    for cid, value in (table or {}).items():
        path = "circuits." + str(cid)
        if cid == SITE_NODE:
            r.error(path, "'site' is reserved for the connection itself")
            continue
        if not _ID_RE.match(str(cid)):
            r.error(path, "'" + str(cid) + "' is not a valid circuit id")
            continue
        t = r.table(value, path, ("rating_a", "parent"))
        if t is None:
            r.broken.add(("circuit", str(cid)))
            continue
        rating = r.per_phase(t, "rating_a", path)
        parent = r.text(t, "parent", path, default=SITE_NODE)
        if rating is not None and parent is not None:
            circuits[str(cid)] = Circuit(str(cid), rating, parent)
        else:
            r.broken.add(("circuit", str(cid)))
    bad: set[str] = set()
    for cid, circuit in circuits.items():
        if circuit.parent != SITE_NODE and circuit.parent not in circuits:
            if ("circuit", circuit.parent) not in r.broken:
                r.error("circuits." + cid + ".parent", "unknown circuit '" + circuit.parent + "'")
            bad.add(cid)
    for cid, circuit in circuits.items():
        seen = [cid]
        node = circuit.parent
        while node != SITE_NODE and node in circuits and node not in seen:
            seen.append(node)
            node = circuits[node].parent
        if node == cid:
            r.error("circuits." + cid + ".parent", "circuits form a cycle: " + " -> ".join([*seen, cid]))
            bad.add(cid)
    for cid, circuit in circuits.items():
        if cid in bad:
            continue
        parent_rating = capacity if circuit.parent == SITE_NODE else circuits[circuit.parent].rating_a
        if parent_rating is not None and any(a > b for a, b in zip(circuit.rating_a, parent_rating,
                                                                   strict=True)):
            r.warn("circuits." + cid + ".rating_a", "above its parent '" + circuit.parent + "': "
                   "allowed, the parent's rating still binds")
    return circuits  # bad ones included: columns on them should not get a second, misleading error


def _link(r: _Reader, t: Mapping[str, Any], path: str, kinds: tuple[str, ...],
          buses: Mapping[str, SerialBus]) -> Link | None:
    kind = r.text(t, "link", path, choices=kinds)
    if kind is None:
        return None
    for other, keys in _LINK_KEYS.items():
        for key in keys:
            if other != kind and key not in _LINK_KEYS[kind] and key in t:
                r.error(_join(path, key), "not used by link '" + kind + "'")
    if kind == "modbus-rtu":
        bus = r.text(t, "bus", path)
        address = r.number(t, "address", path, 1, 247, integer=True)
        if bus is not None and bus not in buses:
            if ("bus", bus) not in r.broken:
                r.error(_join(path, "bus"), "unknown bus '" + bus + "' (define it under [buses." + bus + "])")
            return None
        return None if bus is None or address is None else ModbusRtuLink(bus, int(address))
    if kind in ("modbus-tcp", "cbor-tcp"):
        host = r.text(t, "host", path)
        port = r.number(t, "port", path, 1, 65535, default=502 if kind == "modbus-tcp" else None,
                        integer=True)
        if kind == "cbor-tcp":
            return None if host is None or port is None else CborTcpLink(host, int(port))
        unit = r.number(t, "unit", path, 0, 255, default=1, integer=True)
        return None if host is None or port is None or unit is None else ModbusTcpLink(host, int(port),
                                                                                      int(unit))
    device = r.text(t, "device", path)
    baud = r.number(t, "baud", path, 1200, 3000000, default=115200, integer=True)
    return None if device is None or baud is None else CborSerialLink(device, int(baud))


def _meter(r: _Reader, raw: Any, buses: Mapping[str, SerialBus]) -> SiteMeter | None:
    known = ("kind", "link", "stale_s", *_LINK_KEYS["modbus-rtu"], *_LINK_KEYS["modbus-tcp"],
             *_LINK_KEYS["cbor-serial"])
    t = r.table(raw, "meter", known)
    if t is None:
        return None
    kind = r.text(t, "kind", "meter", default="sdm630", choices=METER_KINDS)
    stale = r.number(t, "stale_s", "meter", 1.0, 3600.0, default=10.0)
    link = _link(r, t, "meter", ("modbus-rtu", "modbus-tcp"), buses)
    if kind is None or stale is None or not isinstance(link, ModbusRtuLink | ModbusTcpLink):
        return None
    return SiteMeter(kind, link, float(stale))


_COLUMN_KEYS = ("id", "circuit", "phases", "rotation", "hardware_a", "installation_a", "link",
                "bus", "address", "host", "port", "unit", "device", "baud")


def _rotation(r: _Reader, t: Mapping[str, Any], path: str, phases: int) -> tuple[int, ...] | None:
    default = "L1L2L3" if phases == 3 else "L1"
    text = r.text(t, "rotation", path, default=default)
    if text is None:
        return None
    names = [text[i:i + 2] for i in range(0, len(text), 2)]
    idx = [PHASE_NAMES.index(n) for n in names if n in PHASE_NAMES]
    if len(text) != 2 * phases or len(idx) != phases or len(set(idx)) != phases:
        want = "three distinct phases such as 'L1L2L3' or 'L2L3L1'" if phases == 3 else \
            "one phase: 'L1', 'L2' or 'L3'"
        r.error(_join(path, "rotation"), "'" + text + "' for a " + str(phases) + "-phase column: expected " +
                want)
        return None
    return tuple(idx)


def _columns(r: _Reader, raw: Any, circuits: Mapping[str, Circuit], buses: Mapping[str, SerialBus], *,
             meter: SiteMeter | None, capacity: PhaseCurrents | None) -> list[Column]:
    if not isinstance(raw, list):
        r.error("columns", "expected an array of tables [[columns]], got " + _kind(raw))
        return []
    columns: list[Column] = []
    ids: dict[str, int] = {}
    endpoints: dict[tuple[Any, ...], str] = {}
    if meter is not None:
        endpoints[_endpoint(meter.link)] = "meter"
    for i, value in enumerate(raw):
        path = "columns[" + str(i) + "]"
        t = r.table(value, path, _COLUMN_KEYS)
        if t is None:
            continue
        cid = r.text(t, "id", path, ident=True)
        if cid is not None:
            if cid in ids:
                r.error(path + ".id", "duplicate column id '" + cid + "' (also columns["
                        + str(ids[cid]) + "])")
            ids.setdefault(cid, i)
        circuit = r.text(t, "circuit", path, default=SITE_NODE)
        if circuit is not None and circuit != SITE_NODE and circuit not in circuits:
            if ("circuit", circuit) not in r.broken:
                r.error(path + ".circuit", "unknown circuit '" + circuit + "'")
            circuit = None
        phases = r.number(t, "phases", path, 1, 3, default=3, integer=True)
        if phases is not None and phases not in (1, 3):
            r.error(path + ".phases", "must be 1 or 3, got " + _fmt(phases))
            phases = None
        rotation = _rotation(r, t, path, int(phases)) if phases is not None else None
        hardware = r.number(t, "hardware_a", path, MIN_CURRENT_A, 80.0)
        installation = r.number(t, "installation_a", path, MIN_CURRENT_A, 80.0, default=hardware,
                                required=False)
        if hardware is not None and installation is not None and installation > hardware:
            r.warn(path + ".installation_a", "above hardware_a: the hardware rating binds")
        link = _link(r, t, path, LINK_KINDS, buses)
        if link is not None:
            key = _endpoint(link)
            if key in endpoints:
                r.error(path + "." + _endpoint_field(link),
                        _endpoint_text(link) + " (also " + endpoints[key] + ")")
            endpoints.setdefault(key, path)
        if None in (cid, circuit, phases, rotation, hardware, installation, link):
            continue
        assert cid is not None and circuit is not None and rotation is not None and link is not None
        col = Column(cid, circuit, int(phases or 0), rotation, float(hardware or 0),
                     float(installation or 0), link)
        rating = circuits[circuit].rating_a if circuit != SITE_NODE else capacity
        if rating is not None and any(col.max_a > rating[p] for p in rotation):
            r.warn(path + ".hardware_a", "column rating above its circuit '" + circuit + "': allowed, "
                   "the circuit rating binds")
        columns.append(col)
    return columns


def _endpoint(link: Link) -> tuple[Any, ...]:
    if isinstance(link, ModbusRtuLink):
        return ("rtu", link.bus, link.address)
    if isinstance(link, ModbusTcpLink):
        return ("tcp", link.host, link.port, link.unit)
    if isinstance(link, CborSerialLink):
        return ("serial", link.device)
    return ("tcp", link.host, link.port)


def _endpoint_field(link: Link) -> str:
    return {"modbus-rtu": "address", "modbus-tcp": "unit", "cbor-serial": "device"}.get(link.kind, "port")


def _endpoint_text(link: Link) -> str:
    if isinstance(link, ModbusRtuLink):
        return "duplicate bus address " + str(link.address) + " on bus '" + link.bus + "'"
    if isinstance(link, ModbusTcpLink):
        return "duplicate Modbus TCP endpoint " + link.host + ":" + str(link.port) + " unit " + str(link.unit)
    if isinstance(link, CborSerialLink):
        return "duplicate serial device '" + link.device + "'"
    return "duplicate TCP endpoint " + link.host + ":" + str(link.port)


def _allocation(r: _Reader, raw: Any) -> AllocationSettings | None:
    d = AllocationSettings()
    t = r.table(raw, "allocation", ("increase_delay_max_s", "dno_restore_without_delay", "min_pause_s",
                                    "rotation_s", "reclaim_margin_a", "reclaim_settle_s",
                                    "overdraw_grace_s"))
    if t is None:
        return None
    p = "allocation"
    values = (
        r.number(t, "increase_delay_max_s", p, 0.0, _MAX_DELAY_S, default=d.increase_delay_max_s),
        r.number(t, "min_pause_s", p, 0.0, 3600.0, default=d.min_pause_s),
        r.number(t, "rotation_s", p, 0.0, 86400.0, default=d.rotation_s),
        r.number(t, "reclaim_margin_a", p, 0.5, 16.0, default=d.reclaim_margin_a),
        r.number(t, "reclaim_settle_s", p, 0.0, 3600.0, default=d.reclaim_settle_s),
        r.number(t, "overdraw_grace_s", p, 1.0, 600.0, default=d.overdraw_grace_s),
    )
    restore = r.boolean(t, "dno_restore_without_delay", p, d.dno_restore_without_delay)
    if any(v is None for v in values):
        return None
    delay, pause, rotation, margin, settle, grace = (float(v or 0) for v in values)
    return AllocationSettings(delay, restore, pause, rotation, margin, settle, grace)
