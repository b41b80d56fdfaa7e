"""Vehicle parameters for the HIL EV model: phases, the car's own AC current, battery, taper.

An `EvProfile` says what kind of car is plugged in; how it reacts to the pilot over
time (lag, ramps) is `hil.models.ev.EvDynamics`, calibrated separately against a real log.

Profiles come from two places:
- `BUILTIN`: a handful of typical cars, always available (tests and scenarios use these);
- the open-ev-data vehicle list (293 models, MIT) read in place from
  `$EVEDGE_TRACES/vehicle-specs/open-ev-data_ev-data.json` (default
  `<repo>/../shared/traces`): `load_open_ev_data()` turns each entry into a profile, with
  the AC `usable_phases` and the car's own maximum current per phase
  `max_power_kw * 1000 / (230 V * phases)`.

The taper curve is piecewise linear in state of charge: `(soc, fraction)` points, the
fraction scaling the car's maximum current; below the first point it is the first
fraction, above the last the last. The default (full current up to 80 %, falling to 20 %
of it at 100 %) is a generic AC curve, not a measured one: the real log has no taper.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

NOMINAL_V = 230.0
MAX_AC_CURRENT_A = 80.0          # the highest current IEC 61851 PWM can offer
SPECS_FILE = "vehicle-specs/open-ev-data_ev-data.json"
DEFAULT_TAPER: tuple[tuple[float, float], ...] = ((0.8, 1.0), (1.0, 0.2))


def traces_dir() -> Path:
    """Where the shared real traces live: $EVEDGE_TRACES, default <repo>/../shared/traces."""
    env = os.environ.get("EVEDGE_TRACES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "traces"


@dataclass(frozen=True)
class EvProfile:
    """One kind of car. Currents are per phase, in amps."""

    name: str
    phases: int = 3                   # phases the on-board charger uses: 1, 2 or 3
    max_current_a: float = 16.0       # the car's own AC limit per phase
    battery_kwh: float = 60.0         # usable battery
    taper: tuple[tuple[float, float], ...] = DEFAULT_TAPER
    charge_efficiency: float = 0.9    # share of AC energy that ends up in the battery
    ventilation: bool = False         # presents state D instead of C while charging

    def __post_init__(self) -> None:
        if self.phases not in (1, 2, 3):
            raise ValueError("%s: phases must be 1, 2 or 3, got %r" % (self.name, self.phases))
        if not 0.0 < self.max_current_a <= MAX_AC_CURRENT_A:
            raise ValueError("%s: max_current_a must be in (0, %g], got %r"
                             % (self.name, MAX_AC_CURRENT_A, self.max_current_a))
        if not self.battery_kwh > 0.0:
            raise ValueError("%s: battery_kwh must be > 0, got %r" % (self.name, self.battery_kwh))
        if not 0.0 < self.charge_efficiency <= 1.0:
            raise ValueError("%s: charge_efficiency must be in (0, 1]" % self.name)
        if not self.taper:
            raise ValueError("%s: taper needs at least one (soc, fraction) point" % self.name)
        last = -1.0
        for soc, fraction in self.taper:
            if not (0.0 <= soc <= 1.0 and 0.0 <= fraction <= 1.0) or soc <= last:
                raise ValueError("%s: taper points must be increasing (soc, fraction) pairs in [0, 1]"
                                 % self.name)
            last = soc

    @property
    def taper_start_soc(self) -> float:
        """Below this state of charge the taper never limits (the first point's fraction is 1)."""
        soc, fraction = self.taper[0]
        return soc if fraction >= 1.0 else 0.0

    def taper_fraction(self, soc: float) -> float:
        """Fraction of `max_current_a` the car accepts at state of charge `soc` (0..1)."""
        points = self.taper
        if soc <= points[0][0]:
            return points[0][1]
        for (s0, f0), (s1, f1) in pairwise(points):
            if soc <= s1:
                return f0 + (f1 - f0) * (soc - s0) / (s1 - s0)
        return points[-1][1]


BUILTIN: dict[str, EvProfile] = {p.name: p for p in (
    EvProfile("generic-3ph-11kw", phases=3, max_current_a=16.0, battery_kwh=60.0),
    EvProfile("generic-3ph-22kw", phases=3, max_current_a=32.0, battery_kwh=80.0),
    EvProfile("generic-1ph-7kw", phases=1, max_current_a=32.0, battery_kwh=40.0),
    EvProfile("generic-1ph-3.7kw", phases=1, max_current_a=16.0, battery_kwh=12.0),
    # The car in the real 1 s log (traces/openevse-shaper): single phase; offered 32 A it
    # drew 31.1 A on average (its own limit: below 25 A it drew the offer - 0.33 A). Its
    # battery size is not in the log.
    EvProfile("openevse-log", phases=1, max_current_a=31.1, battery_kwh=60.0),
)}
DEFAULT_PROFILE = BUILTIN["generic-3ph-11kw"]


def profile_from_spec(entry: Mapping[str, Any], voltage_v: float = NOMINAL_V) -> EvProfile:
    """An `EvProfile` from one open-ev-data vehicle entry. Raises ValueError if unusable."""
    try:
        ac = entry["ac_charger"]
        phases = int(ac["usable_phases"])
        max_power_kw = float(ac["max_power"])
        battery_kwh = float(entry["usable_battery_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError("vehicle entry %r lacks AC charger data: %s" % (entry.get("id"), exc)) from None
    if phases not in (1, 2, 3):
        raise ValueError("vehicle entry %r: usable_phases %r" % (entry.get("id"), phases))
    max_a = min(MAX_AC_CURRENT_A, max_power_kw * 1000.0 / (voltage_v * phases))
    return EvProfile(spec_name(entry), phases=phases, max_current_a=round(max_a, 1), battery_kwh=battery_kwh)


def spec_name(entry: Mapping[str, Any]) -> str:
    """A readable, usually unique name: `Brand Model Variant (year)`."""
    parts = [str(entry.get("brand", "")), str(entry.get("model", "")), str(entry.get("variant") or "")]
    name = " ".join(p for p in parts if p)
    year = entry.get("release_year")
    return "%s (%s)" % (name, year) if year else name


def load_open_ev_data(path: Path | str | None = None) -> list[EvProfile]:
    """Every usable vehicle in the open-ev-data list, read in place. Entries without AC data are skipped."""
    path = Path(path) if path is not None else traces_dir() / SPECS_FILE
    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    entries = data.get("data", []) if isinstance(data, dict) else data
    profiles = []
    for entry in entries:
        try:
            profiles.append(profile_from_spec(entry))
        except ValueError:
            continue
    return profiles


def find_profile(name: str, specs_path: Path | str | None = None) -> EvProfile:
    """A builtin profile by name, else the open-ev-data vehicle whose name matches.

    An exact (case-insensitive) name wins; otherwise the query must be a substring of
    exactly one vehicle name. Raises LookupError naming the candidates otherwise.
    """
    if name in BUILTIN:
        return BUILTIN[name]
    try:
        profiles = load_open_ev_data(specs_path)
    except OSError as exc:
        raise LookupError("unknown profile %r (builtin: %s; vehicle list unreadable: %s)"
                          % (name, ", ".join(BUILTIN), exc)) from None
    query = name.casefold()
    exact = [p for p in profiles if p.name.casefold() == query]
    if exact:
        return exact[0]
    matches = [p for p in profiles if query in p.name.casefold()]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise LookupError("no vehicle profile matches %r (builtin: %s)" % (name, ", ".join(BUILTIN)))
    shown = ", ".join(p.name for p in matches[:5])
    raise LookupError("%r matches %d vehicles (%s%s); be more specific"
                      % (name, len(matches), shown, ", ..." if len(matches) > 5 else ""))
