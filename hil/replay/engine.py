"""The replay engine: a trace, streamed, drives a simulated world around the columns under test.

The engine owns the world and a target (hil.replay.target) owns the columns:
- a car per column (hil.models.ev.EvModel), created at each `ev.event` plug (profile from
  the event's `profile`, the layout column's `ev_profile`, else by phases: the calibrated
  single-phase car of the real log, or a generic 11 kW three-phase car; `soc_pct`,
  `energy_wh` (or `requested_wh`) as its demand, `misbehave` as a list), following the
  column's pilot and contactor; `ev.demand_a`, `ev.state` (E or F force a pilot fault until
  the next `ev.state`), soc/pause/resume/misbehave/behave events. A column whose trace has
  no `ev.event` channel but a recorded current or offer (a charger log) has a car plugged
  in from the start;
- the column's meter: what the car draws, the import register (layout `meter_start_wh` +
  the car's AC energy); a meter link fault makes it stop answering;
- the site's gateway (hil.replay.gateway_model: gateway.core's LimitBook, allocate and
  plan_failsafe in-process) fed by `dno.limit` records (validity_s 0 withdraws the limit
  with that id) and the columns' status, sending each column its assignment through
  `Target.assign_limit` when the allocation says so; a column with a recorded
  `pilot.offered_a` gets that recorded value instead. The column checks count an
  assignment from its delivery, or, on a target that reports what each firmware received
  (`reports_writes`: mpy, site), from when the firmware had it;
- faults: `link.fault` (map: kind, duration_ms, and `link`: "gateway" (default) between
  the gateway and the column(s), "meter" (any kind: the meter stops answering), or "dno"
  (the broker link: DNO limits that expire meanwhile fall to the site's DNO failsafe);
  `rate` for drop/corrupt, `delay_ms` for delay) and `power.cut`. A silent gateway link goes
  to `Target.gateway_silent`; bus noise goes to the target's optional `link_fault`, or is
  modelled here as dropped (drop, corrupt: each delivery fails with probability `rate`,
  default 0.5; the gateway retries) or late (delay, default 1000 ms) assignments.
  Recorded channels the world computes itself (meter power and energy, site power and
  limit, cp.state) are listed in the run's notes as not replayed; a recorded
  `meter.current_a` is compared with the modelled current (summary `recorded`).

Layout (the columns, their firmware configs, the site, the gateway's timing): hil.replay.layout.
Meta: `duration_ms` (run at least this long), `seed`, `expect` (hil.replay.oracles),
`scenario`, `description`.

Time: trace ms from 0. A realtime target is stepped every `step_ms` (100 ms) and paces
itself. A virtual target (sim) is stepped per column, as finely as the moment needs:
every `fine_ms` (10 ms, the firmware's control period) while the car's pilot state and
the column's view of it differ or the column just switched something, every `step_ms`
while anything moves (a record, an assignment, a current ramp, a fault, a misbehaving
car, `settle_ms` after any change), every `quiet_ms` while a car draws a steady current
(or sooner, when it will have charged its demand), every `waiting_ms` while a car waits on
the column's own pause timer, and every `idle_ms` otherwise (the firmware has no timer then
that could change what it offers). Records, assignments and fault edges are applied at
their own time and wake the column then. The firmware sees the car only at its steps, so
timings (contactor after the car leaves C) are measured from the first step that
presents the change, as a board's control loop would see it.

Everything observed goes to the oracles (hil.replay.oracles) and to the plot series as
it happens; the trace is read as a stream and nothing grows with its length but the
plot series (which keep only changes).
"""

from __future__ import annotations

import heapq
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.controller import DEFAULTS as FW_DEFAULTS
from gateway.core.site import PHASE_NAMES
from hil.replay.gateway_model import Command, GatewayModel, GatewaySettings
from hil.replay.layout import ReplayError, build_site, column_specs
from hil.replay.oracles import (
    ColumnInfo,
    ColumnOracles,
    Expectations,
    OracleConfig,
    OracleResult,
    SiteOracle,
    check_telemetry,
)
from hil.replay.report import ColumnPlot, PlotData
from hil.replay.target import ColumnOutputs, GatewayWrite, Target
from hil.replay.world import ZERO3, ColumnWorld, ms_to_stop
from hil.trace.channels import split_name
from hil.trace.format import Record, TraceError, TraceReader

__all__ = ["EngineOptions", "Progress", "Replay", "ReplayError", "RunResult", "replay"]

_USED = frozenset(
    (
        "ev.event",
        "ev.demand_a",
        "ev.state",
        "dno.limit",
        "link.fault",
        "power.cut",
        "pilot.offered_a",
        "meter.current_a",
    )
)


@dataclass(frozen=True)
class EngineOptions:
    step_ms: int = 100  # the fixed increment; realtime targets are stepped at it
    fine_ms: int = 10  # around pilot state changes (firmware/app.py CONTROL_PERIOD_MS)
    quiet_ms: int = 5000  # a car drawing a steady current
    waiting_ms: int = 5000  # a car waiting on the column's own timer (pause, meter)
    idle_ms: int = 30_000  # no car, or a car that does not want to charge, nothing changing
    settle_ms: int = 6000  # after any change, step_ms until the car has answered (lag ~2 s)
    speed: float | None = None  # None: as fast as possible; N: N x real time (virtual targets)
    progress: bool | None = None  # None: a bar on stderr when it is a terminal and the run is long
    oracles: OracleConfig | None = None  # None: defaults, offer response = step_ms
    gateway: GatewaySettings | None = None  # None: from the trace layout
    ev_profile: str | None = None  # every car this profile (else per event / column / phases)
    tail_ms: int = 0  # run this long after the last record (or meta.duration_ms)
    strict: bool = True  # reject channels outside the vocabulary


@dataclass
class RunResult:
    trace: str
    source: str
    target: str
    scenario: str | None
    description: str
    results: list[OracleResult]
    duration_ms: int
    wall_s: float
    column_steps: int
    iterations: int
    columns: dict[str, dict[str, Any]]
    gateway: dict[str, Any]
    target_stats: dict[str, Any]
    recorded: dict[str, Any]
    notes: list[str]
    plots: PlotData = field(repr=False, default_factory=PlotData)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def realtime_factor(self) -> float:
        return self.duration_ms / 1000.0 / self.wall_s if self.wall_s > 0 else math.inf


# ---- the engine ---------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr, redrawn at most 5 times a second; drawn only once
    the run has taken `after_s` (a short run prints nothing)."""

    def __init__(self, label: str, stream: Any = None, after_s: float = 1.0) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self._last = time.monotonic() + after_s - 0.2
        self.shown = False

    def update(self, fraction: float, t_ms: int, wall_s: float) -> None:
        now = time.monotonic()
        if now - self._last < 0.2:
            return
        self._last = now
        frac = min(max(fraction, 0.0), 1.0)
        bar = "#" * int(frac * 30)
        rate = t_ms / 1000.0 / wall_s if wall_s > 0 else 0.0
        self.stream.write(
            "\r%s [%-30s] %3d%%  %s virtual  %.0fx " % (self.label, bar, frac * 100, _hms(t_ms), rate)
        )
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\n")
            self.stream.flush()


def _hms(ms: int) -> str:
    s = ms // 1000
    return "%d:%02d:%02d" % (s // 3600, s // 60 % 60, s % 60)


class Replay:
    """One run: `Replay(trace, target, options).run()` -> RunResult. The target must be
    fresh; the engine starts it (and leaves closing it to the caller)."""

    def __init__(
        self,
        trace: str | os.PathLike[str],
        target: Target,
        options: EngineOptions | None = None,
        *,
        target_name: str = "sim",
    ) -> None:
        self.path = str(trace)
        self.target = target
        self.target_name = target_name
        self.opt = opt = options or EngineOptions()
        self.ocfg = opt.oracles or OracleConfig(offer_response_ms=opt.step_ms)
        if target.realtime and opt.oracles is None:
            self.ocfg = OracleConfig(offer_response_ms=opt.step_ms, timing_allowance_ms=opt.step_ms)
        self.notes: list[str] = []
        self.ignored: dict[str, int] = {}
        self.rejected: list[str] = []
        self._actions: list[tuple[int, int, Callable[[int], None]]] = []
        self._aseq = 0
        self._heap: list[tuple[int, int, str]] = []
        self._rng = random.Random(1)
        self.iterations = 0
        self.column_steps = 0
        self._rec_sq = 0.0
        self._rec_sum = 0.0
        self._rec_n = 0
        self._dno_down = 0
        self.gateway_in_loop = False
        self.reports_writes = False

    # -- setup ----------------------------------------------------------------------------------
    def _setup(self, header: dict[str, Any]) -> None:
        opt = self.opt
        meta = header.get("meta") or {}
        self.meta = meta
        try:
            self.expect = Expectations.from_meta(meta)
        except ValueError as exc:
            raise ReplayError("trace meta: %s" % exc) from None
        specs = column_specs(header)
        if not specs:
            raise ReplayError("the trace names no column (no layout columns, no per-column channel)")
        self.site = site = build_site(header, specs, self.notes)
        layout = header.get("layout") or {}
        try:
            settings = opt.gateway or GatewaySettings.from_layout(layout.get("gateway"))
        except ValueError as exc:
            raise ReplayError(str(exc)) from None
        if (
            opt.gateway is None
            and isinstance(meta.get("seed"), int)
            and "seed" not in (layout.get("gateway") or {})
        ):
            settings = GatewaySettings(
                settings.period_ms, settings.refresh_ms, settings.validity_s, settings.retry_ms, meta["seed"]
            )
        self._rng = random.Random(settings.seed)
        configs = {s.id: s.firmware_config() for s in specs}
        channels = header["channels"]
        recorded = frozenset(s.id for s in specs if "%s/pilot.offered_a" % s.id in channels)
        hb = {
            s.id: int(configs[s.id].get("heartbeat_timeout_s", FW_DEFAULTS["heartbeat_timeout_s"])) * 1000
            for s in specs
        }
        self.gw = GatewayModel(site, settings, hb, recorded=recorded)
        self.plots = PlotData()
        self.site_oracle = SiteOracle(self.ocfg)
        self.cols: dict[str, ColumnWorld] = {}
        for s in specs:
            cfg = configs[s.id]
            info = ColumnInfo(
                s.id,
                min(float(cfg["hardware_rating_a"]), float(cfg["installation_rating_a"])),
                float(cfg["failsafe_a"]),
                hb[s.id],
                float(cfg.get("energy_quantum_wh", FW_DEFAULTS["energy_quantum_wh"])),
            )
            column = site.column(s.id)
            assert column is not None
            plot = self.plots.columns.setdefault(s.id, ColumnPlot())
            col = ColumnWorld(
                s, column.rotation, ColumnOracles(info, self.ocfg, plot.limit.add), plot, site.voltage_v
            )
            col.recorded = s.id in recorded
            has_events = "%s/ev.event" % s.id in channels
            logged = col.recorded or "%s/meter.current_a" % s.id in channels
            if s.plugged or (s.plugged is None and not has_events and logged):
                col.plug(0, {"type": "plug"}, rng=self._rng, profile=self.opt.ev_profile)
            self.cols[s.id] = col
        if recorded:
            self.notes.append(
                "column limit from the trace's recorded pilot.offered_a: " + ", ".join(sorted(recorded))
            )
        # A target with the real gateway in the loop (hil.replay.target: gateway_in_loop) is
        # told the site first; the model above then only says what the DNO demands.
        self.gateway_in_loop = bool(getattr(self.target, "gateway_in_loop", False))
        # A target that reports what each firmware received (hil.replay.target: reports_writes)
        # feeds the column checks from that, not from when the model's assignment was sent.
        self.reports_writes = self.gateway_in_loop or bool(getattr(self.target, "reports_writes", False))
        set_site = getattr(self.target, "set_site", None)
        if callable(set_site):
            set_site(site, settings)
        try:
            self.target.start(configs)
        except ReplayError:
            raise
        for col in self.cols.values():
            self._wake(col, 0)

    # -- records -------------------------------------------------------------------------------
    def _apply(self, rec: Record) -> None:
        t = rec.t_ms
        column, base = split_name(rec.channel)
        value = rec.value
        cols = [self.cols[column]] if column is not None else list(self.cols.values())
        if base not in _USED:
            self.ignored[base] = self.ignored.get(base, 0) + 1
            return
        if base == "dno.limit":
            reason = self.gw.add_dno_limit(t, value, column)
            if reason is not None:
                self.rejected.append(
                    "%.3f s: DNO limit %r refused by the gateway (%s)" % (t / 1000.0, value, reason)
                )
            dno_command = getattr(self.target, "dno_command", None)
            if callable(dno_command):
                dno_command(column, t, dict(value))
            return
        if base == "link.fault":
            self._fault(t, column, value)
            return
        for col in cols:
            if base in ("ev.event", "ev.demand_a", "ev.state", "power.cut"):
                self._wake(col, t, hot=True)
            if base == "ev.event":
                col.ev_event(t, value, rng=self._rng, profile=self.opt.ev_profile)
            elif base == "ev.demand_a":
                col.demand_a = float(value)
                if col.ev is not None:
                    col.ev.set_demand_a(t, col.demand_a)
            elif base == "ev.state":
                col.override = value if value in ("E", "F") else None
            elif base == "power.cut":
                self._cut(col, t, int(value["duration_ms"]))
            elif base == "pilot.offered_a":
                self.gw.set_recorded(col.id, t, max(0.0, float(value)))
            elif base == "meter.current_a":
                if col.ev is not None:
                    col.ev.step(t)
                    model = max(col.ev.phase_currents_a)
                else:
                    model = 0.0
                rec_a = max(float(v) for v in value)
                col.plot.recorded.add(t, rec_a)
                d = model - rec_a
                self._rec_n += 1
                self._rec_sum += d
                self._rec_sq += d * d

    def _cut(self, col: ColumnWorld, t: int, duration: int) -> None:
        self.target.power_cut(col.id, t, duration)
        end = t + duration
        col.down_until = max(col.down_until or 0, end)
        col.oracle.power_cut(t)
        self.gw.set_online(col.id, t, False)

        def back(now: int, col: ColumnWorld = col) -> None:
            if col.down_until is not None and now >= col.down_until:
                col.down_until = None
                if not col.silent:
                    self.gw.set_online(col.id, now, True)
                self._wake(col, now, hot=True)

        self._at(end, back)

    def _fault(self, t: int, column: str | None, value: dict[str, Any]) -> None:
        kind = value["kind"]
        duration = int(value["duration_ms"])
        link = value.get("link", "gateway")
        end = t + duration
        cols = [self.cols[column]] if column is not None else list(self.cols.values())
        if link == "dno":
            dno_link = getattr(self.target, "dno_link", None)
            self.gw.set_dno_link(t, False)
            self._dno_down += 1
            if self._dno_down == 1 and callable(dno_link):
                dno_link(t, False)

            def dno_up(now: int) -> None:
                self._dno_down -= 1
                if self._dno_down == 0:
                    self.gw.set_dno_link(now, True)
                    if callable(dno_link):
                        dno_link(now, True)

            self._at(end, dno_up)
            return
        if link == "meter":
            for col in cols:
                col.meter_faults += 1
                self._wake(col, t, hot=True)

            def meter_back(now: int) -> None:
                for col in cols:
                    col.meter_faults -= 1
                    self._wake(col, now, hot=True)

            self._at(end, meter_back)
            return
        if link != "gateway":
            raise ReplayError(
                "link.fault at %.3f s: link must be gateway, meter or dno, got %r" % (t / 1000.0, link)
            )
        if kind == "silent":
            for col in cols:
                col.silent += 1
                if col.silent == 1:
                    self.target.gateway_silent(col.id, t, True)
                    self.gw.set_online(col.id, t, False)
                    col.oracle.silent(t, True)
                self._wake(col, t, hot=True)

            def speak(now: int) -> None:
                for col in cols:
                    col.silent -= 1
                    if col.silent == 0:
                        self.target.gateway_silent(col.id, now, False)
                        if col.down_until is None:
                            self.gw.set_online(col.id, now, True)
                        col.oracle.silent(now, False)
                    self._wake(col, now, hot=True)

            self._at(end, speak)
            return
        hook = getattr(self.target, "link_fault", None)
        if hook is not None and hook(column, t, kind, duration, dict(value)):
            return
        rate = value.get("rate", 0.5)
        delay = value.get("delay_ms", 1000)
        if not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise ReplayError(
                "link.fault at %.3f s: rate must be a number from 0 to 1, got %r" % (t / 1000.0, rate)
            )
        if not isinstance(delay, int) or delay < 0:
            raise ReplayError(
                "link.fault at %.3f s: delay_ms must be an int >= 0, got %r" % (t / 1000.0, delay)
            )
        for col in cols:
            col.noise.append((end, kind, float(rate), delay))

    # -- the gateway's commands ---------------------------------------------------------------
    def _send(self, cmd: Command, t: int) -> None:
        if self.gateway_in_loop:  # the real gateway decides; its writes come from gateway_writes()
            self.gw.delivered(cmd, t, True)
            return
        col = self.cols[cmd.column_id]
        if not col.noise:
            self._deliver(cmd, t)
            return
        col.noise = [n for n in col.noise if n[0] > t]
        delay = 0
        for _until, kind, rate, delay_ms in col.noise:
            if kind in ("drop", "corrupt") and self._rng.random() < rate:
                self.gw.delivered(cmd, t, False)
                return
            if kind == "delay":
                delay = max(delay, delay_ms)
        if delay:
            self._at(t + delay, lambda now, cmd=cmd: self._deliver(cmd, now))
        else:
            self._deliver(cmd, t)

    def _deliver(self, cmd: Command, t: int) -> None:
        col = self.cols[cmd.column_id]
        ok = (
            self.target.assign_limit(cmd.column_id, t, cmd.limit_a, cmd.validity_s, cmd.failsafe_a)
            is not False
        )
        self.gw.delivered(cmd, t, ok)
        if ok:
            if not self.reports_writes:  # else the column checks learn of it when the firmware has it
                col.oracle.assignment(t, cmd.limit_a, cmd.validity_s, cmd.failsafe_a)
            if cmd.limit_a != col.delivered_a:
                col.delivered_a = cmd.limit_a
                self._wake(col, t, hot=True)

    def _gateway_write(self, col: ColumnWorld, w: GatewayWrite) -> None:
        """What a column's link handed its firmware (reports_writes targets: the real
        gateway's writes, or the model's as the firmware received them)."""
        if w.limit_a is None:
            col.oracle.gateway_seen(w.t_ms, w.failsafe_a)
        else:
            col.oracle.assignment(w.t_ms, w.limit_a, w.validity_s, w.failsafe_a)
            col.delivered_a = w.limit_a

    def _gateway(self, t: int) -> None:
        gw = self.gw
        for cmd in gw.step(t):
            self._send(cmd, t)
        if not gw.reallocated:
            return
        site_a = gw.site_limit_a()
        self.site_oracle.set_limit(t, site_a, gw.effective.source)
        site = self.plots.site
        site.limit.add(t, min(site_a))
        site.dno.add(t, gw.dno_site_a(t))
        for col in self.cols.values():
            dno = gw.dno_column_a(col.id)
            col.oracle.dno_limit(t, dno)
            col.plot.dno.add(t, dno)

    # -- scheduling -------------------------------------------------------------------------------
    def _at(self, t: int, fn: Callable[[int], None]) -> None:
        self._aseq += 1
        heapq.heappush(self._actions, (t, self._aseq, fn))

    def _wake(self, col: ColumnWorld, t: int, *, hot: bool = False) -> None:
        if hot:
            col.hot_until = max(col.hot_until, t + self.opt.settle_ms)
        if t < col.due and not self.target.realtime:
            col.due = t
            col.seq += 1
            heapq.heappush(self._heap, (t, col.seq, col.id))

    def _schedule(
        self,
        col: ColumnWorld,
        t: int,
        prev: ColumnOutputs | None,
        out: ColumnOutputs,
        *,
        cp: str,
        draw: float,
    ) -> None:
        opt = self.opt
        if col.down_until is not None:
            nxt = col.down_until if col.down_until > t else t + opt.step_ms
        else:
            fast = (
                prev is None
                or prev.contactor != out.contactor
                or prev.status != out.status
                or prev.cp_state != out.cp_state
            )
            if prev is not None and (fast or prev.offered_a != out.offered_a or prev.error != out.error):
                col.hot_until = max(col.hot_until, t + opt.settle_ms)
            if cp != out.cp_state:
                if col.mismatch_since is None:
                    col.mismatch_since = t
                fast = fast or t - col.mismatch_since < 1000
            else:
                col.mismatch_since = None
            if fast:
                nxt = t + opt.fine_ms
            elif (
                t < col.hot_until
                or col.meter_faults
                or col.silent
                or col.override is not None
                or col.misbehave
                or abs(draw - col.draw) > 0.02
                or draw > out.offered_a + 0.05
                or out.status == "Faulted"
                or col.noise
            ):
                nxt = t + opt.step_ms
            elif draw > 0.0:
                nxt = t + min(opt.quiet_ms, ms_to_stop(col.ev, draw))
            elif col.ev is not None and out.limit_source in ("pause", "safety"):
                nxt = t + opt.waiting_ms
            else:
                nxt = t + opt.idle_ms
        col.due = nxt
        col.seq += 1
        heapq.heappush(self._heap, (nxt, col.seq, col.id))

    # -- one step of a set of columns ----------------------------------------------------------------
    def _step_columns(self, cols: list[ColumnWorld], t: int) -> None:
        target = self.target
        for col in cols:
            if col.ev is not None:
                col.ev.step(t)
            target.set_inputs(col.id, t, col.inputs())
        target.advance(t)
        gw = self.gw
        realtime = target.realtime
        site_moved = False
        writes = getattr(target, "gateway_writes", None) if self.reports_writes else None
        for col in cols:
            out = target.outputs(col.id)
            if writes is not None:
                for w in writes(col.id):
                    self._gateway_write(col, w)
            cp = col.presented_cp()
            ev = col.ev
            offered = out.offered_a
            plot = col.plot
            if offered != col.pilot:
                plot.offer.add(t, offered)
                if ev is not None:
                    ev.set_pilot(t, offered)
                col.pilot = offered
            if out.contactor != col.supply:
                if ev is not None:
                    ev.set_supply(t, out.contactor)
                col.supply = out.contactor
            phases = ev.phase_currents_a if ev is not None else ZERO3
            n = col.spec.phases
            draw = phases[0] if n == 1 else max(phases)
            powered = col.down_until is None or t >= col.down_until
            col.oracle.sample(t, cp, draw, out, powered=powered, modelled_wh=col.modelled_wh)
            gw.observe(col.id, t, out.status, phases)
            if phases != col.phases or offered != col.offered:
                self._site_move(col, phases, offered)
                site_moved = True
            if draw != col.draw:
                plot.current.add(t, draw)
            if not realtime:
                self._schedule(col, t, col.out, out, cp=cp, draw=draw)
            col.out = out
            col.draw = draw
            col.steps += 1
        self.column_steps += len(cols)
        if site_moved:
            site = self._site_a
            sp = self.plots.site
            for p in range(3):
                if site[p] < 1e-9:
                    site[p] = 0.0
                sp.phases[p].add(t, site[p])
            sp.offered.add(t, max(self._site_offered))
        self.site_oracle.sample(t, self._site_a)

    def _site_move(self, col: ColumnWorld, phases: tuple[float, float, float], offered: float) -> None:
        """Move the column's contribution to the site's per-phase sums."""
        site = self._site_a
        off = self._site_offered
        rot = col.rotation
        for i in range(col.spec.phases):
            p = rot[i]
            site[p] += phases[i] - col.phases[i]
            off[p] += offered - col.offered
        col.phases = phases
        col.offered = offered

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> RunResult:
        wall0 = time.perf_counter()
        fp = open(self.path, "rb")
        try:
            size = max(1, os.fstat(fp.fileno()).st_size)
            reader = TraceReader(fp, strict=self.opt.strict)
            reader.name = self.path
            header = reader.header
            self._setup(header)
            duration = self.meta.get("duration_ms")
            duration = int(duration) if isinstance(duration, (int, float)) and duration > 0 else None
            show = self.opt.progress
            if show is None:
                show = sys.stderr.isatty()
            progress = Progress(Path(self.path).name) if show else None
            self._site_a = [0.0, 0.0, 0.0]
            self._site_offered = [0.0, 0.0, 0.0]
            records = iter(reader)
            t_end = self._loop(records, duration, lambda: fp.tell() / size, progress, wall0)
            if progress is not None:
                progress.done()
        except TraceError:
            raise
        finally:
            fp.close()
        return self._finish(header, t_end, time.perf_counter() - wall0)

    def _next_record(self, records: Iterator[Record]) -> Record | None:
        return next(records, None)

    def _loop(
        self,
        records: Iterator[Record],
        duration: int | None,
        read_frac: Callable[[], float],
        progress: Progress | None,
        wall0: float,
    ) -> int:
        opt = self.opt
        realtime = self.target.realtime
        rec = self._next_record(records)
        last_rec_t = 0
        end: float = math.inf
        t = 0
        pace = opt.speed if (opt.speed and not realtime) else None
        same_t = 0
        heap = self._heap
        actions = self._actions
        cols = self.cols
        while True:
            self.iterations += 1
            while actions and actions[0][0] <= t:
                _, _, fn = heapq.heappop(actions)
                fn(t)
            while rec is not None and rec.t_ms <= t:
                self._apply(rec)
                last_rec_t = rec.t_ms
                rec = self._next_record(records)
            if rec is None and end == math.inf:
                end = max(last_rec_t, duration or 0) + opt.tail_ms
                end = max(end, t)
            if self.gw.due_ms() <= t:
                self._gateway(t)
            if realtime:
                due = list(cols.values())
            else:
                due = []
                while heap and heap[0][0] <= t:
                    _due, seq, cid = heapq.heappop(heap)
                    col = cols[cid]
                    if seq == col.seq:
                        due.append(col)
            if t >= end:
                stepped = {c.id for c in due}
                due += [c for c in cols.values() if c.id not in stepped]
            if due:
                if pace is not None:
                    lag = t / 1000.0 / pace - (time.perf_counter() - wall0)
                    if lag > 0:
                        time.sleep(lag)
                self._step_columns(due, t)
            if t >= end:
                return t
            if progress is not None and self.iterations % 64 == 0:
                frac = t / duration if duration else (read_frac() if rec is not None else t / max(end, 1))
                progress.update(frac, t, time.perf_counter() - wall0)
            if realtime:
                t += opt.step_ms
                continue
            nxt = end
            if heap:
                nxt = min(nxt, heap[0][0])
            if rec is not None:
                nxt = min(nxt, rec.t_ms)
            if actions:
                nxt = min(nxt, actions[0][0])
            nxt = max(t, int(min(nxt, self.gw.due_ms())))
            if nxt == t:
                same_t += 1
                if same_t > 1000:  # a scheduling bug, not a user mistake: say where
                    raise RuntimeError("replay engine stuck at t=%d ms" % t)
            else:
                same_t = 0
            t = nxt

    # -- results ------------------------------------------------------------------------------------
    def _finish(self, header: dict[str, Any], t_end: int, wall_s: float) -> RunResult:
        results: list[OracleResult] = [self.site_oracle.result()]
        for col in self.cols.values():
            results += col.oracle.results(t_end)
        seqs_fn = getattr(self.target, "telemetry_sequences", None)
        seqs = seqs_fn() if callable(seqs_fn) else None
        if seqs is not None:
            conflicts_fn = getattr(self.target, "telemetry_conflicts", None)
            conflicts = conflicts_fn() if callable(conflicts_fn) else None
            results.append(check_telemetry(seqs, conflicting=conflicts))
        reported = {cid: col.oracle.errors for cid, col in self.cols.items()}
        results = self.expect.apply(results, reported)
        self.plots.close(t_end)
        stats_fn = getattr(self.target, "stats", None)
        target_stats = dict(stats_fn()) if callable(stats_fn) else {}
        gs = self.gw.stats
        gateway = {
            "allocations": gs.allocations,
            "allocations_skipped": gs.skipped,
            "commands": gs.commands,
            "delivered": gs.delivered,
            "not_delivered": gs.failed,
            "dno_accepted": gs.dno_accepted,
            "dno_rejected": gs.dno_rejected,
            "load_violations_reported": gs.violations,
            "failsafe_plan_a": {k: round(v, 1) for k, v in self.gw.failsafe_a.items()},
            "settings": vars(self.gw.settings),
        }
        columns = {}
        for cid, col in self.cols.items():
            out = col.out
            columns[cid] = {
                "phases": col.spec.phases,
                "rotation": "".join(PHASE_NAMES[p] for p in col.rotation),
                "cars": col.plugs,
                "modelled_wh": round(col.modelled_wh, 1),
                "register_wh": out.energy_wh if out else None,
                "final_status": out.status if out else None,
                "final_error": out.error if out else None,
                "errors_reported": dict(col.oracle.errors),
                "steps": col.steps,
            }
        recorded: dict[str, Any] = {}
        if self._rec_n:
            recorded = {
                "samples": self._rec_n,
                "rmse_a": round(math.sqrt(self._rec_sq / self._rec_n), 3),
                "bias_a": round(self._rec_sum / self._rec_n, 3),
                "note": "modelled car current (driven by the firmware's pilot) vs the log's recorded current",
            }
        notes = list(self.notes)
        if self.ignored:
            notes.append(
                "channels recorded but not replayed: "
                + ", ".join("%s (%d records)" % kv for kv in sorted(self.ignored.items()))
            )
        notes += self.rejected[:20]
        meta = self.meta
        return RunResult(
            self.path,
            str(header.get("source", "")),
            self.target_name,
            meta.get("scenario") if isinstance(meta.get("scenario"), str) else None,
            str(meta.get("description", "")),
            results,
            t_end,
            wall_s,
            self.column_steps,
            self.iterations,
            columns,
            gateway,
            target_stats,
            recorded,
            notes,
            self.plots,
        )


def replay(
    trace: str | os.PathLike[str],
    target: Target,
    options: EngineOptions | None = None,
    *,
    target_name: str = "sim",
) -> RunResult:
    """Replay `trace` against a fresh `target` (started here, not closed) and judge it."""
    return Replay(trace, target, options, target_name=target_name).run()
