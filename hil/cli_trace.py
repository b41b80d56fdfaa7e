"""`python -m hil import` and `python -m hil info`: turn logs into traces and summarise traces.

Mount on the harness's command line with `add_import_parser(sub)` and
`add_info_parser(sub)` (each sets `func` to a handler taking the parsed args and
returning the exit code). `python -m hil.cli_trace import|info ...` runs them alone.
Exit codes: 0 done, 2 a user mistake (missing file, bad mapping, malformed trace),
reported as one `error:` line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from hil.trace.format import ImportResult, TraceError, TraceImportError, summarise, utc_text
from hil.trace.mappings import load_mapping, ready_mappings

_Subparsers = argparse._SubParsersAction  # what ArgumentParser.add_subparsers() returns

_SESSION_OPTIONS = ("start", "end", "max_columns", "compress_idle_s")
_SESSION_FLAGS = {"start": "--from", "end": "--to", "max_columns": "--max-columns",
                  "compress_idle_s": "--compress-idle"}


def add_import_parser(subparsers: _Subparsers[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "import", help="turn a CSV log or a session list into a trace",
        description="Import SOURCE into a trace file with a mapping. Ready mappings: %s; or give a "
                    "mapping file (.toml/.json)." % ", ".join(ready_mappings()))
    p.add_argument("source", metavar="SOURCE", help="CSV log or session list (JSON)")
    p.add_argument("--mapping", "-m", required=True, metavar="NAME|FILE", help="mapping name or file")
    p.add_argument("-o", "--output", required=True, metavar="TRACE", help="trace file to write")
    p.add_argument("--timezone", metavar="TZ",
                   help="zone of times without an offset (IANA name, UTC, +01:00)")
    p.add_argument("--column", metavar="ID", help="CSV: column id for the per-column channels")
    p.add_argument("--from", dest="start", metavar="DATE", help="sessions: first day (or ISO time) to keep")
    p.add_argument("--to", dest="end", metavar="DATE", help="sessions: keep arrivals before this day/time")
    p.add_argument("--max-columns", type=int, metavar="N",
                   help="sessions: keep the N busiest stations (0: all)")
    p.add_argument("--compress-idle", dest="compress_idle_s", type=float, metavar="S",
                   help="sessions: shorten spells with no car plugged in to S seconds")
    p.set_defaults(func=run_import)
    return p


def add_info_parser(subparsers: _Subparsers[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = subparsers.add_parser("info", help="summarise a trace",
                              description="Read TRACE once and print its channels, counts and ranges.")
    p.add_argument("trace", metavar="TRACE")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--lenient", action="store_true", help="accept channels outside the vocabulary")
    p.add_argument("--partial", action="store_true",
                   help="accept a recording cut off between records (no end marker)")
    p.set_defaults(func=run_info)
    return p


def _error(message: str) -> int:
    print("error: %s" % message, file=sys.stderr)
    return 2


def run_import(args: argparse.Namespace) -> int:
    source = Path(args.source)
    if not source.is_file():
        return _error("source file not found: %s" % source)
    try:
        mapping = load_mapping(args.mapping)
        if mapping["importer"] == "csv":
            given = [_SESSION_FLAGS[k] for k in _SESSION_OPTIONS if getattr(args, k) is not None]
            if given:
                return _error("%s only apply to session lists, and mapping %r is a CSV mapping"
                              % (", ".join(given), mapping["name"]))
            from hil.trace.csv_import import import_csv, parse_csv_mapping
            result = import_csv(source, parse_csv_mapping(mapping), args.output,
                                timezone=args.timezone, column=args.column)
        else:
            if args.column is not None:
                return _error("--column applies to CSV logs; session lists name columns after stations")
            from hil.trace.sessions_import import import_acn_sessions, parse_sessions_mapping
            result = import_acn_sessions(source, args.output, mapping=parse_sessions_mapping(mapping),
                                         start=args.start, end=args.end, max_columns=args.max_columns,
                                         compress_idle_s=args.compress_idle_s, timezone=args.timezone)
    except (TraceImportError, TraceError) as exc:
        return _error(str(exc))
    except OSError as exc:
        return _error("cannot write %s: %s" % (args.output, exc.strerror or exc))
    print(_import_line(result))
    for note in result.notes:
        print("note: %s" % note)
    return 0


def _import_line(r: ImportResult) -> str:
    return ("wrote %s: %d records on %d channels from %d %s (%d %s), %s + %s"
            % (r.output, r.records, len(r.channels), r.rows, r.unit, r.skipped, r.skipped_what,
               utc_text(r.start_utc_ms), duration_text(r.last_t_ms)))


def duration_text(ms: int) -> str:
    """A duration as [Nd ]H:MM:SS[.mmm]."""
    seconds, milli = divmod(int(ms), 1000)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    text = "%d:%02d:%02d" % (hours, seconds // 60, seconds % 60)
    if milli:
        text += ".%03d" % milli
    return ("%dd %s" % (days, text)) if days else text


def run_info(args: argparse.Namespace) -> int:
    try:
        summary = summarise(args.trace, strict=not args.lenient, partial_ok=args.partial)
    except TraceError as exc:
        return _error(str(exc))
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(info_text(summary))
    return 0


def _num(value: Any) -> str:
    return "" if value is None else "%.6g" % value


def _values(entry: dict[str, Any], limit: int = 70) -> str:
    """A short text for text values (counts) and map fields (counts or ranges)."""
    parts = []
    values = entry.get("values")
    if isinstance(values, dict):
        parts.append(", ".join("%s %d" % kv for kv in values.items()))
    elif values:
        parts.append(str(values))
    fields = entry.get("fields", {})
    for key in sorted(fields, key=lambda k: (k != "type", k)):  # a map's type first
        field = fields[key]
        if isinstance(field.get("values"), dict):
            parts.append("%s: %s" % (key, ", ".join("%s %d" % kv for kv in field["values"].items())))
        elif "min" in field:
            parts.append("%s %s..%s" % (key, _num(field["min"]), _num(field["max"])))
        elif field.get("values"):
            parts.append("%s: %s" % (key, field["values"]))
    text = "; ".join(parts)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def info_text(s: dict[str, Any]) -> str:
    """The human-readable summary `info` prints."""
    lines = [
        "%s: %s v%d, %s" % (s["file"], s["format"], s["version"],
                            "complete" if s["complete"] else "INCOMPLETE (no end marker)"),
        "source    %s" % s["source"],
        "time      %s .. %s (%s)" % (s["start_utc"], s["end_utc"], duration_text(s["duration_ms"])),
        "records   %d on %d channels, %d column%s%s" % (
            s["records"], len(s["channels"]), len(s["columns"]), "" if len(s["columns"]) == 1 else "s",
            (" (%s)" % ", ".join(s["columns"][:8]) + (", ..." if len(s["columns"]) > 8 else ""))
            if s["columns"] else ""),
    ]
    meta = {k: v for k, v in s["meta"].items()
            if isinstance(v, (str, int, float)) and not isinstance(v, bool)}
    if meta:
        lines.append("meta      " + " ".join("%s=%s" % kv for kv in meta.items()))
    rows = [("channel", "unit", "kind", "records", "first", "last", "min", "max", "values")]
    for name, c in sorted(s["channels"].items()):
        rows.append((name, c["unit"], c["kind"], str(c["records"]),
                     duration_text(c["first_t_ms"]) if c["first_t_ms"] is not None else "-",
                     duration_text(c["last_t_ms"]) if c["last_t_ms"] is not None else "-",
                     _num(c.get("min")), _num(c.get("max")), _values(c)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines.append("")
    for r in rows:
        cells = [r[i].rjust(widths[i]) if i in (3, 6, 7) else r[i].ljust(widths[i])
                 for i in range(len(widths))]
        lines.append(("  ".join(cells) + "  " + r[-1]).rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil.cli_trace", description="HIL trace import and info")
    sub = parser.add_subparsers(dest="command", required=True)
    add_import_parser(sub)
    add_info_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
