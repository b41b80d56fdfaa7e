"""Cars at virtual columns, in wall-clock time: the calibrated EV model on the board's lines.

`CarPort` is one column's socket. `arrive` plugs a car in (a fresh `hil.models.ev.EvModel`
with a profile and a state of charge), `leave` unplugs it; `step(now_ms)` reads the
column's board outputs (pilot offer, contactor), advances the car to `now_ms`, and
writes back what the car presents on the control pilot (CP voltage, diode), the cable's
PP resistance, and the current it draws into the column's simulated meter (with the
meter's energy register following the cars' energy). Call `step` often (every 100 ms);
only changed board inputs are sent. `car_schedule` makes a seeded plan of arrivals and
departures for a run of a given length (used by the site demo).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hil.models.ev import EvModel
from hil.models.ev_profiles import BUILTIN
from hil.rig.vcolumn import VirtualColumn

CABLE_OHMS = 220      # PP resistor of a 32 A cable
NO_CABLE = -1
NO_PILOT = 10000      # duty of a constant +12 V pilot: no current offered
THREE_PHASE_CARS = ("generic-3ph-11kw", "generic-3ph-22kw", "generic-3ph-11kw", "generic-1ph-7kw")
ONE_PHASE_CARS = ("generic-1ph-7kw", "generic-1ph-3.7kw")


class CarPort:
    def __init__(self, vcol: VirtualColumn, phases: int) -> None:
        self.vcol = vcol
        self.phases = phases
        self.ev: EvModel | None = None
        self.profile = ""
        self.energy_before_wh = 0.0     # cars that have left
        self.offered_a = 0.0
        self.contactor = False
        self.status = -1
        self.visits = 0
        self._sent: dict[str, int] = {}

    # -- the schedule's events ---------------------------------------------------------------
    def arrive(self, now_ms: int, profile: str, soc: float) -> None:
        self.leave(now_ms)
        self.ev = EvModel(BUILTIN[profile], now_ms=now_ms, plugged=True, soc=soc,
                          column_phases=self.phases, supply=False, seed=self.visits)
        self.profile = profile
        self.visits += 1

    def leave(self, now_ms: int) -> None:
        ev = self.ev
        if ev is None:
            return
        ev.unplug(now_ms)
        ev.step(now_ms)
        self.energy_before_wh += ev.energy_wh
        self.ev = None
        self.profile = ""

    def reset_board(self) -> None:
        """The column's firmware restarted: its board has forgotten the car's inputs, so the
        next step sends them all again."""
        self._sent.clear()

    # -- the loop --------------------------------------------------------------------------
    def step(self, now_ms: int) -> dict[str, Any]:
        out = self.vcol.outputs()
        duty = int(out.get("duty", NO_PILOT))
        self.offered_a = int(out.get("offered_da", 0)) / 10 if 0 < duty < NO_PILOT else 0.0
        self.contactor = bool(out.get("contactor", 0))
        self.status = int(out.get("status", -1))
        ev = self.ev
        if ev is None:
            wanted = {"cp_mv": 12000, "diode": 1, "pp_ohms": NO_CABLE}
        else:
            ev.set_pilot(now_ms, self.offered_a)
            ev.set_supply(now_ms, self.contactor)
            ev.step(now_ms)
            wanted = {"cp_mv": ev.cp_high_mv, "diode": int(ev.diode_present), "pp_ohms": CABLE_OHMS}
        meter = self.vcol.meter
        meter.set_load(list(self.currents_a)[: meter.phases])
        meter.set_energy(import_kwh=self.energy_wh / 1000.0)
        changed = {k: v for k, v in wanted.items() if self._sent.get(k) != v}
        if changed:
            self.vcol.board(**changed)
            self._sent.update(changed)
        return out

    # -- what the car does -----------------------------------------------------------------
    @property
    def currents_a(self) -> tuple[float, float, float]:
        """Current on the column's L1, L2, L3."""
        return self.ev.phase_currents_a if self.ev is not None else (0.0, 0.0, 0.0)

    @property
    def energy_wh(self) -> float:
        """Every car's energy at this column so far (what the column's meter counts)."""
        return self.energy_before_wh + (self.ev.energy_wh if self.ev is not None else 0.0)

    def describe(self) -> str:
        ev = self.ev
        if ev is None:
            return "-"
        return "%s %s %.0f%%" % (self.profile.replace("generic-", ""), ev.cp_name, ev.soc * 100)


@dataclass(frozen=True)
class Visit:
    column: str
    arrive_s: float
    leave_s: float | None      # None: stays to the end
    profile: str
    soc: float


def car_schedule(columns: Sequence[tuple[str, int]], duration_s: float, seed: int) -> list[Visit]:
    """Seeded arrivals and departures compressed into a run, for (column id, phases) pairs:
    two columns in three have a car early on, the others later; some cars leave and another
    one takes their place. A car on a 3-phase column may be a 1-phase one."""
    rng = random.Random(seed)
    d = duration_s
    visits = []
    for i, (cid, phases) in enumerate(columns):
        cars = THREE_PHASE_CARS if phases == 3 else ONE_PHASE_CARS
        t = rng.uniform(0.01, 0.12) * d if i % 3 != 2 else rng.uniform(0.2, 0.45) * d
        first = True
        while t < 0.85 * d:
            leave = t + rng.uniform(0.35, 0.75) * d
            # One car arrives nearly full: it tapers and the gateway reclaims what it leaves.
            soc = 0.93 if (first and i == 1) else round(rng.uniform(0.2, 0.7), 2)
            visits.append(Visit(cid, round(t, 1), round(leave, 1) if leave < 0.95 * d else None,
                                rng.choice(cars), soc))
            if leave >= 0.95 * d:
                break
            t = leave + rng.uniform(0.04, 0.1) * d
            first = False
    return visits
