"""Share the effective site limit among the charging sessions: site -> circuits -> columns.

One call to ``allocate`` is one control step; it is pure apart from drawing from the injected
random source, and returns the new allocator state with the result. Currents are worked in whole
deci-amps so that sums are exact; every node/phase constraint holds for the targets, and the
offers sent (``offered_a``) never exceed the targets, so they hold for the offers too.

Algorithm, per step:
1. Constraints: each site phase (min of capacity and effective limit, less the base load) and
   each circuit phase, less what ``reserved_a`` columns (offline, at their failsafe) may draw.
   A session loads the site phases its car draws on (``draw_phases`` mapped through the column's
   rotation; all the column's phases while unknown) on every node from its circuit to the site.
2. Cap per session: column rating, column limit, the car's own maximum, and the reclaim cap: once
   the offer has been unchanged for ``reclaim_settle_s`` and the car draws clearly less (at least
   1 A below offer - margin), it is offered measured + ``reclaim_margin_a`` (never below 6 A); the
   cap is released when the car draws within margin/2 of it.
3. Admission at 6 A in rank order; a session that does not fit at 6 A is paused. Rank (fair
   rotation with a minimum pause): sessions charging for less than ``rotation_s`` first (newest
   stint first), then waiting sessions (longest waiting first), then sessions charging longer
   than ``rotation_s`` (so the longest-charging is paused first). A session the allocator paused
   stays paused for ``min_pause_s``.
4. Max-min fair water-filling from 6 A up to each cap (remainders in rank order).
5. Decreases apply at once; an increase (including a start) waits a random delay in
   [0, ``increase_delay_max_s``], drawn once per increase and kept while it is pending, unless a
   DNO-ordered restore just happened and ``dno_restore_without_delay`` is set.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple, Protocol

from gateway.core.limits import EffectiveLimit
from gateway.core.site import (
    MIN_CURRENT_A,
    SITE_NODE,
    Column,
    PhaseCurrents,
    Site,
    site_phase_key,
    to_da,
)

MIN_DA = to_da(MIN_CURRENT_A)
_RELEASE_STEP_DA = 10  # reclaim only when it frees at least 1 A

IDLE = "idle"
RESERVED = "reserved"
CHARGING = "charging"
PAUSED_CAPACITY = "paused:capacity"
PAUSED_MIN_PAUSE = "paused:min_pause"
PAUSED_LIMIT = "paused:limit"
PAUSED_DELAY = "paused:delay"


class RandomSource(Protocol):
    def random(self) -> float: ...


class Session(NamedTuple):
    """A car plugged into a column and wanting to charge, as the adapters report it (built
    for every session at every step: a NamedTuple costs a quarter of a frozen dataclass)."""

    column_id: str
    started_ms: int
    measured_a: tuple[float, ...] | None = None   # per column phase, None while unknown
    draw_phases: tuple[int, ...] | None = None    # column phase indices drawing, None: all
    energy_wh: float = 0.0
    car_max_a: float | None = None


@dataclass(frozen=True)
class ColumnMemory:
    applied_da: int = 0
    applied_since_ms: int = 0
    session_started_ms: int | None = None
    charging_since_ms: int | None = None
    paused_since_ms: int | None = None   # set when the allocator paused a charging session
    pending_due_ms: int | None = None
    reclaim_cap_da: int | None = None


@dataclass(frozen=True)
class AllocatorState:
    rng: RandomSource = field(default_factory=random.Random)
    columns: Mapping[str, ColumnMemory] = field(default_factory=dict)
    restore_seen_ms: int | None = None

    @classmethod
    def resume(cls, offers_a: Mapping[str, float], now_ms: int,
               rng: RandomSource | None = None) -> AllocatorState:
        """State for a gateway (re)starting while columns already hold these offers."""
        mem = {cid: ColumnMemory(applied_da=to_da(a), applied_since_ms=now_ms,
                                 charging_since_ms=now_ms if a > 0 else None)
               for cid, a in offers_a.items()}
        return cls(rng=rng if rng is not None else random.Random(), columns=mem)


class ColumnAllocation(NamedTuple):
    """One column's result (a NamedTuple: the step builds one per column, thousands a second,
    and a frozen dataclass costs 4x as much to build)."""

    column_id: str
    offered_a: float            # send this to the column now
    target_a: float             # where the offer goes once a pending increase is due
    paused: bool                # a session is present but offered nothing
    reason: str                 # IDLE, RESERVED, CHARGING or one of the PAUSED_* reasons
    binding: str                # what caps the target: a constraint key, "column", "limit:<source>",
    increase_due_ms: int | None  # "car", "reclaim", or "" when nothing does


@dataclass(frozen=True)
class Allocation:
    columns: Mapping[str, ColumnAllocation]
    binding: str                # tightest constraint ("site:L1", "circuit:f1:L2"), "" when none
    site_source: str            # source of the effective site limit
    site_limit_a: PhaseCurrents
    offered_site_a: PhaseCurrents  # offers (and reservations) summed per site phase
    state: AllocatorState
    ignored: tuple[str, ...] = ()  # sessions on columns the site does not know


@dataclass(slots=True)
class _Demand:   # built for every session at every step and never changed: not frozen, it costs 3x
    session: Session
    column: Column
    mem: ColumnMemory
    phases: frozenset[int]
    keys: tuple[str, ...]
    cap_da: int
    cap_binding: str
    reclaim_cap_da: int | None


def water_fill(items: Mapping[str, tuple[int, int, tuple[str, ...]]], limits: Mapping[str, int],
               order: Sequence[str]) -> tuple[dict[str, int], dict[str, str]]:
    """Max-min fair fill. ``items``: id -> (floor, cap, constraint keys), all in deci-amps; the
    floors must already fit. Returns the amounts and, per item, what stopped it ("cap" or a key)."""
    offer = {i: items[i][0] for i in order}
    used: dict[str, int] = {}
    users: dict[str, list[str]] = {}
    for i in order:
        for k in items[i][2]:
            used[k] = used.get(k, 0) + items[i][0]
            users.setdefault(k, []).append(i)
    stopped: dict[str, str] = {i: "cap" for i in order if items[i][1] <= offer[i]}
    active = [i for i in order if i not in stopped]
    live_users = dict.fromkeys(users, 0)   # per key, how many of its users are still active
    for i in active:
        for k in items[i][2]:
            live_users[k] += 1
    while active:
        live = set(active)
        step = min(items[i][1] - offer[i] for i in active)
        tight: list[str] = []
        for k, n in live_users.items():
            if n:
                per = (limits.get(k, 0) - used[k]) // n
                step = min(step, per)
                if per <= 0:
                    tight.append(k)
        if step > 0:   # every active item rises by step: each key by step per active user
            for i in active:
                offer[i] += step
            for k, n in live_users.items():
                used[k] += step * n
            continue
        for i in active:
            if items[i][1] <= offer[i]:
                stopped[i] = "cap"
        for k in sorted(tight):
            room = limits.get(k, 0)
            for i in users[k]:  # hand out the remainder, 0.1 A each, in rank order
                if room - used[k] <= 0:
                    break   # k is full: none of its users can take more
                if i in live and i not in stopped and items[i][1] > offer[i] and \
                        all(limits.get(kk, 0) - used[kk] > 0 for kk in items[i][2]):
                    offer[i] += 1
                    for kk in items[i][2]:
                        used[kk] += 1
        for k in sorted(tight):
            if limits.get(k, 0) - used[k] <= 0:  # full: its users are done
                for i in users[k]:
                    if i in live and i not in stopped:
                        stopped[i] = k
        for i in active:
            if i in stopped:
                for k in items[i][2]:
                    live_users[k] -= 1
        active = [i for i in active if i not in stopped]
    return offer, stopped


def _ceil_da(amps: float) -> int:
    return math.ceil(amps * 10 - 1e-6)


def _measured_da(session: Session, column: Column) -> int | None:
    if session.measured_a is None:
        return None
    idx = [i for i in (session.draw_phases or range(column.phases)) if 0 <= i < column.phases]
    vals = [session.measured_a[i] for i in idx if i < len(session.measured_a)]
    vals = [v for v in vals if math.isfinite(v)]
    return _ceil_da(max(*vals, 0.0)) if vals else None


def _reclaim_cap(site: Site, session: Session, column: Column, mem: ColumnMemory, now_ms: int) -> int | None:
    cfg = site.allocation
    if mem.applied_da <= 0:
        return None
    settled = now_ms - mem.applied_since_ms >= cfg.reclaim_settle_s * 1000
    if mem.reclaim_cap_da is None and not settled:
        return None   # nothing to release nor to propose (the usual case: skip the measurement)
    measured = _measured_da(session, column)
    if measured is None:
        return mem.reclaim_cap_da
    margin = to_da(cfg.reclaim_margin_a)
    cap = mem.reclaim_cap_da
    if cap is not None and measured >= cap - margin // 2:
        cap = None  # the car wants more again
    if settled:
        proposal = max(MIN_DA, measured + margin)
        if proposal <= mem.applied_da - _RELEASE_STEP_DA and (cap is None or proposal < cap):
            cap = proposal
    return cap


def _demand(site: Site, session: Session, column: Column, effective: EffectiveLimit, *,
            mem: ColumnMemory, now_ms: int) -> _Demand:
    phases = column.site_phases(session.draw_phases)
    cap_da, cap_binding = to_da(column.max_a), "column"   # the first of equal caps names it
    col_limit = effective.columns.get(column.id)
    if col_limit is not None:
        da = to_da(max(col_limit.value_a, 0.0))
        if da < cap_da:
            cap_da, cap_binding = da, "limit:" + col_limit.source
    if session.car_max_a is not None and math.isfinite(session.car_max_a):
        da = to_da(max(session.car_max_a, 0.0))
        if da < cap_da:
            cap_da, cap_binding = da, "car"
    reclaim = _reclaim_cap(site, session, column, mem, now_ms)
    if reclaim is not None and reclaim < cap_da:
        cap_da, cap_binding = reclaim, "reclaim"
    return _Demand(session, column, mem, phases, site.constraint_keys(column, phases), cap_da,
                   cap_binding, reclaim)


def _rank(d: _Demand, site: Site, now_ms: int) -> tuple[int, int, float, str]:
    cfg = site.allocation
    mem = d.mem
    if mem.applied_da > 0 and mem.charging_since_ms is not None:
        group = 0 if now_ms - mem.charging_since_ms < cfg.rotation_s * 1000 else 2
        return (group, -mem.charging_since_ms, d.session.energy_wh, d.column.id)
    if mem.paused_since_ms is not None:
        group = 3 if now_ms - mem.paused_since_ms < cfg.min_pause_s * 1000 else 1
        return (group, mem.paused_since_ms, d.session.energy_wh, d.column.id)
    return (1, d.session.started_ms, d.session.energy_wh, d.column.id)


_NO_MEMORY = ColumnMemory()


def _memory(known: Mapping[str, ColumnMemory], session: Session | None, cid: str) -> ColumnMemory:
    mem = known.get(cid)
    if mem is None:
        mem = _NO_MEMORY
    if session is not None and mem.session_started_ms != session.started_ms:
        # a new session: keep what the column holds now, forget the old session's history
        mem = ColumnMemory(applied_da=mem.applied_da, applied_since_ms=mem.applied_since_ms,
                           session_started_ms=session.started_ms,
                           charging_since_ms=session.started_ms if mem.applied_da > 0 else None)
    return mem


def allocate(site: Site, sessions: Sequence[Session], effective_limit: EffectiveLimit, now_ms: int,
             state: AllocatorState, *, reserved_a: Mapping[str, float] | None = None,
             base_load_a: PhaseCurrents | None = None) -> Allocation:
    """One control step. ``reserved_a``: columns not under control (offline) and the current they
    may draw (their failsafe); ``base_load_a``: non-EV site load per phase (meter minus columns)."""
    step = AllocationStep(site, effective_limit, now_ms, state)
    step.add(sessions)
    step.solve(reserved_a=reserved_a, base_load_a=base_load_a)
    step.finish(len(site.columns))
    return step.result()


class AllocationStep:
    """``allocate`` in stages, for a step that must not hold the event loop for a whole large
    site: ``add`` the sessions in as many calls as wanted, ``solve`` once (the site-wide part:
    constraints, rank order, admission, water-filling), ``finish`` the site's columns a number
    at a time (in site order, the order the random delays are drawn in), then ``result``. The
    per-column stages are most of the work; the stages run back to back are ``allocate``."""

    def __init__(self, site: Site, effective_limit: EffectiveLimit, now_ms: int,
                 state: AllocatorState) -> None:
        self.site = site
        self.effective = effective_limit
        self.now_ms = now_ms
        self.state = state
        self._demands: dict[str, _Demand] = {}
        self._ranks: dict[str, tuple[int, int, float, str]] = {}
        self._ignored: list[str] = []
        self._solved = False
        self._reserved: dict[str, float] = {}
        self._targets: dict[str, int] = {}
        self._stopped: dict[str, str] = {}
        self._paused: dict[str, str] = {}
        self._hits: list[str] = []
        self._restore_now = False
        self._done = 0                 # columns finished, in site order
        self._out: dict[str, ColumnAllocation] = {}
        self._memory: dict[str, ColumnMemory] = {}
        self._load = [0, 0, 0]

    def add(self, sessions: Iterable[Session]) -> None:
        """The sessions' demands and ranks (a later session on the same column replaces one
        added before; a session on a column the site does not know is ignored)."""
        if self._solved:
            raise RuntimeError("sessions added to a solved allocation step")
        site, effective, now, known = self.site, self.effective, self.now_ms, self.state.columns
        demands, ranks, column = self._demands, self._ranks, site.column
        for s in sessions:
            cid = s.column_id
            col = column(cid)
            if col is None:
                self._ignored.append(cid)
                continue
            d = demands[cid] = _demand(site, s, col, effective, mem=_memory(known, s, cid), now_ms=now)
            ranks[cid] = _rank(d, site, now)

    def solve(self, *, reserved_a: Mapping[str, float] | None = None,
              base_load_a: PhaseCurrents | None = None) -> None:
        """The site-wide part, once every session is in: ``reserved_a`` are the columns not under
        control (a session on one of them is left out) and what they may draw."""
        if self._solved:
            raise RuntimeError("an allocation step is solved once")
        self._solved = True
        site, demands, ranks = self.site, self._demands, self._ranks
        reserved = self._reserved = _reserved(site, reserved_a or {})
        for cid in reserved:
            if demands.pop(cid, None) is not None:
                del ranks[cid]
        limits = _constraint_room(site, self.effective, reserved, base_load_a)
        order = sorted(demands, key=ranks.__getitem__)
        admitted, self._paused, hits = _admit(demands, order, ranks, limits)
        self._targets, self._stopped = water_fill(
            {cid: (MIN_DA, demands[cid].cap_da, demands[cid].keys) for cid in admitted}, limits, admitted)
        hits.extend(k for k in self._stopped.values() if k != "cap")
        self._hits = hits
        restore_ms = self.effective.dno_restore_ms
        self._restore_now = (site.allocation.dno_restore_without_delay and restore_ms is not None
                             and restore_ms != self.state.restore_seen_ms)

    def finish(self, count: int) -> bool:
        """The next ``count`` of the site's columns: offer, memory, reason. True once all are."""
        if not self._solved:
            raise RuntimeError("an allocation step is finished after solve()")
        columns = self.site.columns
        stop = min(self._done + count, len(columns))
        now = self.now_ms
        reserved, demands, targets = self._reserved, self._demands, self._targets
        paused, stopped, out, memory, load = self._paused, self._stopped, self._out, self._memory, self._load
        known, rng, restore_now = self.state.columns, self.state.rng, self._restore_now
        delay_max_s = self.site.allocation.increase_delay_max_s
        for i in range(self._done, stop):   # every column at every step: kept lean
            col = columns[i]
            cid = col.id
            if cid in reserved:
                out[cid] = ColumnAllocation(cid, reserved[cid], reserved[cid], False, RESERVED, "", None)
                memory[cid] = ColumnMemory(applied_da=to_da(reserved[cid]), applied_since_ms=now)
                for p in col.rotation:
                    load[p] += to_da(reserved[cid])
                continue
            d = demands.get(cid)
            mem = d.mem if d is not None else known.get(cid, _NO_MEMORY)
            target = targets.get(cid, 0)
            if target <= mem.applied_da:   # no increase: nothing to delay (_apply_delay's first case)
                applied, due = target, None
            else:
                applied, due = _apply_delay(mem, target, now, restore_now=restore_now,
                                            delay_max_s=delay_max_s, rng=rng)
            memory[cid] = _remember(mem, d, applied, due, now)
            if d is None:
                out[cid] = ColumnAllocation(cid, applied / 10, 0.0, False, IDLE, "", None)
                continue
            if cid in paused:
                reason, binding = paused[cid], d.cap_binding if paused[cid] == PAUSED_LIMIT else ""
            else:
                reason = CHARGING if applied > 0 else PAUSED_DELAY
                why = stopped.get(cid, "")
                binding = d.cap_binding if why == "cap" else why
            out[cid] = ColumnAllocation(cid, applied / 10, target / 10, applied == 0, reason, binding, due)
            for p in d.phases:
                load[p] += applied
        self._done = stop
        return stop == len(columns)

    def result(self) -> Allocation:
        if self._done < len(self.site.columns):
            raise RuntimeError("an allocation step's result is taken once every column is finished")
        load, effective = self._load, self.effective
        new_state = AllocatorState(rng=self.state.rng, columns=self._memory,
                                   restore_seen_ms=effective.dno_restore_ms)
        return Allocation(self._out, _overall_binding(self.site, self._hits), effective.source,
                          effective.site_a, (load[0] / 10, load[1] / 10, load[2] / 10), new_state,
                          tuple(self._ignored))


def _reserved(site: Site, reserved_a: Mapping[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for cid, amps in reserved_a.items():
        col = site.column(cid)
        if col is not None:  # a current that is not a number: assume the column's rating
            out[cid] = max(amps, 0.0) if math.isfinite(amps) else col.max_a
    return out


def _constraint_room(site: Site, effective: EffectiveLimit, reserved: Mapping[str, float],
                     base_load_a: PhaseCurrents | None) -> dict[str, int]:
    """Deci-amps left on every node/phase for the sessions under control."""
    limits = site.constraint_limits_da(effective.site_a)
    if base_load_a is not None:
        for p in range(3):
            base = base_load_a[p] if math.isfinite(base_load_a[p]) else 0.0
            limits[site_phase_key(SITE_NODE, p)] -= _ceil_da(max(base, 0.0))
    for cid, amps in reserved.items():
        col = site.column(cid)
        if col is not None:
            for k in site.constraint_keys(col, frozenset(col.rotation)):
                limits[k] -= _ceil_da(amps)
    return limits


def _admit(demands: Mapping[str, _Demand], order: Sequence[str],
           ranks: Mapping[str, tuple[int, int, float, str]],
           limits: Mapping[str, int]) -> tuple[list[str], dict[str, str], list[str]]:
    """Admit sessions at 6 A in rank order: (admitted, paused with reason, constraints hit)."""
    remaining = dict(limits)
    admitted: list[str] = []
    paused: dict[str, str] = {}
    hits: list[str] = []
    for cid in order:
        d = demands[cid]
        if d.cap_da < MIN_DA:
            paused[cid] = PAUSED_LIMIT
        elif ranks[cid][0] == 3:
            paused[cid] = PAUSED_MIN_PAUSE
        else:
            for k in d.keys:
                if remaining.get(k, 0) < MIN_DA:
                    paused[cid] = PAUSED_CAPACITY
                    hits.append(k)
                    break
            else:
                for k in d.keys:
                    remaining[k] -= MIN_DA
                admitted.append(cid)
    return admitted, paused, hits


def _remember(mem: ColumnMemory, d: _Demand | None, applied: int, due: int | None,
              now_ms: int) -> ColumnMemory:
    """The column's memory after this step."""
    since = now_ms if applied != mem.applied_da else mem.applied_since_ms
    if d is None:  # idle: nothing to remember but what it holds
        return ColumnMemory(applied_da=applied, applied_since_ms=since)
    charging = (now_ms if mem.charging_since_ms is None else mem.charging_since_ms) if applied > 0 else None
    paused_since = mem.paused_since_ms
    if applied == 0 and mem.applied_da > 0:
        paused_since = now_ms        # the allocator paused a charging session: minimum pause starts
    elif applied > 0:
        paused_since = None
    reclaim = d.reclaim_cap_da if applied > 0 else None
    if (applied == mem.applied_da and since == mem.applied_since_ms and due == mem.pending_due_ms
            and charging == mem.charging_since_ms and paused_since == mem.paused_since_ms
            and reclaim == mem.reclaim_cap_da):
        return mem                   # the steady state: every step for every session
    return replace(mem, applied_da=applied, applied_since_ms=since, pending_due_ms=due,
                   charging_since_ms=charging, paused_since_ms=paused_since, reclaim_cap_da=reclaim)


def _apply_delay(mem: ColumnMemory, target: int, now_ms: int, *, restore_now: bool, delay_max_s: float,
                 rng: RandomSource) -> tuple[int, int | None]:
    """(offer to send now, due time of a pending increase): decreases at once, increases later."""
    if target <= mem.applied_da:
        return target, None
    if restore_now or delay_max_s <= 0:
        return target, None
    due = mem.pending_due_ms
    if due is None:
        due = now_ms + round(rng.random() * delay_max_s * 1000)
    if now_ms >= due:
        return target, None
    return mem.applied_da, due


def _overall_binding(site: Site, hits: list[str]) -> str:
    """The constraint nearest the root among those that stopped someone; site phases first."""
    if not hits:
        return ""

    def depth(key: str) -> tuple[int, str]:
        parts = key.split(":")
        return (0 if parts[0] == SITE_NODE else len(site.node_path(parts[1])), key)

    return min(set(hits), key=depth)   # one hit per session paused: thousands, a few keys
