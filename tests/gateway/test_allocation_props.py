"""Properties over random sites, sessions and limit sequences (bounded hypothesis runs):
no circuit or phase is ever over its rating, every charging session gets at least 6 A, headroom
is not left unused, the failsafe limits together fit every circuit and the capacity, and a step
run in stages and slices (a large site's) allocates exactly as one run at once."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.allocation import Allocation, AllocationStep, AllocatorState, Session, allocate
from gateway.core.failsafe import plan_failsafe
from gateway.core.limits import ColumnLimit, EffectiveLimit
from gateway.core.site import AllocationSettings, Circuit, Column, ModbusTcpLink, Site

S = 1000
EPS = 1e-6
PROPS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

amps = st.integers(0, 1000).map(lambda x: x / 10)


@st.composite
def sites(draw: st.DrawFn) -> Site:
    circuits: dict[str, Circuit] = {}
    for i in range(draw(st.integers(0, 4))):
        parent = draw(st.sampled_from(["site", *circuits]))
        rating = tuple(draw(st.integers(30, 800)) / 10 for _ in range(3))
        circuits["f" + str(i)] = Circuit("f" + str(i), rating, parent)  # type: ignore[arg-type]
    columns = []
    for i in range(draw(st.integers(1, 8))):
        phases = draw(st.sampled_from([1, 3]))
        rotation = tuple(draw(st.permutations([0, 1, 2]))) if phases == 3 else (draw(st.integers(0, 2)),)
        max_a = draw(st.integers(60, 320)) / 10
        columns.append(Column("c" + str(i), draw(st.sampled_from(["site", *circuits])), phases, rotation,
                              max_a, max_a, ModbusTcpLink("h", 502, i + 1)))
    capacity = tuple(draw(st.integers(60, 1000)) / 10 for _ in range(3))
    cfg = AllocationSettings(increase_delay_max_s=draw(st.sampled_from([0.0, 120.0, 600.0])),
                             dno_restore_without_delay=draw(st.booleans()),
                             min_pause_s=draw(st.sampled_from([0.0, 300.0])),
                             rotation_s=draw(st.sampled_from([0.0, 900.0])),
                             reclaim_settle_s=draw(st.sampled_from([0.0, 60.0])))
    failsafe = draw(st.none() | amps)
    return Site("s", capacity, circuits, tuple(columns), allocation=cfg, dno_failsafe_a=failsafe)  # type: ignore[arg-type]


@dataclass
class Step:
    dt_ms: int
    sessions: list[Session]
    effective: EffectiveLimit
    offline: list[str]
    base_load: tuple[float, float, float] | None


@st.composite
def steps(draw: st.DrawFn, site: Site, max_steps: int = 6) -> list[Step]:
    out = []
    for _ in range(draw(st.integers(1, max_steps))):
        sess = []
        for c in site.columns:
            if not draw(st.booleans()):
                continue
            draw_phases = draw(st.none() | st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True)
                               .map(tuple))
            measured = draw(st.none() | st.lists(amps, min_size=c.phases, max_size=c.phases).map(tuple))
            sess.append(Session(c.id, draw(st.sampled_from([0, 5 * S])), measured_a=measured,
                                draw_phases=draw_phases, energy_wh=draw(st.floats(0, 1e5)),
                                car_max_a=draw(st.none() | amps)))
        per_phase = draw(st.tuples(amps, amps, amps) | amps.map(lambda a: (a, a, a)))
        col_limits = {c.id: ColumnLimit(draw(amps), "operator") for c in site.columns if draw(st.booleans())}
        eff = EffectiveLimit(per_phase, "dno", None, col_limits,
                             draw(st.none() | st.sampled_from([1, 2, 3])))
        offline = [c.id for c in site.columns if draw(st.integers(0, 4)) == 0]
        base = draw(st.none() | st.tuples(amps, amps, amps))
        out.append(Step(draw(st.sampled_from([0, 1 * S, 61 * S, 400 * S])), sess, eff, offline, base))
    return out


def _loads(site: Site, per_column: dict[str, tuple[float, frozenset[int]]]) -> dict[tuple[str, int], float]:
    """Independent tally: current per (node, site phase), walking each column up to the site."""
    total: dict[tuple[str, int], float] = {}
    for col in site.columns:
        if col.id not in per_column:
            continue
        current, phases = per_column[col.id]
        node = col.circuit
        while True:
            for p in phases:
                total[(node, p)] = total.get((node, p), 0.0) + current
            if node == "site":
                break
            node = site.circuits[node].parent
    return total


def _rating(site: Site, node: str, p: int, eff: EffectiveLimit | None) -> float:
    if node == "site":
        return min(site.capacity_a[p], eff.site_a[p]) if eff is not None else site.capacity_a[p]
    return site.circuits[node].rating_a[p]


def _site_phases(col: Column, s: Session | None) -> frozenset[int]:
    if s is not None and s.draw_phases:
        picked = {col.rotation[i] for i in s.draw_phases if i < col.phases}
        if picked:
            return frozenset(picked)
    return frozenset(col.rotation)


@PROPS
@given(data=st.data())
def test_allocation_never_overloads_and_never_offers_below_6a(data: st.DataObject) -> None:
    site = data.draw(sites())
    plan = plan_failsafe(site)
    state = AllocatorState(rng=random.Random(data.draw(st.integers(0, 2**32))))
    now = 0
    for step in data.draw(steps(site)):
        now += step.dt_ms
        reserved = {cid: plan.limits_a[cid] for cid in step.offline}
        alloc = allocate(site, step.sessions, step.effective, now, state, reserved_a=reserved,
                         base_load_a=step.base_load)
        state = alloc.state
        by_col = {s.column_id: s for s in step.sessions}
        fixed = {cid: (a, frozenset(site.column(cid).rotation)) for cid, a in reserved.items()}  # type: ignore[union-attr]
        fixed_load = _loads(site, fixed)
        for field in ("offered_a", "target_a"):
            drawn = {}
            for col in site.columns:
                ca = alloc.columns[col.id]
                value = getattr(ca, field)
                if col.id in reserved:
                    continue
                assert value == 0 or value >= 6.0, (col.id, field, value)
                assert value <= col.max_a + EPS
                if col.id not in by_col:
                    assert value == 0
                    continue
                lim = step.effective.columns.get(col.id)
                if lim is not None:
                    assert value <= lim.value_a + EPS
                car = by_col[col.id].car_max_a
                if car is not None:
                    assert value <= car + EPS
                if field == "offered_a":
                    assert ca.paused == (value == 0)
                drawn[col.id] = (value, _site_phases(col, by_col[col.id]))
            load = _loads(site, drawn)
            for (node, p), amps_used in load.items():
                room = _rating(site, node, p, step.effective) - fixed_load.get((node, p), 0.0)
                if node == "site" and step.base_load is not None:
                    room -= step.base_load[p]
                assert amps_used <= max(room, 0.0) + EPS, (field, node, p, amps_used, room)
            assert all(alloc.columns[c].offered_a <= alloc.columns[c].target_a + EPS for c in drawn)


@PROPS
@given(data=st.data())
def test_headroom_is_not_left_unused(data: st.DataObject) -> None:
    """A session held below its own caps by a constraint finds that constraint full (0.1 A steps)."""
    site = data.draw(sites())
    (step,) = data.draw(steps(site, max_steps=1))
    alloc = allocate(site, step.sessions, step.effective, 0, AllocatorState(rng=random.Random(0)),
                     base_load_a=step.base_load)
    by_col = {s.column_id: s for s in step.sessions}
    targets = {cid: (alloc.columns[cid].target_a, _site_phases(site.column(cid), by_col[cid]))  # type: ignore[arg-type]
               for cid in by_col if alloc.columns[cid].target_a > 0}
    load = _loads(site, targets)
    for cid in targets:
        binding = alloc.columns[cid].binding
        assert binding, cid
        if binding.startswith(("site:", "circuit:")):
            parts = binding.split(":")
            node, p = parts[-2], ["L1", "L2", "L3"].index(parts[-1])
            room = _rating(site, node, p, step.effective)
            if node == "site" and step.base_load is not None:
                room -= step.base_load[p]
            assert room - load[(node, p)] < 0.1 + EPS, (cid, binding, room, load[(node, p)])


def _chunks(draw: st.DrawFn, items: list[Session]) -> list[list[Session]]:
    out: list[list[Session]] = []
    while items:
        n = draw(st.integers(0, len(items)))
        out.append(items[:n])
        items = items[n:]
    return out


def _same(staged: Allocation, at_once: Allocation) -> None:
    assert staged.columns == at_once.columns
    for name in ("binding", "site_source", "site_limit_a", "offered_site_a", "ignored"):
        assert getattr(staged, name) == getattr(at_once, name), name
    assert staged.state.columns == at_once.state.columns
    assert staged.state.restore_seen_ms == at_once.state.restore_seen_ms


@PROPS
@given(data=st.data())
def test_a_step_in_stages_and_slices_allocates_as_at_once(data: st.DataObject) -> None:
    """The sessions added in any number of calls (a session on a column the site does not know,
    or on an offline column, among them) and the columns finished any number at a time give
    the offers, reasons, random delays and memory of one allocate() call, step after step."""
    site = data.draw(sites())
    plan = plan_failsafe(site)
    seed = data.draw(st.integers(0, 2**32))
    one, staged_state = AllocatorState(rng=random.Random(seed)), AllocatorState(rng=random.Random(seed))
    now = 0
    for step in data.draw(steps(site)):
        now += step.dt_ms
        sessions = list(step.sessions)
        if data.draw(st.booleans()):
            sessions.insert(data.draw(st.integers(0, len(sessions))), Session("ghost", now))
        reserved = {cid: plan.limits_a[cid] for cid in step.offline}
        at_once = allocate(site, sessions, step.effective, now, one, reserved_a=reserved,
                           base_load_a=step.base_load)
        run = AllocationStep(site, step.effective, now, staged_state)
        for chunk in _chunks(data.draw, sessions):
            run.add(iter(chunk))
        run.solve(reserved_a=reserved, base_load_a=step.base_load)
        while not run.finish(data.draw(st.integers(1, 3))):
            pass
        staged = run.result()
        _same(staged, at_once)
        one, staged_state = at_once.state, staged.state


def test_a_step_out_of_stage_order_is_refused() -> None:
    """A stage run out of its order raises rather than allocate from half the inputs."""
    site = Site("s", (32.0, 32.0, 32.0), {}, (Column("c0", "site", 3, (0, 1, 2), 32.0, 32.0,
                                                     ModbusTcpLink("h", 502, 1)),))
    eff = EffectiveLimit((32.0, 32.0, 32.0), "capacity", None, {}, None)
    run = AllocationStep(site, eff, 0, AllocatorState())
    for early in (lambda: run.finish(1), run.result):
        with pytest.raises(RuntimeError):
            early()
    run.add([Session("c0", 0)])
    run.solve()
    for late in (lambda: run.add([Session("c0", 0)]), run.solve, run.result):
        with pytest.raises(RuntimeError):
            late()
    assert run.finish(5)
    assert run.result().columns["c0"].target_a == 32.0


@PROPS
@given(site=sites(), budget=st.none() | st.tuples(amps, amps, amps))
def test_failsafe_limits_together_fit_every_circuit_and_the_capacity(
        site: Site, budget: tuple[float, float, float] | None) -> None:
    plan = plan_failsafe(site, budget_a=budget)
    limit_a = plan.budget_a
    assert set(plan.limits_a) == {c.id for c in site.columns}
    for col in site.columns:
        value = plan.limits_a[col.id]
        assert value == 0 or 6.0 <= value <= col.max_a + EPS
        assert (value == 0) == (col.id in plan.paused)
    everyone = {c.id: (plan.limits_a[c.id], frozenset(c.rotation)) for c in site.columns}
    eff = EffectiveLimit(limit_a)
    for (node, p), used in _loads(site, everyone).items():
        assert used <= _rating(site, node, p, eff) + EPS, (node, p, used)
    # nobody is left at 0 who would have fitted at 6 A next to the others at 6 A
    at_min = {cid: (6.0, phases) for cid, (a, phases) in everyone.items() if a > 0}
    base_load = _loads(site, at_min)
    for cid in plan.paused:
        paused_col = site.column(cid)
        assert paused_col is not None
        extra = _loads(site, {cid: (6.0, frozenset(paused_col.rotation))})
        assert any(base_load.get(k, 0.0) + 6.0 > _rating(site, k[0], k[1], eff) + EPS for k in extra), cid


@PROPS
@given(site=sites())
def test_failsafe_gives_every_column_6a_when_they_all_fit(site: Site) -> None:
    plan = plan_failsafe(site)
    everyone = {c.id: (6.0, frozenset(c.rotation)) for c in site.columns}
    eff = EffectiveLimit(plan.budget_a)
    fits = all(used <= _rating(site, node, p, eff) + EPS
               for (node, p), used in _loads(site, everyone).items())
    assert fits == (plan.paused == ())
