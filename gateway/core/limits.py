"""Limits with a source, a value, a validity and a priority; the effective site limit; load checks.

Rules (DESIGN-NOTES "Who decides a current"):
- A limit is in A per phase, or in kW converted with I = P / (V x phases): the site's 3 phases for
  a site limit, the column's phases for a column limit.
- Within one source (and target) the valid limit with the highest priority wins, the most recent
  one among equals: a DNO sending a new limit replaces its previous one, up or down.
- Across sources the lowest wins, and never above the connection capacity.
- DNO limits that expire while the DNO link is down fall to the site's ``dno_failsafe_a`` until the
  link is back (or ``dno_failsafe_duration_s`` after the expiry, if set). DNO site limits needed
  for that rule are kept until the link comes back up; everything else expired is pruned.
- A DNO command that raises the effective site limit is a "DNO-ordered restore"; its time is
  carried in ``EffectiveLimit.dno_restore_ms`` so the allocator can skip the random delay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.core.site import SITE_NODE, PhaseCurrents, Site, site_phase_key

SOURCE_DNO = "dno"
SOURCE_DNO_FAILSAFE = "dno-failsafe"
SOURCE_CAPACITY = "capacity"
UNITS = ("A", "kW")

# Reasons a limit is refused (also used as ack reason codes northbound).
R_BAD_SOURCE = "bad_source"
R_BAD_UNIT = "bad_unit"
R_NOT_FINITE = "not_finite"
R_NEGATIVE = "negative"
R_BAD_VALIDITY = "bad_validity"
R_EXPIRED = "expired"
R_ABOVE_CAPACITY = "above_capacity"
R_UNKNOWN_COLUMN = "unknown_column"
R_ABOVE_RATING = "above_rating"

OVERDRAW_FACTOR = 1.10   # a load may exceed its allowed current by 10 % + 0.5 A ...
OVERDRAW_OFFSET_A = 0.5  # ... for the grace time before it is reported


@dataclass(frozen=True)
class Limit:
    source: str
    value: float
    valid_until_ms: int
    unit: str = "A"
    valid_from_ms: int = 0
    priority: int = 0
    column: str | None = None  # None: the whole site
    id: str = ""

    def is_valid(self, now_ms: int) -> bool:
        return self.valid_from_ms <= now_ms < self.valid_until_ms


@dataclass(frozen=True)
class ColumnLimit:
    value_a: float
    source: str


@dataclass(frozen=True)
class EffectiveLimit:
    """What the allocator shares: the site limit per phase and which source binds."""

    site_a: PhaseCurrents
    source: str = SOURCE_CAPACITY
    limit: Limit | None = None  # the binding record (None for the capacity and the failsafe)
    columns: Mapping[str, ColumnLimit] = field(default_factory=dict)
    dno_restore_ms: int | None = None
    failsafe_active: bool = False


def limit_amps(limit: Limit, site: Site) -> float:
    """The limit in A per phase."""
    if limit.unit == "A":
        return float(limit.value)
    col = site.column(limit.column) if limit.column is not None else None
    return site.kw_to_a(limit.value, col.phases if col is not None else 3)


def check_limit(limit: Limit, site: Site, now_ms: int) -> str | None:
    """None when the limit may be applied, else a reason code."""
    if not limit.source:
        return R_BAD_SOURCE
    if limit.unit not in UNITS:
        return R_BAD_UNIT
    if isinstance(limit.value, bool) or not isinstance(limit.value, int | float) \
            or not math.isfinite(limit.value):
        return R_NOT_FINITE
    if limit.value < 0:
        return R_NEGATIVE
    if limit.valid_until_ms <= limit.valid_from_ms:
        return R_BAD_VALIDITY
    if limit.valid_until_ms <= now_ms:
        return R_EXPIRED
    amps = limit_amps(limit, site)
    if limit.column is None:
        return R_ABOVE_CAPACITY if amps > max(site.capacity_a) + 1e-9 else None
    col = site.column(limit.column)
    if col is None:
        return R_UNKNOWN_COLUMN
    return R_ABOVE_RATING if amps > col.max_a + 1e-9 else None


class LimitBook:
    """Every received limit, and the effective limits at a given time."""

    def __init__(self, site: Site, *, dno_link_up: bool = False, now_ms: int = 0) -> None:
        self._site = site
        self._limits: dict[tuple[str, str | None, str], tuple[int, Limit]] = {}
        self._seq = 0
        self._dno_up = dno_link_up
        self._dno_down_since_ms = now_ms
        self._restore_ms: int | None = None

    @property
    def dno_link_up(self) -> bool:
        return self._dno_up

    def add(self, limit: Limit, now_ms: int) -> str | None:
        """Store a limit (replacing one with the same source, target and id); reason if refused."""
        reason = check_limit(limit, self._site, now_ms)
        if reason is not None:
            return reason
        before = self.effective(now_ms).site_a
        self._seq += 1
        self._limits[(limit.source, limit.column, limit.id)] = (self._seq, limit)
        self._note_restore(limit.source, before, now_ms)
        return None

    def remove(self, source: str, limit_id: str, now_ms: int, column: str | None = None) -> bool:
        """Withdraw a limit (a DNO 'clear' command); True when there was one."""
        before = self.effective(now_ms).site_a
        found = self._limits.pop((source, column, limit_id), None) is not None
        if found:
            self._note_restore(source, before, now_ms)
        return found

    def set_dno_link(self, up: bool, now_ms: int) -> None:
        if up == self._dno_up:
            return
        self._dno_up = up
        if not up:
            self._dno_down_since_ms = now_ms
        else:
            self.prune(now_ms)

    def limits(self) -> tuple[Limit, ...]:
        return tuple(lim for _, lim in sorted(self._limits.values(), key=lambda sl: sl[0]))

    def prune(self, now_ms: int) -> None:
        """Forget expired limits, except those the DNO failsafe rule still needs."""
        for key, (_, lim) in list(self._limits.items()):
            if lim.valid_until_ms > now_ms:
                continue
            if self._needed_for_failsafe(lim):
                continue
            del self._limits[key]

    def effective(self, now_ms: int) -> EffectiveLimit:
        site = self._site
        candidates: list[tuple[float, int, str, Limit | None]] = [
            (limit_amps(lim, site), _source_rank(lim.source), lim.source, lim)
            for lim in self._winners(now_ms, None)
        ]
        failsafe = self._failsafe_active(now_ms)
        if failsafe and site.dno_failsafe_a is not None:
            candidates.append((site.dno_failsafe_a, _source_rank(SOURCE_DNO_FAILSAFE), SOURCE_DNO_FAILSAFE,
                               None))
        source, binding = SOURCE_CAPACITY, None
        site_a = site.capacity_a
        if candidates:
            value, _, name, lim = min(candidates, key=lambda c: (c[0], c[1], c[2]))
            site_a = (min(site_a[0], value), min(site_a[1], value), min(site_a[2], value))
            if any(value <= cap for cap in site.capacity_a):
                source, binding = name, lim
        columns: dict[str, ColumnLimit] = {}
        limited = {lim.column for _, lim in self._limits.values() if lim.column is not None}
        for col in site.columns:
            if col.id not in limited:   # most columns, at every step: no limit of their own
                continue
            per_source = [(limit_amps(lim, site), _source_rank(lim.source), lim.source)
                          for lim in self._winners(now_ms, col.id)]
            if per_source:
                value, _, name = min(per_source)
                columns[col.id] = ColumnLimit(value, name)
        return EffectiveLimit(site_a, source, binding, columns, self._restore_ms, failsafe)

    def _winners(self, now_ms: int, column: str | None) -> list[Limit]:
        """Per source: the valid limit with the highest priority, the latest among equals."""
        best: dict[str, tuple[int, int, Limit]] = {}
        for seq, lim in self._limits.values():
            if lim.column != column or not lim.is_valid(now_ms):
                continue
            rank = (lim.priority, seq)
            held = best.get(lim.source)
            if held is None or rank > (held[0], held[1]):
                best[lim.source] = (lim.priority, seq, lim)
        return [entry[2] for entry in best.values()]

    def _needed_for_failsafe(self, lim: Limit) -> bool:
        return (not self._dno_up and lim.source == SOURCE_DNO and lim.column is None
                and lim.valid_until_ms >= self._dno_down_since_ms)

    def _failsafe_active(self, now_ms: int) -> bool:
        if self._dno_up or self._site.dno_failsafe_a is None:
            return False
        if any(lim.source == SOURCE_DNO for lim in self._winners(now_ms, None)):
            return False  # a DNO limit (planned ahead) is still valid: it rules
        expiries = [lim.valid_until_ms for _, lim in self._limits.values()
                    if self._needed_for_failsafe(lim) and lim.valid_until_ms <= now_ms]
        if not expiries:
            return False
        duration = self._site.dno_failsafe_duration_s
        return duration is None or now_ms < max(expiries) + duration * 1000

    def _note_restore(self, source: str, before: PhaseCurrents, now_ms: int) -> None:
        after = self.effective(now_ms).site_a
        if source == SOURCE_DNO and any(a > b for a, b in zip(after, before, strict=True)):
            self._restore_ms = now_ms


def _source_rank(source: str) -> int:
    """Ties between equal values name the DNO first: its command is what the site obeys."""
    return {SOURCE_DNO: 0, SOURCE_DNO_FAILSAFE: 1}.get(source, 2)


# ---- measured load against what was allowed ---------------------------------------------------

@dataclass(frozen=True)
class Violation:
    kind: str          # "column_overdraw" | "site_over_limit" | "circuit_over_rating"
    target: str        # column id, "site" or a circuit id
    phase: int         # site phase index (0..2)
    measured_a: float
    allowed_a: float
    since_ms: int      # when the load first went above allowed + tolerance
    new: bool          # first time reported: emit an event once


@dataclass(frozen=True)
class LoadCheckState:
    over_since: Mapping[str, int] = field(default_factory=dict)
    reported: frozenset[str] = frozenset()


@dataclass(frozen=True)
class LoadCheck:
    violations: tuple[Violation, ...]
    state: LoadCheckState


def tolerated_a(allowed_a: float) -> float:
    return allowed_a * OVERDRAW_FACTOR + OVERDRAW_OFFSET_A


def check_load(site: Site, effective: EffectiveLimit, offered_a: Mapping[str, float],
               column_a: Mapping[str, tuple[float, ...]], now_ms: int, *, state: LoadCheckState,
               site_meter_a: PhaseCurrents | None = None) -> LoadCheck:
    """Compare measured currents with what each column was offered, the circuits' ratings and the
    effective site limit. ``column_a`` holds per column phase currents (column order); the site
    load is the meter's when given, else the sum of the columns. A load above allowed x 1.1 +
    0.5 A is reported once it has lasted ``overdraw_grace_s``."""
    over: list[tuple[str, str, str, int, float, float]] = []  # key, kind, target, phase, meas, allowed
    node_load: dict[str, float] = {}
    for col in site.columns:   # thousands of columns at every step: the loop is kept lean
        currents = column_a.get(col.id)
        if currents is None:
            continue
        allowed = offered_a.get(col.id, 0.0)
        tolerated = tolerated_a(allowed)
        # a column reports up to 3 currents: its own phases are the first col.phases of them
        for amps, phase, keys in zip(currents, col.rotation, site.phase_paths(col), strict=False):
            if amps > tolerated:
                key = "column:" + col.id + ":" + str(phase)
                over.append((key, "column_overdraw", col.id, phase, amps, allowed))
            for key in keys:
                node_load[key] = node_load.get(key, 0.0) + amps
    for cid, circuit in site.circuits.items():
        for p in range(3):
            key = site_phase_key(cid, p)
            if node_load.get(key, 0.0) > tolerated_a(circuit.rating_a[p]):
                over.append((key, "circuit_over_rating", cid, p, node_load[key], circuit.rating_a[p]))
    for p in range(3):
        key = site_phase_key(SITE_NODE, p)
        measured = site_meter_a[p] if site_meter_a is not None else node_load.get(key, 0.0)
        if measured > tolerated_a(effective.site_a[p]):
            over.append((key, "site_over_limit", SITE_NODE, p, measured, effective.site_a[p]))
    grace_ms = site.allocation.overdraw_grace_s * 1000
    since: dict[str, int] = {}
    reported: set[str] = set()
    found: list[Violation] = []
    for key, kind, target, phase, measured, allowed in over:
        since[key] = state.over_since.get(key, now_ms)
        if now_ms - since[key] >= grace_ms:
            found.append(Violation(kind, target, phase, measured, allowed, since[key],
                                   key not in state.reported))
            reported.add(key)
    return LoadCheck(tuple(found), LoadCheckState(since, frozenset(reported)))
