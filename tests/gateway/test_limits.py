"""Limits: validity, priority, kW conversion, the effective site limit, the DNO failsafe, load checks."""

from __future__ import annotations

import math

import pytest

from gateway.core.limits import (
    R_ABOVE_CAPACITY,
    R_ABOVE_RATING,
    R_BAD_SOURCE,
    R_BAD_UNIT,
    R_BAD_VALIDITY,
    R_EXPIRED,
    R_NEGATIVE,
    R_NOT_FINITE,
    R_UNKNOWN_COLUMN,
    SOURCE_CAPACITY,
    SOURCE_DNO_FAILSAFE,
    EffectiveLimit,
    Limit,
    LimitBook,
    LoadCheckState,
    check_limit,
    check_load,
    limit_amps,
)
from gateway.core.site import Circuit, Column, ModbusTcpLink, Site

S = 1000  # ms per second
H = 3600 * S


def make_site(*, failsafe: float | None = 20.0, duration_s: float | None = None) -> Site:
    cols = (
        Column("c1", "f1", 3, (0, 1, 2), 32.0, 32.0, ModbusTcpLink("h", 502, 1)),
        Column("c2", "f1", 1, (1,), 32.0, 32.0, ModbusTcpLink("h", 502, 2)),
        Column("c3", "site", 3, (1, 2, 0), 16.0, 16.0, ModbusTcpLink("h", 502, 3)),
    )
    return Site("s1", (100.0, 100.0, 100.0), {"f1": Circuit("f1", (40.0, 40.0, 40.0))}, cols,
                dno_failsafe_a=failsafe, dno_failsafe_duration_s=duration_s)


def test_kw_limits_convert_with_voltage_and_phases() -> None:
    site = make_site()
    assert limit_amps(Limit("dno", 69.0, H, unit="kW"), site) == pytest.approx(100.0)  # 69 kW / (230 V x 3)
    assert limit_amps(Limit("operator", 7.36, H, unit="kW", column="c2"), site) == pytest.approx(32.0)
    assert limit_amps(Limit("operator", 22.08, H, unit="kW", column="c1"), site) == pytest.approx(32.0)
    book = LimitBook(site, dno_link_up=True)
    assert book.add(Limit("dno", 13.8, H, unit="kW"), 0) is None
    assert book.effective(0).site_a == pytest.approx((20.0, 20.0, 20.0))


REJECT = [
    (Limit("", 10, H), R_BAD_SOURCE),
    (Limit("dno", 10, H, unit="W"), R_BAD_UNIT),
    (Limit("dno", math.nan, H), R_NOT_FINITE),
    (Limit("dno", math.inf, H), R_NOT_FINITE),
    (Limit("dno", -1, H), R_NEGATIVE),
    (Limit("dno", 10, 5 * S, valid_from_ms=5 * S), R_BAD_VALIDITY),
    (Limit("dno", 10, 10 * S), R_EXPIRED),        # now is 10 s: validity ended
    (Limit("dno", 100.5, H), R_ABOVE_CAPACITY),
    (Limit("dno", 70, H, unit="kW"), R_ABOVE_CAPACITY),
    (Limit("operator", 10, H, column="c9"), R_UNKNOWN_COLUMN),
    (Limit("operator", 17, H, column="c3"), R_ABOVE_RATING),
]


@pytest.mark.parametrize(("limit", "reason"), REJECT, ids=[r[1] + ":" + str(i) for i, r in enumerate(REJECT)])
def test_bad_limits_are_refused_and_change_nothing(limit: Limit, reason: str) -> None:
    site = make_site()
    book = LimitBook(site, dno_link_up=True)
    assert check_limit(limit, site, 10 * S) == reason
    assert book.add(limit, 10 * S) == reason
    assert book.limits() == ()
    assert book.effective(10 * S) == EffectiveLimit((100.0, 100.0, 100.0))


def test_lowest_valid_limit_binds_and_names_its_source() -> None:
    book = LimitBook(make_site(), dno_link_up=True)
    assert book.effective(0).source == SOURCE_CAPACITY
    book.add(Limit("operator", 60, H), 0)
    book.add(Limit("dno", 45, 10 * S), 0)
    eff = book.effective(5 * S)
    assert (eff.site_a, eff.source) == ((45.0, 45.0, 45.0), "dno")
    assert eff.limit is not None and eff.limit.value == 45
    # the DNO limit expires: the operator's limit binds
    eff = book.effective(10 * S)
    assert (eff.site_a, eff.source) == ((60.0, 60.0, 60.0), "operator")
    # a limit equal to the capacity is reported as binding (it is what the site obeys)
    book.add(Limit("site", 100, H), 20 * S)
    book.add(Limit("operator", 100, H), 20 * S)
    assert book.effective(20 * S).site_a == (100.0, 100.0, 100.0)


def test_per_phase_capacity_is_kept_under_a_higher_limit() -> None:
    site = make_site()
    site = Site(site.id, (100.0, 80.0, 60.0), site.circuits, site.columns)
    book = LimitBook(site, dno_link_up=True)
    book.add(Limit("dno", 70, H), 0)
    eff = book.effective(0)
    assert eff.site_a == (70.0, 70.0, 60.0)
    assert eff.source == "dno"


def test_validity_window_from_and_until() -> None:
    book = LimitBook(make_site(), dno_link_up=True)
    book.add(Limit("dno", 30, 20 * S, valid_from_ms=10 * S), 0)
    assert book.effective(9_999).site_a == (100.0, 100.0, 100.0)
    assert book.effective(10 * S).site_a == (30.0, 30.0, 30.0)
    assert book.effective(19_999).site_a == (30.0, 30.0, 30.0)
    assert book.effective(20 * S).site_a == (100.0, 100.0, 100.0)
    book.prune(20 * S)
    assert book.limits() == ()


def test_priority_decides_within_a_source_latest_among_equals() -> None:
    book = LimitBook(make_site(), dno_link_up=True)
    book.add(Limit("dno", 30, H, priority=5, id="a"), 0)
    book.add(Limit("dno", 80, H, priority=9, id="b"), 0)   # higher priority wins even though higher
    assert book.effective(0).site_a[0] == 80.0
    book.add(Limit("dno", 50, H, priority=9, id="c"), 1)   # same priority: the latest wins
    assert book.effective(1).site_a[0] == 50.0
    book.add(Limit("dno", 70, H, priority=9, id="c"), 2)   # same id replaces
    assert book.effective(2).site_a[0] == 70.0
    assert book.remove("dno", "c", 3)
    assert book.effective(3).site_a[0] == 80.0
    assert not book.remove("dno", "nope", 3)
    # across sources the lowest still wins whatever the priority
    book.add(Limit("operator", 40, H, priority=0), 4)
    assert book.effective(4).source == "operator"


def test_column_limits_are_kept_apart_from_the_site_limit() -> None:
    book = LimitBook(make_site(), dno_link_up=True)
    book.add(Limit("operator", 10, H, column="c1"), 0)
    book.add(Limit("dno", 3.68, H, unit="kW", column="c2"), 0)   # 1-phase: 16 A
    eff = book.effective(0)
    assert eff.site_a == (100.0, 100.0, 100.0)
    assert eff.columns["c1"].value_a == 10.0 and eff.columns["c1"].source == "operator"
    assert eff.columns["c2"].value_a == pytest.approx(16.0) and eff.columns["c2"].source == "dno"
    assert "c3" not in eff.columns


def test_dno_limit_expiring_while_link_down_falls_to_site_failsafe() -> None:
    book = LimitBook(make_site(failsafe=20.0), dno_link_up=True)
    book.add(Limit("dno", 50, 100 * S), 0)
    book.set_dno_link(False, 40 * S)
    eff = book.effective(99 * S)
    assert (eff.site_a[0], eff.source, eff.failsafe_active) == (50.0, "dno", False)
    book.prune(100 * S)  # the expired DNO limit is kept: the failsafe rule needs it
    eff = book.effective(100 * S)
    assert (eff.site_a, eff.source, eff.failsafe_active) == ((20.0, 20.0, 20.0), SOURCE_DNO_FAILSAFE, True)
    assert book.effective(10 * H).source == SOURCE_DNO_FAILSAFE  # held until the link is back
    book.set_dno_link(True, 10 * H)
    eff = book.effective(10 * H)
    assert (eff.site_a[0], eff.source, eff.failsafe_active) == (100.0, SOURCE_CAPACITY, False)
    assert book.limits() == ()


def test_failsafe_rules_edge_cases() -> None:
    # expired before the link went down: no failsafe
    book = LimitBook(make_site(), dno_link_up=True)
    book.add(Limit("dno", 50, 10 * S), 0)
    book.set_dno_link(False, 20 * S)
    assert book.effective(30 * S).source == SOURCE_CAPACITY
    # link down but nothing expired (no DNO limit at all): no failsafe
    assert LimitBook(make_site()).effective(H).source == SOURCE_CAPACITY
    # no failsafe configured: back to the capacity
    book = LimitBook(make_site(failsafe=None), dno_link_up=True)
    book.add(Limit("dno", 50, 10 * S), 0)
    book.set_dno_link(False, 5 * S)
    assert book.effective(11 * S).site_a == (100.0, 100.0, 100.0)
    # a DNO limit scheduled ahead still rules while the link is down
    book = LimitBook(make_site(), dno_link_up=True)
    book.add(Limit("dno", 50, 10 * S), 0)
    book.add(Limit("dno", 35, 20 * S, valid_from_ms=10 * S, id="next"), 0)
    book.set_dno_link(False, 5 * S)
    assert book.effective(15 * S).site_a[0] == 35.0
    assert book.effective(20 * S).source == SOURCE_DNO_FAILSAFE
    # a failsafe lower than an operator limit binds; a higher one does not
    book.add(Limit("operator", 15, H), 20 * S)
    assert book.effective(21 * S).source == "operator"


def test_failsafe_duration_ends_the_failsafe() -> None:
    book = LimitBook(make_site(duration_s=7200), dno_link_up=True)
    book.add(Limit("dno", 50, 10 * S), 0)
    book.set_dno_link(False, 5 * S)
    assert book.effective(10 * S + 2 * H - 1).source == SOURCE_DNO_FAILSAFE
    assert book.effective(10 * S + 2 * H).source == SOURCE_CAPACITY


def test_dno_ordered_restore_is_marked_but_expiry_is_not() -> None:
    book = LimitBook(make_site(), dno_link_up=True)
    book.add(Limit("dno", 30, 100 * S), 0)
    assert book.effective(0).dno_restore_ms is None          # a reduction is no restore
    book.add(Limit("operator", 90, H), 10 * S)
    book.add(Limit("dno", 60, 100 * S), 20 * S)              # the DNO raises its limit
    assert book.effective(20 * S).dno_restore_ms == 20 * S
    book.remove("dno", "", 30 * S)                           # the DNO clears it
    assert book.effective(30 * S).dno_restore_ms == 30 * S
    book.add(Limit("dno", 50, 100 * S), 40 * S)
    assert book.effective(100 * S).dno_restore_ms == 30 * S  # expiry is not an ordered restore


# ---- measured load check --------------------------------------------------------------------

def test_column_ignoring_its_limit_is_reported_after_grace_once() -> None:
    site = make_site()   # overdraw_grace_s = 10
    eff = EffectiveLimit((100.0, 100.0, 100.0))
    offered = {"c1": 10.0, "c2": 16.0}
    state = LoadCheckState()
    within = {"c1": (11.5, 11.5, 11.5), "c2": (18.1,)}   # 10 x 1.1 + 0.5 = 11.5; 16 x 1.1 + 0.5 = 18.1
    res = check_load(site, eff, offered, within, 0, state=state)
    assert res.violations == ()
    over = {"c1": (11.6, 3.0, 3.0), "c2": (16.0,)}
    res = check_load(site, eff, offered, over, 1 * S, state=res.state)
    assert res.violations == ()
    res = check_load(site, eff, offered, over, 10_999, state=res.state)
    assert res.violations == ()
    res = check_load(site, eff, offered, over, 11 * S, state=res.state)
    (v,) = res.violations
    assert (v.kind, v.target, v.phase, v.measured_a, v.allowed_a, v.since_ms, v.new) == \
        ("column_overdraw", "c1", 0, 11.6, 10.0, 1 * S, True)
    res = check_load(site, eff, offered, over, 12 * S, state=res.state)
    assert [x.new for x in res.violations] == [False]
    res = check_load(site, eff, offered, within, 13 * S, state=res.state)   # back within: cleared
    assert res.violations == ()
    res = check_load(site, eff, offered, over, 14 * S, state=res.state)
    assert res.violations == ()  # the grace starts again


def test_rotation_maps_column_overdraw_to_site_phase_and_paused_column_must_draw_nothing() -> None:
    site = make_site()
    eff = EffectiveLimit((100.0, 100.0, 100.0))
    res = check_load(site, eff, {"c3": 0.0}, {"c3": (0.4, 0.0, 2.0)}, 0, state=LoadCheckState())
    res = check_load(site, eff, {"c3": 0.0}, {"c3": (0.4, 0.0, 2.0)}, 10 * S, state=res.state)
    (v,) = res.violations
    assert (v.target, v.phase) == ("c3", 0)   # column L3 is wired to site L1


def test_site_and_circuit_over_their_limits_are_reported() -> None:
    site = make_site()
    eff = EffectiveLimit((30.0, 30.0, 30.0), "dno")
    offered = {"c1": 32.0, "c2": 32.0, "c3": 16.0}
    measured = {"c1": (20.0, 20.0, 20.0), "c2": (26.0,), "c3": (10.0, 0.0, 0.0)}
    state = LoadCheckState()
    res = check_load(site, eff, offered, measured, 0, state=state)
    res = check_load(site, eff, offered, measured, 10 * S, state=res.state)
    found = {(v.kind, v.target, v.phase) for v in res.violations}
    # f1 L2 = 20 + 26 = 46 > 40 x 1.1 + 0.5; site L2 = 56 > 33.5; site L1 = 20 (no), L3 = 20 (no)
    assert found == {("circuit_over_rating", "f1", 1), ("site_over_limit", "site", 1)}
    # the site meter, when given, is the measured site load (it sees the non-EV load too)
    res = check_load(site, eff, offered, {}, 0, state=LoadCheckState(), site_meter_a=(40.0, 1.0, 1.0))
    res = check_load(site, eff, offered, {}, 10 * S, state=res.state, site_meter_a=(40.0, 1.0, 1.0))
    assert [(v.kind, v.phase, v.measured_a, v.allowed_a) for v in res.violations] == \
        [("site_over_limit", 0, 40.0, 30.0)]
