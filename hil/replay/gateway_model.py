"""The site's gateway during a replay: gateway.core in-process, driven on the virtual clock.

What a gateway does between the DNO and the columns, minus the wires: DNO limits go into a
`LimitBook`; `allocate` shares the effective site limit among the sessions the columns
report; `plan_failsafe` gives every column the failsafe it must fall back to; and the
result is sent to each column as an assignment (limit, validity, failsafe) through the
target. Decreases go out at once (allocation runs as soon as a limit arrives or a session
starts or stops), increases when the allocator's randomised delay is due, and every
column's assignment is re-sent every `refresh_ms` (that is its heartbeat). A delivery the
target reports as failed (silent or noisy link) is retried after `retry_ms`.

A column the gateway cannot reach (silent link, power cut) is "offline": the allocator
reserves for it the most it may still draw, which is its last delivered assignment while
that can still be in force in the column (validity and heartbeat timeout), then its
failsafe. Columns whose limit comes from the trace (a recorded `pilot.offered_a`) are
reserved at that recorded value and get it as their assignment.

Timing knobs (`GatewaySettings`) come from the trace layout's `gateway` table
(`period_s`, `refresh_s`, `validity_s`, `retry_s`, `seed`), else the defaults below.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from gateway.core.allocation import AllocatorState, Session, allocate
from gateway.core.failsafe import plan_failsafe
from gateway.core.limits import (
    SOURCE_DNO,
    EffectiveLimit,
    Limit,
    LimitBook,
    LoadCheckState,
    Violation,
    check_load,
    limit_amps,
    tolerated_a,
)
from gateway.core.site import Site

SESSION_STATUSES = frozenset(("Preparing", "Charging", "SuspendedEV", "SuspendedEVSE"))
_NEVER = 1 << 62


@dataclass(frozen=True)
class GatewaySettings:
    period_ms: int = 10_000  # allocation re-runs this often without an event (reclaim, rotation)
    refresh_ms: int = 15_000  # each column's assignment is re-sent this often (its heartbeat)
    validity_s: int = 60  # validity of each assignment
    retry_ms: int = 1_000  # a failed delivery is retried this soon
    seed: int = 1  # the allocator's random increase delays

    @classmethod
    def from_layout(cls, table: Any) -> GatewaySettings:
        """From a trace layout's `gateway` map; raises ValueError naming a bad key."""
        if table is None:
            return cls()
        if not isinstance(table, dict):
            raise ValueError("layout 'gateway' must be a map")
        known = {
            "period_s": "period_ms",
            "refresh_s": "refresh_ms",
            "validity_s": "validity_s",
            "retry_s": "retry_ms",
            "seed": "seed",
        }
        values: dict[str, int] = {}
        for key, value in table.items():
            if key not in known:
                raise ValueError("layout gateway.%s: unknown key (known: %s)" % (key, ", ".join(known)))
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < (0 if key == "seed" else 0.1)
            ):
                raise ValueError("layout gateway.%s: expected a positive number, got %r" % (key, value))
            name = known[key]
            values[name] = int(value) if name in ("validity_s", "seed") else round(value * 1000)
        return cls(**values)


@dataclass(frozen=True)
class Command:
    """One assignment for one column."""

    column_id: str
    limit_a: float
    validity_s: int
    failsafe_a: float


@dataclass
class _Col:
    phases: int
    hb_ms: int
    online: bool = True
    recorded_a: float | None = None  # the trace's own limit for this column, if any
    session_since: int | None = None
    measured: tuple[float, ...] = (0.0, 0.0, 0.0)
    target_a: float = 0.0  # what the allocation says now
    sent_a: float | None = None  # last delivered assignment
    sent_ms: int = -_NEVER
    tried_a: float | None = None  # last value sent (delivered or not)
    next_send_ms: int = 0
    pending: bool = False  # a delivery is on its way (delayed link)
    over: bool = False  # measured above its assignment + tolerance


@dataclass
class GatewayStats:
    allocations: int = 0
    skipped: int = 0  # periodic runs skipped: nothing had moved
    commands: int = 0
    delivered: int = 0
    failed: int = 0
    dno_accepted: int = 0
    dno_rejected: dict[str, int] = field(default_factory=dict)
    violations: list[dict[str, Any]] = field(default_factory=list)


class GatewayModel:
    def __init__(
        self,
        site: Site,
        settings: GatewaySettings,
        heartbeat_ms: dict[str, int],
        *,
        recorded: frozenset[str] = frozenset(),
    ) -> None:
        self.site = site
        self.settings = settings
        self.book = LimitBook(site, dno_link_up=True, now_ms=0)
        self.state = AllocatorState(rng=random.Random(settings.seed))
        self.failsafe_a: dict[str, float] = dict(plan_failsafe(site).limits_a)
        self.cols = {c.id: _Col(c.phases, heartbeat_ms.get(c.id, 60_000)) for c in site.columns}
        for cid in recorded:
            self.cols[cid].recorded_a = 0.0
        self.stats = GatewayStats()
        self.effective: EffectiveLimit = self.book.effective(0)
        self._load_state = LoadCheckState()
        self._dirty = True
        self._next_alloc = 0
        self._next_due = 0
        self.reallocated = False
        self._quiescent = False
        self._sig: tuple[Any, ...] = ()
        self._check_due = _NEVER

    # -- inputs ---------------------------------------------------------------------------
    def add_dno_limit(self, now_ms: int, value: dict[str, Any], column: str | None) -> str | None:
        """A `dno.limit` record; returns the reason code if the gateway refuses it."""
        validity = float(value["validity_s"])
        limit_id = str(value["id"])
        self._dirty = True
        if validity <= 0:  # validity 0: withdraw the limit with that id
            self.book.remove(SOURCE_DNO, limit_id, now_ms, column)
            return None
        unit, amount = ("A", value["limit_a"]) if "limit_a" in value else ("kW", value["limit_kw"])
        prio = value.get("priority", 0)
        lim = Limit(
            SOURCE_DNO,
            float(amount),
            now_ms + round(validity * 1000),
            unit=unit,
            valid_from_ms=now_ms,
            priority=prio if isinstance(prio, int) and not isinstance(prio, bool) else 0,
            column=column,
            id=limit_id,
        )
        reason = self.book.add(lim, now_ms)
        if reason is None:
            self.stats.dno_accepted += 1
        else:
            self.stats.dno_rejected[reason] = self.stats.dno_rejected.get(reason, 0) + 1
        return reason

    def set_dno_link(self, now_ms: int, up: bool) -> None:
        self.book.set_dno_link(up, now_ms)
        self._dirty = True

    def set_online(self, column_id: str, now_ms: int, online: bool) -> None:
        col = self.cols[column_id]
        if col.online != online:
            col.online = online
            col.next_send_ms = now_ms
            col.pending = False
            self._dirty = True

    def set_recorded(self, column_id: str, now_ms: int, amps: float) -> None:
        col = self.cols[column_id]
        if col.recorded_a != amps:
            col.recorded_a = amps
            col.next_send_ms = now_ms
            self._dirty = True

    def observe(self, column_id: str, now_ms: int, status: str, measured: tuple[float, float, float]) -> None:
        """What the column reports (status, measured current per column phase)."""
        col = self.cols[column_id]
        col.measured = measured
        over = max(measured[: col.phases]) > tolerated_a(col.sent_a or 0.0)
        if over != col.over:  # a car going over (or back under) its limit: check the load now
            col.over = over
            self._check_due = min(self._check_due, now_ms)
        has = status in SESSION_STATUSES
        if has != (col.session_since is not None):
            col.session_since = now_ms if has else None
            self._dirty = True

    # -- the gateway's step ---------------------------------------------------------------
    def due_ms(self) -> int:
        """When `step` must run next: now if something changed, else the next timer."""
        return -_NEVER if self._dirty else min(self._next_alloc, self._next_due, self._check_due)

    def step(self, now_ms: int) -> list[Command]:
        """Run what is due; `reallocated` tells whether the allocation (and limits) ran."""
        self.reallocated = self._dirty or now_ms >= self._next_alloc
        if self.reallocated:
            self._allocate(now_ms)
        elif now_ms >= self._check_due:
            self._check_load(now_ms, self.effective)
        out = []
        nxt = self._next_alloc
        for cid, col in self.cols.items():
            if not col.online:
                continue
            value = col.recorded_a if col.recorded_a is not None else col.target_a
            # A new value goes out at once; a refresh, or a retry of a failed one, when it is due.
            fresh = value not in (col.sent_a, col.tried_a)
            if not col.pending and (fresh or now_ms >= col.next_send_ms):
                out.append(Command(cid, value, self.settings.validity_s, self.failsafe_a.get(cid, 0.0)))
                col.pending = True
                col.tried_a = value
                col.next_send_ms = now_ms + self.settings.retry_ms  # until the delivery says otherwise
            if not col.pending:  # a pending one reschedules itself when its delivery is known
                nxt = min(nxt, col.next_send_ms)
        self._next_due = max(nxt, now_ms + 1)
        self.stats.commands += len(out)
        return out

    def delivered(self, cmd: Command, now_ms: int, ok: bool) -> None:
        col = self.cols[cmd.column_id]
        col.pending = False
        if ok:
            col.sent_a = cmd.limit_a
            col.sent_ms = now_ms
            # Refreshes are due on a common tick (a gateway refreshes its columns in one sweep).
            period = self.settings.refresh_ms
            col.next_send_ms = ((now_ms + period // 2) // period + 1) * period
            self.stats.delivered += 1
        else:
            col.next_send_ms = now_ms + self.settings.retry_ms
            self.stats.failed += 1
        self._next_due = min(self._next_due, col.next_send_ms)

    def _reserved(self, now_ms: int) -> dict[str, float]:
        out: dict[str, float] = {}
        validity_ms = self.settings.validity_s * 1000
        for cid, col in self.cols.items():
            if col.recorded_a is not None:
                out[cid] = col.recorded_a
            elif not col.online:
                fs = self.failsafe_a.get(cid, 0.0)
                held = (
                    col.sent_a
                    if col.sent_a is not None and now_ms < col.sent_ms + min(col.hb_ms, validity_ms)
                    else 0.0
                )
                out[cid] = max(held, fs)
        return out

    def _signature(self, eff: EffectiveLimit) -> tuple[Any, ...]:
        """What the allocation depends on, with measured currents rounded to 0.5 A."""
        cols = tuple(
            (cid, c.session_since, c.online, c.recorded_a, round(max(c.measured[: c.phases]) * 2))
            for cid, c in self.cols.items()
        )
        return (
            cols,
            eff.site_a,
            tuple(sorted((k, v.value_a) for k, v in eff.columns.items())),
            eff.failsafe_active,
        )

    def _allocate(self, now_ms: int) -> None:
        periodic = not self._dirty
        self._dirty = False
        book = self.book
        book.prune(now_ms)
        eff = book.effective(now_ms)
        self.effective = eff
        nxt = now_ms + self.settings.period_ms
        for lim in book.limits():  # re-run when a limit expires or a planned one starts
            for edge in (lim.valid_from_ms, lim.valid_until_ms):
                if edge > now_ms:
                    nxt = min(nxt, edge)
        sig = self._signature(eff)
        if periodic and self._quiescent and sig == self._sig:
            # Nothing the allocation reads has moved, and it left nothing waiting on time
            # (no pending increase, no paused session, no headroom to reclaim): same result.
            self.stats.skipped += 1
            self._next_alloc = nxt
            self.reallocated = False
            self._check_load(now_ms, eff)
            return
        self._sig = sig
        sessions = [
            Session(cid, col.session_since, measured_a=col.measured[: col.phases])
            for cid, col in self.cols.items()
            if col.session_since is not None and col.online and col.recorded_a is None
        ]
        alloc = allocate(self.site, sessions, eff, now_ms, self.state, reserved_a=self._reserved(now_ms))
        self.state = alloc.state
        self.stats.allocations += 1
        quiet = True
        margin = self.site.allocation.reclaim_margin_a
        for cid, ca in alloc.columns.items():
            col = self.cols[cid]
            if col.recorded_a is None and col.online:
                col.target_a = ca.offered_a
            if ca.increase_due_ms is not None and ca.increase_due_ms > now_ms:
                nxt = min(nxt, ca.increase_due_ms)
                quiet = False
            # Headroom the allocator would reclaim (offer measured + margin, never below 6 A,
            # when that frees at least 1 A) once the offer has settled.
            reclaim = max(6.0, max(col.measured[: col.phases]) + margin)
            if ca.paused or (ca.offered_a > 0 and reclaim <= ca.offered_a - 1.0):
                quiet = False
        self._quiescent = quiet
        self._next_alloc = nxt
        self._check_load(now_ms, eff)

    def _check_load(self, now_ms: int, eff: EffectiveLimit) -> None:
        """The gateway's measured-load check (a car ignoring its limit is reported). Skipped
        when surely nothing is over: no column above its tolerance, every column's highest
        phase together within the lowest site phase limit, no circuits, nothing pending."""
        self._check_due = _NEVER
        if not self._load_state.over_since and not self.site.circuits:
            total = 0.0
            over = False
            for c in self.cols.values():
                m = max(c.measured[: c.phases])
                total += m
                if m > tolerated_a(c.sent_a or 0.0):
                    over = True
                    break
            if not over and total <= min(eff.site_a):
                return
        offered = {cid: (c.sent_a if c.sent_a is not None else 0.0) for cid, c in self.cols.items()}
        measured = {cid: c.measured[: c.phases] for cid, c in self.cols.items()}
        result = check_load(self.site, eff, offered, measured, now_ms, state=self._load_state)
        self._load_state = result.state
        if result.state.over_since:  # something is over: look again every second
            self._check_due = now_ms + 1000
        for v in result.violations:
            if v.new and len(self.stats.violations) < 100:
                self.stats.violations.append(_violation(v))

    # -- what the oracles and plots read ----------------------------------------------------
    def site_limit_a(self) -> tuple[float, float, float]:
        return self.effective.site_a

    def dno_site_a(self, now_ms: int) -> float | None:
        """The lowest valid DNO site limit (A per phase), None when there is none."""
        values = [
            limit_amps(lim, self.site)
            for lim in self.book.limits()
            if lim.source == SOURCE_DNO and lim.column is None and lim.is_valid(now_ms)
        ]
        return min(values) if values else None

    def dno_column_a(self, column_id: str) -> float | None:
        lim = self.effective.columns.get(column_id)
        return lim.value_a if lim is not None and lim.source == SOURCE_DNO else None


def _violation(v: Violation) -> dict[str, Any]:
    return {
        "kind": v.kind,
        "target": v.target,
        "phase": v.phase,
        "measured_a": round(v.measured_a, 2),
        "allowed_a": round(v.allowed_a, 2),
        "since_ms": v.since_ms,
    }
