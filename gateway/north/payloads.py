"""JSON payloads of the MQTT API, and the reason codes every command decision carries.

Defined once here and imported by the topic tree, the authenticator, the audit log and
the service. Field names carry their unit (`_a`, `_v`, `_w`, `_wh`, `_ms`, `_s`). Every
message the gateway publishes has `ts_ms` (UTC milliseconds) and `seq` (the gateway's
sequence number, stamped by the outbox when the message is queued: see outbox.py).

Outgoing messages are described by one field table per message type (`SPECS`): the
builders check their input against it (a NaN never leaves the gateway) and `validate`
checks a decoded message against it (consumers and tests). Incoming commands are parsed
by `decode_json` + `parse_command`, which raise `PayloadError` with a distinct reason.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from firmware.status_names import CP_NAMES, ERROR_NAMES, LIMIT_SOURCE_NAMES, STATUS_NAMES


class Reason(StrEnum):
    """Why a command was accepted or rejected: the `reason` of an ack and of an audit line."""

    OK = "ok"
    BAD_JSON = "bad_json"                # not UTF-8, not a JSON object, duplicate keys, too large
    NOT_FINITE = "not_finite"            # NaN, Infinity or a number that overflows a double
    MISSING_FIELD = "missing_field"
    UNKNOWN_FIELD = "unknown_field"
    BAD_TYPE = "bad_type"                # wrong JSON type, including true/false for a number
    BAD_FIELD = "bad_field"              # right type, wrong shape: id charset, conflicting fields
    OUT_OF_RANGE = "out_of_range"        # negative, above capacity, validity too long
    UNKNOWN_TOPIC = "unknown_topic"
    WRONG_SITE = "wrong_site"            # a command topic for another site
    UNKNOWN_COLUMN = "unknown_column"
    UNAUTHENTICATED = "unauthenticated"  # no key_id or sig
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    STALE = "stale"                      # issued_ms older than the timestamp window
    FUTURE = "future"                    # issued_ms ahead of the timestamp window
    EXPIRED = "expired"                  # the validity is already over
    REPLAYED = "replayed"                # (key_id, id) seen inside the window
    BUSY = "busy"                        # replay memory full: refuse rather than forget
    INTERNAL_ERROR = "internal_error"


class PayloadError(ValueError):
    """A payload was refused; `reason` is what the ack says, `detail` names the field."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def utc_ms() -> int:
    """Wall-clock UTC milliseconds, the `ts_ms` of every message."""
    return time.time_ns() // 1_000_000


# -- encoding ----------------------------------------------------------------------------

MAX_COMMAND_BYTES = 4096
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")  # command and key ids
_MAX_STR = 256


def encode(payload: Mapping[str, Any]) -> bytes:
    """Compact JSON, UTF-8; refuses NaN/Infinity rather than writing non-JSON."""
    return _ENCODER.encode(payload).encode()


# json.dumps() with options builds an encoder per call: a third of the cost of a telemetry message.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonFinite(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NonFinite(text)
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PayloadError(Reason.BAD_JSON, f"duplicate key {key[:64]!r}")
        out[key] = value
    return out


def decode_json(data: bytes | str, *, max_bytes: int = MAX_COMMAND_BYTES) -> dict[str, Any]:
    """Strict JSON object: UTF-8, no duplicate keys, no NaN/Infinity, at most max_bytes."""
    if len(data) > max_bytes:
        raise PayloadError(Reason.BAD_JSON, f"payload larger than {max_bytes} bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes | bytearray) else data
        obj = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                         object_pairs_hook=_unique_keys)
    except _NonFinite as exc:
        raise PayloadError(Reason.NOT_FINITE, f"non-finite number {str(exc)[:32]}") from None
    except PayloadError:
        raise
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise PayloadError(Reason.BAD_JSON, f"not JSON: {type(exc).__name__}") from None
    if not isinstance(obj, dict):
        raise PayloadError(Reason.BAD_JSON, "not a JSON object")
    return obj


def decode(data: bytes | str) -> dict[str, Any]:
    """Decode a message the gateway published (no size limit beyond sanity)."""
    return decode_json(data, max_bytes=1 << 20)


# -- field checks ------------------------------------------------------------------------

Check = Callable[[str, Any], None]


def is_number(value: Any) -> bool:
    """A JSON number: int or float, but not bool (True is an int in Python)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(name: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    kind = type(value)   # exact float/int first: every telemetry message checks a dozen numbers
    if kind is float:
        finite = math.isfinite(value)
    elif kind is int:
        finite = abs(value) <= _FLOAT_MAX
    elif is_number(value):
        # (an int beyond a double's range would overflow math.isfinite: it is not finite as a double)
        finite = math.isfinite(value) if isinstance(value, float) else abs(value) <= _FLOAT_MAX
    else:
        raise PayloadError(Reason.BAD_TYPE, f"{name} must be a number")
    if not finite:
        raise PayloadError(Reason.NOT_FINITE, f"{name} must be finite")
    if lo is not None and value < lo:
        raise PayloadError(Reason.OUT_OF_RANGE, f"{name} must be >= {lo}")
    if hi is not None and value > hi:
        raise PayloadError(Reason.OUT_OF_RANGE, f"{name} must be <= {hi}")
    return float(value)


_FLOAT_MAX = sys.float_info.max


def _integer(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise PayloadError(Reason.BAD_TYPE, f"{name} must be an integer")
    _number(name, value, lo, hi)
    return value


def num(lo: float | None = None, hi: float | None = None) -> Check:
    def check(name: str, value: Any) -> None:
        _number(name, value, lo, hi)
    return check


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(name: str, value: Any) -> None:
        _integer(name, value, lo, hi)
    return check


def boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise PayloadError(Reason.BAD_TYPE, f"{name} must be true or false")


def one_of(names: Sequence[str]) -> Check:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, str):
            raise PayloadError(Reason.BAD_TYPE, f"{name} must be a string")
        if value not in names:
            raise PayloadError(Reason.BAD_FIELD, f"{name} must be one of {', '.join(names)}")
    return check


def text(max_len: int = _MAX_STR) -> Check:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, str):
            raise PayloadError(Reason.BAD_TYPE, f"{name} must be a string")
        if len(value) > max_len:
            raise PayloadError(Reason.OUT_OF_RANGE, f"{name} longer than {max_len}")
    return check


def ident(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise PayloadError(Reason.BAD_TYPE, f"{name} must be a string")
    if not ID_PATTERN.fullmatch(value):
        raise PayloadError(Reason.BAD_FIELD, f"{name} must match {ID_PATTERN.pattern}")


def phases3(lo: float | None = None) -> Check:
    """[l1, l2, l3]: a column wired to one phase reports 0 on the others."""
    def check(name: str, value: Any) -> None:
        if not isinstance(value, list) or len(value) != 3:
            raise PayloadError(Reason.BAD_TYPE, f"{name} must be a list [l1, l2, l3]")
        for i, item in enumerate(value):
            if type(item) is float and math.isfinite(item) and (lo is None or item >= lo):
                continue   # the usual case, without naming the item
            _number(f"{name}[{i}]", item, lo)
    return check


def nullable(check: Check) -> Check:
    return lambda name, value: None if value is None else check(name, value)


def scalar(name: str, value: Any) -> None:
    """Free-form event data: a finite number, a short string, a bool or null."""
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, str):
        text()(name, value)
        return
    _number(name, value)


@dataclass(frozen=True)
class Field:
    check: Check
    required: bool = True


# -- outgoing messages -------------------------------------------------------------------

GATEWAY_STATES = ("online", "offline")
SITE_LIMIT_SOURCES = ("connection", "dno", "failsafe")
EVENT_NAMES = ("session_started", "session_stopped", "fault", "fault_cleared", "limit_violation",
               "column_online", "column_offline", "limit_changed", "outbox_dropped",
               "command_rejected", "config_error", "gateway_started", "gateway_stopping")
ACK_RESULTS = ("accepted", "rejected")
REASONS = tuple(r.value for r in Reason)

_SEQ = Field(integer(1))
_TS = Field(integer(0))
_A = num(0.0)

SPECS: dict[str, dict[str, Field]] = {
    "gateway_state": {"state": Field(one_of(GATEWAY_STATES)), "ts_ms": _TS,
                      "cause": Field(text(32), required=False)},
    "column_status": {"seq": _SEQ, "ts_ms": _TS, "column_id": Field(ident),
                      "status": Field(one_of(STATUS_NAMES)), "state": Field(one_of(CP_NAMES)),
                      "error": Field(one_of(ERROR_NAMES)), "online": Field(boolean)},
    "column_telemetry": {"seq": _SEQ, "ts_ms": _TS, "column_id": Field(ident),
                         "current_a": Field(phases3()), "voltage_v": Field(phases3(0.0)),
                         "power_w": Field(num()), "energy_wh": Field(num(0.0)),
                         "offered_a": Field(_A), "applied_limit_a": Field(nullable(_A)),
                         "limit_source": Field(one_of(LIMIT_SOURCE_NAMES)),
                         "state": Field(one_of(CP_NAMES)), "status": Field(one_of(STATUS_NAMES))},
    "site_telemetry": {"seq": _SEQ, "ts_ms": _TS, "power_w": Field(num()),
                       "current_a": Field(phases3()), "limit_a": Field(_A),
                       "limit_source": Field(one_of(SITE_LIMIT_SOURCES)),
                       "limit_valid_until_ms": Field(nullable(integer(0))),
                       "active_sessions": Field(integer(0))},
    "ack": {"seq": _SEQ, "ts_ms": _TS, "id": Field(nullable(text(64))),
            "result": Field(one_of(ACK_RESULTS)), "reason": Field(one_of(REASONS)),
            "applied_limit_a": Field(nullable(_A)), "detail": Field(text(), required=False)},
}
EVENT_BASE = {"seq": _SEQ, "ts_ms": _TS, "event": Field(one_of(EVENT_NAMES)),
              "column_id": Field(ident, required=False)}


def validate(message_type: str, obj: Mapping[str, Any], *, stamped: bool = True) -> None:
    """Check a message of `message_type` ("event" or a key of SPECS); raise PayloadError.

    stamped=False skips `seq`, for a message not yet queued (the outbox adds it).
    """
    plan = _PLANS.get((message_type, stamped))
    if plan is None:
        raise ValueError(f"unknown message type {message_type!r}")
    fields, known, extra = plan
    present = 0
    for name, check, required in fields:
        if name not in obj:
            if required:
                raise PayloadError(Reason.MISSING_FIELD, name)
            continue
        present += 1
        check(name, obj[name])
    if present == len(obj):
        return   # every field is a known one, and checked
    for name, value in obj.items():
        if name in known:
            continue
        if extra is None:
            raise PayloadError(Reason.UNKNOWN_FIELD, name)
        extra(name, value)


_Plan = tuple[tuple[tuple[str, Check, bool], ...], frozenset[str], Check | None]


def _plans() -> dict[tuple[str, bool], _Plan]:
    """Per (message type, stamped): the fields to check in order, the names allowed, and the
    check for any other field (events carry free-form data). Built once: every telemetry message
    of every column goes through validate()."""
    plans = {}
    specs: list[tuple[str, dict[str, Field], Check | None]] = [(t, spec, None) for t, spec in SPECS.items()]
    for message_type, spec, extra in [*specs, ("event", EVENT_BASE, scalar)]:
        for stamped in (True, False):
            fields = tuple((n, f.check, f.required) for n, f in spec.items() if stamped or n != "seq")
            plans[(message_type, stamped)] = (fields, frozenset(spec), extra)
    return plans


_PLANS = _plans()


def _build(message_type: str, fields: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in fields.items() if v is not None or k not in _OPTIONAL_NONE}
    try:
        validate(message_type, out, stamped=False)
    except PayloadError as exc:
        raise ValueError(f"{message_type}: {exc}") from None
    return out


_OPTIONAL_NONE = frozenset({"cause", "column_id", "detail"})


def gateway_state(state: str, *, ts_ms: int, cause: str | None = None) -> dict[str, Any]:
    """Retained birth ("online") and will/shutdown ("offline"); not sequenced (see outbox)."""
    return _build("gateway_state", {"state": state, "ts_ms": ts_ms, "cause": cause})


def column_status(*, ts_ms: int, column_id: str, status: str, state: str, error: str = "NoError",
                  online: bool = True) -> dict[str, Any]:
    return _build("column_status", {"ts_ms": ts_ms, "column_id": column_id, "status": status,
                                    "state": state, "error": error, "online": online})


def column_telemetry(*, ts_ms: int, column_id: str, current_a: Sequence[float],
                     voltage_v: Sequence[float], power_w: float, energy_wh: float, offered_a: float,
                     applied_limit_a: float | None, limit_source: str, state: str,
                     status: str) -> dict[str, Any]:
    return _build("column_telemetry", {
        "ts_ms": ts_ms, "column_id": column_id, "current_a": list(current_a),
        "voltage_v": list(voltage_v), "power_w": power_w, "energy_wh": energy_wh,
        "offered_a": offered_a, "applied_limit_a": applied_limit_a, "limit_source": limit_source,
        "state": state, "status": status})


def column_telemetry_encoded(*, ts_ms: int, column_id: str, current_a: Sequence[float],
                             voltage_v: Sequence[float], power_w: float, energy_wh: float, offered_a: float,
                             applied_limit_a: float | None, limit_source: str, state: str,
                             status: str) -> tuple[dict[str, Any], bytes]:
    """column_telemetry() and encode() of it, as the telemetry round needs for every column
    every second. When every value has the exact type the contract asks for and is within it
    (the usual case: readings are decoded into floats and ints), the checks of SPECS are
    written out and the JSON comes from a template, the same bytes for a quarter of the cost;
    anything else goes through column_telemetry(), which raises the contract's error."""
    c = current_a if type(current_a) is tuple and len(current_a) == 3 else _NOT3
    v = voltage_v if type(voltage_v) is tuple and len(voltage_v) == 3 else _NOT3
    # (x - x == 0.0: an exact float is finite; inf - inf and nan - nan are nan)
    if (type(c[0]) is float and type(c[1]) is float and type(c[2]) is float
            and c[0] - c[0] == 0.0 and c[1] - c[1] == 0.0 and c[2] - c[2] == 0.0
            and type(v[0]) is float and type(v[1]) is float and type(v[2]) is float
            and v[0] - v[0] == 0.0 and v[1] - v[1] == 0.0 and v[2] - v[2] == 0.0
            and v[0] >= 0.0 and v[1] >= 0.0 and v[2] >= 0.0
            and type(ts_ms) is int and 0 <= ts_ms <= _FLOAT_MAX
            and _finite(power_w, None) and _finite(energy_wh, 0.0) and _finite(offered_a, 0.0)
            and (applied_limit_a is None or _finite(applied_limit_a, 0.0))
            and limit_source in _LIMIT_SOURCES and state in _CP_STATES and status in _STATUSES
            and type(column_id) is str and ID_PATTERN.fullmatch(column_id) is not None):
        payload = {"ts_ms": ts_ms, "column_id": column_id, "current_a": list(current_a),
                   "voltage_v": list(voltage_v), "power_w": power_w, "energy_wh": energy_wh,
                   "offered_a": offered_a, "applied_limit_a": applied_limit_a,
                   "limit_source": limit_source, "state": state, "status": status}
        body = _TELEMETRY_JSON % (ts_ms, column_id, current_a[0], current_a[1], current_a[2], voltage_v[0],
                                  voltage_v[1], voltage_v[2], power_w, energy_wh, offered_a,
                                  "null" if applied_limit_a is None else repr(applied_limit_a),
                                  limit_source, state, status)
        return payload, body.encode()
    payload = column_telemetry(ts_ms=ts_ms, column_id=column_id, current_a=current_a, voltage_v=voltage_v,
                               power_w=power_w, energy_wh=energy_wh, offered_a=offered_a,
                               applied_limit_a=applied_limit_a, limit_source=limit_source, state=state,
                               status=status)
    return payload, encode(payload)


def _finite(value: Any, lo: float | None) -> bool:
    """An exact float that is finite, or an exact int a double can hold; at least lo when given
    (json.dumps writes both as repr() does: the template relies on it)."""
    kind = type(value)
    if kind is float:
        ok = math.isfinite(value)
    elif kind is int:
        ok = abs(value) <= _FLOAT_MAX
    else:
        return False
    return ok and (lo is None or value >= lo)


# Key order and spelling as column_telemetry() builds it; column_id matches ID_PATTERN and the
# names come from the vocabularies, so no string needs escaping.
_TELEMETRY_JSON = ('{"ts_ms":%d,"column_id":"%s","current_a":[%r,%r,%r],"voltage_v":[%r,%r,%r],'
                   '"power_w":%r,"energy_wh":%r,"offered_a":%r,"applied_limit_a":%s,'
                   '"limit_source":"%s","state":"%s","status":"%s"}')
_LIMIT_SOURCES = frozenset(LIMIT_SOURCE_NAMES)
_NOT3 = (None, None, None)   # anything but a 3-tuple of floats: the general path
_CP_STATES = frozenset(CP_NAMES)
_STATUSES = frozenset(STATUS_NAMES)


def site_telemetry(*, ts_ms: int, power_w: float, current_a: Sequence[float], limit_a: float,
                   limit_source: str, limit_valid_until_ms: int | None,
                   active_sessions: int) -> dict[str, Any]:
    return _build("site_telemetry", {
        "ts_ms": ts_ms, "power_w": power_w, "current_a": list(current_a), "limit_a": limit_a,
        "limit_source": limit_source, "limit_valid_until_ms": limit_valid_until_ms,
        "active_sessions": active_sessions})


def event(name: str, *, ts_ms: int, column_id: str | None = None,
          data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An event; `data` holds scalar fields with unit suffixes (energy_wh, limit_a...)."""
    extra = dict(data or {})
    clash = set(extra) & set(EVENT_BASE)
    if clash:
        raise ValueError(f"event data may not set {sorted(clash)}")
    return _build("event", {"event": name, "ts_ms": ts_ms, "column_id": column_id, **extra})


def ack(*, command_id: str | None, reason: Reason, applied_limit_a: float | None, ts_ms: int,
        detail: str = "") -> dict[str, Any]:
    """The answer to every command: result is "accepted" exactly when reason is ok."""
    result = "accepted" if reason is Reason.OK else "rejected"
    return _build("ack", {"id": command_id, "result": result, "reason": str(reason),
                          "applied_limit_a": applied_limit_a, "ts_ms": ts_ms,
                          "detail": detail[:_MAX_STR] or None})


# -- incoming commands -------------------------------------------------------------------

class CommandKind(StrEnum):
    SITE_LIMIT = "site_limit"
    COLUMN_LIMIT = "column_limit"
    SITE_FAILSAFE = "site_failsafe"
    CONFIG = "config"


MAX_LIMIT_A = 10_000.0           # sanity bound when no capacity is known
MAX_VALIDITY_S = 86_400          # default; the site config may lower it
FAILSAFE_DURATION_S = (60, 86_400)
NOMINAL_VOLTAGE_V = 230.0
# Settings a DNO may change remotely: name -> (min, max), integers.
CONFIG_FIELDS: dict[str, tuple[int, int]] = {
    "random_delay_max_s": (0, 1800),      # UK SCP regs: up to 1800 s, adjustable remotely
    "telemetry_interval_s": (1, 3600),
    "failsafe_duration_s": FAILSAFE_DURATION_S,
}
_AUTH_FIELDS = ("key_id", "sig")
_COMMON = ("id", "issued_ms", "valid_until_ms", "validity_s", *_AUTH_FIELDS)
_ALLOWED: dict[CommandKind, frozenset[str]] = {
    CommandKind.SITE_LIMIT: frozenset((*_COMMON, "limit_a", "limit_kw")),
    CommandKind.COLUMN_LIMIT: frozenset((*_COMMON, "limit_a", "limit_kw")),
    CommandKind.SITE_FAILSAFE: frozenset((*_COMMON, "limit_a", "limit_kw", "duration_s")),
    CommandKind.CONFIG: frozenset((*_COMMON, "config")),
}


@dataclass(frozen=True)
class LimitContext:
    """What a limit is checked against: the capacity of the site or column it targets."""

    capacity_a: float = MAX_LIMIT_A
    phases: int = 3
    voltage_v: float = NOMINAL_VOLTAGE_V


@dataclass(frozen=True)
class Command:
    """A parsed, range-checked command (authentication is auth.py's job)."""

    kind: CommandKind
    id: str
    issued_ms: int
    valid_until_ms: int
    key_id: str
    limit_a: float | None = None       # amps; from limit_kw via I = P / (V x phases) when sent in kW
    limit_kw: float | None = None      # as sent, when sent in kW
    duration_s: int | None = None      # failsafe: how long it holds after the link is lost
    config: Mapping[str, int] | None = None


def limit_command(cmd_id: str, limit_a: float, *, validity_s: float,
                  issued_ms: int | None = None) -> dict[str, Any]:
    """The unsigned body of a site or column limit in amps (parse_command reads it back; sign it
    with auth.sign_command for the command's topic)."""
    return {"id": cmd_id, "issued_ms": utc_ms() if issued_ms is None else issued_ms,
            "validity_s": validity_s, "limit_a": limit_a}


def command_id_of(obj: Mapping[str, Any]) -> str | None:
    """The id to echo in an ack, if the sender gave a well-formed one."""
    value = obj.get("id")
    return value if isinstance(value, str) and ID_PATTERN.fullmatch(value) else None


def _exactly_one(obj: Mapping[str, Any], a: str, b: str) -> str:
    if a in obj and b in obj:
        raise PayloadError(Reason.BAD_FIELD, f"give {a} or {b}, not both")
    if a not in obj and b not in obj:
        raise PayloadError(Reason.MISSING_FIELD, f"{a} or {b}")
    return a if a in obj else b


def parse_command(obj: Mapping[str, Any], kind: CommandKind, *, context: LimitContext | None = None,
                  max_validity_s: int = MAX_VALIDITY_S) -> Command:
    """Check a decoded command's fields and ranges; raise PayloadError with the reason."""
    ctx = context or LimitContext()
    unknown = sorted(set(obj) - _ALLOWED[kind])
    if unknown:
        raise PayloadError(Reason.UNKNOWN_FIELD, repr(unknown[0][:64]))
    for name in _AUTH_FIELDS:
        if not isinstance(obj.get(name), str):
            raise PayloadError(Reason.UNAUTHENTICATED, f"{name} missing")
    if "id" not in obj:
        raise PayloadError(Reason.MISSING_FIELD, "id")
    ident("id", obj["id"])
    if "issued_ms" not in obj:
        raise PayloadError(Reason.MISSING_FIELD, "issued_ms")
    issued_ms = _integer("issued_ms", obj["issued_ms"], 1, 2**53)
    validity_ms = max_validity_s * 1000
    if _exactly_one(obj, "valid_until_ms", "validity_s") == "valid_until_ms":
        valid_until_ms = _integer("valid_until_ms", obj["valid_until_ms"], issued_ms + 1,
                                  issued_ms + validity_ms)
    else:
        seconds = _number("validity_s", obj["validity_s"], 0.001, max_validity_s)
        valid_until_ms = issued_ms + round(seconds * 1000)
    limit_a = limit_kw = None
    duration_s = None
    config = None
    if kind is CommandKind.CONFIG:
        config = _parse_config(obj.get("config"))
    else:
        if _exactly_one(obj, "limit_a", "limit_kw") == "limit_a":
            limit_a = _number("limit_a", obj["limit_a"], 0.0, ctx.capacity_a)
        else:
            limit_kw = _number("limit_kw", obj["limit_kw"], 0.0)
            limit_a = limit_kw * 1000.0 / (ctx.voltage_v * ctx.phases)
            if limit_a > ctx.capacity_a:
                raise PayloadError(Reason.OUT_OF_RANGE, f"limit_kw is above {ctx.capacity_a} A")
        if "duration_s" in obj:
            duration_s = _integer("duration_s", obj["duration_s"], *FAILSAFE_DURATION_S)
    return Command(kind=kind, id=obj["id"], issued_ms=issued_ms, valid_until_ms=valid_until_ms,
                   key_id=obj["key_id"], limit_a=limit_a, limit_kw=limit_kw, duration_s=duration_s,
                   config=config)


def _parse_config(value: Any) -> dict[str, int]:
    if value is None:
        raise PayloadError(Reason.MISSING_FIELD, "config")
    if not isinstance(value, dict):
        raise PayloadError(Reason.BAD_TYPE, "config must be an object")
    if not value:
        raise PayloadError(Reason.BAD_FIELD, "config is empty")
    out: dict[str, int] = {}
    for name in sorted(value):
        if name not in CONFIG_FIELDS:
            raise PayloadError(Reason.UNKNOWN_FIELD, f"config.{name[:64]!r}")
        lo, hi = CONFIG_FIELDS[name]
        out[name] = _integer(f"config.{name}", value[name], lo, hi)
    return out
