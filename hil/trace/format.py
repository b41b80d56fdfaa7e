"""The HIL trace file: a versioned, self-describing CBOR sequence (RFC 8742).

Layout of a trace file, item by item:

1. Header map::

       {"format": "evedge-trace", "version": 1, "source": str, "start_utc_ms": int,
        "channels": {name: {"unit": str, "kind": str, "column": str | None,
                            "description": str}},
        "layout": {"site": {...}, "columns": [{"id": str, ...}, ...]},   # optional
        "meta": {...}}

   Channel names and kinds are those of `hil.trace.channels`: `<column>/<base>` for
   per-column channels, `<base>` for site-wide ones.
2. Records, each a CBOR array `[t_ms, channel, value]`: `t_ms` an int >= 0 relative to
   `start_utc_ms`, non-decreasing; `channel` a name declared in the header; `value` of the
   channel's kind. A value holds until the channel's next record.
3. End marker map `{"end": true, "records": N, "crc32": C}`: the record count and the
   CRC-32 (zlib) of every byte before the marker. It makes a trace cut at a record
   boundary, or with a flipped byte inside a number, detectable: a reader raises
   `TraceError` instead of replaying a shorter or altered trace as if it were whole.
   `TraceWriter` writes it on a clean close (not when its `with` block raised).

Reading streams: the file is read in 64 KB chunks, records are decoded one at a time
from the current chunk, and the CRC is computed as chunks are left behind, so memory
stays flat whatever the length.
Every problem (truncation, corrupt CBOR, bad header, undeclared channel, time going
backwards, wrong value) raises `TraceError` naming the record index and byte offset.
"""

from __future__ import annotations

import io
import math
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import IO, Any, NamedTuple

import cbor2

from hil.trace import channels as ch

FORMAT = "evedge-trace"
VERSION = 1
_CHUNK = 1 << 16  # bytes read at a time
_MAX_ITEM = 1 << 24  # no header or record is this long: a length field claiming more is corruption


class TraceError(ValueError):
    """A trace that cannot be read or written as asked; the message says where and why."""

    def __init__(self, message: str, *, offset: int | None = None, record: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset
        self.record = record


class TraceImportError(ValueError):
    """A source (CSV log, session list) or mapping that cannot be imported; says where."""


@dataclass
class ImportResult:
    """What an importer wrote: counts a user checks against the source."""

    output: str
    rows: int  # source rows (CSV lines, sessions) used
    records: int
    skipped: int  # empty cells (CSV) or sessions left out (sessions)
    start_utc_ms: int
    last_t_ms: int
    channels: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unit: str = "rows"  # what `rows` counts
    skipped_what: str = "empty cells skipped"


@contextmanager
def atomic_output(target: str | os.PathLike[str] | IO[bytes]) -> Iterator[str | IO[bytes]]:
    """Write a trace to `target` through a `.part` file renamed into place on success.

    A failed import leaves no trace file behind (and an older one untouched). A file
    object is passed through as it is.
    """
    if not isinstance(target, (str, os.PathLike)):
        yield target
        return
    part = str(target) + ".part"
    try:
        yield part
        os.replace(part, target)
    except BaseException:
        with suppress(OSError):
            os.unlink(part)
        raise


class Record(NamedTuple):
    t_ms: int
    channel: str
    value: Any

    @property
    def column(self) -> str | None:
        return ch.split_name(self.channel)[0]

    @property
    def base(self) -> str:
        return ch.split_name(self.channel)[1]


def _never(value: Any) -> bool:
    return False


def _is_float(value: Any) -> bool:
    return type(value) is float and value - value == 0.0  # finite: inf - inf and nan are nan


def _is_3_floats(value: Any) -> bool:
    if type(value) is not list or len(value) != 3:
        return False
    a, b, c = value
    return type(a) is float and type(b) is float and type(c) is float and a - a + b - b + c - c == 0.0


class _Channel(NamedTuple):
    kind: str
    base: str | None  # vocabulary base name, None for a custom channel (non-strict)
    fast_ok: Callable[[Any], bool] = _never  # True: surely valid (the common case, checked quickly)


def make_header(source: str, start_utc_ms: int, channels: dict[str, dict[str, Any]], *,
                layout: dict[str, Any] | None = None, meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """A header map; `channels` as built with `hil.trace.channels.declare`."""
    header: dict[str, Any] = {"format": FORMAT, "version": VERSION, "source": source,
                              "start_utc_ms": start_utc_ms, "channels": channels, "meta": meta or {}}
    if layout is not None:
        header["layout"] = layout
    return header


def check_header(header: Any, *, strict: bool = True) -> dict[str, _Channel]:
    """Validate a header map; returns the channel table. Raises ValueError saying what is wrong."""
    if not isinstance(header, dict):
        raise ValueError("the first item is not a header map")
    if header.get("format") != FORMAT:
        raise ValueError("not an %s file (format is %r)" % (FORMAT, header.get("format")))
    if header.get("version") != VERSION:
        raise ValueError("unsupported trace version %r (this reader knows %d)"
                         % (header.get("version"), VERSION))
    if not isinstance(header.get("source"), str):
        raise ValueError("header field 'source' must be a string")
    start = header.get("start_utc_ms")
    if not isinstance(start, int) or isinstance(start, bool):
        raise ValueError("header field 'start_utc_ms' must be an int")
    if not isinstance(header.get("meta", {}), dict):
        raise ValueError("header field 'meta' must be a map")
    decls = header.get("channels")
    if not isinstance(decls, dict):
        raise ValueError("header field 'channels' must be a map")
    columns = _layout_columns(header.get("layout"))
    table = {}
    for name, decl in decls.items():
        table[name] = _check_decl(name, decl, columns, strict)
    return table


def _layout_columns(layout: Any) -> set[str] | None:
    if layout is None:
        return None
    if not isinstance(layout, dict):
        raise ValueError("header field 'layout' must be a map")
    cols = layout.get("columns")
    if cols is None:
        return None
    if not isinstance(cols, list) or not all(isinstance(c, dict) and isinstance(c.get("id"), str)
                                             for c in cols):
        raise ValueError("layout 'columns' must be a list of maps with a string 'id'")
    return {c["id"] for c in cols}


def _check_decl(name: Any, decl: Any, columns: set[str] | None, strict: bool) -> _Channel:
    where = "channel %r: " % (name,)
    if not isinstance(name, str) or not name:
        raise ValueError(where + "a channel name must be a non-empty string")
    if not isinstance(decl, dict):
        raise ValueError(where + "its declaration must be a map")
    for key, types in (("unit", str), ("kind", str), ("description", str)):
        if not isinstance(decl.get(key), types):
            raise ValueError(where + "field %r must be a string" % key)
    kind = decl["kind"]
    if kind not in ch.KINDS:
        raise ValueError(where + "unknown kind %r (kinds: %s)" % (kind, ", ".join(ch.KINDS)))
    column, base = ch.split_name(name)
    if decl.get("column") != column:
        raise ValueError(where + "field 'column' is %r but the name says %r" % (decl.get("column"), column))
    if column is not None:
        problem = ch.check_column_id(column)
        if problem:
            raise ValueError(where + problem)
        if columns is not None and column not in columns:
            raise ValueError(where + "column %r is not in the layout" % column)
    spec = ch.VOCABULARY.get(base)
    if spec is None:
        if strict:
            raise ValueError(where + "unknown channel %r (known: %s)" % (base, ", ".join(ch.VOCABULARY)))
        return _Channel(kind, None, _is_float if kind == "float" else _never)
    if spec.kind != kind or spec.unit != decl["unit"]:
        raise ValueError(where + "must be kind %r in unit %r, not %r in %r"
                         % (spec.kind, spec.unit, kind, decl["unit"]))
    problem = ch.check_scope(spec, column)
    if problem:
        raise ValueError(where + problem)
    fast = _is_float if kind == "float" else _is_3_floats if base == "meter.current_a" else _never
    return _Channel(kind, base, fast)


def _check_record_value(chan: _Channel, value: Any) -> str | None:
    if chan.base is not None:
        return ch.check_value(chan.base, value)
    return ch.check_kind(chan.kind, value)


def _normalise(kind: str, value: Any) -> Any:
    if kind == "float" and isinstance(value, int):
        return float(value)
    if kind == "list":
        return [float(v) for v in value]
    return value


class TraceWriter:
    """Writes a trace: `with TraceWriter(path, header) as w: w.write(t_ms, channel, value)`.

    `target` is a path or a writable binary file (left open). Each write is checked:
    the channel is declared, `t_ms` is an int >= 0 not below the previous one, and the
    value fits the channel. A clean exit writes the end marker; an exit by exception
    leaves the trace without it, so readers see it as incomplete.
    """

    def __init__(self, target: str | os.PathLike[str] | IO[bytes], header: dict[str, Any], *,
                 strict: bool = True) -> None:
        try:
            self._channels = check_header(header, strict=strict)
        except ValueError as exc:
            raise TraceError("bad trace header: %s" % exc) from None
        try:
            header_bytes = cbor2.dumps(header)  # not canonical: keeps the writer's channel order
        except cbor2.CBOREncodeError as exc:
            raise TraceError("bad trace header: %s" % exc) from None
        self._own = isinstance(target, (str, os.PathLike))
        self._fp: IO[bytes] = open(target, "wb") if isinstance(target, (str, os.PathLike)) else target
        self._crc = 0
        self._last_t = 0
        self.records = 0
        self.closed = False
        self._emit(header_bytes)

    def _emit(self, data: bytes) -> None:
        self._crc = zlib.crc32(data, self._crc)
        self._fp.write(data)

    def write(self, t_ms: int, channel: str, value: Any) -> None:
        if self.closed:
            raise TraceError("write to a closed trace")
        chan = self._channels.get(channel)
        if chan is None:
            raise TraceError("channel %r is not declared in the header" % (channel,), record=self.records)
        if not isinstance(t_ms, int) or isinstance(t_ms, bool) or t_ms < 0:
            raise TraceError("record %d: t_ms must be an int >= 0, got %r" % (self.records, t_ms),
                             record=self.records)
        if t_ms < self._last_t:
            raise TraceError("record %d: time goes backwards (%d ms after %d ms)"
                             % (self.records, t_ms, self._last_t), record=self.records)
        problem = _check_record_value(chan, value)
        if problem:
            raise TraceError("record %d, channel %s: %s" % (self.records, channel, problem),
                             record=self.records)
        try:  # canonical: floats in their shortest exact form (16.0 takes 3 bytes, not 9)
            data = cbor2.dumps([t_ms, channel, _normalise(chan.kind, value)], canonical=True)
        except cbor2.CBOREncodeError as exc:
            raise TraceError("record %d, channel %s: %s" % (self.records, channel, exc),
                             record=self.records) from None
        self._emit(data)
        self._last_t = t_ms
        self.records += 1

    def close(self) -> None:
        """Write the end marker and close (the file, if this writer opened it)."""
        if not self.closed:
            self._fp.write(cbor2.dumps({"end": True, "records": self.records, "crc32": self._crc},
                                       canonical=True))
            self._finish()

    def abort(self) -> None:
        """Close without the end marker: the trace reads as incomplete."""
        if not self.closed:
            self._finish()

    def _finish(self) -> None:
        self.closed = True
        self._fp.flush()
        if self._own:
            self._fp.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _ItemStream:
    """CBOR items from a binary stream read in chunks (cbor2 decodes fast from memory).

    Knows each item's byte offset and keeps the CRC-32 of the bytes it has moved past,
    so the checksum costs one pass over the data and memory stays at about one chunk
    (or one item, if an item is larger, up to `_MAX_ITEM`).
    """

    def __init__(self, fp: IO[bytes]) -> None:
        self._fp = fp
        self._buf = b""
        self._base = 0  # offset of _buf[0] from where the stream started
        self._crc = 0
        self._crc_upto = 0  # the CRC covers bytes [0, _crc_upto)
        self._bio = io.BytesIO(self._buf)
        self._dec = cbor2.CBORDecoder(self._bio)
        self._exhausted = False

    def offset(self) -> int:
        return self._base + self._bio.tell()

    def _crc_through(self, end: int) -> None:
        lo, hi = self._crc_upto - self._base, end - self._base
        if hi > lo:
            self._crc = zlib.crc32(memoryview(self._buf)[lo:hi], self._crc)
            self._crc_upto = end

    def crc_before(self, offset: int) -> int:
        """CRC-32 of every byte before `offset` (an offset inside the current chunk)."""
        self._crc_through(offset)
        return self._crc

    def _refill(self) -> bool:
        """Drop the bytes before the current position and read more; False at end of stream."""
        if self._exhausted:
            return False
        pos = self._bio.tell()
        chunk = self._fp.read(max(_CHUNK, len(self._buf) - pos))  # grows for a large item
        if not chunk:
            self._exhausted = True
            return False
        self._crc_through(self._base + pos)
        self._buf = self._buf[pos:] + chunk
        self._base += pos
        self._bio = io.BytesIO(self._buf)
        self._dec = cbor2.CBORDecoder(self._bio)
        return True

    def at_end(self) -> bool:
        return self._bio.tell() >= len(self._buf) and not self._refill()

    def decode(self) -> Any:
        """The next item. Raises EOFError if the stream ends inside it, ValueError if it is corrupt."""
        start = self._bio.tell()
        while True:
            try:
                return self._dec.decode()
            except cbor2.CBORDecodeEOF:
                if len(self._buf) - start > _MAX_ITEM:
                    raise ValueError("an item longer than %d bytes (a corrupt length?)" % _MAX_ITEM) from None
                self._bio.seek(start)
                if not self._refill():
                    raise EOFError from None
                start = 0
            except Exception as exc:  # cbor2 raises several kinds on garbage, even RecursionError
                raise ValueError("corrupt CBOR (%s)" % exc) from None


class TraceReader:
    """Reads a trace as a stream: `with TraceReader(path) as r: r.header; for rec in r: ...`.

    `source` is a path or a readable binary file (left open; offsets count from where
    it stood). The header is read and checked at once. Iterating yields `Record`s one
    at a time; iterating again starts over (for a seekable source). `strict` rejects
    channels outside the vocabulary; `partial_ok` accepts a trace that ends at a record
    boundary without its end marker (a recording that was cut off) and sets `complete`
    to False instead of raising.
    """

    def __init__(self, source: str | os.PathLike[str] | IO[bytes], *, strict: bool = True,
                 partial_ok: bool = False) -> None:
        self._own = isinstance(source, (str, os.PathLike))
        self.name = str(source) if self._own else str(getattr(source, "name", "trace"))
        if isinstance(source, (str, os.PathLike)):
            try:
                self._fp: IO[bytes] = open(source, "rb")
            except OSError as exc:
                raise TraceError("cannot open trace %s: %s" % (source, exc.strerror or exc)) from None
        else:
            self._fp = source
        self.partial_ok = partial_ok
        self.complete = False
        self.records = 0
        self._iterated = False
        try:
            self._start = self._fp.tell() if self._fp.seekable() else None
            self._stream = _ItemStream(self._fp)
            if self._stream.at_end():
                raise TraceError("%s: empty file, no trace header at byte offset 0" % self.name, offset=0)
            header = self._decode(self._stream, "header")
            try:
                self._channels = check_header(header, strict=strict)
            except ValueError as exc:
                raise TraceError("%s: header at byte offset 0: %s" % (self.name, exc), offset=0) from None
        except BaseException:
            self.close()
            raise
        self.header: dict[str, Any] = header
        self.start_utc_ms: int = header["start_utc_ms"]
        self.channels: dict[str, dict[str, Any]] = header["channels"]

    def _decode(self, stream: _ItemStream, what: str) -> Any:
        offset = stream.offset()
        try:
            return stream.decode()
        except EOFError:
            problem = "truncated (the file ends inside it)"
        except ValueError as exc:
            problem = str(exc)
        index = None if what == "header" else self.records
        label = what if index is None else "%s %d" % (what, index)
        raise TraceError("%s: %s at byte offset %d: %s" % (self.name, label, offset, problem),
                         offset=offset, record=index)

    def _fail(self, offset: int, problem: str) -> TraceError:
        index = self.records
        return TraceError("%s: record %d at byte offset %d: %s" % (self.name, index, offset, problem),
                          offset=offset, record=index)

    def _restart(self) -> _ItemStream:
        if not self._iterated:
            self._iterated = True
            return self._stream
        if self._start is None:
            raise TraceError("%s: a trace read from a stream can be iterated only once" % self.name)
        self._fp.seek(self._start)
        stream = _ItemStream(self._fp)
        stream.decode()  # the header, checked when the reader was opened
        return stream

    def __iter__(self) -> Iterator[Record]:
        stream = self._restart()
        self.complete = False
        self.records = 0
        last_t = 0
        channels = self._channels
        while True:
            offset = stream.offset()
            if stream.at_end():
                if self.partial_ok:
                    return
                raise self._fail(offset, "the file ends there without the end marker "
                                 "(truncated, or its writer did not finish)")
            item = self._decode(stream, "record")
            if type(item) is not list or len(item) != 3:
                if isinstance(item, dict):
                    self._check_end(stream, item, offset)
                    self.complete = True
                    return
                raise self._fail(offset, "expected [t_ms, channel, value], got %s" % ch._show(item))
            t_ms, name, value = item
            if type(t_ms) is not int or t_ms < last_t:
                if type(t_ms) is not int or t_ms < 0:
                    raise self._fail(offset, "t_ms must be an int >= 0, got %s" % ch._show(t_ms))
                raise self._fail(offset, "time goes backwards (%d ms after %d ms)" % (t_ms, last_t))
            chan = channels.get(name) if type(name) is str else None
            if chan is None:
                raise self._fail(offset, "unknown channel %s (not declared in the header)" % ch._show(name))
            if not chan.fast_ok(value):
                problem = _check_record_value(chan, value)
                if problem:
                    raise self._fail(offset, "channel %s: %s" % (name, problem))
            last_t = t_ms
            self.records += 1
            yield Record(t_ms, name, value)

    def _check_end(self, stream: _ItemStream, item: dict[Any, Any], offset: int) -> None:
        index = self.records
        if item.get("end") is not True or item.get("records") != index:
            raise self._fail(offset, "expected a record or an end marker for %d records, got %s"
                             % (index, ch._show(item)))
        if item.get("crc32") != stream.crc_before(offset):
            raise TraceError("%s: checksum mismatch: the bytes before the end marker (byte offset %d) "
                             "are corrupt" % (self.name, offset), offset=offset, record=index)
        end = stream.offset()
        if not stream.at_end():
            raise TraceError("%s: unexpected data after the end marker at byte offset %d" % (self.name, end),
                             offset=end, record=index)

    def close(self) -> None:
        if self._own:
            self._fp.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def utc_text(ms: int) -> str:
    """A UTC time in ms as ISO 8601 text with milliseconds and a Z; a time datetime cannot
    show (outside the years 1..9999: a corrupt or hostile header) as its number."""
    try:
        when = datetime.fromtimestamp(ms / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        return "%d ms since 1970 (out of range)" % ms
    return when.isoformat(timespec="milliseconds").replace("+00:00", "Z")


_MAX_DISTINCT = 20  # text values counted per channel/field before giving up (session ids...)


class _Stats:
    """Running figures for one channel (or one field of a map channel)."""

    def __init__(self) -> None:
        self.count = 0
        self.first_t: int | None = None
        self.last_t: int | None = None
        self.min: float | None = None
        self.max: float | None = None
        self.values: dict[str, int] | None = {}
        self.fields: dict[str, _Stats] = {}

    def add(self, t_ms: int, value: Any) -> None:
        self.count += 1
        if self.first_t is None:
            self.first_t = t_ms
        self.last_t = t_ms
        self._add_value(value)

    def _add_value(self, value: Any) -> None:
        if isinstance(value, bool):
            value = str(value).lower()
        if isinstance(value, (int, float)):
            # (math.isfinite overflows on an int too large for a float: such a value is skipped)
            if math.isfinite(value) if isinstance(value, float) else abs(value) <= sys.float_info.max:
                self.min = value if self.min is None else min(self.min, value)
                self.max = value if self.max is None else max(self.max, value)
        elif isinstance(value, list):
            for v in value:
                self._add_value(v)
        elif isinstance(value, str):
            if self.values is not None:
                self.values[value] = self.values.get(value, 0) + 1
                if len(self.values) > _MAX_DISTINCT:
                    self.values = None
        elif isinstance(value, dict):
            for key, v in value.items():
                self.fields.setdefault(str(key), _Stats())._add_value(v)

    def as_dict(self, top: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if top:
            out.update(records=self.count, first_t_ms=self.first_t, last_t_ms=self.last_t)
        if self.min is not None:
            out.update(min=self.min, max=self.max)
        if self.values:
            out["values"] = dict(sorted(self.values.items()))
        elif self.values is None:
            out["values"] = "more than %d distinct" % _MAX_DISTINCT
        if self.fields:
            out["fields"] = {k: s.as_dict(top=False) for k, s in sorted(self.fields.items())}
        return out


def summarise(path: str | os.PathLike[str] | IO[bytes], *, strict: bool = True,
              partial_ok: bool = False) -> dict[str, Any]:
    """Stream a trace once and return its summary (JSON-serialisable).

    Keys: format, version, source, start_utc_ms, start_utc, end_utc, duration_ms (start
    to last record), first_t_ms, last_t_ms, records, complete, columns, layout, meta,
    and channels: {name: {unit, kind, column, records, first_t_ms, last_t_ms, min/max
    for numbers and lists, values (text counts), fields (per map key)}}.
    """
    with TraceReader(path, strict=strict, partial_ok=partial_ok) as reader:
        stats = {name: _Stats() for name in reader.channels}
        first_t: int | None = None
        last_t = 0
        for rec in reader:
            if first_t is None:
                first_t = rec.t_ms
            last_t = rec.t_ms
            stats[rec.channel].add(rec.t_ms, rec.value)
        header = reader.header
        start = reader.start_utc_ms
        channel_out = {}
        for name, decl in header["channels"].items():
            # (the reader takes a site channel's missing "column" as null, as its name says)
            entry = {"unit": decl["unit"], "kind": decl["kind"], "column": decl.get("column")}
            entry.update(stats[name].as_dict())
            channel_out[name] = entry
        columns = sorted({e["column"] for e in channel_out.values() if e["column"] is not None})
        return {
            "file": reader.name, "format": header["format"], "version": header["version"],
            "source": header["source"], "start_utc_ms": start, "start_utc": utc_text(start),
            "end_utc": utc_text(start + last_t), "duration_ms": last_t,
            "first_t_ms": first_t, "last_t_ms": last_t if first_t is not None else None,
            "records": reader.records, "complete": reader.complete, "columns": columns,
            "layout": header.get("layout"), "meta": header.get("meta", {}), "channels": channel_out,
        }
