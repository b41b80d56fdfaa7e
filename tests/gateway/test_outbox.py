"""The SQLite outbox on its own: order, persistence, crash safety, bounds and the drop policy."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.north import outbox as outbox_module
from gateway.north.outbox import DROP_PRIORITY, SCHEMA_VERSION, MessageKind, Outbox, OutboxError, Outgoing

REPO = Path(__file__).resolve().parents[2]
T, S, E, A = MessageKind.TELEMETRY, MessageKind.STATUS, MessageKind.EVENT, MessageKind.ACK


def _seqs(ob: Outbox) -> list[int]:
    return [r.seq for r in ob.peek(0, 10_000)]


def _body(ob: Outbox) -> list[dict[str, object]]:
    return [json.loads(r.payload) for r in ob.peek(0, 10_000)]


def test_enqueue_stamps_seq_and_keeps_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", clock_ms=lambda: 42) as ob:
        assert ob.enqueue("evedge/v1/s/telemetry", {"ts_ms": 1, "power_w": 5.0}, kind=T) == 1
        assert ob.enqueue("evedge/v1/s/events", {"ts_ms": 2}, kind=E, retain=True,
                          correlation=b"\x00corr") == 2
        assert ob.enqueue_many([Outgoing("a", {"n": n}, A) for n in range(3)]) == [3, 4, 5]
        rows = ob.peek()
        assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
        assert rows[0].payload == b'{"ts_ms":1,"power_w":5.0,"seq":1}'
        assert (rows[0].topic, rows[0].kind, rows[0].qos, rows[0].retain, rows[0].enqueued_ms) == \
            ("evedge/v1/s/telemetry", T, 1, False, 42)
        assert (rows[1].retain, rows[1].correlation) == (True, b"\x00corr")
        assert [r.seq for r in ob.peek(rows[1].row_id, 2)] == [3, 4]
        assert len(ob) == 5 and ob.bytes_used > 0
        assert ob.ack([rows[0].row_id, rows[2].row_id, 999_999]) == 2
        assert _seqs(ob) == [2, 4, 5]
        with pytest.raises(ValueError, match="stamps seq"):
            ob.enqueue("a", {"seq": 7}, kind=T)


def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as ob:
        for n in range(20):
            ob.enqueue(f"t/{n}", {"n": n}, kind=E if n % 5 == 0 else T)
        ob.ack([r.row_id for r in ob.peek(0, 7)])
        before = ob.peek(0, 100)
        used = ob.bytes_used
    with Outbox(path) as ob:
        assert ob.peek(0, 100) == before
        assert (len(ob), ob.bytes_used, ob.next_seq) == (13, used, 21)
        assert ob.enqueue("t", {}, kind=T) == 21


def test_a_refused_row_is_not_read_again(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as ob:
        ob.enqueue_many([Outgoing("t", {"n": n}, T) for n in range(4)])
        assert [r.seq for r in ob.peek(1, 10)] == [2, 3, 4]   # a publisher's read past row 1
        assert ob.drop([3]) == 1
        assert [r.seq for r in ob.peek(1, 10)] == [2, 4] and _seqs(ob) == [1, 2, 4]


def test_row_ids_are_never_reused(tmp_path: Path) -> None:
    # the publisher's cursor relies on it: a new row must sort after every row it has seen
    with Outbox(tmp_path / "o.db") as ob:
        ob.enqueue_many([Outgoing("t", {}, T)] * 3)
        last = ob.peek()[-1].row_id
        ob.ack(r.row_id for r in ob.peek())
        ob.enqueue("t", {}, kind=T)
        assert ob.peek()[0].row_id > last


CRASHER = """
import os, signal, sys
from gateway.north.outbox import Outbox, MessageKind
ob = Outbox(sys.argv[1], durability=sys.argv[2])
for n in range(50):
    ob.enqueue("t", {"n": n}, kind=MessageKind.TELEMETRY)
ob.ack([r.row_id for r in ob.peek(0, 10)])
print(ob.next_seq, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("durability", ["full", "normal"])
def test_a_killed_process_loses_nothing_and_reuses_no_seq(tmp_path: Path, durability: str) -> None:
    path = tmp_path / "o.db"
    proc = subprocess.run([sys.executable, "-c", CRASHER, str(path), durability], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, timeout=30,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.strip() == b"51"
    with Outbox(path) as ob:  # the exclusive lock died with the process
        assert _seqs(ob) == list(range(11, 51))
        assert ob.enqueue("t", {}, kind=T) == 51


def test_one_process_at_a_time(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db"), pytest.raises(OutboxError, match="in use"):
        Outbox(tmp_path / "o.db")


def test_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(OutboxError, match="not a usable outbox"):
        Outbox(path)


def test_a_failed_enqueue_changes_nothing(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=2048) as ob:
        ob.enqueue("t", {"n": 1}, kind=T)
        with pytest.raises(ValueError, match="larger than the outbox"):
            ob.enqueue_many([Outgoing("t", {"n": 2}, T), Outgoing("t", {"x": "y" * 4000}, E)])
        assert (_seqs(ob), ob.next_seq, len(ob)) == ([1], 2, 1)
        assert ob.drop_report() is None


def _fill(ob: Outbox, kinds: str) -> None:
    names = {"T": T, "S": S, "E": E, "A": A}
    for k in kinds:
        ob.enqueue("t", {"k": k}, kind=names[k])


def test_drop_policy_oldest_telemetry_first(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_rows=10) as ob:
        _fill(ob, "EE" + "T" * 8)                     # seq 1-2 events, 3-10 telemetry
        _fill(ob, "T")                                # seq 11 pushes out seq 3
        _fill(ob, "E")                                # seq 12 pushes out seq 4, not an event
        assert _seqs(ob) == [1, 2, 5, 6, 7, 8, 9, 10, 11, 12]
        report = ob.drop_report()
        assert report is not None
        assert (report.counts, report.first_seq, report.last_seq, report.total) == ({"telemetry": 2}, 3, 4, 2)


def test_drop_policy_status_after_telemetry_events_last(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_rows=4) as ob:
        _fill(ob, "SSEA")                             # seq 1-4
        _fill(ob, "T")                                # seq 5: telemetry never displaces a status
        assert _seqs(ob) == [1, 2, 3, 4]
        _fill(ob, "S")                                # seq 6 displaces the oldest status
        assert _seqs(ob) == [2, 3, 4, 6]
        _fill(ob, "E")                                # seq 7: statuses go before events
        _fill(ob, "E")                                # seq 8: the last status
        assert _seqs(ob) == [3, 4, 7, 8]
        _fill(ob, "A")                                # seq 9: only events/acks left: the oldest goes
        assert _seqs(ob) == [4, 7, 8, 9]
        assert ob.stats().dropped == {"telemetry": 1, "status": 3, "event": 1, "ack": 0}


def test_byte_bound(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_bytes=4096) as ob:
        for n in range(100):
            ob.enqueue("evedge/v1/s/telemetry", {"n": n, "pad": "x" * 100}, kind=T)
            assert ob.bytes_used <= 4096
        kept = _seqs(ob)
        assert kept == list(range(101 - len(kept), 101)) and len(kept) > 20
        report = ob.drop_report()
        assert report is not None and report.total == 100 - len(kept)


def test_drops_are_reported_once_as_an_event_and_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path, max_rows=5, clock_ms=lambda: 1000) as ob:
        _fill(ob, "TTTTTTT")                         # drops seq 1, 2
    with Outbox(path, max_rows=5, clock_ms=lambda: 2000) as ob:
        report = ob.drop_report()                    # unreported drops are kept in the file
        assert report is not None and (report.counts, report.first_seq, report.last_seq) == \
            ({"telemetry": 2}, 1, 2)
        seq = ob.enqueue_drop_report("evedge/v1/s/events")
        assert seq == 8
        # seq 3 made room for the report, and is counted in it: every gap below 8 is explained
        assert _body(ob)[-1] == {"event": "outbox_dropped", "ts_ms": 2000, "dropped_telemetry": 3,
                                 "dropped_status": 0, "dropped_event": 0, "dropped_ack": 0,
                                 "first_seq": 1, "last_seq": 3, "seq": 8}
        assert _seqs(ob) == [4, 5, 6, 7, 8]
        assert ob.drop_report() is None and ob.enqueue_drop_report("evedge/v1/s/events") is None
        assert ob.stats().dropped["telemetry"] == 3  # the totals stay
        _fill(ob, "T")
        report = ob.drop_report()
        assert report is not None and (report.counts, report.first_seq, report.last_seq) == \
            ({"telemetry": 1}, 4, 4)


@st.composite
def _ops(draw: st.DrawFn) -> list[tuple[str, MessageKind | int]]:
    return draw(st.lists(st.one_of(st.tuples(st.just("put"), st.sampled_from(list(MessageKind))),
                                   st.tuples(st.just("ack"), st.integers(1, 4)),
                                   st.tuples(st.just("report"), st.just(0))), max_size=60))


@settings(max_examples=40, deadline=None)
@given(_ops(), st.integers(2, 8))
def test_every_seq_is_delivered_queued_or_counted(tmp_path_factory: pytest.TempPathFactory,
                                                  ops: list[tuple[str, MessageKind | int]],
                                                  max_rows: int) -> None:
    path = tmp_path_factory.mktemp("prop") / "o.db"
    acked: set[int] = set()
    with Outbox(path, max_rows=max_rows, durability="normal") as ob:
        for op, arg in ops:
            kinds_before = {r.kind for r in ob.peek(0, 100)}
            important_before = ob.stats().dropped["event"] + ob.stats().dropped["ack"]
            if op == "put":
                assert isinstance(arg, MessageKind)
                ob.enqueue("t", {"x": 1}, kind=arg)
            elif op == "ack":
                rows = ob.peek(0, int(arg))
                acked |= {r.seq for r in rows}
                ob.ack(r.row_id for r in rows)
            else:
                ob.enqueue_drop_report("e")
            queued = _seqs(ob)
            assert len(queued) <= max_rows and queued == sorted(queued)
            dropped = sum(ob.stats().dropped.values())
            assert len(acked) + len(queued) + dropped == ob.next_seq - 1
            if ob.stats().dropped["event"] + ob.stats().dropped["ack"] > important_before:
                assert not kinds_before & {MessageKind.TELEMETRY, MessageKind.STATUS}


def test_a_batch_is_queued_exactly_as_its_messages_one_by_one(tmp_path: Path) -> None:
    batch = [Outgoing("t/%d" % n, {"n": n, "v": [1.5, None], "s": "Zürich"} if n else {}, T if n % 2 else E,
                      retain=n == 3, correlation=b"c" if n == 4 else None) for n in range(6)]
    with Outbox(tmp_path / "a.db", clock_ms=lambda: 7) as a, \
            Outbox(tmp_path / "b.db", clock_ms=lambda: 7) as b:
        assert a.enqueue_many(batch) == [1, 2, 3, 4, 5, 6]
        for msg in batch:
            b.enqueue_many([msg])
        assert a.peek(0, 100) == b.peek(0, 100)
        assert (a.next_seq, len(a), a.bytes_used) == (b.next_seq, len(b), b.bytes_used)
        assert (a.next_seq, len(a)) == (7, 6)
        assert a.peek(0, 1)[0].payload == b'{"seq":1}'
        assert a.peek(0, 2)[1].payload == '{"n":1,"v":[1.5,null],"s":"Zürich","seq":2}'.encode()


def test_a_batch_that_does_not_fit_goes_by_the_drop_policy(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", max_rows=4) as ob:
        kinds = [E, T, T, T, T, E]
        seqs = ob.enqueue_many([Outgoing("t", {"k": k}, kind) for k, kind in enumerate(kinds)])
        assert seqs == [1, 2, 3, 4, 5, 6]
        assert _seqs(ob) == [1, 4, 5, 6]           # the two oldest telemetry made room
        report = ob.drop_report()
        assert report is not None
        assert (report.counts, report.first_seq, report.last_seq) == ({"telemetry": 2}, 2, 3)
        assert ob.enqueue_many([Outgoing("t", {"k": 9}, T)]) == [7]   # the counter went on


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("put"), st.sampled_from(list(MessageKind))),
                          st.tuples(st.just("ack"), st.integers(1, 3)),
                          st.tuples(st.just("reopen"), st.just(0))), max_size=80), st.integers(1, 6))
def test_the_drop_order_is_the_policy_across_acks_and_restarts(tmp_path_factory: pytest.TempPathFactory,
                                                               ops: list[tuple[str, MessageKind | int]],
                                                               max_rows: int) -> None:
    # A model of the policy (the module docstring): a full queue loses its lowest class,
    # oldest first, and never a row of a higher class than the new message's.
    path = tmp_path_factory.mktemp("order") / "o.db"
    model: list[tuple[int, int]] = []   # (seq, prio), oldest first
    next_seq = 1
    ob = Outbox(path, max_rows=max_rows, durability="normal")
    try:
        for op, arg in ops:
            if op == "put":
                assert isinstance(arg, MessageKind)
                prio = DROP_PRIORITY[arg]
                assert ob.enqueue("t", {}, kind=arg) == next_seq
                if len(model) >= max_rows:
                    victim = min(model, key=lambda row: (row[1], row[0]))
                    if victim[1] <= prio:
                        model.remove(victim)
                if len(model) < max_rows:
                    model.append((next_seq, prio))
                next_seq += 1
            elif op == "ack":
                rows = ob.peek(0, int(arg))
                ob.ack(r.row_id for r in rows)
                del model[:len(rows)]
            else:
                ob.close()
                ob = Outbox(path, max_rows=max_rows, durability="normal")
            assert _seqs(ob) == [seq for seq, _prio in model]
    finally:
        ob.close()


_SCHEMA_1 = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, seq INTEGER NOT NULL, kind TEXT NOT NULL, prio INTEGER NOT NULL,
    topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL,
    correlation BLOB, enqueued_ms INTEGER NOT NULL, size INTEGER NOT NULL);
CREATE INDEX outbox_drop_order ON outbox (prio, id);
"""


def test_a_schema_1_file_is_migrated_with_everything_it_holds(tmp_path: Path) -> None:
    # What a gateway of schema 1 (ids beside the seqs, from AUTOINCREMENT) left queued.
    path = tmp_path / "o.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(_SCHEMA_1)
    rows = [(10 + n, seq, kind, DROP_PRIORITY[MessageKind(kind)], f"t/{seq}", b'{"seq":%d}' % seq, 1,
             int(seq == 5), b"c" if seq == 6 else None, 1000 + seq, 20)
            for n, (seq, kind) in enumerate([(4, "telemetry"), (5, "status"), (6, "ack"), (9, "telemetry")])]
    db.executemany("INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
    meta = [("next_seq", 10), ("dropped.telemetry", 3), ("unreported.telemetry", 1),
            ("unreported.first_seq", 8), ("unreported.last_seq", 8)]
    db.executemany("INSERT INTO meta VALUES (?, ?)", meta)
    db.execute("PRAGMA user_version=1")
    db.close()
    with Outbox(path, max_rows=5) as ob:
        got = ob.peek(0, 10)
        assert [(r.row_id, r.seq, r.kind, r.topic, r.payload, r.retain, r.correlation, r.enqueued_ms)
                for r in got] == [(seq, seq, MessageKind(kind), topic, body, bool(retain), corr, ts)
                                  for _id, seq, kind, _p, topic, body, _q, retain, corr, ts, _s in rows]
        assert (len(ob), ob.bytes_used, ob.next_seq) == (4, 80, 10)
        assert ob.stats().dropped["telemetry"] == 3
        report = ob.drop_report()
        assert report is not None and (report.counts, report.first_seq, report.last_seq) == \
            ({"telemetry": 1}, 8, 8)
        assert ob.enqueue("t", {}, kind=MessageKind.TELEMETRY) == 10
        assert ob.enqueue("t", {}, kind=MessageKind.EVENT) == 11   # full: the oldest telemetry goes
        assert _seqs(ob) == [5, 6, 9, 10, 11]
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    assert check.execute("SELECT COUNT(*) FROM sqlite_master WHERE name = 'outbox_1'").fetchone()[0] == 0
    check.close()


def test_a_file_of_a_newer_schema_is_refused_left_alone_and_not_held(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as ob:
        ob.enqueue("t", {}, kind=T)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(OutboxError, match="newer than this gateway's"):
        Outbox(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0] == 1
    db.close()



@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("put"), st.integers(1, 4), st.sampled_from(list(MessageKind))),
                          st.tuples(st.just("ack"), st.integers(0, 40), st.integers(1, 3)),
                          st.tuples(st.just("drop"), st.integers(0, 40), st.integers(1, 2)),
                          st.tuples(st.just("peek"), st.integers(0, 40), st.integers(1, 6)),
                          st.tuples(st.just("fail"), st.just(0), st.just(0)),
                          st.tuples(st.just("reopen"), st.just(0), st.just(0))), max_size=80),
       st.integers(3, 12), st.integers(2, 6))
def test_peek_from_memory_is_what_the_file_holds(tmp_path_factory: pytest.TempPathFactory,
                                                 ops: list[tuple[str, int, MessageKind | int]],
                                                 max_rows: int, tail_rows: int) -> None:
    # The in-memory tail behind peek() (TAIL_ROWS, small here so that it overflows) against the
    # file itself, through inserts, drops by policy, acks and drops of any rows, failed
    # transactions and restarts, read at any cursor the way a publisher reads.
    path = tmp_path_factory.mktemp("tail") / "o.db"
    mp = pytest.MonkeyPatch()
    mp.setattr(outbox_module, "TAIL_ROWS", tail_rows)
    ob = Outbox(path, max_rows=max_rows, max_bytes=1 << 16, durability="normal")
    cursor = 0
    try:
        for op, a, b in ops:
            if op == "put":
                assert isinstance(b, MessageKind)
                ob.enqueue_many([Outgoing("t", {"n": n}, b) for n in range(a)])
            elif op == "ack":
                ob.ack(range(a, a + int(b)))
            elif op == "drop":   # rows the broker refused
                ob.drop(range(a, a + int(b)))
            elif op == "peek":
                cursor = a if a < cursor else cursor   # a reconnect reads again from further back
                rows = ob.peek(cursor, int(b))
                assert rows == ob._peek_file(cursor, int(b))
                cursor = rows[-1].row_id if rows else cursor
            elif op == "fail":
                with pytest.raises(ValueError):   # the second one is too large: nothing is queued
                    ob.enqueue_many([Outgoing("t", {}, MessageKind.TELEMETRY),
                                     Outgoing("t", {"x": "y" * (1 << 17)}, MessageKind.EVENT)])
            else:
                ob.close()
                ob = Outbox(path, max_rows=max_rows, max_bytes=1 << 16, durability="normal")
            for after in (0, cursor):
                assert ob.peek(after, 100) == ob._peek_file(after, 100)
    finally:
        ob.close()
        mp.undo()
