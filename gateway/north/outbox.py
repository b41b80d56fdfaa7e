"""The on-disk outbox: every telemetry, status, event and ack message waits here until
the broker has acknowledged it.

Guarantees
- A message is stamped with the next sequence number and written in one SQLite
  transaction before anyone can publish it. Sequence numbers (`seq`, from 1) live in
  the same file and are committed with the message, so they are never reused, even
  after a crash: a seq is only ever seen by a consumer if its message was committed.
- A row is deleted only when the publisher reports the broker's PUBACK (QoS 1). A crash
  between PUBACK and the delete sends the message again after restart: delivery is at
  least once, and consumers drop duplicates by `seq`.
- Rows are handed out in insertion order (`row_id`, which is never reused either: it is
  the row's seq), so after a broker outage or a restart the backlog goes out oldest first.
- Durability (the SQLite WAL journal in both modes):
  "full" (synchronous=FULL, default): once enqueue() returns the message survives a
  process crash and a power cut. "normal" (synchronous=NORMAL): it survives a process
  crash (SIGKILL); a power cut or OS crash may lose the transactions of the last moments.
- One process at a time: the file is opened in exclusive locking mode; a second opener
  gets OutboxError (two gateways on one file would interleave sequence numbers).
- The newest rows are also kept in memory (up to TAIL_ROWS), as they were committed: a
  publisher that keeps up reads them from there instead of from the file. The file stays
  the truth: a row leaves the tail with its delete, and a failed transaction empties it.

Drop policy (the queue is bounded by max_rows and max_bytes)
When a new message would take the queue over either bound, whole rows are dropped
until it fits: the oldest telemetry first, then the oldest status, and only when
neither is left the oldest events and acks. A queued row is never dropped for a new
message of a lower class (telemetry < status < event = ack): then the new message is
dropped instead (it still consumed its seq, which the drop report covers). Every
drop is counted per kind (totals kept in the file across restarts) and remembered as
"unreported" with the seq range dropped. The service publishes that as an `outbox_dropped` gateway event with
enqueue_drop_report(), which resets the unreported counts in the same transaction: a
drop is never silent, and consumers can tell a gap in `seq` that was dropped from one
that was lost. A dropped row may already be in flight, and then may still arrive.
Rows that can never be delivered (the broker refuses them with an MQTT 5 failure code,
or the topic is not valid) are removed with drop() and reported the same way.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple, TypeVar, cast

from gateway.north import payloads
from gateway.north.payloads import encode, utc_ms

log = logging.getLogger(__name__)

T = TypeVar("T")
SCHEMA_VERSION = 2
TAIL_ROWS = 10_000   # rows kept in memory for peek() (two telemetry rounds of 5,000 columns)
DURABILITY = {"full": "FULL", "normal": "NORMAL"}


class MessageKind(StrEnum):
    TELEMETRY = "telemetry"
    STATUS = "status"
    EVENT = "event"
    ACK = "ack"


# Lower drops first (see the module docstring).
DROP_PRIORITY = {MessageKind.TELEMETRY: 0, MessageKind.STATUS: 1, MessageKind.EVENT: 2,
                 MessageKind.ACK: 2}


class OutboxError(RuntimeError):
    pass


class Outgoing(NamedTuple):
    """A message to queue; the outbox adds "seq" to the payload. (NamedTuples, this and
    OutboxRow: one of each per message, thousands a second; a frozen dataclass costs 4x to build.)"""

    topic: str
    payload: Mapping[str, Any]
    kind: MessageKind
    qos: int = 1
    retain: bool = False
    correlation: bytes | None = None  # MQTT 5 correlation data, for acks to a response topic
    body: bytes | None = None         # encode(payload) when the producer has it already (telemetry)


class OutboxRow(NamedTuple):
    row_id: int
    seq: int
    kind: MessageKind
    topic: str
    payload: bytes
    qos: int
    retain: bool
    correlation: bytes | None
    enqueued_ms: int


@dataclass(frozen=True)
class DropReport:
    """Drops since the last report: counts per kind and the seq range they came from."""

    counts: dict[str, int]
    first_seq: int
    last_seq: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class OutboxStats:
    rows: int
    bytes: int
    next_seq: int
    dropped: dict[str, int]      # totals since the file was created


# Schema 2: the row id is the seq (never reused, and queued in seq order), where schema 1 had
# an AUTOINCREMENT id beside it; the drop order's index leaves out telemetry, which is most
# rows and is found in id order (_oldest_telemetry). Both save work on every insert and
# delete. A schema 1 file is migrated on open (_MIGRATE_1).
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,  -- the seq
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    prio INTEGER NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    correlation BLOB,
    enqueued_ms INTEGER NOT NULL,
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_drop_order ON outbox (prio, id) WHERE prio > 0;
"""
# Schema 1 -> 2: the old table is set aside, _SCHEMA makes the new one, the rows move over.
_MIGRATE_1_BEFORE = "ALTER TABLE outbox RENAME TO outbox_1; DROP INDEX outbox_drop_order"
_MIGRATE_1_AFTER = """
INSERT INTO outbox SELECT seq, seq, kind, prio, topic, payload, qos, retain, correlation, enqueued_ms, size
    FROM outbox_1 ORDER BY id;
DROP TABLE outbox_1
"""
_COLUMNS = "id, seq, kind, topic, payload, qos, retain, correlation, enqueued_ms"
_VICTIM = "id, seq, kind, prio, size"   # what the drop policy reads of a row
_INSERT = ("INSERT INTO outbox (id, seq, kind, prio, topic, payload, qos, retain, correlation, enqueued_ms, "
           "size) VALUES (?1, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)")
_KINDS = {k.value: k for k in MessageKind}
# A row as inserted: (id = seq, kind, prio, topic, payload, qos, retain, correlation, enqueued_ms, size).
_Row = tuple[int, str, int, str, bytes, int, int, bytes | None, int, int]


def _run_script(db: sqlite3.Connection, script: str) -> None:
    """Each statement of `script` inside the caller's transaction (executescript would commit)."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _stamp(body: bytes, seq: int) -> bytes:
    """`encode({**payload, "seq": seq})` from `encode(payload)`: the same bytes (seq is the last
    key), without encoding the payload again inside the transaction."""
    if body == b"{}":
        return b'{"seq":%d}' % seq
    return b'%s,"seq":%d}' % (body[:-1], seq)


class Outbox:
    """SQLite-backed FIFO of outgoing messages. Not thread-safe: one owner (the asyncio loop)."""

    def __init__(self, path: Path | str, *, max_rows: int = 100_000, max_bytes: int = 64 << 20,
                 durability: str = "full", clock_ms: Callable[[], int] = utc_ms) -> None:
        if max_rows < 1 or max_bytes < 1024:
            raise ValueError("max_rows must be >= 1 and max_bytes >= 1024")
        if durability not in DURABILITY:
            raise ValueError(f"durability must be one of {sorted(DURABILITY)}")
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.durability = durability
        self._clock_ms = clock_ms
        self.on_enqueue: Callable[[], None] | None = None  # the publisher's wake-up
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        except sqlite3.Error as exc:
            raise OutboxError(f"{self.path}: cannot open: {exc}") from None
        try:
            self._setup()
        except OutboxError:
            self._db.close()   # and with it the exclusive lock
            raise
        except sqlite3.OperationalError as exc:
            self._db.close()
            if "locked" in str(exc):
                raise OutboxError(f"{self.path}: in use by another process") from None
            raise OutboxError(f"{self.path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise OutboxError(f"{self.path}: not a usable outbox database: {exc}") from None

    def _setup(self) -> None:
        db = self._db
        db.execute("PRAGMA locking_mode=EXCLUSIVE")
        if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            raise OutboxError(f"{self.path}: cannot use the WAL journal")
        db.execute(f"PRAGMA synchronous={DURABILITY[self.durability]}")
        db.execute("BEGIN IMMEDIATE")  # takes the exclusive lock now, not at the first write
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise OutboxError(f"{self.path}: schema {version} is newer than this gateway's")
            # What a schema 1 file holds stays queued, in its order, with its seqs.
            migrate = version == 1
            _run_script(db, _MIGRATE_1_BEFORE if migrate else "")
            _run_script(db, _SCHEMA)
            if migrate:
                _run_script(db, _MIGRATE_1_AFTER)
                log.info("outbox %s: schema 1 migrated to %d", self.path, SCHEMA_VERSION)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._load()

    def _load(self) -> None:
        self._telemetry_floor = 0   # no telemetry row has an id <= this (see _oldest_telemetry)
        rows, size = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone()
        self._rows, self._bytes = int(rows), int(size)
        self._meta = dict(self._db.execute("SELECT name, value FROM meta").fetchall())
        self._tail_restart()

    def _tail_restart(self) -> None:
        """An empty tail that starts after every row the file may hold."""
        # Rows as inserted (_Row: atoms only, so the cyclic collector soon stops tracking them).
        self._tail: deque[_Row] = deque()
        self._tail_after = self._get("next_seq", 1) - 1   # the tail holds every row with a higher id

    def _tail_add(self, rows: Iterable[_Row]) -> None:
        tail = self._tail
        tail.extend(rows)
        while len(tail) > TAIL_ROWS:
            self._tail_after = tail.popleft()[0]

    # -- meta counters (kept in the file, written inside the caller's transaction) -------
    def _get(self, name: str, default: int = 0) -> int:
        return int(self._meta.get(name, default))

    def _set(self, name: str, value: int) -> None:
        self._meta[name] = value
        self._db.execute("INSERT INTO meta (name, value) VALUES (?, ?) "
                         "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (name, value))

    def _transaction(self, work: Callable[[], T]) -> T:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            self._load()  # the caches may hold uncommitted values
            raise
        return result

    # -- producing ------------------------------------------------------------------------
    def enqueue(self, topic: str, payload: Mapping[str, Any], *, kind: MessageKind, qos: int = 1,
                retain: bool = False, correlation: bytes | None = None) -> int:
        """Queue one message; returns its seq. On disk when this returns (see durability)."""
        return self.enqueue_many([Outgoing(topic, payload, kind, qos, retain, correlation)])[0]

    def enqueue_many(self, messages: Sequence[Outgoing]) -> list[int]:
        """Queue several messages in one transaction (one fsync); returns their seqs.

        The payloads are encoded before the transaction (the seq is spliced into the JSON
        text); a batch that fits the bounds goes in with one executemany and one update of
        the seq counter, so a telemetry round of thousands of messages costs a few µs each."""
        for msg in messages:
            if msg.qos not in (0, 1):
                raise ValueError("qos must be 0 or 1")
            if "seq" in msg.payload:
                raise ValueError("the outbox stamps seq; do not set it")
        if not messages:
            return []
        bodies = [encode(msg.payload) if msg.body is None else msg.body for msg in messages]
        seqs = self._transaction(lambda: self._insert_all(messages, bodies))
        if self.on_enqueue is not None and seqs:
            self.on_enqueue()
        return seqs

    def _insert_all(self, messages: Sequence[Outgoing], bodies: Sequence[bytes]) -> list[int]:
        first = self._get("next_seq", 1)
        now = self._clock_ms()
        rows: list[_Row] = []
        total = 0
        seq = first
        kind: MessageKind | None = None
        value, prio = "", 0
        for msg, unstamped in zip(messages, bodies, strict=True):   # thousands a second: lean
            if msg.kind is not kind:   # (a batch is mostly of one kind; an enum hashes in Python)
                kind = msg.kind
                value, prio = kind.value, DROP_PRIORITY[kind]
            body = _stamp(unstamped, seq)
            size = self._size(msg, body)
            total += size
            rows.append((seq, value, prio, msg.topic, body, msg.qos, int(msg.retain), msg.correlation, now,
                         size))
            seq += 1
        n = len(rows)
        if self._rows + n > self.max_rows or self._bytes + total > self.max_bytes:
            # Something has to go: one message at a time, by the drop policy.
            return [self._insert(msg, row[0], row[4], row[9])
                    for msg, row in zip(messages, rows, strict=True)]
        self._db.executemany(_INSERT, rows)
        self._set("next_seq", first + n)
        self._rows += n
        self._bytes += total
        self._tail_add(rows)
        return list(range(first, first + n))

    def _next_seq(self) -> int:
        seq = self._get("next_seq", 1)
        self._set("next_seq", seq + 1)
        return seq

    def _size(self, msg: Outgoing, body: bytes) -> int:
        topic, correlation = msg.topic, msg.correlation
        size = len(body) + (len(topic) if topic.isascii() else len(topic.encode()))   # (isascii: O(1))
        if correlation is not None:
            size += len(correlation)
        if size > self.max_bytes:
            raise ValueError(f"message of {size} bytes is larger than the outbox ({self.max_bytes})")
        return size

    def _encode(self, msg: Outgoing, seq: int) -> tuple[bytes, int]:
        body = encode({**msg.payload, "seq": seq})
        return body, self._size(msg, body)

    def _insert(self, msg: Outgoing, seq: int, body: bytes, size: int) -> int:
        self._set("next_seq", seq + 1)
        if not self._make_room(size, DROP_PRIORITY[msg.kind]):
            self._count_drop(str(msg.kind), seq)  # everything queued matters more than this one
            return seq
        self._write(msg, seq, body, size)
        return seq

    def _write(self, msg: Outgoing, seq: int, body: bytes, size: int) -> None:
        row = (seq, msg.kind.value, DROP_PRIORITY[msg.kind], msg.topic, body, msg.qos, int(msg.retain),
               msg.correlation, self._clock_ms(), size)
        self._db.execute(_INSERT, row)
        self._rows += 1
        self._bytes += size
        self._tail_add((row,))

    def _make_room(self, size: int, prio: int) -> bool:
        """Drop queued rows until `size` more bytes and one more row fit; False when the
        next victim would matter more than the new message (then the new one is dropped)."""
        while self._rows + 1 > self.max_rows or self._bytes + size > self.max_bytes:
            victim = self._oldest_telemetry() or self._db.execute(
                f"SELECT {_VICTIM} FROM outbox WHERE prio > 0 ORDER BY prio, id LIMIT 1").fetchone()
            row_id, seq, kind, row_prio, row_size = victim
            if row_prio > prio:
                return False
            if row_prio == 0:
                self._telemetry_floor = row_id
            self._db.execute("DELETE FROM outbox WHERE id = ?", (row_id,))
            self._rows -= 1
            self._bytes -= row_size
            self._count_drop(kind, seq)
            self._tail_forget({row_id})
        return True

    def _oldest_telemetry(self) -> tuple[int, int, str, int, int] | None:
        """The first telemetry row in id order, read from past the last one dropped: every
        telemetry row at or below that is gone, so the rows between are passed over once."""
        return cast(tuple[int, int, str, int, int] | None, self._db.execute(
            f"SELECT {_VICTIM} FROM outbox WHERE prio = 0 AND id > ? ORDER BY id LIMIT 1",
            (self._telemetry_floor,)).fetchone())

    def _count_drop(self, kind: str, seq: int) -> None:
        self._set(f"dropped.{kind}", self._get(f"dropped.{kind}") + 1)
        self._set(f"unreported.{kind}", self._get(f"unreported.{kind}") + 1)
        if not self._get("unreported.first_seq"):
            self._set("unreported.first_seq", seq)
        self._set("unreported.last_seq", max(seq, self._get("unreported.last_seq")))
        log.warning("outbox: dropped %s seq %d", kind, seq)

    # -- consuming ------------------------------------------------------------------------
    def peek(self, after_row_id: int = 0, limit: int = 100) -> list[OutboxRow]:
        """The oldest rows with row_id > after_row_id, in order (nothing is removed)."""
        tail = self._tail
        if after_row_id >= self._tail_after:
            # Rows at or below the cursor are behind every reader that keeps up: let them go.
            while tail and tail[0][0] <= after_row_id:
                self._tail_after = tail.popleft()[0]
            kinds = _KINDS
            return [OutboxRow(r[0], r[0], kinds[r[1]], r[3], r[4], r[5], bool(r[6]), r[7], r[8])
                    for r in itertools.islice(tail, limit)]
        return self._peek_file(after_row_id, limit)

    def _peek_file(self, after_row_id: int, limit: int) -> list[OutboxRow]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                (after_row_id, limit)).fetchall()
        kinds = _KINDS
        return [OutboxRow(r[0], r[1], kinds[r[2]], r[3], bytes(r[4]), r[5], bool(r[6]),
                          None if r[7] is None else bytes(r[7]), r[8]) for r in rows]

    def ack(self, row_ids: Iterable[int]) -> int:
        """Delete rows the broker acknowledged (one transaction); returns how many existed."""
        ids = list(row_ids)
        if not ids:
            return 0

        def work() -> int:
            deleted = 0
            for start in range(0, len(ids), 500):
                chunk = ids[start:start + 500]
                marks = ",".join("?" * len(chunk))
                sizes = self._db.execute(f"DELETE FROM outbox WHERE id IN ({marks}) RETURNING size",
                                         chunk).fetchall()
                deleted += len(sizes)
                self._rows -= len(sizes)
                self._bytes -= sum(s[0] for s in sizes)
            self._tail_forget(ids)
            return deleted
        return self._transaction(work)

    def drop(self, row_ids: Iterable[int]) -> int:
        """Delete rows that can never be delivered (the broker refused them, or the MQTT
        client cannot send them), counting them as drops so that the next report covers them."""
        ids = list(row_ids)

        def work() -> int:
            found = 0
            for row_id in ids:
                row = self._db.execute("DELETE FROM outbox WHERE id = ? RETURNING seq, kind, size",
                                       (row_id,)).fetchone()
                if row is not None:
                    found += 1
                    self._rows -= 1
                    self._bytes -= row[2]
                    self._count_drop(row[1], row[0])
            self._tail_forget(ids)
            return found
        return self._transaction(work) if ids else 0

    def _tail_forget(self, row_ids: Iterable[int]) -> None:
        """Deleted rows leave the tail too (the usual case, the oldest rows, from its front)."""
        tail = self._tail
        if not tail:
            return
        gone = set(row_ids)
        while tail and tail[0][0] in gone:
            gone.discard(tail.popleft()[0])
        if gone and tail and max(gone) >= tail[0][0]:
            self._tail = deque(r for r in tail if r[0] not in gone)

    # -- drop reporting -------------------------------------------------------------------
    def drop_report(self) -> DropReport | None:
        """Drops not yet reported, or None."""
        counts = {str(k): self._get(f"unreported.{k}") for k in MessageKind}
        counts = {k: v for k, v in counts.items() if v}
        if not counts:
            return None
        return DropReport(counts, self._get("unreported.first_seq"), self._get("unreported.last_seq"))

    def enqueue_drop_report(self, topic: str, *, ts_ms: int | None = None) -> int | None:
        """Queue an `outbox_dropped` event for the unreported drops, atomically marking them
        reported; returns its seq, or None when nothing was dropped since the last report.

        Rows dropped to make room for the report itself are counted in it, so a consumer
        can account for every gap below the report's seq."""
        if self.drop_report() is None:
            return None
        ts = self._clock_ms() if ts_ms is None else ts_ms

        def work() -> int:
            seq = self._next_seq()
            _, size = self._encode(Outgoing(topic, self._report_payload(ts), MessageKind.EVENT), seq)
            self._make_room(size + 64, DROP_PRIORITY[MessageKind.EVENT])  # + counts growing a digit
            msg = Outgoing(topic, self._report_payload(ts), MessageKind.EVENT)
            body, size = self._encode(msg, seq)
            for name in [*(f"unreported.{k}" for k in MessageKind), "unreported.first_seq",
                         "unreported.last_seq"]:
                self._set(name, 0)
            self._write(msg, seq, body, size)
            return seq
        seq = self._transaction(work)
        if self.on_enqueue is not None:
            self.on_enqueue()
        return seq

    def _report_payload(self, ts_ms: int) -> dict[str, Any]:
        data: dict[str, Any] = {f"dropped_{k}": self._get(f"unreported.{k}") for k in MessageKind}
        data.update({"first_seq": self._get("unreported.first_seq"),
                     "last_seq": self._get("unreported.last_seq")})
        return payloads.event("outbox_dropped", ts_ms=ts_ms, data=data)

    # -- state ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._rows

    @property
    def bytes_used(self) -> int:
        return self._bytes

    @property
    def next_seq(self) -> int:
        return self._get("next_seq", 1)

    def stats(self) -> OutboxStats:
        return OutboxStats(rows=self._rows, bytes=self._bytes, next_seq=self.next_seq,
                           dropped={str(k): self._get(f"dropped.{k}") for k in MessageKind})

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
