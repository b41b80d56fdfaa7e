"""`python -m hil validate-ev TRACE`: the EV model against a recorded charging log.

Drives `hil.models.ev.EvModel` with the offered current recorded in a trace (or, with
`--csv`, straight from a CSV log such as traces/openevse-shaper/shaper_1s_part1.csv) and
prints JSON: the RMSE of modelled vs recorded current in amps, and the same response
figures for the recording and for the model:
- `reduction_lag_s`: after each reduction of the offered current that finds the car above
  the new limit, the time until its current is first below the limit then in force
  (below 0.5 A for PWM off) (median, p90 (nearest rank), max, count; `unresolved` counts
  reductions never met);
- `ramp_up_s`: after each start from standstill (>= 0.5 A after >= 5 s below it), the time
  until the current is >= 90 % of the offer for 3 samples in a row.

Both series are compared on one time grid (`--period-ms`, default 1 s; each channel holds
its last value). The current compared is the highest phase current.

The offered current does not say when the charger itself opened its relay (a log without
relay or CP state, like the OpenEVSE one, shows this as a zero current while the offer
stays >= 6 A). With `--infer-pauses` (the default) every run of recorded current below
0.5 A lasting >= 5 s is taken as the supply being off, and the supply returns so that the
model's current starts flowing at the run's last sample; the JSON reports how many
seconds were inferred this way. `--no-infer-pauses` drives the model by the offer alone.

User mistakes (a missing file, a trace without the channels, a CSV without the columns)
print one line on stderr and exit 2; `--max-rmse A` makes a larger RMSE exit 1.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hil.models.ev import CALIBRATED, MIN_OFFERED_A, EvDynamics, EvModel
from hil.models.ev_profiles import BUILTIN, EvProfile, find_profile

OFFERED = "pilot.offered_a"
MEASURED = "meter.current_a"
ZERO_A = 0.5            # below this a car counts as not drawing
PAUSE_MIN_MS = 5000     # a zero run this long is a pause (start or EVSE relay open)
RAMP_FRACTION = 0.9
RAMP_HOLD = 3           # samples in a row at >= RAMP_FRACTION of the offer
TIME_FORMATS = ("%d/%m/%Y %H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%d.%m.%Y %H:%M:%S")


class InputError(Exception):
    """A user mistake: the message is printed as it is and the command exits 2."""


@dataclass
class Recording:
    """A recorded session on a time grid: offer and current held at each grid time."""

    source: str
    t_ms: list[int]
    offered_a: list[float]
    current_a: list[float]
    offered_events: list[tuple[int, float]]   # the offer as recorded (time, A), for the model


# ---- reading ------------------------------------------------------------------------

def read_csv(path: str | Path, *, offered_column: str = "Current_Capacity",
             measured_column: str = "Charging_Current", time_column: str = "TimeStamp",
             delimiter: str = ";", period_ms: int = 1000) -> Recording:
    """A CSV log (OpenEVSE column names by default; BOM, decimal commas accepted)."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            fields = reader.fieldnames or []
            missing = [c for c in (time_column, offered_column, measured_column) if c not in fields]
            if missing:
                raise InputError("%s: no column %s (columns: %s)"
                                 % (path, ", ".join(repr(c) for c in missing), ", ".join(fields) or "none"))
            offered: list[tuple[int, float]] = []
            measured: list[tuple[int, float]] = []
            parse = None
            t0 = None
            for line, row in enumerate(reader, start=2):
                text = (row.get(time_column) or "").strip()
                if parse is None:
                    parse = _time_parser(text, path, line)
                try:
                    stamp = parse(text)
                except ValueError:
                    raise InputError("%s line %d: time %r not in the format of the first row"
                                     % (path, line, text)) from None
                t0 = stamp if t0 is None else t0
                t = round((stamp - t0) * 1000)
                if offered and t < offered[-1][0]:
                    raise InputError("%s line %d: time goes backwards" % (path, line))
                offered.append((t, _number(row.get(offered_column), path, line, offered_column)))
                measured.append((t, _number(row.get(measured_column), path, line, measured_column)))
    except OSError as exc:
        raise InputError("cannot read %s: %s" % (path, exc.strerror or exc)) from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError("%s is not a readable CSV file: %s" % (path, exc)) from None
    return _on_grid(str(path), offered, measured, period_ms)


def _time_parser(text: str, path: str | Path, line: int) -> Callable[[str], float]:
    try:
        float(text)
        return float
    except ValueError:
        pass
    for fmt in TIME_FORMATS:
        try:
            datetime.strptime(text, fmt)
        except ValueError:
            continue
        return lambda s, fmt=fmt: _seconds(datetime.strptime(s, fmt))
    try:
        datetime.fromisoformat(text)
        return lambda s: _seconds(datetime.fromisoformat(s))
    except ValueError:
        raise InputError("%s line %d: cannot read time %r (seconds or dd/mm/YYYY HH:MM:SS expected)"
                         % (path, line, text)) from None


def _seconds(stamp: datetime) -> float:
    """A log time in seconds; a time without zone counts as UTC (no DST jumps)."""
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)).timestamp()


def _number(text: str | None, path: str | Path, line: int, column: str) -> float:
    try:
        value = float((text or "").strip().replace(",", "."))
    except ValueError:
        raise InputError("%s line %d: column %s: %r is not a number" % (path, line, column, text)) from None
    if not math.isfinite(value):
        raise InputError("%s line %d: column %s: %r is not a finite number" % (path, line, column, text))
    return value


def read_trace(path: str | Path, *, column: str | None = None, period_ms: int = 1000) -> Recording:
    """A trace's `<column>/pilot.offered_a` and `<column>/meter.current_a` channels."""
    from hil.trace import TraceError, TraceReader, split_name

    if not Path(path).is_file():
        raise InputError("no such trace file: %s" % path)
    try:
        with TraceReader(path, partial_ok=True) as reader:
            names = _pick_channels(reader.channels, column, path, split_name)
            offered: list[tuple[int, float]] = []
            measured: list[tuple[int, float]] = []
            for rec in reader:
                if rec.channel == names[0]:
                    offered.append((rec.t_ms, float(rec.value)))
                elif rec.channel == names[1]:
                    measured.append((rec.t_ms, max(float(v) for v in rec.value) if rec.value else 0.0))
    except TraceError as exc:
        raise InputError(str(exc)) from None
    if not offered or not measured:
        raise InputError("%s: channels %s and %s hold no records" % (path, names[0], names[1]))
    return _on_grid(str(path), offered, measured, period_ms)


def _pick_channels(channels: dict[str, Any], column: str | None, path: str | Path,
                   split_name: Any) -> tuple[str, str]:
    by_column: dict[str | None, set[str]] = {}
    for name in channels:
        col, base = split_name(name)
        by_column.setdefault(col, set()).add(base)
    usable = sorted(c for c, bases in by_column.items() if c is not None and {OFFERED, MEASURED} <= bases)
    if column is not None:
        if column not in usable:
            raise InputError("%s: column %r has no %s and %s channels (usable columns: %s)"
                             % (path, column, OFFERED, MEASURED, ", ".join(usable) or "none"))
    elif len(usable) == 1:
        column = usable[0]
    elif not usable:
        raise InputError("%s: no column with both %s and %s channels" % (path, OFFERED, MEASURED))
    else:
        raise InputError("%s: several columns (%s); choose one with --column" % (path, ", ".join(usable)))
    return column + "/" + OFFERED, column + "/" + MEASURED


def _on_grid(source: str, offered: list[tuple[int, float]], measured: list[tuple[int, float]],
             period_ms: int) -> Recording:
    if not offered or not measured:
        raise InputError("%s: no data rows" % source)
    start = max(offered[0][0], measured[0][0])
    end = max(offered[-1][0], measured[-1][0])
    grid = list(range(start, end + 1, period_ms))
    return Recording(source, grid, _hold(offered, grid), _hold(measured, grid), offered)


def _hold(events: list[tuple[int, float]], grid: list[int]) -> list[float]:
    """Each channel's last value at or before each grid time (events sorted by time)."""
    out = []
    i, value = 0, events[0][1]
    for t in grid:
        while i < len(events) and events[i][0] <= t:
            value = events[i][1]
            i += 1
        out.append(value)
    return out


# ---- figures ------------------------------------------------------------------------

def pause_runs(rec: Recording) -> list[tuple[int, int]]:
    """(first, last) grid indices of every run of current < ZERO_A lasting >= PAUSE_MIN_MS."""
    runs = []
    t, current = rec.t_ms, rec.current_a
    i, n = 0, len(t)
    while i < n:
        if current[i] >= ZERO_A:
            i += 1
            continue
        j = i
        while j + 1 < n and current[j + 1] < ZERO_A:
            j += 1
        period = t[1] - t[0] if n > 1 else 1000
        if t[j] - t[i] + period >= PAUSE_MIN_MS:
            runs.append((i, j))
        i = j + 1
    return runs


def simulate(rec: Recording, profile: EvProfile, dynamics: EvDynamics = CALIBRATED, *,
             infer_pauses: bool = True, soc: float = 0.2) -> tuple[list[float], int]:
    """The model's current at each grid time, and the inferred pause time in ms."""
    supply: list[tuple[int, bool]] = []
    paused_ms = 0
    t = rec.t_ms
    if infer_pauses:
        for i, j in pause_runs(rec):
            off = t[i]
            supply.append((off, False))
            if j + 1 < len(t):
                supply.append((max(off, t[j] - dynamics.start_delay_ms), True))
                paused_ms += t[j] - t[i]
            else:
                paused_ms += t[j] - t[i]
    events: list[tuple[int, int, Any]] = [(ts, 0, on) for ts, on in supply]
    events += [(ts, 1, a) for ts, a in rec.offered_events]
    events.sort(key=lambda e: (e[0], e[1]))
    model = EvModel(profile, dynamics, now_ms=min(t[0], events[0][0]), soc=soc,
                    supply=not supply or supply[0][0] > t[0])
    out = []
    k = 0
    for now in t:
        while k < len(events) and events[k][0] <= now:
            ts, kind, value = events[k]
            if kind == 0:
                model.set_supply(ts, value)
            else:
                model.set_pilot(ts, value)
            k += 1
        model.step(now)
        out.append(model.draw_a)
    return out, paused_ms


def reduction_lags(t_ms: Sequence[int], offered: Sequence[float], current: Sequence[float]
                   ) -> tuple[list[float], int]:
    """Seconds from each reduction (car above the new limit) until below the limit in force.

    Below an offer under 6 A (PWM off) means stopped: under ZERO_A.
    """
    lags, unresolved = [], 0
    for i in range(1, len(t_ms)):
        if offered[i] < offered[i - 1] and current[i - 1] > offered[i] and current[i - 1] >= ZERO_A:
            for j in range(i, len(t_ms)):
                if current[j] < offered[j] or (offered[j] < MIN_OFFERED_A and current[j] < ZERO_A):
                    lags.append((t_ms[j] - t_ms[i]) / 1000.0)
                    break
            else:
                unresolved += 1
    return lags, unresolved


def ramp_ups(t_ms: Sequence[int], offered: Sequence[float], current: Sequence[float]
             ) -> tuple[list[float], int]:
    """Seconds from each start from standstill until >= 90 % of the offer for 3 samples."""
    ramps, unresolved = [], 0
    n = len(t_ms)
    still_since: int | None = None
    for i in range(n):
        if current[i] < ZERO_A:
            if still_since is None:   # a recording that begins at rest counts as a start
                still_since = t_ms[i] - (PAUSE_MIN_MS if i == 0 else 0)
            continue
        if still_since is not None and t_ms[i] - still_since >= PAUSE_MIN_MS:
            for j in range(i, n):
                window = range(j, min(j + RAMP_HOLD, n))
                if all(current[k] >= RAMP_FRACTION * offered[k] for k in window):
                    ramps.append((t_ms[j] - t_ms[i]) / 1000.0)
                    break
            else:
                unresolved += 1
        still_since = None
    return ramps, unresolved


def describe(values: Iterable[float], unresolved: int = 0) -> dict[str, Any]:
    data = sorted(values)
    if not data:
        return {"median": None, "p90": None, "max": None, "count": 0, "unresolved": unresolved}
    n = len(data)
    median = data[n // 2] if n % 2 else (data[n // 2 - 1] + data[n // 2]) / 2.0
    p90 = data[max(0, math.ceil(0.9 * n) - 1)]
    return {"median": round(median, 3), "p90": round(p90, 3), "max": round(data[-1], 3), "count": n,
            "unresolved": unresolved}


def figures(rec: Recording, current: Sequence[float]) -> dict[str, Any]:
    lags, lag_open = reduction_lags(rec.t_ms, rec.offered_a, current)
    ramps, ramp_open = ramp_ups(rec.t_ms, rec.offered_a, current)
    return {"reduction_lag_s": describe(lags, lag_open), "ramp_up_s": describe(ramps, ramp_open)}


def validate(rec: Recording, profile: EvProfile | None = None, dynamics: EvDynamics = CALIBRATED, *,
             infer_pauses: bool = True) -> dict[str, Any]:
    """The JSON report for one recording."""
    profile = profile or BUILTIN["openevse-log"]
    modelled, paused_ms = simulate(rec, profile, dynamics, infer_pauses=infer_pauses)
    n = len(rec.t_ms)
    errors = [m - r for m, r in zip(modelled, rec.current_a, strict=True)]
    return {
        "source": rec.source,
        "samples": n,
        "duration_s": (rec.t_ms[-1] - rec.t_ms[0]) / 1000.0,
        "rmse_a": round(math.sqrt(sum(e * e for e in errors) / n), 3),
        "bias_a": round(sum(errors) / n, 3),
        "inferred_pause_s": paused_ms / 1000.0 if infer_pauses else None,
        "recorded": figures(rec, rec.current_a),
        "modelled": figures(rec, modelled),
        "model": {"profile": profile.name, "phases": profile.phases,
                  "max_current_a": profile.max_current_a, "dynamics": asdict(dynamics)},
    }


# ---- command line -------------------------------------------------------------------

def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("trace", help="a trace file (or a CSV log with --csv, or a .csv name)")
    parser.add_argument("--csv", action="store_true", help="read TRACE as a CSV log (OpenEVSE columns)")
    parser.add_argument("--column", help="the trace's column id when it holds several")
    parser.add_argument("--offered-column", default="Current_Capacity", help="CSV: offered current (A)")
    parser.add_argument("--measured-column", default="Charging_Current", help="CSV: measured current (A)")
    parser.add_argument("--time-column", default="TimeStamp", help="CSV: time (s or dd/mm/YYYY HH:MM:SS)")
    parser.add_argument("--delimiter", default=";", help="CSV: field separator (default ;)")
    parser.add_argument("--period-ms", type=int, default=1000, help="comparison grid (default 1000)")
    parser.add_argument("--profile", default="openevse-log",
                        help="EV profile: a builtin name or an open-ev-data vehicle (default openevse-log)")
    parser.add_argument("--no-infer-pauses", dest="infer_pauses", action="store_false",
                        help="drive the model by the offer alone, no inferred relay pauses")
    parser.add_argument("--max-rmse", type=float, help="exit 1 when the RMSE (A) is above this")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Mount as `python -m hil validate-ev`: `validate_ev.add_parser(sub)`; calls `run`."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "validate-ev", help="compare the EV model with a recorded log (JSON: RMSE, lags)",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    _configure(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        if args.period_ms <= 0:
            raise InputError("--period-ms must be > 0")
        try:
            profile = find_profile(args.profile)
        except LookupError as exc:
            raise InputError(str(exc.args[0])) from None
        path = Path(args.trace)
        if not path.is_file():
            raise InputError("no such file: %s" % path)
        if args.csv or path.suffix.lower() == ".csv":
            rec = read_csv(path, offered_column=args.offered_column, measured_column=args.measured_column,
                           time_column=args.time_column, delimiter=args.delimiter, period_ms=args.period_ms)
        else:
            rec = read_trace(path, column=args.column, period_ms=args.period_ms)
        if len(rec.t_ms) < 2:
            raise InputError("%s: too short to compare (%d samples)" % (path, len(rec.t_ms)))
    except InputError as exc:
        print("validate-ev: error: %s" % exc, file=sys.stderr)
        return 2
    report = validate(rec, profile, infer_pauses=args.infer_pauses)
    print(json.dumps(report, indent=2))
    if args.max_rmse is not None and report["rmse_a"] > args.max_rmse:
        print("validate-ev: RMSE %.3f A is above --max-rmse %.3f A" % (report["rmse_a"], args.max_rmse),
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil.validate_ev",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    _configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
