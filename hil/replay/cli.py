"""`python -m hil replay TRACE --target sim|mpy|site|serial:PORT [--speed max|N] [--report DIR]` and
`python -m hil suite [--target sim] [--report DIR]` (what `make hil` runs).

`replay` exits 0 when every check came out as expected (every oracle passes, or fails
where the trace's meta.expect says it must), 1 otherwise, and 2 for a user mistake or a
broken setup (a malformed trace, an unknown channel, a bad layout, an unknown target, a
target that does not answer), reported as one `error:` line, never a traceback (set
HIL_DEBUG=1 to get one). `suite` generates the scenario suite (hil.scenarios) into a
temporary folder and replays each trace on a fresh target; it exits 0 iff all of them
pass. Scenarios too long for real time (meta realtime_ok false, e.g. the 24 h site) are
skipped on realtime targets and listed as skipped.

The `mpy`, `site[:OPTIONS]` and `serial:PORT` targets live in hil/replay/mpy.py,
hil/replay/site_target.py and hil/replay/serial_target.py, imported only when asked for.
Each module exposes `make_target(arg, *, speed)` (arg: None for mpy, the options for site,
the port for serial), or the classes `MpyTarget(speed=...)` / `SerialTarget(port, speed=...)`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from hil.replay.engine import EngineOptions, ReplayError, RunResult, replay
from hil.replay.target import Target, TargetError
from hil.trace.format import TraceError, TraceReader

_Subparsers = argparse._SubParsersAction  # what ArgumentParser.add_subparsers() returns
_REALTIME = {"mpy": ("hil.replay.mpy", "MpyTarget"), "serial": ("hil.replay.serial_target", "SerialTarget"),
             "site": ("hil.replay.site_target", "SiteTarget")}
_ARG = {"mpy": False, "serial": True}   # whether the target needs an argument (site: optional)


class UsageError(Exception):
    """A user mistake or a setup problem: printed as one line, exit 2."""


# ---- targets ---------------------------------------------------------------------------------


def parse_speed(text: str) -> float:
    """--speed: "max" (inf: as fast as possible) or a factor > 0 (1 = real time)."""
    if text == "max":
        return float("inf")
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("speed must be 'max' or a number > 0, got %r" % text) from None
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError("speed must be 'max' or a number > 0, got %r" % text)
    return value


def make_target(spec: str, speed: float | None = None) -> Target:
    """A fresh target from a --target value: sim, mpy, site[:OPTIONS] or serial:PORT."""
    name, _, arg = spec.partition(":")
    if name == "sim" and not arg:
        from hil.replay.sim import SimTarget

        return SimTarget()
    if name not in _REALTIME or _ARG.get(name, bool(arg)) != bool(arg):
        raise UsageError("unknown target %r (use sim, mpy, site[:OPTIONS] or serial:PORT)" % spec)
    module_name, class_name = _REALTIME[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise UsageError(
                "target %r is not available: %s.py is not there yet" % (name, module_name.replace(".", "/"))
            ) from None
        raise
    factory = getattr(module, "make_target", None)
    try:
        if callable(factory):
            return factory(arg or None, speed=speed)
        cls = getattr(module, class_name, None)
        if cls is None:
            raise UsageError("%s has neither make_target() nor %s" % (module_name, class_name))
        return cls(arg, speed=speed) if arg else cls(speed=speed)
    except ValueError as exc:   # options the target refuses
        raise UsageError("target %s: %s" % (spec, exc)) from None
    except (TargetError, OSError, TimeoutError) as exc:
        raise UsageError("target %s does not answer: %s" % (spec, exc)) from None


def _target_error(spec: str, exc: BaseException) -> UsageError:
    if isinstance(exc, (TargetError, OSError, TimeoutError, EOFError)):
        return UsageError("target %s: %s" % (spec, exc or type(exc).__name__))
    return UsageError("target %s failed: %s: %s" % (spec, type(exc).__name__, exc))


def run_one(trace: str | Path, spec: str, options: EngineOptions) -> RunResult:
    """Replay one trace on a fresh target; user mistakes and target trouble raise UsageError."""
    if not Path(trace).is_file():
        raise UsageError("trace not found: %s" % trace)
    target = make_target(spec, options.speed)
    try:
        return replay(trace, target, options, target_name=spec)
    except (TraceError, ReplayError) as exc:
        raise UsageError(str(exc)) from None
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as exc:
        if os.environ.get("HIL_DEBUG") or (spec == "sim" and not isinstance(exc, TargetError)):
            raise
        raise _target_error(spec, exc) from None
    finally:
        try:
            target.close()
        except Exception as exc:  # a target that fails to close must not hide the result
            print("warning: closing target %s: %s" % (spec, exc), file=sys.stderr)


# ---- output ----------------------------------------------------------------------------------


def _dur(ms: float) -> str:
    s = int(ms // 1000)
    return "%d:%02d:%02d" % (s // 3600, s // 60 % 60, s % 60)


def _verdict(ok: bool, passed: bool, expected: str) -> str:
    if expected == "fail":
        return "fail (expected)" if ok else "PASS (expected fail)"
    return "pass" if passed else "FAIL"


def summary_table(result: RunResult, width: int = 110) -> str:
    ok = sum(1 for r in result.results if r.ok)
    lines = [
        "trace     %s%s" % (result.trace, " (scenario %s)" % result.scenario if result.scenario else ""),
        "target    %s" % result.target,
        "virtual   %s in %.2f s wall: %.0fx real time, %d column steps"
        % (_dur(result.duration_ms), result.wall_s, result.realtime_factor, result.column_steps),
        "result    %s: %d of %d checks as expected"
        % ("PASS" if result.ok else "FAIL", ok, len(result.results)),
    ]
    lines += ["note      " + n for n in result.notes]
    rows = [(r.id, _verdict(r.ok, r.passed, r.expected), r.message) for r in result.results]
    w0 = max(len("check"), *(len(r[0]) for r in rows))
    w1 = max(len("result"), *(len(r[1]) for r in rows))
    lines.append("")
    lines.append("%-*s  %-*s  %s" % (w0, "check", w1, "result", "figure"))
    for a, b, c in rows:
        room = max(20, width - w0 - w1 - 4)
        lines.append("%-*s  %-*s  %s" % (w0, a, w1, b, c if len(c) <= room else c[: room - 3] + "..."))
    return "\n".join(lines)


def _error(message: str) -> int:
    print("error: %s" % message, file=sys.stderr)
    return 2


def _options(args: argparse.Namespace) -> EngineOptions:
    progress = False if args.no_progress else None
    speed = args.speed
    if speed is None:  # not given: as fast as possible in virtual time, real time on a board
        speed = None if args.target == "sim" else 1.0
    elif speed == float("inf"):
        speed = None
    return EngineOptions(
        step_ms=args.step_ms, speed=speed, progress=progress, ev_profile=getattr(args, "ev_profile", None)
    )


# ---- replay ----------------------------------------------------------------------------------


def add_replay_parser(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "replay",
        help="replay a trace against columns under test and judge it",
        description="Replay TRACE against a target (sim: the firmware core in this process "
        "in virtual time; mpy: the firmware in the MicroPython unix port; site: the real "
        "gateway, broker and virtual columns, options micropython, mixed, hang; "
        "serial:PORT: a board on a serial port), print the checks, exit 0 when "
        "all come out as expected.",
    )
    p.add_argument("trace", metavar="TRACE")
    _common(p)
    p.add_argument(
        "--ev-profile", metavar="NAME", help="every car uses this profile (builtin or vehicle name)"
    )
    p.set_defaults(func=run_replay)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="sim", metavar="sim|mpy|site|serial:PORT",
                   help="columns under test (sim)")
    p.add_argument(
        "--speed",
        type=parse_speed,
        default=None,
        metavar="max|N",
        help="virtual time per wall second: max or a factor (1 = real time); default max for "
        "sim, 1 for mpy, site and serial (site: 1 only)",
    )
    p.add_argument("--report", metavar="DIR", help="write summary.json, junit.xml and PNG plots here")
    p.add_argument("--no-plots", action="store_true", help="with --report: skip the PNG plots")
    p.add_argument("--step-ms", type=int, default=100, metavar="MS", help="fixed step (100 ms)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_replay(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.step_ms < 10:
        return _error("--step-ms must be at least 10")
    try:
        result = run_one(args.trace, args.target, _options(args))
        print(summary_table(result), file=out)
        if args.report:
            from hil.replay.report import write_report

            files = write_report(result, args.report, plots=not args.no_plots)
            print("report    %s (%d files)" % (args.report, len(files)), file=out)
    except UsageError as exc:
        return _error(str(exc))
    except OSError as exc:
        return _error("cannot write the report to %s: %s" % (args.report, exc.strerror or exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0 if result.ok else 1


# ---- suite -----------------------------------------------------------------------------------


def add_suite_parser(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "suite",
        help="generate the scenario suite and replay it (make hil)",
        description="Generate the in-repo scenarios into a temporary folder and replay each "
        "one; exit 0 iff every one passes.",
    )
    _common(p)
    p.add_argument("--only", metavar="NAME", action="append", help="only this scenario (repeatable)")
    p.add_argument("--keep", metavar="DIR", help="generate the traces here and keep them")
    p.set_defaults(func=run_suite_args)


def run_suite_args(args: argparse.Namespace) -> int:
    if args.step_ms < 10:
        return _error("--step-ms must be at least 10")
    return run_suite(
        args.target,
        report=args.report,
        only=args.only,
        options=_options(args),
        keep=args.keep,
        plots=not args.no_plots,
    )


def run_suite(
    target: str = "sim",
    *,
    report: str | Path | None = None,
    only: list[str] | None = None,
    options: EngineOptions | None = None,
    keep: str | Path | None = None,
    plots: bool = True,
    out: TextIO | None = None,
    on_result: Callable[[RunResult], None] | None = None,
) -> int:
    """Generate the scenario suite and replay every scenario; 0 iff all pass, 1 if any fails,
    2 if the suite cannot run (unknown target, target not answering, bad scenario name)."""
    from hil.scenarios import write_scenarios

    out = out or sys.stdout
    options = options or EngineOptions(progress=False)
    with tempfile.TemporaryDirectory(prefix="hil-suite-") as tmp:
        folder = Path(keep) if keep else Path(tmp)
        try:
            traces = write_scenarios(folder, only)
        except (ValueError, OSError, TraceError) as exc:
            return _error(str(exc))
        results: list[RunResult] = []
        skipped: list[tuple[str, str]] = []
        errors = 0
        realtime: bool | None = None
        for path in traces:
            name = path.stem
            if realtime is None:
                try:
                    probe = make_target(target, options.speed)
                    realtime = bool(probe.realtime)
                    probe.close()
                except UsageError as exc:
                    return _error(str(exc))
            if realtime and not _realtime_ok(path):
                skipped.append((name, "too long for a realtime target (meta realtime_ok false)"))
                print("%-24s skipped (too long for real time on %s)" % (name, target), file=out)
                continue
            started = time.perf_counter()
            try:
                result = run_one(path, target, options)
            except UsageError as exc:
                print("%-24s ERROR %s" % (name, exc), file=out)
                errors += 1
                continue
            results.append(result)
            if on_result is not None:
                on_result(result)
            bad = [r.id for r in result.results if not r.ok]
            print(
                "%-24s %s  %s virtual in %.2f s (%.0fx)%s"
                % (
                    name,
                    "pass" if result.ok else "FAIL",
                    _dur(result.duration_ms),
                    time.perf_counter() - started,
                    result.realtime_factor,
                    "" if result.ok else ": " + ", ".join(bad),
                ),
                file=out,
            )
        if report:
            try:
                from hil.replay.report import write_suite_report

                write_suite_report(results, report, skipped=skipped, plots=plots)
            except OSError as exc:
                return _error("cannot write the report to %s: %s" % (report, exc.strerror or exc))
            print("report: %s" % report, file=out)
    ok = not errors and all(r.ok for r in results)
    print(
        "suite %s: %d passed, %d failed, %d could not run, %d skipped"
        % (
            "PASS" if ok else "FAIL",
            sum(1 for r in results if r.ok),
            sum(1 for r in results if not r.ok),
            errors,
            len(skipped),
        ),
        file=out,
    )
    return 0 if ok else 1


def _realtime_ok(path: Path) -> bool:
    with TraceReader(path) as reader:
        meta: dict[str, Any] = reader.header.get("meta") or {}
    return meta.get("realtime_ok", True) is not False


def add_parsers(sub: _Subparsers[argparse.ArgumentParser]) -> None:
    add_replay_parser(sub)
    add_suite_parser(sub)
