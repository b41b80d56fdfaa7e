"""CSV logs to traces, driven by a mapping (a TOML table; see mappings/openevse-shaper.toml).

Mapping keys (every key except the required ones has the default shown):

    name = "..."; importer = "csv"; description = ""
    [meta]      copied into the trace header's meta (origin, licence, ...)
    [csv]       delimiter = ","; decimal = "."; thousands = ""; encoding = "utf-8-sig"
    [time]      column (required); format = "%Y-%m-%d %H:%M:%S" (strptime), or "iso",
                "unix_s", "unix_ms"; timezone = "UTC" (IANA name or "+01:00"), used
                when the text carries no offset
    [layout]    column = "c1" (id of the column the per-column channels belong to);
                phases = 1
    [[channels]] csv (CSV header name, required); channel (vocabulary base name,
                required); unit (the CSV's unit, default the channel's; kW -> W etc.
                are converted); scale = 1.0; offset = 0.0 (applied in the CSV unit,
                before unit conversion); phase (1-3, only and required for list
                channels such as meter.current_a: a single phase gives [I, 0, 0],
                several entries with different phases fill one list); on_change = false
                (write a record only when the value changes); values (text channels:
                a table translating CSV text to channel text)

The CSV must have a header row; a BOM at its start is ignored; blank lines are
skipped; an empty cell writes no record for that channel in that row (counted). The
file is read one row at a time and records are written as they come.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone, tzinfo
from pathlib import Path
from typing import IO, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from hil.trace import channels as ch
from hil.trace.format import (
    ImportResult,
    TraceImportError,
    TraceWriter,
    atomic_output,
    make_header,
)
from hil.trace.mappings import MappingError, Section, load_mapping

TIME_FORMATS = ("iso", "unix_s", "unix_ms")


@dataclass
class ChannelMap:
    csv: str
    base: str
    factor: float  # CSV unit -> channel unit
    scale: float = 1.0
    offset: float = 0.0
    phase: int | None = None
    on_change: bool = False
    values: dict[str, str] | None = None


@dataclass
class CsvMapping:
    name: str
    time_column: str
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    delimiter: str = ","
    decimal: str = "."
    thousands: str = ""
    encoding: str = "utf-8-sig"
    time_format: str = "%Y-%m-%d %H:%M:%S"
    timezone: str = "UTC"
    column: str = "c1"
    phases: int = 1
    channels: list[ChannelMap] = field(default_factory=list)


def parse_timezone(name: str) -> tzinfo:
    """A tzinfo for "UTC", a fixed offset "+01:00"/"-0500", or an IANA name."""
    if name.upper() in ("UTC", "Z", "GMT"):
        return UTC
    if name[:1] in "+-" and name[1:].replace(":", "").isdigit() and len(name[1:].replace(":", "")) == 4:
        digits = name[1:].replace(":", "")
        delta = timedelta(hours=int(digits[:2]), minutes=int(digits[2:]))
        return timezone(-delta if name[0] == "-" else delta)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("unknown timezone %r (use an IANA name such as Europe/Berlin, UTC, or +01:00)"
                         % name) from None


def parse_csv_mapping(table: dict[str, Any]) -> CsvMapping:
    """Check a mapping table (as loaded by `load_mapping`) and turn it into a CsvMapping."""
    top = Section(table.get("name", "?"), "", table)
    name = top.get("name", str, required=True)
    if top.get("importer", str, required=True) != "csv":
        raise top.error("is not a CSV mapping (importer = %r)" % table.get("importer"))
    description = top.get("description", str, "")
    meta = Section(name, "meta", top.get("meta", dict, {})).table
    csv_sec = Section(name, "csv", top.get("csv", dict, {}))
    time_sec = Section(name, "time", top.get("time", dict, required=True))
    layout = Section(name, "layout", top.get("layout", dict, {}))
    rows = top.get("channels", list, required=True)
    top.done()
    m = CsvMapping(name=name, description=description, meta=dict(meta),
                   time_column=time_sec.get("column", str, required=True))
    m.delimiter = csv_sec.get("delimiter", str, m.delimiter)
    m.decimal = csv_sec.get("decimal", str, m.decimal)
    m.thousands = csv_sec.get("thousands", str, m.thousands)
    m.encoding = csv_sec.get("encoding", str, m.encoding)
    csv_sec.done()
    if len(m.delimiter) != 1:
        raise csv_sec.error("must be one character", "delimiter")
    if m.decimal not in (".", ","):
        raise csv_sec.error("must be '.' or ','", "decimal")
    if m.thousands == m.decimal or len(m.thousands) > 1:
        raise csv_sec.error("must be one character other than the decimal mark, or empty", "thousands")
    m.time_format = time_sec.get("format", str, m.time_format)
    m.timezone = time_sec.get("timezone", str, m.timezone)
    time_sec.done()
    try:
        parse_timezone(m.timezone)
    except ValueError as exc:
        raise time_sec.error(str(exc), "timezone") from None
    m.column = layout.get("column", str, m.column)
    m.phases = layout.get("phases", int, m.phases)
    layout.done()
    problem = ch.check_column_id(m.column)
    if problem or m.phases not in (1, 2, 3):
        raise layout.error(problem or "phases must be 1, 2 or 3")
    if not rows:
        raise top.error("maps no channels", "channels")
    seen: set[tuple[str, int | None]] = set()
    for i, row in enumerate(rows):
        cm = _parse_channel(Section(name, "channels[%d]" % i, row))
        if (cm.base, cm.phase) in seen:
            raise top.error("channel %s%s is mapped twice" % (cm.base, "" if cm.phase is None
                                                                else " phase %d" % cm.phase), "channels")
        seen.add((cm.base, cm.phase))
        m.channels.append(cm)
    return m


def _parse_channel(sec: Section) -> ChannelMap:
    source = sec.get("csv", str, required=True)
    base = sec.get("channel", str, required=True)
    spec = ch.VOCABULARY.get(base)
    if spec is None:
        raise sec.error("unknown channel %r (known: %s)" % (base, ", ".join(ch.VOCABULARY)), "channel")
    if spec.kind == "map":
        raise sec.error("channel %s holds maps; a CSV column can fill number, list or text channels" % base)
    unit = sec.get("unit", str, spec.unit)
    factor = ch.unit_factor(unit, spec.unit)
    if factor is None:
        raise sec.error("%r cannot be converted to %s's unit %r" % (unit, base, spec.unit), "unit")
    cm = ChannelMap(source, base, factor, scale=sec.get("scale", float, 1.0),
                    offset=sec.get("offset", float, 0.0), phase=sec.get("phase", int),
                    on_change=sec.get("on_change", bool, False), values=sec.get("values", dict))
    sec.done()
    if spec.kind == "list" and cm.phase not in (1, 2, 3):
        raise sec.error("channel %s is a per-phase list: give phase = 1, 2 or 3" % base, "phase")
    if spec.kind != "list" and cm.phase is not None:
        raise sec.error("only per-phase list channels take a phase", "phase")
    if cm.values is not None and spec.kind != "str":
        raise sec.error("only text channels take a values table", "values")
    return cm


@dataclass
class _Group:
    """One trace channel and the CSV columns that fill it (several for a per-phase list)."""

    name: str
    kind: str
    parts: list[tuple[int, ChannelMap]]
    on_change: bool
    last: Any = None


class _Rows:
    """Row-by-row parsing with errors that name the file, line and CSV column."""

    def __init__(self, path: Path, mapping: CsvMapping, tz: tzinfo) -> None:
        self.path = path
        self.m = mapping
        self.tz = tz
        self.line = 0
        th, dec = re.escape(mapping.thousands or "'"), re.escape(mapping.decimal)
        self._grouped = re.compile(r"[+-]?\d{1,3}(?:%s\d{3})+(?:%s\d*)?" % (th, dec))

    def error(self, problem: str, column: str | None = None) -> TraceImportError:
        where = "%s line %d" % (self.path.name, self.line)
        if column is not None:
            where += ", column %r" % column
        return TraceImportError("%s: %s" % (where, problem))

    def number(self, text: str, column: str) -> float:
        t = text.strip()
        if self.m.thousands and self.m.thousands in t:
            if not self._grouped.fullmatch(t):  # "0.35" must not become 35 with '.' for thousands
                raise self.error("%r has a misplaced thousands separator %r" % (text, self.m.thousands),
                                 column)
            t = t.replace(self.m.thousands, "")
        if self.m.decimal == ",":
            if "." in t:
                raise self.error("%r has a '.' but the mapping says decimal commas" % text, column)
            t = t.replace(",", ".")
        try:
            value = float(t)
        except ValueError:
            raise self.error("%r is not a number" % text, column) from None
        if not math.isfinite(value):
            raise self.error("%r is not a finite number" % text, column)
        return value

    def time_ms(self, text: str) -> int:
        t = text.strip()
        fmt = self.m.time_format
        try:
            if fmt == "unix_s":
                return round(self.number(t, self.m.time_column) * 1000)
            if fmt == "unix_ms":
                return round(self.number(t, self.m.time_column))
            stamp = datetime.fromisoformat(t) if fmt == "iso" else datetime.strptime(t, fmt)
        except ValueError:
            raise self.error("time %r does not match the format %r" % (text, fmt),
                             self.m.time_column) from None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=self.tz)
        return round(stamp.timestamp() * 1000)

    def value(self, row: list[str], group: _Group) -> Any:
        if group.kind == "list":
            out = [0.0, 0.0, 0.0]
            for idx, cm in group.parts:
                if not row[idx].strip():
                    return None
                assert cm.phase is not None
                out[cm.phase - 1] = (self.number(row[idx], cm.csv) * cm.scale + cm.offset) * cm.factor
            return out
        idx, cm = group.parts[0]
        text = row[idx].strip()
        if not text:
            return None
        if group.kind == "str":
            if cm.values is not None:
                if text not in cm.values:
                    raise self.error("%r is not in the mapping's values table" % text, cm.csv)
                return cm.values[text]
            return text
        value = (self.number(text, cm.csv) * cm.scale + cm.offset) * cm.factor
        return round(value) if group.kind == "int" else value


def import_csv(source: str | os.PathLike[str], mapping: str | os.PathLike[str] | dict[str, Any] | CsvMapping,
               output: str | os.PathLike[str] | IO[bytes], *, timezone: str | None = None,
               column: str | None = None) -> ImportResult:
    """Import a CSV log into a trace file; returns the counts.

    `mapping` is a ready mapping name, a mapping file, a mapping table or a CsvMapping;
    `timezone` and `column` override the mapping's. Raises MappingError when the
    mapping is malformed or does not match the CSV, TraceImportError for bad rows.
    """
    if not isinstance(mapping, CsvMapping):
        mapping = parse_csv_mapping(mapping if isinstance(mapping, dict) else load_mapping(mapping))
    m = mapping
    try:
        tz = parse_timezone(timezone or m.timezone)
    except ValueError as exc:
        raise TraceImportError(str(exc)) from None
    col = column or m.column
    problem = ch.check_column_id(col)
    if problem:
        raise TraceImportError(problem)
    path = Path(source)
    try:
        fh = open(path, encoding=m.encoding, newline="")
    except OSError as exc:
        raise TraceImportError("cannot read %s: %s" % (path, exc.strerror or exc)) from None
    except LookupError:
        raise MappingError("mapping %r: csv.encoding: unknown encoding %r" % (m.name, m.encoding)) from None
    with fh:
        try:
            return _import_rows(_Rows(path, m, tz), fh, col=col, tz_name=timezone or m.timezone,
                                output=output)
        except UnicodeDecodeError as exc:
            raise TraceImportError("%s is not %s text (%s)" % (path.name, m.encoding, exc.reason)) from None
        except csv.Error as exc:
            raise TraceImportError("%s: malformed CSV: %s" % (path.name, exc)) from None


def _import_rows(rows: _Rows, fh: IO[str], *, col: str, tz_name: str,
                 output: str | os.PathLike[str] | IO[bytes]) -> ImportResult:
    m, path = rows.m, rows.path
    reader = csv.reader(fh, delimiter=m.delimiter)
    header = next(reader, None)
    if header is None:
        raise TraceImportError("%s is empty: expected a header row" % path.name)
    names = [h.strip().lstrip("\ufeff") for h in header]
    index = {}
    for i, n in enumerate(names):
        if n in index:
            raise TraceImportError("%s: the header names column %r twice" % (path.name, n))
        index[n] = i
    for needed in [m.time_column] + [cm.csv for cm in m.channels]:
        if needed not in index:
            raise MappingError("mapping %r needs CSV column %r, which %s does not have (its columns: %s)"
                               % (m.name, needed, path.name, ", ".join(names)))
    groups: dict[str, _Group] = {}
    decls = {}
    for cm in m.channels:
        spec = ch.VOCABULARY[cm.base]
        name, decl = ch.declare(cm.base, None if spec.scope == "site" else col)
        decls[name] = decl
        group = groups.setdefault(name, _Group(name, spec.kind, [], cm.on_change))
        group.parts.append((index[cm.csv], cm))
        group.on_change = group.on_change or cm.on_change
    time_idx = index[m.time_column]
    data = _data_rows(reader, rows, len(names))
    first = next(data, None)
    if first is None:
        raise TraceImportError("%s has a header row but no data rows" % path.name)
    start = rows.time_ms(first[time_idx])
    layout: dict[str, Any] = {"site": {"name": m.name}}
    if any(d["column"] is not None for d in decls.values()):
        layout["columns"] = [{"id": col, "phases": m.phases}]
    meta = {"importer": "csv", "mapping": m.name, "file": path.name, "timezone": tz_name}
    meta.update(m.meta)
    head = make_header("csv:%s (mapping %s)" % (path.name, m.name), start, decls, layout=layout, meta=meta)
    count = skipped = records = 0
    last_t = 0
    with atomic_output(output) as out, TraceWriter(out, head) as writer:
        row: list[str] | None = first
        while row is not None:
            count += 1
            t = rows.time_ms(row[time_idx]) - start
            if t < last_t:
                raise rows.error("time %r is earlier than the row before (a clock change?); "
                                 "traces need non-decreasing time" % row[time_idx].strip(), m.time_column)
            last_t = t
            for group in groups.values():
                value = rows.value(row, group)
                if value is None:
                    skipped += 1
                    continue
                if group.on_change and value == group.last:
                    continue
                group.last = value
                writer.write(t, group.name, value)
                records += 1
            row = next(data, None)
    return ImportResult(output=str(getattr(output, "name", output)), rows=count, records=records,
                        skipped=skipped, start_utc_ms=start, last_t_ms=last_t, channels=list(decls))


def _data_rows(reader: Any, rows: _Rows, width: int) -> Any:
    for row in reader:
        rows.line = reader.line_num
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != width:
            raise rows.error("expected %d fields like the header, found %d" % (width, len(row)))
        yield row
