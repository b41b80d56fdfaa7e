"""Pre-assigned failsafe limits: what each column may offer once the gateway has gone silent.

Guarantee: with every column at its failsafe at the same time, every circuit phase and every site
phase stays within its rating and the failsafe budget (the connection capacity, and the site's
``dno_failsafe_a`` when set, since a silent gateway cannot hear the DNO either), with each column
loading all the site phases its rotation wires it to (the car is unknown in advance).

Algorithm:
1. If every column fits at 6 A, all are admitted. Otherwise columns are admitted one at a time,
   each time picking, among those that still fit at 6 A, the one whose constraints (node/phase)
   keep the largest remaining share of their rating after it is added, compared tightest first
   (the site phase, then its feeder, ...); ties by column id. This spreads the columns that keep
   charging over feeders and phases instead of filling one feeder first. Columns not admitted
   get 0 (a failsafe below 6 A would mean a pause anyway).
2. The admitted columns are water-filled (max-min fair, 0.1 A steps) from 6 A up to their own
   rating, so spare capacity is shared evenly and no constraint is exceeded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gateway.core.allocation import MIN_DA, water_fill
from gateway.core.site import PhaseCurrents, Site, to_da


@dataclass(frozen=True)
class FailsafePlan:
    limits_a: Mapping[str, float]   # column id -> failsafe current (0: paused in failsafe)
    budget_a: PhaseCurrents         # the site budget the plan fits in
    paused: tuple[str, ...]         # columns that got 0 because not all fit at 6 A


def failsafe_budget_a(site: Site) -> PhaseCurrents:
    cap = site.capacity_a
    if site.dno_failsafe_a is None:
        return cap
    f = max(float(site.dno_failsafe_a), 0.0)
    return (min(cap[0], f), min(cap[1], f), min(cap[2], f))


def plan_failsafe(site: Site, *, budget_a: PhaseCurrents | None = None) -> FailsafePlan:
    budget = budget_a if budget_a is not None else failsafe_budget_a(site)
    limits = site.constraint_limits_da(budget)
    keys = {col.id: site.constraint_keys(col, frozenset(col.rotation)) for col in site.columns}
    caps = {col.id: to_da(col.max_a) for col in site.columns}
    candidates = sorted(cid for cid in keys if caps[cid] >= MIN_DA)
    admitted = _admit(candidates, keys, limits)
    amounts, _ = water_fill({cid: (MIN_DA, caps[cid], keys[cid]) for cid in admitted}, limits,
                            sorted(admitted))
    out = {col.id: amounts.get(col.id, 0) / 10 for col in site.columns}
    paused = tuple(sorted(cid for cid, a in out.items() if a == 0))
    return FailsafePlan(out, budget, paused)


def _admit(candidates: list[str], keys: Mapping[str, tuple[str, ...]],
           limits: Mapping[str, int]) -> list[str]:
    need: dict[str, int] = {}
    for cid in candidates:
        for k in keys[cid]:
            need[k] = need.get(k, 0) + MIN_DA
    if all(n <= limits.get(k, 0) for k, n in need.items()):
        return list(candidates)
    remaining = dict(limits)
    admitted: list[str] = []
    left = list(candidates)
    while left:
        best: tuple[list[float], str] | None = None
        for cid in left:
            if any(remaining.get(k, 0) < MIN_DA for k in keys[cid]):
                continue
            shares = sorted((remaining[k] - MIN_DA) / max(limits[k], 1) for k in keys[cid])
            if best is None or shares > best[0]:
                best = (shares, cid)
        if best is None:
            break
        cid = best[1]
        for k in keys[cid]:
            remaining[k] -= MIN_DA
        admitted.append(cid)
        left.remove(cid)
    return admitted
