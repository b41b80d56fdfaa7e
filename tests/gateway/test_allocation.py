"""Allocation scenarios: nested circuits, phases and rotation, more cars than capacity, tapering
cars, limits expiring, the DNO failsafe, kW limits, the randomised increase delay."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import pytest

from gateway.core.allocation import (
    CHARGING,
    IDLE,
    PAUSED_CAPACITY,
    PAUSED_DELAY,
    PAUSED_LIMIT,
    PAUSED_MIN_PAUSE,
    RESERVED,
    Allocation,
    AllocatorState,
    Session,
    allocate,
)
from gateway.core.limits import ColumnLimit, EffectiveLimit, Limit, LimitBook
from gateway.core.site import AllocationSettings, Circuit, Column, ModbusTcpLink, PhaseCurrents, Site

S = 1000
NO_DELAY = AllocationSettings(increase_delay_max_s=0)


def col(cid: str, circuit: str = "site", *, phases: int = 3, rotation: tuple[int, ...] | None = None,
        rating: float = 32.0) -> Column:
    rot = rotation if rotation is not None else ((0, 1, 2) if phases == 3 else (0,))
    return Column(cid, circuit, phases, rot, rating, rating, ModbusTcpLink(cid, 502, 1))


def site_of(capacity: float | PhaseCurrents, columns: list[Column],
            circuits: dict[str, tuple[float, str]] | None = None,
            settings: AllocationSettings = NO_DELAY, failsafe: float | None = None) -> Site:
    cap = capacity if isinstance(capacity, tuple) else (float(capacity),) * 3
    circ = {cid: Circuit(cid, (r, r, r), parent) for cid, (r, parent) in (circuits or {}).items()}
    return Site("s", cap, circ, tuple(columns), allocation=settings, dno_failsafe_a=failsafe)


def limit(amps: float | None = None, source: str = "dno", **columns: float) -> EffectiveLimit:
    a = 1000.0 if amps is None else amps
    caps = {c: ColumnLimit(v, "operator") for c, v in columns.items()}
    return EffectiveLimit((a, a, a), source, None, caps)


def offers(alloc: Allocation) -> dict[str, float]:
    return {cid: c.offered_a for cid, c in alloc.columns.items()}


@dataclass
class Scenario:
    name: str
    site: Site
    sessions: list[Session]
    effective: EffectiveLimit
    offered: dict[str, float]
    reasons: dict[str, str] = field(default_factory=dict)
    bindings: dict[str, str] = field(default_factory=dict)
    binding: str | None = None
    reserved: dict[str, float] | None = None
    base_load: PhaseCurrents | None = None


def sessions(*cids: str, **kw: object) -> list[Session]:
    return [Session(c, 0, **kw) for c in cids]  # type: ignore[arg-type]


NESTED = site_of(100, [col("a", "f1a"), col("b", "f1a"), col("c", "f1"), col("d")],
                 {"f1": (40.0, "site"), "f1a": (16.0, "f1")})
SCENARIOS = [
    Scenario("plenty of capacity: each column at its rating", site_of(100, [col("a"), col("b")]),
             sessions("a", "b"), limit(), {"a": 32.0, "b": 32.0},
             {"a": CHARGING, "b": CHARGING}, {"a": "column", "b": "column"}, ""),
    Scenario("site limit shared evenly, remainder in rank order",
             site_of(100, [col("a"), col("b"), col("c")]),
             sessions("a", "b", "c"), limit(40), {"a": 13.4, "b": 13.3, "c": 13.3},
             bindings={"a": "site:L1", "b": "site:L1"}, binding="site:L1"),
    Scenario("nested circuits bind at each level", NESTED, sessions("a", "b", "c", "d"), limit(),
             {"a": 8.0, "b": 8.0, "c": 24.0, "d": 32.0},
             bindings={"a": "circuit:f1a:L1", "c": "circuit:f1:L1", "d": "column"}, binding="circuit:f1:L1"),
    Scenario("single-phase columns spread over the phases", site_of(16, [col("a", phases=1, rotation=(0,)),
             col("b", phases=1, rotation=(1,)), col("c", phases=1, rotation=(2,))]),
             sessions("a", "b", "c"), limit(), {"a": 16.0, "b": 16.0, "c": 16.0}),
    Scenario("single-phase columns on one phase: one is paused", site_of(16, [col("a", phases=1),
             col("b", phases=1), col("c", phases=1)]),
             sessions("a", "b", "c"), limit(), {"a": 8.0, "b": 8.0, "c": 0.0},
             {"c": PAUSED_CAPACITY}, binding="site:L1"),
    Scenario("1-phase car on a rotated 3-phase column loads one site phase",
             site_of((16.0, 32.0, 16.0), [col("a"), col("b", rotation=(1, 2, 0))]),
             [Session("a", 0), Session("b", 0, draw_phases=(0,))], limit(), {"a": 16.0, "b": 16.0},
             bindings={"a": "site:L1", "b": "site:L2"}),
    Scenario("car phases unknown: all column phases assumed",
             site_of((16.0, 32.0, 16.0), [col("a"), col("b", rotation=(1, 2, 0))]),
             sessions("a", "b"), limit(), {"a": 8.0, "b": 8.0}),
    Scenario("more cars than capacity: pause the rest, never below 6 A",
             site_of(20, [col(c) for c in "abcde"]), sessions(*"abcde"), limit(),
             {"a": 6.7, "b": 6.7, "c": 6.6, "d": 0.0, "e": 0.0},
             {"a": CHARGING, "d": PAUSED_CAPACITY, "e": PAUSED_CAPACITY}, binding="site:L1"),
    Scenario("site limit below 6 A pauses everyone", site_of(100, [col("a"), col("b")]),
             sessions("a", "b"), limit(5.9), {"a": 0.0, "b": 0.0},
             {"a": PAUSED_CAPACITY, "b": PAUSED_CAPACITY}, binding="site:L1"),
    Scenario("column limit caps one column, the others take the rest",
             site_of(40, [col("a"), col("b")]), sessions("a", "b"), limit(a=10), {"a": 10.0, "b": 30.0},
             bindings={"a": "limit:operator", "b": "site:L1"}),
    Scenario("column limit below 6 A pauses that column", site_of(40, [col("a"), col("b")]),
             sessions("a", "b"), limit(a=5), {"a": 0.0, "b": 32.0}, {"a": PAUSED_LIMIT},
             {"a": "limit:operator"}),
    Scenario("car maximum below the column rating", site_of(40, [col("a"), col("b")]),
             [Session("a", 0, car_max_a=16), Session("b", 0)], limit(), {"a": 16.0, "b": 24.0},
             bindings={"a": "car"}),
    Scenario("offline column keeps its failsafe reserved", site_of(32, [col("a"), col("b"), col("c")]),
             sessions("a", "b", "c"), limit(), {"a": 8.0, "b": 8.0, "c": 16.0}, {"c": RESERVED},
             reserved={"c": 16.0}),
    Scenario("non-EV base load comes off the site phases", site_of(32, [col("a"), col("b")]),
             sessions("a", "b"), limit(), {"a": 8.0, "b": 8.0}, base_load=(10.0, 16.0, 4.0)),
    Scenario("idle columns are offered nothing", site_of(100, [col("a"), col("b")]), sessions("a"),
             limit(), {"a": 32.0, "b": 0.0}, {"b": IDLE}),
]


@pytest.mark.parametrize("sc", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_allocation_scenarios(sc: Scenario) -> None:
    alloc = allocate(sc.site, sc.sessions, sc.effective, 0, AllocatorState(rng=random.Random(0)),
                     reserved_a=sc.reserved, base_load_a=sc.base_load)
    assert offers(alloc) == pytest.approx(sc.offered)
    for cid, reason in sc.reasons.items():
        assert alloc.columns[cid].reason == reason, cid
        assert alloc.columns[cid].paused == reason.startswith("paused")
    for cid, binding in sc.bindings.items():
        assert alloc.columns[cid].binding == binding, cid
    if sc.binding is not None:
        assert alloc.binding == sc.binding


def run(site: Site, steps: list[tuple[int, list[Session], EffectiveLimit]],
        state: AllocatorState | None = None) -> list[Allocation]:
    st = state if state is not None else AllocatorState(rng=random.Random(0))
    out = []
    for now, sess, eff in steps:
        alloc = allocate(site, sess, eff, now, st)
        st = alloc.state
        out.append(alloc)
    return out


def test_decreases_apply_at_once_increases_after_a_seeded_random_delay() -> None:
    site = site_of(100, [col("a"), col("b")], settings=AllocationSettings())  # delay up to 600 s
    expected_delay_ms = round(random.Random(42).random() * 600 * S)
    st = AllocatorState(rng=random.Random(42))
    first = allocate(site, sessions("a"), limit(), 0, st)
    assert first.columns["a"].offered_a == 0.0
    assert first.columns["a"].target_a == 32.0
    assert first.columns["a"].reason == PAUSED_DELAY
    assert first.columns["a"].increase_due_ms == expected_delay_ms
    before = allocate(site, sessions("a"), limit(), expected_delay_ms - 1, first.state)
    assert before.columns["a"].offered_a == 0.0
    assert before.columns["a"].increase_due_ms == expected_delay_ms   # not re-rolled while pending
    due = allocate(site, sessions("a"), limit(), expected_delay_ms, before.state)
    assert (due.columns["a"].offered_a, due.columns["a"].reason) == (32.0, CHARGING)
    # the site limit drops: the offer follows in the same step, no delay
    cut = allocate(site, sessions("a"), limit(10), expected_delay_ms + 1, due.state)
    assert cut.columns["a"].offered_a == 10.0
    assert cut.columns["a"].increase_due_ms is None
    # and rises again only after a fresh random delay
    up = allocate(site, sessions("a"), limit(), expected_delay_ms + 2, cut.state)
    assert up.columns["a"].offered_a == 10.0
    assert up.columns["a"].target_a == 32.0
    due_again = up.columns["a"].increase_due_ms
    assert due_again is not None and due_again > expected_delay_ms + 2


class _Fixed:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(("delay_s", "draw", "due_ms"), [(1800, 0.999, 1_798_200), (600, 0.5, 300_000),
                                                          (600, 0.0, 0)])
def test_increase_delay_range_is_configurable(delay_s: float, draw: float, due_ms: int) -> None:
    site = site_of(100, [col("a")], settings=AllocationSettings(increase_delay_max_s=delay_s))
    alloc = allocate(site, sessions("a"), limit(), 0, AllocatorState(rng=_Fixed(draw)))
    if due_ms == 0:
        assert alloc.columns["a"].offered_a == 32.0
    else:
        assert alloc.columns["a"].increase_due_ms == due_ms
        assert alloc.columns["a"].offered_a == 0.0


def test_a_pending_increase_never_overshoots_a_lower_new_target() -> None:
    site = site_of(100, [col("a")], settings=AllocationSettings())
    a1 = allocate(site, sessions("a"), limit(20), 0, AllocatorState.resume({"a": 10.0}, 0, _Fixed(0.5)))
    assert (a1.columns["a"].offered_a, a1.columns["a"].increase_due_ms) == (10.0, 300_000)
    a2 = allocate(site, sessions("a"), limit(15), 300_000, a1.state)
    assert a2.columns["a"].offered_a == 15.0


def _book_site(settings: AllocationSettings) -> Site:
    return site_of(100, [col("a"), col("b")], settings=settings, failsafe=20.0)


@pytest.mark.parametrize("without_delay", [True, False])
def test_dno_ordered_restore_skips_the_delay_only_when_configured(without_delay: bool) -> None:
    site = _book_site(AllocationSettings(dno_restore_without_delay=without_delay))
    book = LimitBook(site, dno_link_up=True)
    book.add(Limit("dno", 20, 3600 * S), 0)
    st = AllocatorState.resume({"a": 10.0, "b": 10.0}, 0, _Fixed(0.5))
    a1 = allocate(site, sessions("a", "b"), book.effective(0), 0, st)
    assert offers(a1) == {"a": 10.0, "b": 10.0}
    book.add(Limit("dno", 64, 3600 * S), 10 * S)   # the DNO restores
    a2 = allocate(site, sessions("a", "b"), book.effective(10 * S), 10 * S, a1.state)
    assert offers(a2) == ({"a": 32.0, "b": 32.0} if without_delay else {"a": 10.0, "b": 10.0})
    # the restore is consumed once: a later increase is delayed again
    book.add(Limit("operator", 30, 3600 * S), 20 * S)
    a3 = allocate(site, sessions("a", "b"), book.effective(20 * S), 20 * S, a2.state)
    book.add(Limit("operator", 90, 3600 * S), 30 * S)
    a4 = allocate(site, sessions("a", "b"), book.effective(30 * S), 30 * S, a3.state)
    if without_delay:
        assert offers(a3) == offers(a4) == {"a": 15.0, "b": 15.0}
        assert a4.columns["a"].increase_due_ms == 30 * S + 300 * S
    else:  # still waiting for the increase drawn at 10 s
        assert offers(a3) == offers(a4) == {"a": 10.0, "b": 10.0}
        assert a4.columns["a"].increase_due_ms == 10 * S + 300 * S


def test_expiry_of_a_dno_limit_raises_the_offer_only_after_the_random_delay() -> None:
    site = _book_site(AllocationSettings(dno_restore_without_delay=True))
    book = LimitBook(site, dno_link_up=True)
    book.add(Limit("dno", 20, 60 * S), 0)
    st = AllocatorState.resume({"a": 10.0, "b": 10.0}, 0, _Fixed(0.25))
    a1 = allocate(site, sessions("a", "b"), book.effective(59 * S), 59 * S, st)
    a2 = allocate(site, sessions("a", "b"), book.effective(60 * S), 60 * S, a1.state)
    assert book.effective(60 * S).source == "capacity"
    assert offers(a2) == {"a": 10.0, "b": 10.0}
    assert a2.columns["a"].increase_due_ms == 60 * S + 150 * S
    a3 = allocate(site, sessions("a", "b"), book.effective(210 * S), 210 * S, a2.state)
    assert offers(a3) == {"a": 32.0, "b": 32.0}


def test_dno_link_down_and_limit_expiry_cut_the_site_to_its_failsafe_at_once() -> None:
    site = _book_site(NO_DELAY)
    book = LimitBook(site, dno_link_up=True)
    book.add(Limit("dno", 50, 60 * S), 0)
    a1 = allocate(site, sessions("a", "b"), book.effective(0), 0, AllocatorState())
    assert offers(a1) == {"a": 25.0, "b": 25.0}
    book.set_dno_link(False, 30 * S)
    a2 = allocate(site, sessions("a", "b"), book.effective(60 * S), 60 * S, a1.state)
    assert offers(a2) == {"a": 10.0, "b": 10.0}
    assert a2.site_source == "dno-failsafe"


def test_kw_limit_from_the_book() -> None:
    site = _book_site(NO_DELAY)
    book = LimitBook(site, dno_link_up=True)
    assert book.add(Limit("dno", 27.6, 3600 * S, unit="kW"), 0) is None   # 40 A per phase
    alloc = allocate(site, sessions("a", "b"), book.effective(0), 0, AllocatorState())
    assert offers(alloc) == {"a": 20.0, "b": 20.0}


def test_tapering_car_is_reclaimed_after_settling_and_released_when_it_draws_again() -> None:
    site = site_of(40, [col("a"), col("b")])   # margin 2 A, settle 60 s, no delay
    eff = limit()
    a0 = allocate(site, sessions("a", "b"), eff, 0, AllocatorState())
    assert offers(a0) == {"a": 20.0, "b": 20.0}
    tapering = [Session("a", 0, measured_a=(8.0, 8.0, 7.5)), Session("b", 0, measured_a=(20.0,) * 3)]
    early = allocate(site, tapering, eff, 59 * S, a0.state)
    assert offers(early) == {"a": 20.0, "b": 20.0}        # not settled yet
    a1 = allocate(site, tapering, eff, 60 * S, early.state)
    assert offers(a1) == {"a": 10.0, "b": 30.0}            # measured + margin; the rest to b
    assert a1.columns["a"].binding == "reclaim"
    steady = [Session("a", 0, measured_a=(8.5, 8.5, 8.5)), Session("b", 0, measured_a=(30.0,) * 3)]
    a2 = allocate(site, steady, eff, 200 * S, a1.state)
    assert offers(a2) == {"a": 10.0, "b": 30.0}            # stays reclaimed, no oscillation
    wants_more = [Session("a", 0, measured_a=(9.5, 9.5, 9.5)), Session("b", 0, measured_a=(30.0,) * 3)]
    a3 = allocate(site, wants_more, eff, 210 * S, a2.state)
    assert offers(a3) == {"a": 20.0, "b": 20.0}


def test_one_phase_car_measured_on_its_phase_only() -> None:
    site = site_of(40, [col("a"), col("b")])
    a0 = allocate(site, sessions("a", "b"), limit(), 0, AllocatorState())
    one_phase = [Session("a", 0, measured_a=(19.8, 0.0, 0.0), draw_phases=(0,)), Session("b", 0)]
    a1 = allocate(site, one_phase, limit(), 100 * S, a0.state)
    assert offers(a1) == {"a": 20.0, "b": 20.0}    # it draws its offer on the phase it uses


def test_rotation_pauses_the_longest_charging_and_min_pause_holds_it() -> None:
    settings = replace(NO_DELAY, rotation_s=900, min_pause_s=300)
    site = site_of(100, [col("a"), col("b"), col("c")], settings=settings)
    cars = [Session("a", 0, energy_wh=1000), Session("b", 0, energy_wh=5000), Session("c", 1 * S)]
    a0 = allocate(site, cars, limit(12), 1 * S, AllocatorState())
    assert offers(a0) == {"a": 6.0, "b": 6.0, "c": 0.0}
    assert a0.columns["c"].reason == PAUSED_CAPACITY
    a1 = allocate(site, cars, limit(12), 900 * S, a0.state)      # a and b charged 899 s: protected
    assert offers(a1) == {"a": 6.0, "b": 6.0, "c": 0.0}
    a2 = allocate(site, cars, limit(12), 901 * S, a1.state)      # rotation: b has the most energy
    assert offers(a2) == {"a": 6.0, "b": 0.0, "c": 6.0}
    a3 = allocate(site, cars, limit(100), 902 * S, a2.state)   # plenty again, but b is in min pause
    assert offers(a3) == {"a": 32.0, "b": 0.0, "c": 32.0}
    assert a3.columns["b"].reason == PAUSED_MIN_PAUSE
    a4 = allocate(site, cars, limit(100), 1201 * S, a3.state)
    assert offers(a4) == {"a": 32.0, "b": 32.0, "c": 32.0}


def test_session_end_frees_its_share_and_unknown_columns_are_ignored() -> None:
    site = site_of(40, [col("a"), col("b")])
    a0 = allocate(site, sessions("a", "b"), limit(), 0, AllocatorState())
    a1 = allocate(site, [Session("b", 0), Session("zz", 0)], limit(), 1 * S, a0.state)
    assert offers(a1) == {"a": 0.0, "b": 32.0}
    assert a1.columns["a"].reason == IDLE
    assert a1.ignored == ("zz",)
    assert a1.offered_site_a == (32.0, 32.0, 32.0)


def test_a_session_on_an_offline_column_takes_no_share_beside_its_reservation() -> None:
    """An offline column may draw its failsafe (reserved); a session still reported on it is not
    admitted as well, or its 6 A would be counted twice and taken from the others."""
    site = site_of(20, [col("a"), col("b")])
    alloc = allocate(site, sessions("a", "b"), limit(), 0, AllocatorState(), reserved_a={"a": 6.0})
    assert offers(alloc) == {"a": 6.0, "b": 14.0}
    assert alloc.columns["a"].reason == RESERVED
    assert alloc.offered_site_a == (20.0, 20.0, 20.0)


def test_resume_keeps_current_offers_without_a_start_delay() -> None:
    site = site_of(100, [col("a")], settings=AllocationSettings())
    alloc = allocate(site, sessions("a"), limit(16), 0, AllocatorState.resume({"a": 16.0}, 0))
    assert alloc.columns["a"].offered_a == 16.0


def test_garbage_inputs_fail_closed_without_raising() -> None:
    nan = float("nan")
    site = site_of(40, [col("a"), col("b"), col("c")])
    garbage = [Session("a", 0, measured_a=(nan, nan, nan), draw_phases=(7,), car_max_a=nan),
               Session("b", 0, measured_a=())]
    alloc = allocate(site, garbage, EffectiveLimit((nan, 40.0, 40.0), "dno"), 0, AllocatorState())
    assert offers(alloc) == {"a": 0.0, "b": 0.0, "c": 0.0}   # site L1 unknown: nothing on it
    alloc = allocate(site, garbage, limit(a=nan), 0, AllocatorState(), reserved_a={"c": nan},
                     base_load_a=(nan, 0.0, 0.0))
    assert offers(alloc) == {"a": 0.0, "b": 8.0, "c": 32.0}  # c reserved at its rating; a capped at 0
    assert alloc.columns["a"].reason == PAUSED_LIMIT
