"""The trace channel vocabulary: every channel a HIL trace may carry, defined once.

A channel has a base name from `VOCABULARY` (`meter.current_a`, `dno.limit`, ...), a
unit, a value kind and a scope. Per-column channels are named `<column>/<base>` in a
trace (`c1/meter.current_a`, `2-39-81-4550/ev.event`), and their header entry repeats
the column id in its `column` field; site-wide channels carry no prefix and
`column: None` (`site.power_w`). Channels of scope "any" (`dno.limit`, `link.fault`)
may be either: without a prefix they apply to the whole site.

Value kinds: "float" (a number; ints are accepted), "int", "str", "list" (a list of
numbers, e.g. the three phase currents) and "map" (a CBOR map with string keys, whose
required keys are checked by `check_value`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KINDS = ("float", "int", "str", "list", "map")
SCOPES = ("column", "site", "any")

CP_STATES = ("A", "B", "C", "D", "E", "F")
# `ev.event` types. "plug" may carry the session's energy demand (energy_wh,
# requested_wh, stay_ms, done_after_ms, requested_stay_ms, session); "soc" carries soc_pct;
# "misbehave" names a scripted misbehaviour in `what` (ignore_reduction, draw_in_b,
# diode_missing) and "behave" ends it.
EV_EVENTS = ("plug", "unplug", "soc", "pause", "resume", "misbehave", "behave")
LINK_FAULTS = ("drop", "corrupt", "delay", "silent")


@dataclass(frozen=True)
class ChannelSpec:
    """One entry of the vocabulary: what a channel means and what its values look like."""

    base: str
    unit: str
    kind: str
    scope: str
    description: str


def _spec(base: str, unit: str, kind: str, scope: str, description: str) -> tuple[str, ChannelSpec]:
    return base, ChannelSpec(base, unit, kind, scope, description)


VOCABULARY: dict[str, ChannelSpec] = dict([
    _spec("ev.demand_a", "A", "float", "column", "current per phase the car would draw if offered enough"),
    _spec("ev.state", "", "str", "column", "control pilot state the car presents (A-F)"),
    _spec("ev.event", "", "map", "column", "car event: plug (with energy demand), unplug, soc, misbehaviour"),
    _spec("cp.state", "", "str", "column", "control pilot state seen by the column (A-F)"),
    _spec("meter.current_a", "A", "list", "column", "measured current per phase [L1, L2, L3]"),
    _spec("meter.voltage_v", "V", "float", "column", "measured voltage (L1, or the single phase)"),
    _spec("meter.power_w", "W", "float", "column", "measured active power, total"),
    _spec("meter.energy_wh", "Wh", "float", "column", "meter import energy register"),
    _spec("pilot.offered_a", "A", "float", "column", "recorded current offered on the control pilot"),
    _spec("dno.limit", "", "map", "any", "DNO limit command: limit_a or limit_kw, validity_s, id"),
    _spec("link.fault", "", "map", "any", "link fault: kind drop/corrupt/delay/silent, duration_ms"),
    _spec("power.cut", "", "map", "column", "the column loses its supply for duration_ms"),
    _spec("site.power_w", "W", "float", "site", "measured power at the site's connection point"),
    _spec("site.limit_w", "W", "float", "site", "site power cap in force"),
])

# Unit conversions an importer may apply: factor such that value_in_to = value_in_from * factor.
_UNIT_FACTORS: dict[tuple[str, str], float] = {
    ("mA", "A"): 0.001, ("kW", "W"): 1000.0, ("MW", "W"): 1e6, ("kWh", "Wh"): 1000.0,
    ("MWh", "Wh"): 1e6, ("kV", "V"): 1000.0, ("mV", "V"): 0.001, ("s", "ms"): 1000.0,
}


def unit_factor(from_unit: str, to_unit: str) -> float | None:
    """The factor converting `from_unit` values into `to_unit`, or None if not convertible."""
    if from_unit == to_unit:
        return 1.0
    if (from_unit, to_unit) in _UNIT_FACTORS:
        return _UNIT_FACTORS[(from_unit, to_unit)]
    if (to_unit, from_unit) in _UNIT_FACTORS:
        return 1.0 / _UNIT_FACTORS[(to_unit, from_unit)]
    return None


def channel_name(base: str, column: str | None = None) -> str:
    """The trace name of a channel: `<column>/<base>`, or just `<base>` for the site."""
    return base if column is None else column + "/" + base


def split_name(name: str) -> tuple[str | None, str]:
    """(column or None, base) of a trace channel name."""
    column, sep, base = name.rpartition("/")
    return (column if sep else None), base


def check_column_id(column: str) -> str | None:
    """Why `column` is not a usable column id, or None if it is."""
    if not isinstance(column, str) or not column:
        return "a column id must be a non-empty string"
    if "/" in column or any(ch.isspace() for ch in column):
        return "column id %r must not contain '/' or whitespace" % column
    return None


def declare(base: str, column: str | None = None,
            description: str | None = None) -> tuple[str, dict[str, Any]]:
    """(name, header entry) for a vocabulary channel, e.g. `declare("ev.demand_a", "c1")`.

    Raises ValueError for an unknown base, a bad column id, or a scope mismatch.
    """
    spec = VOCABULARY.get(base)
    if spec is None:
        raise ValueError("unknown channel %r; known: %s" % (base, ", ".join(VOCABULARY)))
    if column is not None:
        problem = check_column_id(column)
        if problem:
            raise ValueError(problem)
    problem = check_scope(spec, column)
    if problem:
        raise ValueError(problem)
    entry = {"unit": spec.unit, "kind": spec.kind, "column": column,
             "description": description or spec.description}
    return channel_name(base, column), entry


def check_scope(spec: ChannelSpec, column: str | None) -> str | None:
    if spec.scope == "column" and column is None:
        return "channel %s belongs to a column: name it <column>/%s" % (spec.base, spec.base)
    if spec.scope == "site" and column is not None:
        return "channel %s is site-wide: it takes no column prefix" % spec.base
    return None


def _is_number(value: Any) -> bool:
    """A finite number a float can hold (an int beyond one would overflow math and float())."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


def check_kind(kind: str, value: Any) -> str | None:
    """Why `value` is not a value of `kind`, or None if it is."""
    if kind == "float":
        ok = _is_number(value)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "str":
        ok = isinstance(value, str)
    elif kind == "list":
        ok = isinstance(value, list) and all(_is_number(v) for v in value)
    elif kind == "map":
        ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
    else:
        return "unknown kind %r" % (kind,)
    return None if ok else "expected a %s value, got %s" % (kind, _show(value))


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _need(value: dict[str, Any], key: str, test: Callable[[Any], bool], what: str) -> str | None:
    if key not in value:
        return "missing key %r" % key
    if not test(value[key]):
        return "%r must be %s, got %s" % (key, what, _show(value[key]))
    return None


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_value(base: str, value: Any) -> str | None:
    """Why `value` is not a valid value for vocabulary channel `base`, or None if it is."""
    spec = VOCABULARY[base]
    problem = check_kind(spec.kind, value)
    if problem:
        return problem
    if base in ("ev.state", "cp.state"):
        return None if value in CP_STATES else "state must be one of A-F, got %s" % _show(value)
    if base == "meter.current_a":
        return None if len(value) == 3 else "expected 3 phase currents, got %d" % len(value)
    if base == "ev.event":
        return _need(value, "type", lambda v: v in EV_EVENTS, "one of " + "/".join(EV_EVENTS))
    if base == "dno.limit":
        if ("limit_a" in value) == ("limit_kw" in value):
            return "a DNO limit has exactly one of limit_a and limit_kw"
        key = "limit_a" if "limit_a" in value else "limit_kw"
        return (_need(value, key, lambda v: _is_number(v) and v >= 0, "a number >= 0")
                or _need(value, "validity_s", lambda v: _is_number(v) and v >= 0, "a number >= 0")
                or _need(value, "id", lambda v: isinstance(v, (str, int)), "a string or int"))
    if base == "link.fault":
        return (_need(value, "kind", lambda v: v in LINK_FAULTS, "one of " + "/".join(LINK_FAULTS))
                or _need(value, "duration_ms", _positive_int, "an int >= 0"))
    if base == "power.cut":
        return _need(value, "duration_ms", _positive_int, "an int >= 0")
    return None
