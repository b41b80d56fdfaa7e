"""What a soak run does, decided before it starts: the site, the fault schedule, the DNO's commands.

Everything comes from one seed, so a run can be repeated. The site is the site demo's
(examples/site.toml's site, circuits and column templates, hil.demo.site_plan) with the
columns put on the soak's mix of links: several Modbus RTU columns on one RS-485 bus (one
in ten on MicroPython), Modbus TCP, CBOR over TCP and CBOR over a serial line. Each column
is commissioned with the failsafe the gateway plans for it (gateway.core.failsafe), as an
installer would, so that columns booting while the gateway is away never add up to more
than the site can take.

The fault schedule scales the full soak's counts (FULL_COUNTS over FULL_DURATION_S) to the
run's length, keeping every kind at least once. Faults start after a warm-up and end a
settle time before the run ends; each kind's events are spread over that window, one per
equal slot, so events of one kind never overlap (different kinds may).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from gateway.core.failsafe import plan_failsafe
from gateway.core.site import Site
from gateway.core.site_config import parse_site
from hil.rig.site import ColumnSpec

FULL_DURATION_S = 600.0
# In placement order: the last two keep out of the others where they must (_clashes).
FULL_COUNTS = {
    "gateway_kill": 5,
    "column_kill": 10,
    "broker_restart": 20,
    "bus_noise": 2,
    "meter_fail": 2,
    "column_silent": 2,
}
KINDS = tuple(FULL_COUNTS)
NOISE_CORRUPT_RATE = 0.01  # 1 % of the bytes on the RS-485 bus get a flipped bit
REBOOT_S = 8.0  # a killed column boots and is online again within this
RESERVE_S = 16.0  # a silent column at its shortest and the 2 s before an outage
SEEN_S = 10.0  # a failing meter or silent column needs the gateway this long to show
HEARTBEAT_TIMEOUT_S = 10  # the columns' (hil.rig.site.ColumnTuning default; the firmware's minimum)
# Which link and interpreter the n-th column gets (cycled): 4 RTU (one on MicroPython),
# 3 Modbus TCP, 2 CBOR TCP, 1 CBOR serial in every ten.
LINK_PLAN = (
    ("modbus-rtu", "micropython"),
    ("modbus-tcp", "cpython"),
    ("modbus-rtu", "cpython"),
    ("cbor-tcp", "cpython"),
    ("modbus-rtu", "cpython"),
    ("modbus-tcp", "cpython"),
    ("cbor-serial", "cpython"),
    ("modbus-rtu", "cpython"),
    ("modbus-tcp", "cpython"),
    ("cbor-tcp", "cpython"),
)
SITE_LIMIT_A = (30, 90)  # DNO site limits, A per phase
COMMAND_GAP_S = (3.0, 7.0)  # between two DNO commands
COMMAND_VALIDITY_S = (20, 60)
COLUMN_LIMIT_SHARE = 0.2  # of the commands limit one column instead of the site


@dataclass(frozen=True)
class Fault:
    """One fault: `kind` from KINDS, starting `at_s` after the run started, lasting
    `duration_s` (down time, or the window), on column `target` for the column kinds."""

    kind: str
    n: int
    at_s: float
    duration_s: float
    target: str | None = None

    @property
    def end_s(self) -> float:
        return self.at_s + self.duration_s

    def describe(self) -> str:
        what = {
            "broker_restart": "broker restart",
            "gateway_kill": "gateway SIGKILL",
            "column_kill": "column SIGKILL",
            "column_silent": "column stops answering",
            "bus_noise": "bus noise %.0f %%" % (NOISE_CORRUPT_RATE * 100),
            "meter_fail": "meter fails",
        }[self.kind]
        on = " " + self.target if self.target else ""
        return "%s #%d%s at %.1f s for %.1f s" % (what, self.n, on, self.at_s, self.duration_s)


@dataclass(frozen=True)
class DnoCommand:
    """A signed limit the DNO sends `at_s` into the run: for the site (column None) or one column."""

    at_s: float
    limit_a: float
    validity_s: int
    column: str | None = None


@dataclass(frozen=True)
class SoakPlan:
    duration_s: float
    seed: int
    tables: Mapping[str, Any]
    specs: tuple[ColumnSpec, ...]
    faults: tuple[Fault, ...]
    commands: tuple[DnoCommand, ...]
    warmup_s: float
    settle_s: float

    def counts(self) -> dict[str, int]:
        return {k: sum(1 for f in self.faults if f.kind == k) for k in KINDS}


def scaled_counts(duration_s: float) -> dict[str, int]:
    """The full soak's fault counts for a run of this length, each kind at least once."""
    return {k: max(1, round(n * duration_s / FULL_DURATION_S)) for k, n in FULL_COUNTS.items()}


def plan_site(n_columns: int) -> tuple[dict[str, Any], list[ColumnSpec]]:
    """The site demo's tables and columns on the soak's links, each commissioned with its
    planned failsafe."""
    from hil.demo import site_plan

    tables, specs = site_plan(n_columns)
    specs = [
        replace(s, link=LINK_PLAN[k % len(LINK_PLAN)][0], interp=LINK_PLAN[k % len(LINK_PLAN)][1])
        for k, s in enumerate(specs)
    ]
    failsafe = plan_failsafe(planning_site(tables, specs)).limits_a
    return tables, [replace(s, config={"failsafe_a": failsafe[s.id]}) for s in specs]


def planning_site(tables: Mapping[str, Any], specs: Sequence[ColumnSpec], site_id: str = "soak") -> Site:
    """The site as the gateway will read it (links do not matter for its electrical data)."""
    columns = []
    for k, s in enumerate(specs):
        entry: dict[str, Any] = {
            "id": s.id,
            "phases": s.phases,
            "hardware_a": s.hardware_a,
            "link": "cbor-tcp",
            "host": "127.0.0.1",
            "port": 1024 + k,
        }
        for key, value in (
            ("circuit", s.circuit),
            ("rotation", s.rotation),
            ("installation_a", s.installation_a),
        ):
            if value is not None:
                entry[key] = value
        columns.append(entry)
    doc = {
        "site": {**tables["site"], "id": site_id},
        "circuits": dict(tables.get("circuits", {})),
        "columns": columns,
    }
    return parse_site(doc)


def windows(duration_s: float) -> tuple[float, float]:
    """(warm-up, settle): no fault before the first nor in the last."""
    warmup = min(20.0, max(5.0, 0.05 * duration_s))
    settle = min(40.0, max(12.0, 0.08 * duration_s))
    return warmup, settle


def plan_faults(duration_s: float, specs: Sequence[ColumnSpec], seed: int) -> tuple[Fault, ...]:
    """The seeded fault schedule (see the module docstring). A failing meter and a silent
    column are kept out of the gateway's outages (and off a column being killed) so that
    the gateway is there to see them."""
    rng = random.Random("faults-%d" % seed)
    warmup, settle = windows(duration_s)
    start, end = warmup, duration_s - settle
    if end - start < 20:
        raise ValueError("a soak needs at least %.0f s" % (warmup + settle + 20))
    counts = scaled_counts(duration_s)
    rtu = [s.id for s in specs if s.link == "modbus-rtu"]
    every = [s.id for s in specs]
    faults: list[Fault] = []
    for kind in KINDS:
        n = counts[kind]
        slot = (end - start) / n
        targets = _targets(kind, n, rtu, every, rng)
        for i in range(n):
            d = _duration(kind, slot, rng)
            lo, hi = start + i * slot, start + i * slot + max(0.0, slot - d - 1.0)
            if kind == "gateway_kill" and hi - lo >= RESERVE_S:
                lo += RESERVE_S  # room before it for a failing meter or a silent column to show
            if kind == "column_kill":
                hi = max(lo, min(hi, end - d - REBOOT_S))  # time to boot and be seen before the end
            target = targets[i]
            if kind in ("meter_fail", "column_silent"):
                pool = rtu if kind == "column_silent" and rtu else every
                at, d, target = _free_place(
                    Fault(kind, i + 1, lo, d, target), pool, faults, (hi, start, end), rng
                )
            else:
                at = rng.uniform(lo, hi)
            faults.append(Fault(kind, i + 1, round(at, 1), round(d, 1), target))
    return tuple(sorted(faults, key=lambda f: (f.at_s, f.kind)))


def _free_place(
    f: Fault,
    pool: Sequence[str],
    placed: Sequence[Fault],
    bounds: tuple[float, float, float],
    rng: random.Random,
) -> tuple[float, float, str | None]:
    """(start, duration, column) where `f` clashes with nothing placed: its own column first,
    in its slot (f.at_s..hi), else anywhere in the window, else at its shortest, on any
    column of `pool`; if there is no such place, its slot's start. bounds: (hi, window)."""
    hi, window = bounds[0], bounds[1:]
    shortest = _duration(f.kind, 0.0, rng, shortest=True)
    others = [c for c in pool if c != f.target]
    rng.shuffle(others)
    for lo_hi_d in (
        (f.at_s, hi, f.duration_s),
        (window[0], window[1] - f.duration_s - 1.0, f.duration_s),
        (window[0], window[1] - shortest - 1.0, shortest),
    ):
        lo, top, dur = lo_hi_d
        for target in [f.target, *others]:
            free = [
                x / 10.0
                for x in range(int(lo * 10), int(top * 10) + 1)
                if not _clashes(Fault(f.kind, f.n, x / 10.0, round(dur, 1), target), placed)
            ]
            if free:
                return rng.choice(free), dur, target
    return f.at_s, f.duration_s, f.target


def _clashes(f: Fault, placed: Sequence[Fault]) -> bool:
    """True when `f` and a placed fault would hide each other: a failing meter or a silent
    column whose start (its first SEEN_S) or end falls in a gateway outage (with the
    restart after it), or on a column busy with another fault."""
    return any(_pair_clash(f, g) or _pair_clash(g, f) for g in placed)


def _pair_clash(f: Fault, g: Fault) -> bool:
    if f.kind not in ("meter_fail", "column_silent"):
        return False
    if g.kind != "gateway_kill" and not (
        g.target == f.target and g.kind in ("column_kill", "meter_fail", "column_silent")
    ):
        return False
    a, b = g.at_s - 2.0, g.end_s + 8.0  # + the restart and the column coming back
    return (f.at_s < b and a < f.at_s + SEEN_S) or a <= f.end_s <= b


def _duration(kind: str, slot: float, rng: random.Random, shortest: bool = False) -> float:
    if shortest:
        return {
            "column_silent": 12.0,
            "meter_fail": 10.0,
            "gateway_kill": HEARTBEAT_TIMEOUT_S + 2.0,
            "column_kill": 2.0,
        }.get(kind, 1.0)
    if kind == "broker_restart":
        d = rng.uniform(1.0, 5.0)
    elif kind == "gateway_kill":  # long enough for every column to need its failsafe
        d = rng.uniform(HEARTBEAT_TIMEOUT_S + 2.0, HEARTBEAT_TIMEOUT_S + 5.0)
    elif kind == "column_kill":
        d = rng.uniform(2.0, 8.0)
    elif kind == "bus_noise":
        d = min(45.0, rng.uniform(0.25, 0.4) * slot)
    elif kind == "column_silent":
        d = rng.uniform(12.0, 20.0)
    else:
        d = rng.uniform(10.0, 16.0)
    return min(d, slot - 1.0)


def _targets(
    kind: str, n: int, rtu: Sequence[str], every: Sequence[str], rng: random.Random
) -> list[str | None]:
    if kind in ("broker_restart", "gateway_kill", "bus_noise"):
        return [None] * n
    pool = list(rtu) if kind == "column_silent" and rtu else list(every)
    rng.shuffle(pool)
    return [pool[i % len(pool)] for i in range(n)]


def plan_commands(duration_s: float, specs: Sequence[ColumnSpec], seed: int) -> tuple[DnoCommand, ...]:
    """DNO commands every few seconds from a few seconds in until the settle time begins."""
    rng = random.Random("dno-%d" % seed)
    warmup, settle = windows(duration_s)
    t = warmup / 2
    out = []
    while t < duration_s - settle / 2:
        validity = rng.randint(*COMMAND_VALIDITY_S)
        if rng.random() < COLUMN_LIMIT_SHARE:
            spec = rng.choice(list(specs))
            out.append(DnoCommand(round(t, 1), float(rng.randint(6, int(spec.rating_a))), validity, spec.id))
        else:
            out.append(DnoCommand(round(t, 1), float(rng.randint(*SITE_LIMIT_A)), validity))
        t += rng.uniform(*COMMAND_GAP_S)
    return tuple(out)


def make_plan(duration_s: float, n_columns: int, seed: int) -> SoakPlan:
    tables, specs = plan_site(n_columns)
    warmup, settle = windows(duration_s)
    return SoakPlan(
        duration_s,
        seed,
        tables,
        tuple(specs),
        plan_faults(duration_s, specs, seed),
        plan_commands(duration_s, specs, seed),
        warmup,
        settle,
    )
