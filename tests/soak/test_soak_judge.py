"""The fault soak's judge on made-up recordings: each check fails when what it guards is broken,
and the schedule it runs keeps every kind of fault and the faults that must be seen visible."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from gateway.north import topics
from hil.replay.oracles import OracleResult
from hil.soak.judge import judge
from hil.soak.observer import Seen
from hil.soak.plan import KINDS, _pair_clash, make_plan, planning_site, scaled_counts
from hil.soak.run import FaultRecord, GatewayDown, Recording

SITE = "soak"
PLAN = make_plan(60, 4, 1)


def _rec(**changes: Any) -> Recording:
    """A quiet 30 s recording (utc == monotonic ms, t0 = 0) with what a test adds."""
    base = Recording(
        plan=PLAN,
        site=planning_site(PLAN.tables, PLAN.specs, SITE),
        site_id=SITE,
        t0_mono_ms=0,
        utc_offset_ms=0,
        samples={s.id: [] for s in PLAN.specs},
        sample_times=[],
        board={s.id: [] for s in PLAN.specs},
        faults=[],
        gateway_down=[],
        messages=[],
        commands=[],
        audit=[],
        outbox_next_seq=1,
        outbox_pending=(),
        wire_counts={},
        failures=[],
        gateway_exit=0,
        observer_sessions_lost=0,
        ended_ms=30_000,
    )
    return replace(base, **changes)


def _msg(topic: str, at_ms: int, **body: Any) -> Seen:
    return Seen(topic, json.dumps({"ts_ms": at_ms, **body}).encode(), False, at_ms / 1000.0)


def _check(rec: Recording, oid: str) -> OracleResult:
    return {r.id: r for r in judge(rec)}[oid]


def _events(seqs: list[int], **body: Any) -> list[Seen]:
    return [_msg(topics.site_events(SITE), 100 * s, event="gateway_started", seq=s, **body) for s in seqs]


def test_telemetry_every_committed_seq_once_after_dedup() -> None:
    good = _rec(outbox_next_seq=6, messages=_events([1, 2, 3, 3, 4, 5]))
    result = _check(good, "telemetry.seq")
    assert result.passed and result.figure["duplicates"] == 1
    lost = _check(_rec(outbox_next_seq=6, messages=_events([1, 2, 3, 5])), "telemetry.seq")
    assert not lost.passed and lost.figure["lost_seqs"] == ["4"]
    still_queued = _check(
        _rec(outbox_next_seq=6, messages=_events([1, 2, 3, 5]), outbox_pending=(4,)), "telemetry.seq"
    )
    assert (
        not still_queued.passed
        and still_queued.figure["lost"] == 0
        and still_queued.figure["queued_at_end"] == 1
    )
    reused = [*_events([1, 2]), _msg(topics.site_events(SITE), 200, event="gateway_stopping", seq=2)]
    assert not _check(_rec(outbox_next_seq=3, messages=reused), "telemetry.seq").passed


def test_what_the_outbox_held_at_a_kill_must_arrive() -> None:
    kill = GatewayDown(1000, 5000, "kill", outbox_next_seq=5, outbox_pending=(3, 4))
    rec = _rec(outbox_next_seq=5, gateway_down=[kill], messages=_events([1, 2, 3, 4]))
    assert _check(rec, "outbox.kills").passed
    missing = _check(replace(rec, messages=_events([1, 2, 3])), "outbox.kills")
    assert not missing.passed and missing.figure["kills"][0]["missing"] == ["4"]


def test_every_decided_command_is_acknowledged_unless_a_kill_took_it() -> None:
    audit = [{"ts_ms": 1000, "decision": "accepted", "reason": "ok", "id": "a", "kind": "site_limit"}]
    ack = _msg(topics.ack(SITE), 1500, id="a", result="accepted", reason="ok", seq=1)
    assert _check(_rec(audit=audit, messages=[ack], outbox_next_seq=2), "acks").passed
    assert not _check(_rec(audit=audit), "acks").passed
    killed = GatewayDown(2500, 20_000, "kill")
    exempt = _check(_rec(audit=audit, gateway_down=[killed]), "acks")
    assert exempt.passed and exempt.figure["lost_with_a_killed_gateway"] == 1
    wrong = _msg(topics.ack(SITE), 1500, id="a", result="rejected", reason="stale", seq=1)
    assert not _check(_rec(audit=audit, messages=[wrong], outbox_next_seq=2), "acks").passed


def _line(t: int, *, fs: int, offer: float, ada: float = 16.0, fda: float = 6.7) -> dict[str, Any]:
    return {
        "t": t,
        "duty": 2666,
        "contactor": 1,
        "offered_da": round(offer * 10),
        "status": 2,
        "fs": fs,
        "ada": round(ada * 10),
        "fda": round(fda * 10),
        "as": 30,
        "na": 1,
        "nh": 1,
        "nf": 1,
    }


def test_every_column_at_its_failsafe_within_the_heartbeat_timeout_plus_one_second() -> None:
    down = GatewayDown(10_000, 28_000, "kill")
    cid = PLAN.specs[0].id
    board = {s.id: [_line(0, fs=1, offer=0.0)] for s in PLAN.specs}

    def with_line(t: int) -> Recording:
        return _rec(
            gateway_down=[down], board={**board, cid: [_line(0, fs=0, offer=16.0), _line(t, fs=1, offer=6.7)]}
        )

    assert _check(with_line(19_900), "failsafe.reached").passed
    late = _check(with_line(21_500), "failsafe.reached")
    assert not late.passed and cid in late.figure["late"][0]
    # A column killed before it got there is not judged; one that never gets there fails.
    off = {**board, cid: [_line(0, fs=0, offer=16.0), {"t": 12_000, "offered_da": 0, "off": 1}]}
    assert _check(_rec(gateway_down=[down], board=off), "failsafe.reached").passed
    never = {**board, cid: [_line(0, fs=0, offer=16.0)]}
    assert not _check(_rec(gateway_down=[down], board=never), "failsafe.reached").passed


def test_the_failsafes_held_must_fit_the_capacity() -> None:
    ok = {s.id: [_line(0, fs=1, offer=0.0, fda=6.0)] for s in PLAN.specs}
    assert _check(_rec(board=ok), "failsafe.sum").passed
    too_much = {
        s.id: [_line(0, fs=1, offer=0.0, fda=6.0), _line(5000, fs=1, offer=0.0, fda=32.0)] for s in PLAN.specs
    }
    result = _check(_rec(board=too_much), "failsafe.sum")
    assert not result.passed and result.figure["over"][0]["at_s"] == 5.0


def test_an_offer_above_the_reported_assignment_for_longer_than_allowed_fails() -> None:
    cid = PLAN.specs[0].id
    topic = topics.column_telemetry(SITE, cid)

    def run(reported: list[float], board: list[dict[str, Any]]) -> OracleResult:
        reports = [_msg(topic, 1000 * k, applied_limit_a=a, seq=k + 1) for k, a in enumerate(reported)]
        rec = _rec(messages=reports, board={cid: board}, ended_ms=12_000, outbox_next_seq=len(reported) + 1)
        return _check(rec, "limit.reported")

    # The gateway lowers the limit to 10 A at 2 s; the column never gets it.
    kept = [_line(0, fs=0, offer=16.0, ada=16.0)]
    assert run([16.0] * 2 + [10.0] * 3 + [16.0] * 7, kept).passed  # 3 s: the next write got through
    lost = run([16.0] * 2 + [10.0] * 10, kept)  # 10 s above what it was given
    assert not lost.passed and lost.figure[cid]["violations"] == 1
    # The column falls back to a failsafe above what the gateway believes it holds.
    fell = [_line(0, fs=0, offer=6.0, ada=6.0), _line(2000, fs=1, offer=10.0, fda=10.0)]
    assert not run([6.0] * 12, fell).passed
    # A raise the gateway wrote whose answer it has not got yet: its report lags, nothing is wrong.
    raised = [_line(0, fs=0, offer=10.0, ada=10.0), _line(2000, fs=0, offer=16.0, ada=16.0)]
    lag = run([10.0] * 9 + [16.0] * 3, raised)
    assert lag.passed and lag.figure[cid]["lagging_reports"] == 1 and lag.figure["lagging_longest_s"] >= 6.5


def test_a_forgotten_dno_limit_shows_in_the_site_telemetry() -> None:
    audit = [
        {
            "ts_ms": 1000,
            "decision": "accepted",
            "reason": "ok",
            "id": "d",
            "kind": "site_limit",
            "topic": topics.cmd_site_limit(SITE),
            "limit_a": 30.0,
            "valid_until_ms": 100_000,
        }
    ]
    ack = _msg(topics.ack(SITE), 1100, id="d", result="accepted", reason="ok", seq=1)

    def report(limit: float) -> Recording:
        tele = _msg(topics.site_telemetry(SITE), 10_000, limit_a=limit, limit_source="dno", seq=2)
        return _rec(audit=audit, messages=[ack, tele], outbox_next_seq=3)

    assert _check(report(30.0), "dno.reported").passed
    assert not _check(report(100.0), "dno.reported").passed


def test_the_site_current_must_follow_the_dno_limit_within_the_response_time() -> None:
    audit = [
        {
            "ts_ms": 1000,
            "decision": "accepted",
            "reason": "ok",
            "id": "d",
            "kind": "site_limit",
            "topic": topics.cmd_site_limit(SITE),
            "limit_a": 30.0,
            "valid_until_ms": 100_000,
        }
    ]
    three = next(s for s in PLAN.specs if s.phases == 3)
    times = list(range(0, 30_000, 100))
    samples = {s.id: [(t, 0.0, 0.0, 0.0, 0.0) for t in times] for s in PLAN.specs}
    samples[three.id] = [(t, 38.0, 38.0, 38.0, 32.0) for t in times]
    rec = _rec(audit=audit, samples=samples, sample_times=times)
    over = _check(rec, "limit.site")
    assert not over.passed and over.figure["L1"]["violations"] == 1
    # While the gateway is down the columns hold their failsafes, planned inside the 40 A budget.
    down = _rec(
        audit=audit, samples=samples, sample_times=times, gateway_down=[GatewayDown(500, None, "kill")]
    )
    assert _check(down, "limit.site").passed


def test_each_fault_kind_must_have_happened_and_taken_effect() -> None:
    results = {r.id: r for r in judge(_rec())}
    for kind in KINDS:
        assert not results["fault." + kind].passed, kind  # none happened
    noise = next(f for f in PLAN.faults if f.kind == "bus_noise")
    quiet = FaultRecord(noise, 1000, 9000, {"bytes": 500, "corrupted": 0})
    assert not _check(_rec(faults=[quiet]), "fault.bus_noise").passed  # noise that corrupted nothing
    noisy = FaultRecord(noise, 1000, 9000, {"bytes": 500, "corrupted": 5})
    assert _check(_rec(faults=[noisy]), "fault.bus_noise").figure["corrupted_pct"] == 1.0


@pytest.mark.parametrize(("duration", "columns"), [(60, 8), (60, 6), (600, 20), (120, 10)])
def test_the_schedule_has_every_kind_and_keeps_what_must_be_seen_visible(
    duration: float, columns: int
) -> None:
    for seed in range(1, 13):
        plan = make_plan(duration, columns, seed)
        assert plan.counts() == scaled_counts(duration)
        assert all(n >= 1 for n in plan.counts().values())
        for f in plan.faults:
            assert plan.warmup_s <= f.at_s and f.end_s <= duration - plan.settle_s + 0.05, f
            assert not any(_pair_clash(f, g) for g in plan.faults if g is not f), (seed, f)
        kills = sorted((f for f in plan.faults if f.kind == "gateway_kill"), key=lambda f: f.at_s)
        assert all(f.duration_s > 11 for f in kills)  # long enough to need the failsafe
    assert make_plan(600, 20, 1).counts() == {
        "gateway_kill": 5,
        "column_kill": 10,
        "broker_restart": 20,
        "bus_noise": 2,
        "meter_fail": 2,
        "column_silent": 2,
    }
    assert make_plan(600, 20, 1) == make_plan(600, 20, 1)
