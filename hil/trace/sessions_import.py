"""Session lists (ACN-Data JSON) to site traces: arrivals, departures and energy demands.

Each session (`connectionTime`, `disconnectTime`, `doneChargingTime` as RFC 1123 GMT
text, `kWhDelivered`, `stationID`, optional `userInputs`) becomes two records on the
channel `<stationID>/ev.event`:

- at connection: `{"type": "plug", "session": id, "energy_wh": delivered,
  "stay_ms": disconnect - connection, "done_after_ms": when charging finished (if
  recorded, at most stay_ms), "requested_wh" / "requested_stay_ms": the driver's last
  input (if any)}`: what a simulated car needs to replay the arrival;
- at disconnection: `{"type": "unplug", "session": id, "energy_wh": delivered}`.

Options: a date range (`start` inclusive, `end` exclusive, on connection time; dates are
local days in `timezone`), `max_columns` (keep the stations with the most sessions in
the range; 0 keeps all), and `compress_idle_s` (spells with no car plugged in anywhere longer than
this are shortened to it; sessions themselves are never shortened). Sessions that end
before they start, or overlap an earlier session on the same station, are left out and
counted. The session list is read whole (a JSON array); the trace is written streaming.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any

from hil.trace import channels as ch
from hil.trace.csv_import import parse_timezone
from hil.trace.format import ImportResult, TraceImportError, TraceWriter, atomic_output, make_header
from hil.trace.mappings import Section, load_mapping


@dataclass
class SessionOptions:
    timezone: str = "UTC"
    start: str | None = None
    end: str | None = None
    max_columns: int | None = None
    compress_idle_s: float | None = None
    name: str = "acn-sessions"
    meta: dict[str, Any] = field(default_factory=dict)


def parse_sessions_mapping(table: dict[str, Any]) -> SessionOptions:
    top = Section(table.get("name", "?"), "", table)
    opts = SessionOptions(name=top.get("name", str, required=True))
    if top.get("importer", str, required=True) != "acn-sessions":
        raise top.error("is not a session-list mapping (importer = %r)" % table.get("importer"))
    top.get("description", str, "")
    opts.meta = dict(Section(opts.name, "meta", top.get("meta", dict, {})).table)
    sec = Section(opts.name, "sessions", top.get("sessions", dict, {}))
    top.done()
    opts.timezone = sec.get("timezone", str, opts.timezone)
    opts.start = sec.get("from", str)
    opts.end = sec.get("to", str)
    opts.max_columns = sec.get("max_columns", int)
    opts.compress_idle_s = sec.get("compress_idle_s", float)
    sec.done()
    return opts


@dataclass
class _Session:
    column: str
    conn_ms: int
    disc_ms: int
    plug: dict[str, Any]
    space: str | None


def _when(text: str, tz_name: str, what: str) -> int:
    """A --from/--to value (a date or an ISO datetime, local to tz_name if naive) in UTC ms."""
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError:
        raise TraceImportError("%s %r is not a date (YYYY-MM-DD) or an ISO date and time"
                               % (what, text)) from None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=parse_timezone(tz_name))
    return round(stamp.timestamp() * 1000)


class _Parser:
    def __init__(self, file_name: str) -> None:
        self.file_name = file_name

    def error(self, i: int, raw: Any, problem: str) -> TraceImportError:
        sid = raw.get("sessionID") if isinstance(raw, dict) else None
        label = " (%s)" % sid if sid else ""
        return TraceImportError("%s session %d%s: %s" % (self.file_name, i, label, problem))

    def time(self, i: int, raw: dict[str, Any], key: str, required: bool = True) -> int | None:
        text = raw.get(key)
        if text is None and not required:
            return None
        try:
            if not isinstance(text, str):
                raise ValueError
            stamp = parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            raise self.error(i, raw, "%r is %r, not an RFC 1123 time" % (key, text)) from None
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return round(stamp.timestamp() * 1000)

    def session(self, i: int, raw: Any) -> _Session:
        if not isinstance(raw, dict):
            raise self.error(i, raw, "not a JSON object")
        station = raw.get("stationID")
        if not isinstance(station, str) or not station.strip():
            raise self.error(i, raw, "'stationID' must be a non-empty string")
        kwh = raw.get("kWhDelivered")
        if not isinstance(kwh, (int, float)) or isinstance(kwh, bool) or not math.isfinite(kwh) or kwh < 0:
            raise self.error(i, raw, "'kWhDelivered' must be a number >= 0, got %r" % (kwh,))
        conn = self.time(i, raw, "connectionTime")
        disc = self.time(i, raw, "disconnectTime")
        done = self.time(i, raw, "doneChargingTime", required=False)
        assert conn is not None and disc is not None
        plug: dict[str, Any] = {"type": "plug", "session": str(raw.get("sessionID", i)),
                                "energy_wh": float(kwh) * 1000.0, "stay_ms": disc - conn}
        if done is not None:
            plug["done_after_ms"] = max(0, min(done - conn, disc - conn))
        inputs = raw.get("userInputs")
        if isinstance(inputs, list) and inputs and isinstance(inputs[-1], dict):
            last = inputs[-1]  # the driver's latest input
            if isinstance(last.get("kWhRequested"), (int, float)):
                plug["requested_wh"] = float(last["kWhRequested"]) * 1000.0
            if isinstance(last.get("minutesAvailable"), (int, float)):
                plug["requested_stay_ms"] = round(last["minutesAvailable"] * 60000)
        column = re.sub(r"[/\s]", "_", station.strip())
        space = raw.get("spaceID")
        return _Session(column, conn, disc, plug, space if isinstance(space, str) else None)


def import_acn_sessions(source: str | os.PathLike[str], output: str | os.PathLike[str] | IO[bytes], *,
                        mapping: str | dict[str, Any] | SessionOptions = "acn-sessions",
                        start: str | None = None, end: str | None = None, max_columns: int | None = None,
                        compress_idle_s: float | None = None, timezone: str | None = None) -> ImportResult:
    """Import an ACN-Data session list into a site trace; keyword options override the mapping's."""
    if isinstance(mapping, SessionOptions):
        opts = mapping
    else:
        opts = parse_sessions_mapping(mapping if isinstance(mapping, dict) else load_mapping(mapping))
    tz_name = timezone or opts.timezone
    try:
        parse_timezone(tz_name)
    except ValueError as exc:
        raise TraceImportError(str(exc)) from None
    start = start if start is not None else opts.start
    end = end if end is not None else opts.end
    max_columns = max_columns if max_columns is not None else opts.max_columns
    compress = compress_idle_s if compress_idle_s is not None else opts.compress_idle_s
    if max_columns is not None and max_columns < 0:
        raise TraceImportError("max columns must be >= 0 (0: every station), got %d" % max_columns)
    if compress is not None and compress < 0:
        raise TraceImportError("idle compression must be >= 0 s, got %g" % compress)
    t_from = _when(start, tz_name, "from") if start else None
    t_to = _when(end, tz_name, "to") if end else None
    if t_from is not None and t_to is not None and t_to <= t_from:
        raise TraceImportError("the date range is empty: 'to' %s is not after 'from' %s" % (end, start))

    path = Path(source)
    try:
        raw_list = json.loads(path.read_bytes())
    except OSError as exc:
        raise TraceImportError("cannot read %s: %s" % (path, exc.strerror or exc)) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise TraceImportError("%s is not valid JSON: %s" % (path.name, exc)) from None
    if isinstance(raw_list, dict) and isinstance(raw_list.get("_items"), list):
        raw_list = raw_list["_items"]  # the ACN-Data API wraps its sessions like this
    if not isinstance(raw_list, list):
        raise TraceImportError("%s: expected a JSON array of sessions" % path.name)
    parser = _Parser(path.name)
    sessions = [parser.session(i, raw) for i, raw in enumerate(raw_list)]
    chosen = [s for s in sessions
              if (t_from is None or s.conn_ms >= t_from) and (t_to is None or s.conn_ms < t_to)]
    notes = []
    backwards = [s for s in chosen if s.disc_ms < s.conn_ms]
    if backwards:
        notes.append("%d sessions end before they start: left out" % len(backwards))
    chosen = [s for s in chosen if s.disc_ms >= s.conn_ms]
    if not chosen:
        raise TraceImportError("%s: no sessions in the selected range" % path.name)
    columns = _busiest(chosen, max_columns)
    in_cols = [s for s in chosen if s.column in columns]
    kept, overlaps = _drop_overlaps(in_cols)
    if overlaps:
        notes.append("%d sessions overlap an earlier one on the same station: left out" % overlaps)
    skipped = len(sessions) - len(kept)
    t0 = t_from if t_from is not None else min(s.conn_ms for s in kept)
    events = _events(kept, t0)
    removed = _compress(events, compress) if compress is not None else 0
    decls = dict(ch.declare("ev.event", c) for c in columns)
    counts = {c: sum(1 for s in kept if s.column == c) for c in columns}
    spaces = {s.column: s.space for s in kept}
    layout = {"site": {"name": path.stem, "timezone": tz_name},
              "columns": [{"id": c, "sessions": counts[c], "space": spaces.get(c)} for c in columns]}
    meta: dict[str, Any] = {"importer": "acn-sessions", "mapping": opts.name, "file": path.name,
                            "sessions": len(kept), "skipped_sessions": skipped, "from": start, "to": end,
                            "timezone": tz_name, "max_columns": max_columns, "compress_idle_s": compress,
                            "idle_removed_ms": removed}
    meta.update(opts.meta)
    header = make_header("sessions:%s (mapping %s)" % (path.name, opts.name), t0, decls,
                         layout=layout, meta=meta)
    with atomic_output(output) as out, TraceWriter(out, header) as writer:
        for t_ms, _order, column, value in events:
            writer.write(t_ms, ch.channel_name("ev.event", column), value)
    return ImportResult(output=str(getattr(output, "name", output)), rows=len(kept), records=len(events),
                        skipped=skipped, start_utc_ms=t0, last_t_ms=events[-1][0] if events else 0,
                        channels=list(decls), notes=notes, unit="sessions",
                        skipped_what="sessions left out")


def _busiest(sessions: list[_Session], limit: int | None) -> list[str]:
    """Station columns ordered by session count (then energy, then id); the first `limit`."""
    count: dict[str, int] = {}
    energy: dict[str, float] = {}
    for s in sessions:
        count[s.column] = count.get(s.column, 0) + 1
        energy[s.column] = energy.get(s.column, 0.0) + s.plug["energy_wh"]
    ranked = sorted(count, key=lambda c: (-count[c], -energy[c], c))
    return ranked[:limit] if limit else ranked


def _drop_overlaps(sessions: list[_Session]) -> tuple[list[_Session], int]:
    busy_until: dict[str, int] = {}
    kept = []
    for s in sorted(sessions, key=lambda s: (s.conn_ms, s.disc_ms)):
        if s.conn_ms < busy_until.get(s.column, s.conn_ms):
            continue
        busy_until[s.column] = s.disc_ms
        kept.append(s)
    return kept, len(sessions) - len(kept)


def _events(sessions: list[_Session], t0: int) -> list[tuple[int, int, str, dict[str, Any]]]:
    """(t_ms, order, column, value) sorted by time; at equal times unplugs come before plugs,
    except the unplug of a zero-length session, which follows its own plug."""
    out = []
    for s in sessions:
        out.append((s.conn_ms - t0, 1, s.column, s.plug))
        out.append((s.disc_ms - t0, 2 if s.disc_ms == s.conn_ms else 0, s.column,
                    {"type": "unplug", "session": s.plug["session"], "energy_wh": s.plug["energy_wh"]}))
    out.sort(key=lambda e: (e[0], e[1], e[2]))
    return out


def _compress(events: list[tuple[int, int, str, dict[str, Any]]], idle_s: float) -> int:
    """Shorten every spell with no car plugged in to at most idle_s, in place; returns ms removed."""
    idle_ms = round(idle_s * 1000)
    plugged = 0
    idle_since: int | None = 0  # the trace starts idle
    shift = 0
    for i, (t_orig, order, column, value) in enumerate(events):
        t = t_orig - shift
        if idle_since is not None and t - idle_since > idle_ms:
            cut = t - idle_since - idle_ms
            shift += cut
            t -= cut
        events[i] = (t, order, column, value)
        plugged += 1 if value["type"] == "plug" else -1
        idle_since = t if plugged == 0 else None
    return shift
