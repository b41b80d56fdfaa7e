"""The world at one column during a replay: its car, its meter, its faults, and what the
engine remembers of it (schedule, last outputs, its share of the site's current).

The car (hil.models.ev.EvModel) is created at each plug: profile from the engine's override,
the event's `profile`, the layout's `ev_profile`, else by phases (the calibrated car of the
real single-phase log, or a generic 11 kW three-phase car); state of charge `soc_pct`
(default 50 %), energy demand `energy_wh` (or `requested_wh`), misbehaviour `misbehave`
(a name or a list, added to any announced before the car arrived). It leaves at unplug
and takes its misbehaviour with it; its AC energy stays in the column's total.
"""

from __future__ import annotations

import random
from typing import Any

from hil.models.ev import CALIBRATED, MISBEHAVIOURS, EvModel
from hil.models.ev_profiles import find_profile
from hil.replay.layout import CABLE_OHMS, ColumnSpec, ReplayError
from hil.replay.oracles import ColumnOracles
from hil.replay.report import ColumnPlot
from hil.replay.target import ColumnInputs, ColumnOutputs

PROFILE_1PH = "openevse-log"  # the calibrated car of the real 1 s log
PROFILE_3PH = "generic-3ph-11kw"
_CP_MV = {"A": 12000, "B": 9000, "C": 6000, "D": 3000, "E": 0, "F": -12000}
NEVER = 1 << 62
ZERO3 = (0.0, 0.0, 0.0)


class ColumnWorld:
    """Engine-side state of one column: its car, meter, faults, schedule and observers."""

    def __init__(
        self,
        spec: ColumnSpec,
        rotation: tuple[int, ...],
        oracle: ColumnOracles,
        plot: ColumnPlot,
        voltage_v: float,
    ) -> None:
        self.spec = spec
        self.id = spec.id
        self.rotation = rotation
        self.oracle = oracle
        self.plot = plot
        self.voltage = (voltage_v, voltage_v, voltage_v) if spec.phases == 3 else (voltage_v, 0.0, 0.0)
        self.pp_ohms = next(ohms for amps, ohms in CABLE_OHMS if amps >= spec.cable_a - 1e-9)
        self.ev: EvModel | None = None
        self.closed_wh = 0.0  # energy of the cars that have left
        self.misbehave: set[str] = set()
        self.demand_a: float | None = None
        self.override: str | None = None
        self.meter_faults = 0
        self.silent = 0
        self.noise: list[tuple[int, str, float, int]] = []  # (until, kind, rate, delay_ms)
        self.down_until: int | None = None
        self.recorded = False  # the trace carries this column's limit (pilot.offered_a)
        self.due = NEVER
        self.hot_until = 0
        self.mismatch_since: int | None = None
        self.out: ColumnOutputs | None = None
        self.pilot = 0.0
        self.supply = False
        self.draw = 0.0
        self.phases: tuple[float, float, float] = ZERO3  # per column phase, as last summed
        self.offered = 0.0  # offer, as last summed
        self.delivered_a: float | None = None
        self.plugs = 0
        self.steps = 0
        self.seq = 0

    @property
    def modelled_wh(self) -> float:
        return self.closed_wh + (self.ev.energy_wh if self.ev is not None else 0.0)

    def presented_cp(self) -> str:
        if self.override is not None:
            return self.override
        return self.ev.cp_name if self.ev is not None else "A"

    def inputs(self) -> ColumnInputs:
        ev = self.ev
        cp = self.presented_cp()
        if ev is None:
            currents = (0.0, 0.0, 0.0)
            diode = True
            pp = -1
        else:
            currents = ev.phase_currents_a
            diode = ev.diode_present
            pp = self.pp_ohms
        return ColumnInputs(
            _CP_MV[cp],
            diode,
            pp,
            currents,
            self.voltage,
            self.spec.meter_start_wh + self.modelled_wh,
            False,
            self.meter_faults == 0,
        )

    def profile_name(self, event: dict[str, Any], override: str | None = None) -> str:
        name = override or event.get("profile") or self.spec.ev_profile
        return str(name) if name else (PROFILE_3PH if self.spec.phases == 3 else PROFILE_1PH)

    def plug(self, t: int, event: dict[str, Any], *, rng: random.Random, profile: str | None = None) -> None:
        """A car arrives (an `ev.event` plug); a car still there leaves first."""
        if self.ev is not None:
            self.unplug(t)
        name = self.profile_name(event, profile)
        try:
            profile = find_profile(name)
        except LookupError as exc:
            raise ReplayError("column %s at %.3f s: %s" % (self.id, t / 1000.0, exc)) from None
        wanted = event.get("misbehave", [])
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        misbehave = self.misbehave | set(wanted)
        soc = event.get("soc_pct")
        demand = event.get("energy_wh", event.get("requested_wh"))
        try:
            ev = EvModel(
                profile,
                CALIBRATED,
                now_ms=t,
                plugged=True,
                soc=float(soc) / 100.0 if isinstance(soc, (int, float)) else 0.5,
                demand_wh=float(demand) if isinstance(demand, (int, float)) and demand > 0 else None,
                column_phases=self.spec.phases,
                voltage_v=self.voltage[0],
                supply=self.supply,
                misbehaviour=misbehave,
                seed=rng.randrange(1 << 30),
            )
        except (ValueError, TypeError) as exc:
            raise ReplayError(
                "column %s at %.3f s: bad plug event: %s" % (self.id, t / 1000.0, exc)
            ) from None
        if self.demand_a is not None:
            ev.set_demand_a(t, self.demand_a)
        if self.pilot:
            ev.set_pilot(t, self.pilot)
        self.ev = ev
        self.misbehave = misbehave
        self.plugs += 1

    def unplug(self, t: int) -> None:
        ev = self.ev
        if ev is None:
            return
        ev.step(t)
        self.closed_wh += ev.energy_wh
        self.ev = None
        self.misbehave = set()

    def ev_event(
        self, t: int, event: dict[str, Any], *, rng: random.Random, profile: str | None = None
    ) -> None:
        """Apply one `ev.event` record."""
        kind = event["type"]
        if kind == "plug":
            self.plug(t, event, rng=rng, profile=profile)
        elif kind == "unplug":
            self.unplug(t)
        elif kind in ("misbehave", "behave"):
            what = event.get("what")
            if what is not None and what not in MISBEHAVIOURS:
                raise ReplayError(
                    "column %s at %.3f s: unknown misbehaviour %r (known: %s)"
                    % (self.id, t / 1000.0, what, ", ".join(MISBEHAVIOURS))
                )
            if kind == "misbehave":
                if what is None:
                    raise ReplayError(
                        "column %s at %.3f s: a misbehave event needs 'what'" % (self.id, t / 1000.0)
                    )
                self.misbehave.add(what)
            else:
                self.misbehave = set() if what is None else self.misbehave - {what}
            if self.ev is not None:
                self.ev.set_misbehaviour(t, self.misbehave)
        elif self.ev is not None:
            try:
                self.ev.apply_event(t, event)
            except (KeyError, TypeError, ValueError) as exc:
                raise ReplayError(
                    "column %s at %.3f s: bad %s event: %s" % (self.id, t / 1000.0, kind, exc)
                ) from None


def ms_to_stop(ev: EvModel | None, draw: float) -> int:
    """About when a steadily charging car will have stopped by itself (full, or its session's
    energy delivered) and present B: the column is stepped then, not up to quiet_ms later."""
    if ev is None or ev.power_w <= 0:
        return NEVER
    p = ev.profile
    left = (ev.target_soc - ev.soc) * p.battery_kwh * 1000.0 / p.charge_efficiency
    if ev.demand_wh is not None:
        left = min(left, ev.demand_wh - ev.session_wh)
    ramp_ms = draw / ev.dynamics.stop_ramp_a_per_s * 1000.0
    return max(1, int(max(left, 0.0) * 3600_000.0 / ev.power_w + ramp_ms) + 1)
