"""`python -m hil soak` (what `make soak` runs): a whole site under a seeded fault schedule.

    python -m hil soak [--duration S] [--columns N] [--seed S] [--report DIR]

A real mosquitto, the real gateway process and N virtual columns running the real
firmware (Modbus RTU on one RS-485 bus, a few of them in MicroPython, Modbus TCP, CBOR
over TCP and over a serial line), cars charging, 1 Hz telemetry and a signed DNO limit
every few seconds, while broker restarts, gateway SIGKILLs with restarts, column
SIGKILLs with restarts, 1 % bus noise, a column that stops answering and a failing meter
come and go on a printed, seeded schedule. Then it judges what the control room, the
boards and the gateway's files saw (hil.soak.judge), prints a table and writes
summary.json and report.md into --report. Exit 0 when every check passed, 1 when one
failed, 2 when the site could not start.

Parts: plan (site, schedule, commands), run (the rigs and the loop), observer (the
control room's consumer), judge (the checks), report.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

DEFAULT_DURATION_S = 600.0
DEFAULT_COLUMNS = 20
MAX_COLUMNS = 40
DEFAULT_REPORT = Path("build") / "soak"
MIN_DURATION_S = 60.0

_Subparsers = argparse._SubParsersAction  # what ArgumentParser.add_subparsers() returns


def add_parser(subparsers: _Subparsers[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "soak",
        help="run a whole virtual site under a fault schedule and judge it (make soak)",
        description="A whole site (mosquitto, the gateway, virtual columns running the firmware, cars, "
        "DNO limits every few seconds) under seeded faults: broker restarts, gateway and column "
        "SIGKILLs, bus noise, a silent column, a failing meter. Exit 0 when every check passed.",
    )
    p.add_argument(
        "--duration",
        type=_duration,
        default=DEFAULT_DURATION_S,
        metavar="S",
        help="how long the site runs (default %.0f; at least %.0f)" % (DEFAULT_DURATION_S, MIN_DURATION_S),
    )
    p.add_argument(
        "--columns",
        type=_columns,
        default=DEFAULT_COLUMNS,
        metavar="N",
        help="virtual columns, 4..%d (default %d)" % (MAX_COLUMNS, DEFAULT_COLUMNS),
    )
    p.add_argument("--seed", type=int, default=1, help="the fault schedule, the DNO and the cars (default 1)")
    p.add_argument(
        "--report",
        type=Path,
        default=DEFAULT_REPORT,
        metavar="DIR",
        help="report folder (default %s)" % DEFAULT_REPORT,
    )
    p.set_defaults(func=run)
    return p


def _duration(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % text) from None
    if not MIN_DURATION_S <= value <= 86400:
        raise argparse.ArgumentTypeError("must be %.0f..86400 s: %r" % (MIN_DURATION_S, text))
    return value


def _columns(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a whole number: %r" % text) from None
    if not 4 <= value <= MAX_COLUMNS:
        raise argparse.ArgumentTypeError("must be 4..%d: %r" % (MAX_COLUMNS, text))
    return value


class _Stop:
    """SIGINT/SIGTERM end the run early; everything started is stopped, the part that ran judged."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self.event.set()


def run(args: argparse.Namespace) -> int:
    stop = _Stop()
    stop.install()
    try:
        with tempfile.TemporaryDirectory(prefix="evedge-soak-") as tmp:
            return soak(
                args.duration,
                args.columns,
                args.seed,
                report=args.report,
                workdir=Path(tmp),
                should_stop=stop.event.is_set,
            )
    finally:
        stop.restore()


def soak(
    duration_s: float,
    columns: int,
    seed: int,
    *,
    report: Path | None,
    workdir: Path,
    should_stop: Callable[[], bool] = lambda: False,
    log: Callable[[str], None] = print,
) -> int:
    """One soak: plan, run, judge, report. The exit status (0 passed, 1 failed, 2 could not start)."""
    from hil.rig.site import RigError, RigStopped
    from hil.soak import report as soak_report
    from hil.soak.judge import judge
    from hil.soak.plan import COMMAND_GAP_S, make_plan
    from hil.soak.run import SoakRun

    def say(line: str) -> None:
        log(line)
        sys.stdout.flush()

    wall0 = time.monotonic()
    plan = make_plan(duration_s, columns, seed)
    say("evedge fault soak: %d columns, %.0f s, seed %d" % (columns, duration_s, seed))
    say("fault schedule (s from the start):")
    for f in plan.faults:
        say("  " + f.describe())
    say("DNO: %d signed limits, one every %.0f-%.0f s" % (len(plan.commands), *COMMAND_GAP_S))
    soak_run = SoakRun(plan, workdir, log=say, should_stop=should_stop)
    try:
        try:
            soak_run.start()
        except (RigStopped, RigError, RuntimeError, TimeoutError, OSError) as exc:
            say("error: the site did not start: %s" % exc)
            return 2
        soak_run.run()
        say("stopping: the gateway (clean), then a heartbeat timeout more for the columns' failsafes")
        recording = soak_run.finish()
    finally:
        soak_run.close()
    results = judge(recording)
    info = soak_report.facts(recording, time.monotonic() - wall0)
    if report is not None:
        soak_report.write(report, recording, results, info)
        soak_run.keep_files(report)
    for line in soak_report.summary_lines(recording, results, info, report):
        say(line)
    return 0 if all(r.ok for r in results) else 1
