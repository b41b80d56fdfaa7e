"""Oracles: what a replay must show, each judged with a pass/fail and a figure.

They are fed as the replay runs (streaming: memory stays flat however long the trace)
and give their verdicts at the end. Ids, one per check:

- `limit.site`: the measured site current, per phase, stays within the effective site
  limit (connection capacity, every valid DNO limit, the DNO failsafe) once the allowed
  response time has passed after each reduction. Figure: worst excess after the response
  time, the overshoot integral (A·s) above the limit in force (response time included),
  and the time spent in violation.
- `limit.offer/<column>`: the firmware's offer stays within the column's limit in force
  (the gateway's assignment while it is valid and the gateway alive, the failsafe
  otherwise, capped by the column's ratings) within one control step.
- `limit.car/<column>`: the car's current stays within that same limit once the car's
  response time has passed ("the car respected the limit"). A car ignoring a reduction
  fails this one while `limit.offer` passes.
- `limit.dno/<column>`: a DNO limit on one column, against the car's current.
- `failsafe/<column>`: each time the gateway goes silent, the column is in failsafe
  (failsafe active, offer within the failsafe limit) within its heartbeat timeout +
  `failsafe_margin_ms`. Only silences long enough to need it are judged.
- `timing/<column>`: the contactor is never closed while the car is outside C/D for more
  than `contactor_open_ms`, nor during a fault (Faulted, CP state E/F) for more than
  `fault_open_ms`, nor with the PWM off for more than `pwm_off_open_ms`; and it closes
  within `contact_close_ms` once the car asks (C/D) with the PWM on.
- `energy/<column>`: the firmware's energy register moved by the modelled energy (the
  integral of the car's power), within `energy_tolerance_pct` % plus the register's
  1 Wh resolution plus one write quantum per power cut (what the store may lose).
- `telemetry`: no lost sequence number at an MQTT consumer after it drops duplicates by
  seq as docs/mqtt-api.md says, and no seq with two different payloads (fed by a target
  that has one: `telemetry_sequences()`, `telemetry_conflicts()`). Redeliveries are counted.
- `reported/<column>`: an error the trace expects the firmware to report (meta.expect).

Response times: a limit is "in force" for a check once the response time has passed
since it was set; until then the higher of the old and new values is allowed (a
trailing maximum over the response window). Defaults from ../shared/STANDARDS.md: the
car's reduction lag budget is 10 s (the longest seen in the real log); the column's
offer must follow within one control step. Timing figures are measured between samples:
`timing_allowance_ms` covers the sampling step of a realtime target.
"""

from __future__ import annotations

import fnmatch
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from hil.replay.target import ColumnOutputs

_INF = math.inf


@dataclass(frozen=True)
class OracleConfig:
    car_response_ms: int = 10_000  # STANDARDS.md: the car is below a new limit within 10 s
    offer_response_ms: int = 100  # one control step of the replay
    current_tolerance_a: float = 0.1  # measurement resolution on currents
    offer_tolerance_a: float = 0.05
    contactor_open_ms: int = 100  # IEC 61851 (STANDARDS.md): open within 100 ms of leaving C/D
    fault_open_ms: int = 3000  # ... within 3 s on state E or a fault
    pwm_off_open_ms: int = 6000  # ... 6 s after the PWM stopped if the car stays in C
    contact_close_ms: int = 3000  # ... close within 3 s after B->C with PWM on
    timing_allowance_ms: int = 0  # the sampling step of a realtime target
    step_allowance_ms: int = 100  # the firmware sees a timeout at its next step
    failsafe_margin_ms: int = 1000  # failsafe within heartbeat timeout + this
    energy_tolerance_pct: float = 0.5
    energy_resolution_wh: float = 1.0


@dataclass(frozen=True)
class OracleResult:
    id: str
    title: str
    passed: bool
    figure: Mapping[str, Any]
    message: str
    column: str | None = None
    expected: str = "pass"  # "fail": the trace expects this check to fail

    @property
    def ok(self) -> bool:
        return self.passed == (self.expected == "pass")

    @property
    def group(self) -> str:
        return self.id.split("/", 1)[0]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "title": self.title,
            "column": self.column,
            "passed": self.passed,
            "expected": self.expected,
            "ok": self.ok,
            "message": self.message,
            "figure": dict(self.figure),
        }


def _r(x: float, nd: int = 3) -> float:
    return round(x, nd) if math.isfinite(x) else x


# ---- limits --------------------------------------------------------------------------------


class LimitWatch:
    """A measured value against a piecewise-constant limit with a response time (streaming)."""

    def __init__(self, response_ms: int, tolerance: float) -> None:
        self.response_ms = response_ms
        self.tolerance = tolerance
        self._changes: deque[tuple[int, float]] = deque([(-(1 << 62), _INF)])
        self._last_t: int | None = None
        self._last_m = 0.0
        self._in_violation = False
        self.overshoot_as = 0.0  # integral above the limit in force (response time included)
        self.violation_ms = 0  # time in violation (above the allowed value, after the response)
        self.violations = 0  # episodes
        self.worst_excess = 0.0  # above the allowed value, at a sample
        self.worst_at_ms: int | None = None
        self.first_violation_ms: int | None = None
        self.max_measured = 0.0
        self.samples = 0
        self.lowest_limit = _INF

    @property
    def limit(self) -> float:
        return self._changes[-1][1]

    def set_limit(self, t_ms: int, value: float | None) -> None:
        v = _INF if value is None else float(value)
        ch = self._changes
        if v == ch[-1][1]:
            return
        t_ms = max(t_ms, ch[-1][0])
        if ch[-1][0] == t_ms and len(ch) > 1:
            ch.pop()  # replaced in the same instant
            if v == ch[-1][1]:
                return
        ch.append((t_ms, v))
        self.lowest_limit = min(self.lowest_limit, v)
        self._prune(min(t_ms, self._last_t if self._last_t is not None else t_ms))

    def _prune(self, t_ms: int) -> None:
        """Forget changes no check can need: keep the one in force at t_ms - response and later."""
        ch = self._changes
        start = t_ms - self.response_ms
        while len(ch) >= 2 and ch[1][0] <= start:  # from t_change + response on, the new value rules
            ch.popleft()

    def allowed(self, t_ms: int) -> float:
        """The highest limit in force during [t_ms - response, t_ms]."""
        self._prune(t_ms)
        best = -_INF
        for tc, v in self._changes:
            if tc > t_ms:
                break
            best = max(best, v)
        return best

    def observe(self, t_ms: int, measured: float) -> None:
        last_t = self._last_t
        ch = self._changes
        lim_t, lim = ch[-1]
        if last_t is not None and lim_t <= last_t and measured <= lim + self.tolerance:
            # The common case: no limit change since the last sample, within the limit now.
            m = self._last_m
            if m > lim:
                self.overshoot_as += (m - lim) * (t_ms - last_t) / 1000.0
            if self._in_violation:
                self.violation_ms += t_ms - last_t
                self._in_violation = False
        else:
            self._observe_slow(t_ms, measured, last_t)
        self._last_t = t_ms
        self._last_m = measured
        self.samples += 1
        self.max_measured = max(self.max_measured, measured)

    def _observe_slow(self, t_ms: int, measured: float, last_t: int | None) -> None:
        if last_t is not None and t_ms > last_t:
            m = self._last_m
            lim = -_INF
            seg = last_t
            for tc, v in self._changes:  # the limit in force over [last_t, t_ms)
                if tc <= last_t:
                    lim = v
                    continue
                if tc >= t_ms:
                    break
                if m > lim:
                    self.overshoot_as += (m - lim) * (tc - seg) / 1000.0
                seg, lim = tc, v
            if m > lim:
                self.overshoot_as += (m - lim) * (t_ms - seg) / 1000.0
            if self._in_violation:
                self.violation_ms += t_ms - last_t
        excess = measured - self.allowed(t_ms)
        if excess > self.tolerance:
            if not self._in_violation:
                self.violations += 1
                if self.first_violation_ms is None:
                    self.first_violation_ms = t_ms
            self._in_violation = True
            if excess > self.worst_excess:
                self.worst_excess = excess
                self.worst_at_ms = t_ms
        else:
            self._in_violation = False
            self.worst_excess = max(self.worst_excess, excess)

    @property
    def passed(self) -> bool:
        return self.violations == 0

    def figure(self) -> dict[str, Any]:
        return {
            "worst_excess_a": _r(self.worst_excess),
            "worst_at_s": None if self.worst_at_ms is None else _r(self.worst_at_ms / 1000.0),
            "overshoot_as": _r(self.overshoot_as),
            "violation_s": _r(self.violation_ms / 1000.0),
            "violations": self.violations,
            "max_measured_a": _r(self.max_measured),
            "lowest_limit_a": _r(self.lowest_limit) if math.isfinite(self.lowest_limit) else None,
            "response_s": self.response_ms / 1000.0,
            "samples": self.samples,
        }

    def text(self) -> str:
        if self.passed:
            return "max excess over the allowed limit %.2f A; overshoot %.1f A·s" % (
                max(self.worst_excess, 0.0),
                self.overshoot_as,
            )
        return (
            "%d violation(s), first at %.1f s, worst %.2f A over at %.1f s, %.1f s in violation; "
            "overshoot %.1f A·s"
            % (
                self.violations,
                (self.first_violation_ms or 0) / 1000.0,
                self.worst_excess,
                (self.worst_at_ms or 0) / 1000.0,
                self.violation_ms / 1000.0,
                self.overshoot_as,
            )
        )


# ---- per column ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ColumnInfo:
    """What the oracles need to know of a column (from its firmware config)."""

    id: str
    cap_a: float  # min(hardware, installation rating)
    failsafe_a: float  # config failsafe (before any pre-assignment, after a boot)
    heartbeat_ms: int
    energy_quantum_wh: float = 10.0


@dataclass
class _Episode:
    start: int
    reached: int | None = None
    failed: bool = False


class _Timer:
    """How long a condition holds, sample to sample; the longest spell and the overruns."""

    def __init__(self, limit_ms: int) -> None:
        self.limit_ms = limit_ms
        self.since: int | None = None
        self.longest = 0
        self.spells = 0
        self.overruns = 0
        self._over = False

    def update(self, t_ms: int, on: bool) -> None:
        if on:
            if self.since is None:
                self.since = t_ms
                self.spells += 1
                self._over = False
            spell = t_ms - self.since
            self.longest = max(self.longest, spell)
            if spell > self.limit_ms and not self._over:
                self._over = True
                self.overruns += 1
        elif self.since is not None:
            self.longest = max(self.longest, t_ms - self.since)
            if t_ms - self.since > self.limit_ms and not self._over:
                self.overruns += 1
            self.since = None


class ColumnOracles:
    def __init__(
        self, info: ColumnInfo, cfg: OracleConfig, on_limit: Callable[[int, float], None] | None = None
    ) -> None:
        self.info = info
        self.cfg = cfg
        self.on_limit = on_limit  # told each time the limit in force changes (plots)
        self.offer = LimitWatch(cfg.offer_response_ms, cfg.offer_tolerance_a)
        self.car = LimitWatch(cfg.car_response_ms, cfg.current_tolerance_a)
        self.dno: LimitWatch | None = None
        self._assign: float | None = None
        self._assign_until = 0
        self._kept: tuple[float, int] | None = None  # the last assignment, for gateway_seen()
        self._alive_until = 0
        self._failsafe = info.failsafe_a
        allow = cfg.timing_allowance_ms
        self.leave_cd = _Timer(cfg.contactor_open_ms + allow)
        self.fault = _Timer(cfg.fault_open_ms + allow)
        self.pwm_off = _Timer(cfg.pwm_off_open_ms + max(allow, cfg.step_allowance_ms))
        self.close = _Timer(cfg.contact_close_ms + max(allow, cfg.step_allowance_ms))
        self.episodes: list[_Episode] = []
        self._silent = False
        self.cuts = 0
        self.reg_first: int | None = None
        self.reg_last = 0
        self.model_first = 0.0
        self.model_last = 0.0
        self.errors: dict[str, int] = {}
        self._last_error = "NoError"
        self._set(0)

    # -- the limit in force ----------------------------------------------------------------
    def in_force(self, t_ms: int) -> float:
        cap = self.info.cap_a
        if self._assign is not None and t_ms < self._assign_until and t_ms < self._alive_until:
            return min(cap, self._assign)
        return min(cap, self._failsafe)

    def _set(self, t_ms: int) -> None:
        v = self.in_force(t_ms)
        self.offer.set_limit(t_ms, v)
        self.car.set_limit(t_ms, v)
        if self.on_limit is not None:
            self.on_limit(t_ms, v)

    def _expire(self, t_ms: int) -> None:
        if self._assign is None:
            return
        edge = min(self._assign_until, self._alive_until)
        if edge <= t_ms:
            self._set(edge)
            self._assign = None

    def assignment(self, t_ms: int, limit_a: float, validity_s: int, failsafe_a: float | None) -> None:
        self._expire(t_ms)
        before = self.in_force(t_ms)
        if validity_s <= 0:
            self._assign = None
            self._kept = None
        else:
            self._assign = max(0.0, float(limit_a))
            self._assign_until = t_ms + min(int(validity_s), 86400) * 1000
            self._kept = (self._assign, self._assign_until)
        self._alive_until = t_ms + self.info.heartbeat_ms
        if failsafe_a is not None:
            self._failsafe = max(0.0, float(failsafe_a))
        if self.in_force(t_ms) != before:
            self._set(t_ms)

    def gateway_seen(self, t_ms: int, failsafe_a: float | None = None) -> None:
        """A sign of life from the gateway that is no assignment (a heartbeat), maybe with a
        new pre-assigned failsafe: an assignment still valid is in force again, as in the
        firmware (fed by targets with the real gateway in the loop)."""
        self._expire(t_ms)
        before = self.in_force(t_ms)
        if self._assign is None and self._kept is not None and self._kept[1] > t_ms:
            self._assign, self._assign_until = self._kept
        self._alive_until = t_ms + self.info.heartbeat_ms
        if failsafe_a is not None:
            self._failsafe = max(0.0, float(failsafe_a))
        if self.in_force(t_ms) != before:
            self._set(t_ms)

    def silent(self, t_ms: int, silent: bool) -> None:
        if silent and not self._silent:
            self.episodes.append(_Episode(t_ms))
        elif not silent and self._silent and self.episodes:
            self._judge(self.episodes[-1], t_ms)
        self._silent = silent

    def power_cut(self, t_ms: int) -> None:
        """The column reboots with its config failsafe and no assignment."""
        self._expire(t_ms)
        self.cuts += 1
        self._assign = None
        self._kept = None
        self._failsafe = self.info.failsafe_a
        self._set(t_ms)

    def dno_limit(self, t_ms: int, value: float | None) -> None:
        if self.dno is None:
            if value is None:
                return
            self.dno = LimitWatch(self.cfg.car_response_ms, self.cfg.current_tolerance_a)
        self.dno.set_limit(t_ms, value)

    def _judge(self, ep: _Episode, t_ms: int) -> None:
        if ep.reached is None and t_ms - ep.start > self.info.heartbeat_ms + self.cfg.failsafe_margin_ms:
            ep.failed = True

    # -- samples ----------------------------------------------------------------------------
    def sample(
        self,
        t_ms: int,
        ev_cp: str,
        current_a: float,
        out: ColumnOutputs,
        *,
        powered: bool,
        modelled_wh: float,
    ) -> None:
        self._expire(t_ms)
        self.offer.observe(t_ms, out.offered_a)
        self.car.observe(t_ms, current_a)
        if self.dno is not None:
            self.dno.observe(t_ms, current_a)
        closed = out.contactor
        in_cd = ev_cp in ("C", "D")
        self.leave_cd.update(t_ms, closed and not in_cd)
        self.fault.update(t_ms, closed and (out.status == "Faulted" or ev_cp in ("E", "F")))
        self.pwm_off.update(t_ms, closed and out.offered_a <= 0.0)
        self.close.update(
            t_ms,
            powered
            and in_cd
            and not closed
            and out.offered_a > 0.0
            and out.status != "Faulted"
            and out.error == "NoError",
        )
        if self._silent and self.episodes:
            ep = self.episodes[-1]
            if ep.reached is None:
                if out.failsafe_active and out.offered_a <= self._failsafe + self.cfg.offer_tolerance_a:
                    ep.reached = t_ms
                else:
                    self._judge(ep, t_ms)
        if powered:
            if self.reg_first is None:
                self.reg_first = out.energy_wh
                self.model_first = modelled_wh
            self.reg_last = out.energy_wh
            self.model_last = modelled_wh
        if out.error != self._last_error:
            self._last_error = out.error
            if out.error != "NoError":
                self.errors[out.error] = self.errors.get(out.error, 0) + 1

    # -- verdicts --------------------------------------------------------------------------
    def results(self, t_end: int) -> list[OracleResult]:
        cid = self.info.id
        out = [
            OracleResult(
                "limit.offer/" + cid,
                "firmware offer within the column's limit (%s)" % cid,
                self.offer.passed,
                self.offer.figure(),
                self.offer.text(),
                cid,
            ),
            OracleResult(
                "limit.car/" + cid,
                "car current within the column's limit after %.0f s (%s)"
                % (self.cfg.car_response_ms / 1000.0, cid),
                self.car.passed,
                self.car.figure(),
                self.car.text(),
                cid,
            ),
        ]
        if self.dno is not None:
            out.append(
                OracleResult(
                    "limit.dno/" + cid,
                    "car current within the DNO's column limit (%s)" % cid,
                    self.dno.passed,
                    self.dno.figure(),
                    self.dno.text(),
                    cid,
                )
            )
        out.append(self._timing_result())
        if self.episodes:
            out.append(self._failsafe_result(t_end))
        out.append(self._energy_result())
        return out

    def _timing_result(self) -> OracleResult:
        timers = {
            "leave_cd": self.leave_cd,
            "fault": self.fault,
            "pwm_off": self.pwm_off,
            "close": self.close,
        }
        figure: dict[str, Any] = {}
        bad = []
        for name, tm in timers.items():
            figure[name + "_max_ms"] = tm.longest
            figure[name + "_limit_ms"] = tm.limit_ms
            figure[name + "_events"] = tm.spells
            if tm.overruns:
                bad.append("%s %d ms > %d ms (%d times)" % (name, tm.longest, tm.limit_ms, tm.overruns))
        msg = (
            "; ".join(bad)
            if bad
            else "contactor open %d ms after leaving C/D (max), %d ms on faults, "
            "%d ms after PWM off; closes in %d ms"
            % (self.leave_cd.longest, self.fault.longest, self.pwm_off.longest, self.close.longest)
        )
        cid = self.info.id
        return OracleResult(
            "timing/" + cid, "contactor and state timings (%s)" % cid, not bad, figure, msg, cid
        )

    def _failsafe_result(self, t_end: int) -> OracleResult:
        limit = self.info.heartbeat_ms + self.cfg.failsafe_margin_ms
        judged = []
        for ep in self.episodes:
            if ep is self.episodes[-1] and self._silent:
                self._judge(ep, t_end)
            if ep.reached is not None or ep.failed:
                judged.append(ep)
        times = [ep.reached - ep.start for ep in judged if ep.reached is not None]
        failed = [
            ep for ep in judged if ep.failed or (ep.reached is not None and ep.reached - ep.start > limit)
        ]
        worst = max(times) if times else None
        figure = {
            "silences": len(self.episodes),
            "judged": len(judged),
            "failed": len(failed),
            "worst_s": None if worst is None else worst / 1000.0,
            "limit_s": limit / 1000.0,
        }
        if failed:
            msg = "failsafe not reached within %.1f s after the gateway went silent at %s" % (
                limit / 1000.0,
                ", ".join("%.1f s" % (ep.start / 1000.0) for ep in failed),
            )
        elif judged:
            msg = "failsafe reached %.1f s after the gateway went silent (limit %.1f s)" % (
                (worst or 0) / 1000.0,
                limit / 1000.0,
            )
        else:
            msg = "no silence lasted long enough to need the failsafe"
        cid = self.info.id
        return OracleResult(
            "failsafe/" + cid,
            "failsafe within the heartbeat timeout + %.0f s (%s)"
            % (self.cfg.failsafe_margin_ms / 1000.0, cid),
            not failed,
            figure,
            msg,
            cid,
        )

    def _energy_result(self) -> OracleResult:
        cid = self.info.id
        register = float(self.reg_last - (self.reg_first or 0))
        modelled = self.model_last - self.model_first
        err = register - modelled
        tol = (
            abs(modelled) * self.cfg.energy_tolerance_pct / 100.0
            + self.cfg.energy_resolution_wh
            + self.cuts * self.info.energy_quantum_wh
        )
        passed = abs(err) <= tol
        figure = {
            "register_wh": _r(register, 1),
            "modelled_wh": _r(modelled, 1),
            "error_wh": _r(err, 1),
            "error_pct": _r(100.0 * err / modelled, 3) if modelled > 0 else None,
            "tolerance_wh": _r(tol, 1),
            "power_cuts": self.cuts,
        }
        msg = "register %.0f Wh vs modelled %.1f Wh: %+.1f Wh (tolerance %.1f Wh)" % (
            register,
            modelled,
            err,
            tol,
        )
        return OracleResult(
            "energy/" + cid,
            "energy register vs the integral of the modelled power (%s)" % cid,
            passed,
            figure,
            msg,
            cid,
        )


# ---- the site --------------------------------------------------------------------------------


class SiteOracle:
    def __init__(self, cfg: OracleConfig) -> None:
        self.cfg = cfg
        self.phases = [LimitWatch(cfg.car_response_ms, cfg.current_tolerance_a) for _ in range(3)]
        self.sources: set[str] = set()

    def set_limit(self, t_ms: int, site_a: Sequence[float], source: str) -> None:
        for watch, v in zip(self.phases, site_a, strict=True):
            watch.set_limit(t_ms, v)
        self.sources.add(source)

    def sample(self, t_ms: int, currents: Sequence[float]) -> None:
        for watch, v in zip(self.phases, currents, strict=True):
            watch.observe(t_ms, v)

    def result(self) -> OracleResult:
        worst = max(range(3), key=lambda p: (self.phases[p].violations, self.phases[p].worst_excess))
        w = self.phases[worst]
        figure = w.figure()
        figure["worst_phase"] = "L%d" % (worst + 1)
        figure["overshoot_as"] = _r(sum(p.overshoot_as for p in self.phases))
        figure["violation_s"] = _r(max(p.violation_ms for p in self.phases) / 1000.0)
        figure["limit_sources"] = sorted(self.sources)
        passed = all(p.passed for p in self.phases)
        msg = "L%d: %s" % (worst + 1, w.text())
        return OracleResult(
            "limit.site",
            "site current within the effective site limit (capacity, DNO) "
            "after %.0f s" % (self.cfg.car_response_ms / 1000.0),
            passed,
            figure,
            msg,
        )


# ---- telemetry -------------------------------------------------------------------------------


def check_telemetry(sequences: Mapping[str, Sequence[int]], *, first: int | None = None,
                    conflicting: Mapping[str, int] | None = None) -> OracleResult:
    """What a consumer that follows docs/mqtt-api.md sees: after dropping duplicates by
    (publisher, seq), no sequence number is missing. Delivery is at least once, so a
    redelivered message (its acknowledgement died with a connection) is counted, not a
    failure; one seq carrying two different payloads (`conflicting`, per publisher, from the
    consumer) is. `first`: the number the first message must carry (None: whatever
    arrived first is the start)."""
    lost = dups = received = 0
    conflicts = conflicting or {}
    worst: dict[str, dict[str, int]] = {}
    for pub, seqs in sequences.items():
        seen = set(seqs)
        d = len(seqs) - len(seen)
        lo = first if first is not None else (min(seen) if seen else 0)
        hi = max(seen) if seen else lo - 1
        missing = sum(1 for s in range(lo, hi + 1) if s not in seen)
        received += len(seqs)
        lost += missing
        dups += d
        if missing or d or conflicts.get(pub):
            worst[pub] = {"lost": missing, "duplicates": d, "conflicting": conflicts.get(pub, 0)}
    conflicted = sum(conflicts.values())
    figure = {
        "publishers": len(sequences),
        "received": received,
        "lost": lost,
        "duplicates": dups,
        "conflicting": conflicted,
        "bad_publishers": worst,
    }
    msg = "%d messages from %d publishers: %d lost, %d redelivered (dropped by seq), %d conflicting" % (
        received, len(sequences), lost, dups, conflicted)
    ok = lost == 0 and conflicted == 0
    return OracleResult("telemetry", "no lost telemetry, no seq with two payloads", ok, figure, msg)


# ---- expectations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Expectations:
    """What a trace says must happen (header meta.expect): checks expected to fail (glob
    patterns on ids) and errors each column's firmware must report."""

    fail: tuple[str, ...] = ()
    errors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> Expectations:
        raw = meta.get("expect") if isinstance(meta, Mapping) else None
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise ValueError("meta.expect must be a map")
        fail = raw.get("fail", [])
        if not isinstance(fail, list) or not all(isinstance(p, str) for p in fail):
            raise ValueError("meta.expect.fail must be a list of oracle ids (glob patterns)")
        errors = raw.get("errors", {})
        if not isinstance(errors, Mapping):
            raise ValueError("meta.expect.errors must map column ids to error names")
        errs: dict[str, tuple[str, ...]] = {}
        for col, given in errors.items():
            names = [given] if isinstance(given, str) else given
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("meta.expect.errors.%s must be an error name or a list of them" % col)
            errs[str(col)] = tuple(names)
        return cls(tuple(fail), errs)

    def apply(
        self, results: Iterable[OracleResult], reported: Mapping[str, Mapping[str, int]]
    ) -> list[OracleResult]:
        out = []
        matched: set[str] = set()
        for r in results:
            hits = [p for p in self.fail if fnmatch.fnmatchcase(r.id, p)]
            matched.update(hits)
            out.append(replace(r, expected="fail") if hits else r)
        for pattern in self.fail:
            if pattern not in matched:
                out.append(
                    OracleResult(
                        "expect/" + pattern,
                        "expected failure %r matches a check" % pattern,
                        False,
                        {"pattern": pattern},
                        "no check has an id matching %r" % pattern,
                    )
                )
        for col, names in self.errors.items():
            seen = reported.get(col, {})
            missing = [n for n in names if n not in seen]
            msg = (
                "reported " + ", ".join("%s (%d times)" % (n, seen[n]) for n in names if n in seen)
                if not missing
                else "never reported " + ", ".join(missing)
            )
            out.append(
                OracleResult(
                    "reported/" + col,
                    "firmware reports %s (%s)" % (", ".join(names), col),
                    not missing,
                    {"expected": list(names), "seen": dict(seen)},
                    msg,
                    col,
                )
            )
        return out
