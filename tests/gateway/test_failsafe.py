"""Pre-assigned failsafe limits: all columns in failsafe together fit every circuit and the capacity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.core.failsafe import failsafe_budget_a, plan_failsafe
from gateway.core.site import Circuit, Column, ModbusTcpLink, PhaseCurrents, Site
from gateway.core.site_config import load_site_file

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "site.toml"


def col(cid: str, circuit: str = "site", rotation: tuple[int, ...] = (0, 1, 2),
        rating: float = 32.0) -> Column:
    return Column(cid, circuit, len(rotation), rotation, rating, rating, ModbusTcpLink(cid, 502, 1))


def site_of(capacity: float | PhaseCurrents, columns: list[Column],
            circuits: dict[str, tuple[float, str]] | None = None,
            failsafe: float | None = None) -> Site:
    cap = capacity if isinstance(capacity, tuple) else (float(capacity),) * 3
    circ = {cid: Circuit(cid, (r, r, r), parent) for cid, (r, parent) in (circuits or {}).items()}
    return Site("s", cap, circ, tuple(columns), dno_failsafe_a=failsafe)


@dataclass
class Case:
    name: str
    site: Site
    expected: dict[str, float]


CASES = [
    Case("room for everyone at full rating", site_of(100, [col("a"), col("b")]), {"a": 32.0, "b": 32.0}),
    Case("capacity shared evenly", site_of(40, [col("a"), col("b"), col("c")]),
         {"a": 13.4, "b": 13.3, "c": 13.3}),
    Case("not all fit at 6 A: the rest get 0", site_of(20, [col(c) for c in "abcde"]),
         {"a": 6.7, "b": 6.7, "c": 6.6, "d": 0.0, "e": 0.0}),
    Case("paused columns are spread over feeders",
         site_of(18, [col("a", "f1"), col("b", "f1"), col("c", "f1"), col("d", "f2"), col("e", "f2"),
                      col("f", "f2")], {"f1": (40.0, "site"), "f2": (40.0, "site")}),
         {"a": 6.0, "b": 6.0, "c": 0.0, "d": 6.0, "e": 0.0, "f": 0.0}),
    Case("single-phase columns on a crowded phase share it, others get more",
         site_of(12, [col("a", rotation=(0,)), col("b", rotation=(0,)), col("c", rotation=(0,)),
                      col("d", rotation=(1,)), col("e", rotation=(2,))]),
         {"a": 6.0, "b": 6.0, "c": 0.0, "d": 12.0, "e": 12.0}),
    Case("rotation honoured: both 3-phase columns load the weak L1",
         site_of((12.0, 40.0, 40.0), [col("a", rotation=(1, 2, 0)), col("b", rotation=(2, 0, 1)),
                                     col("c", rotation=(1,))]),
         {"a": 6.0, "b": 6.0, "c": 28.0}),
    Case("nested circuit binds", site_of(100, [col("a", "f1a"), col("b", "f1a"), col("c", "f1")],
                                         {"f1": (30.0, "site"), "f1a": (10.0, "f1")}),
         {"a": 10.0, "b": 0.0, "c": 20.0}),
    Case("site failsafe lowers the budget", site_of(100, [col("a"), col("b")], failsafe=20.0),
         {"a": 10.0, "b": 10.0}),
    Case("site failsafe of 0 pauses every column", site_of(100, [col("a"), col("b")], failsafe=0.0),
         {"a": 0.0, "b": 0.0}),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_failsafe_plans(case: Case) -> None:
    plan = plan_failsafe(case.site)
    assert dict(plan.limits_a) == pytest.approx(case.expected)
    assert plan.paused == tuple(sorted(c for c, a in case.expected.items() if a == 0))


def test_example_site_failsafe_fits_its_budget() -> None:
    site = load_site_file(EXAMPLE)
    plan = plan_failsafe(site)
    assert plan.budget_a == failsafe_budget_a(site) == (40.0, 40.0, 40.0)
    per_phase = [0.0, 0.0, 0.0]
    for c in site.columns:
        assert plan.limits_a[c.id] >= 6.0
        for p in c.rotation:
            per_phase[p] += plan.limits_a[c.id]
    assert all(load <= 40.0 for load in per_phase)
    assert max(per_phase) > 39.0   # and the budget is used, not wasted


def test_explicit_budget_overrides_the_site_budget() -> None:
    plan = plan_failsafe(site_of(100, [col("a"), col("b")]), budget_a=(16.0, 16.0, 16.0))
    assert dict(plan.limits_a) == {"a": 8.0, "b": 8.0}
