"""`python -m hil demo` (what `make run` runs): a whole charging site on this machine.

    python -m hil demo [--duration SECONDS] [--columns N] [--report DIR]
                       [--broker HOST:PORT] [--seed N] [--dno-limit A] [--plain]

Starts (hil.rig.site.SiteRig) a private mosquitto on a free loopback port (or uses the
broker `--broker` names), the gateway (`python -m gateway run`) with the example site
of examples/site.toml (its site, circuits and columns; the devices replaced by virtual
ones, the timings compressed), and N virtual columns running the real firmware: by
default two in the MicroPython unix port on one RS-485 bus (Modbus RTU over serial line
pairs joined by a bus relay), two on Modbus TCP, one on the CBOR link over TCP and one
on the CBOR link over a serial line (CPython). Cars (the calibrated EV model,
hil.rig.cars) arrive and leave on a seeded schedule compressed into the run; at a third
of the run a control-room client sends a signed DNO site limit valid for another third.

While it runs it shows the site and each column live, then it stops what it started
(the gateway first, which hands the columns their failsafes), prints a summary and
writes the HIL report into --report (hil.demo_report): summary.json, junit.xml and the
plots, plus the site file and the gateway's log. Exit status: 0 when every check passed
(the site and circuit limits kept within the response time, every offer within its
assignment, the DNO limit acknowledged, shown and expired, every column reporting), 1
when one failed or a part died, 2 when it cannot start (bad option, no mosquitto, an
unreachable broker). Ctrl-C or SIGTERM ends the run early, cleanly; the checks then
cover the part that ran.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import tomllib
from collections import deque
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from hil.rig.firmware_proc import REPO

if TYPE_CHECKING:   # imported when used: `python -m hil` loads this module for every command
    from hil.demo_report import SiteWatch
    from hil.demo_view import ColumnRow, SiteRow
    from hil.rig.dno_client import DnoClient
    from hil.rig.site import ColumnSpec, SiteRig

_Subparsers = argparse._SubParsersAction  # what ArgumentParser.add_subparsers() returns

EXAMPLE_SITE = REPO / "examples" / "site.toml"
DEFAULT_DURATION_S = 180.0
DEFAULT_COLUMNS = 6
MAX_COLUMNS = 24
DEFAULT_REPORT = Path("build") / "demo-report"
DEFAULT_DNO_LIMIT_A = 30.0
STEP_S = 0.1
GATEWAY_READY_S = 30.0
COLUMNS_ONLINE_S = 25.0
# Which link and interpreter the n-th column gets (cycled past six). CBOR columns run on
# CPython: the CBOR link needs more heap than the 128K the MicroPython columns get.
LINK_PLAN = (("modbus-rtu", "micropython"), ("modbus-rtu", "micropython"), ("modbus-tcp", "cpython"),
             ("modbus-tcp", "cpython"), ("cbor-tcp", "cpython"), ("cbor-serial", "cpython"))
INTERP_SHORT = {"micropython": "mpy", "cpython": "py"}
# The example's timings compressed so that a few minutes show rises, pauses and reclaims.
ALLOCATION = {"increase_delay_max_s": 5, "min_pause_s": 10, "rotation_s": 60, "reclaim_settle_s": 15,
              "overdraw_grace_s": 10}
SERVICE = {"control_interval_s": 0.5, "telemetry_interval_s": 1, "poll_period_s": 0.5,
           "heartbeat_period_s": 2, "limit_validity_s": 30}


# -- the site and its cars ---------------------------------------------------------------------

def site_plan(n_columns: int, example: Path = EXAMPLE_SITE) -> tuple[dict[str, Any], list[ColumnSpec]]:
    """The site file's tables and the columns: examples/site.toml's site, circuits and columns
    (cycled past its six, without their devices), each on a link from LINK_PLAN."""
    from hil.rig.site import ColumnSpec

    with open(example, "rb") as f:
        doc = tomllib.load(f)
    site = {k: v for k, v in doc["site"].items() if k != "id"}
    tables = {"site": site, "circuits": doc.get("circuits", {}),
              "allocation": {**doc.get("allocation", {}), **ALLOCATION}, "gateway": dict(SERVICE)}
    templates = doc["columns"]
    specs = []
    for k in range(n_columns):
        t = templates[k % len(templates)]
        link, interp = LINK_PLAN[k % len(LINK_PLAN)]
        specs.append(ColumnSpec(id="c%02d" % (k + 1), link=link, interp=interp, address=k + 1,
                                phases=int(t.get("phases", 3)), rotation=t.get("rotation"),
                                hardware_a=t.get("hardware_a", 32), installation_a=t.get("installation_a"),
                                circuit=t.get("circuit")))
    return tables, specs


# -- command line ------------------------------------------------------------------------------

def add_parser(subparsers: _Subparsers[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="run a whole virtual site on this machine (make run)",
        description="Run a whole charging site on this machine: a private broker, the gateway, virtual "
                    "columns running the real firmware (MicroPython on an RS-485 bus, Modbus TCP, CBOR "
                    "link), cars arriving and leaving, and a DNO curtailment that arrives and expires. "
                    "Exit 0 when the site kept every limit.")
    p.add_argument("--duration", type=_positive, default=DEFAULT_DURATION_S, metavar="SECONDS",
                   help="how long the site runs (default %.0f)" % DEFAULT_DURATION_S)
    p.add_argument("--columns", type=_column_count, default=DEFAULT_COLUMNS, metavar="N",
                   help="number of virtual columns, 1..%d (default %d)" % (MAX_COLUMNS, DEFAULT_COLUMNS))
    p.add_argument("--report", type=Path, default=DEFAULT_REPORT, metavar="DIR",
                   help="report folder (default %s)" % DEFAULT_REPORT)
    p.add_argument("--broker", type=_broker, default=None, metavar="HOST:PORT",
                   help="use this MQTT broker instead of starting a private mosquitto")
    p.add_argument("--seed", type=int, default=1, help="the cars' schedule (default 1)")
    p.add_argument("--dno-limit", type=_positive, default=DEFAULT_DNO_LIMIT_A, metavar="A",
                   help="the DNO's site limit per phase (default %.0f)" % DEFAULT_DNO_LIMIT_A)
    p.add_argument("--plain", action="store_true", help="plain periodic lines even on a terminal")
    p.set_defaults(func=run)
    return p


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a number: %r" % text) from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError("must be > 0: %r" % text)
    return value


def _column_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not a whole number: %r" % text) from None
    if not 1 <= value <= MAX_COLUMNS:
        raise argparse.ArgumentTypeError("must be 1..%d: %r" % (MAX_COLUMNS, text))
    return value


def _broker(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError("expected HOST:PORT, got %r" % text)
    return host, int(port)


# -- the run -------------------------------------------------------------------------------------

class _Stop:
    """SIGINT/SIGTERM ask the run to end; everything started is then stopped in order."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name = ""
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._on_signal)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.event.is_set():
            print("\nstill stopping what the demo started, please wait", file=sys.stderr, flush=True)
        self.signal_name = signal.Signals(signum).name
        self.event.set()


def run(args: argparse.Namespace) -> int:
    stop = _Stop()
    stop.install()
    try:
        with tempfile.TemporaryDirectory(prefix="evedge-demo-") as tmp:
            return _run(args, Path(tmp), stop)
    finally:
        stop.restore()


def _run(args: argparse.Namespace, workdir: Path, stop: _Stop) -> int:
    from hil.rig.site import RigError, RigStopped, SiteRig

    tables, specs = site_plan(args.columns)
    site_id = "demo" if args.broker is None else "demo-" + secrets.token_hex(3)
    print("evedge site demo: site %r, %d columns, %.0f s, seed %d"
          % (site_id, len(specs), args.duration, args.seed), flush=True)
    rig = SiteRig(workdir, site_id, specs, tables, broker=args.broker)
    try:
        rig.start(stop.event.is_set, progress=lambda line: print("  " + line, flush=True))
    except RigStopped:
        print("stopped (%s) before the site was up; everything started was stopped" % stop.signal_name)
        return 1
    except (RigError, FileNotFoundError) as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    with rig:
        demo = DemoRun(rig, specs, args, stop)
        code = None
        try:
            demo.connect()
            demo.loop()
        except OSError as exc:
            print("error: cannot follow the site on the broker %s:%d: %s"
                  % (rig.broker_host, rig.broker_port, exc), file=sys.stderr)
            code = 2
        except DemoFailed as exc:
            print("error: %s" % exc, file=sys.stderr)
            code = 1
        finally:
            demo.finish()
    if code is not None:
        return code
    return demo.report(args.report, workdir)


class DemoFailed(Exception):
    """A part of the site failed before the run could start."""


class DemoRun:
    """The running site: cars on the schedule, the DNO curtailment, the live view, the checks."""

    def __init__(self, rig: SiteRig, specs: list[ColumnSpec], args: argparse.Namespace, stop: _Stop) -> None:
        from hil.demo_view import LiveView
        from hil.rig.cars import CarPort, car_schedule

        self.rig = rig
        self.specs = {s.id: s for s in specs}
        self.args = args
        self.stop = stop
        self.duration_s = float(args.duration)
        self.ports = {s.id: CarPort(rig.columns[s.id], s.phases) for s in specs}
        self.visits = car_schedule([(s.id, s.phases) for s in specs], self.duration_s, args.seed)
        timeline: list[tuple[float, int, str, Any]] = []
        for n, v in enumerate(self.visits):
            timeline.append((v.arrive_s, n, "arrive", v))
            if v.leave_s is not None:
                timeline.append((v.leave_s, n, "leave", v))
        self.dno_validity_s = max(1, round(self.duration_s / 3))
        timeline.append((self.duration_s / 3, -1, "dno", None))
        self.timeline = deque(sorted(timeline, key=lambda e: (e[0], e[1])))
        self.events: deque[tuple[float, str]] = deque(maxlen=50)
        self.view = LiveView("evedge site demo: site %s, %d columns" % (rig.site_id, len(specs)),
                             tty=False if args.plain else None)
        self.watch: SiteWatch | None = None
        self.dno: DnoClient | None = None
        self.t0 = 0.0
        self.ended_ms = 0
        self.iterations = 0
        self.interrupted = False
        self.failures: list[str] = []
        self.gateway_exit: int | None = None
        self.wall0 = time.monotonic()

    @property
    def _watch(self) -> SiteWatch:
        assert self.watch is not None, "connect() first"
        return self.watch

    @property
    def _dno(self) -> DnoClient:
        assert self.dno is not None, "connect() first"
        return self.dno

    # -- start -----------------------------------------------------------------------------------
    def connect(self) -> None:
        """The control room's client on the broker; waits for the gateway's birth message."""
        from gateway.core.failsafe import plan_failsafe
        from gateway.north import payloads, topics
        from hil.demo_report import SiteWatch

        started_utc = payloads.utc_ms()
        self.dno = dno = self.rig.dno_client()
        deadline = time.monotonic() + GATEWAY_READY_S
        state_topic = topics.gateway_state(self.rig.site_id)
        while not any(m.topic == state_topic and m.payload.get("state") == "online"
                      and m.payload.get("ts_ms", 0) >= started_utc - 60_000 for m in dno.snapshot()):
            if self.stop.event.is_set():
                raise DemoFailed("stopped (%s) before the gateway was online" % self.stop.signal_name)
            if not self.rig.gateway_alive():
                raise DemoFailed("the gateway stopped at its start; its log ends:\n" + self._gateway_log())
            if time.monotonic() > deadline:
                raise DemoFailed("the gateway was not online within %.0f s; its log ends:\n%s"
                                 % (GATEWAY_READY_S, self._gateway_log()))
            time.sleep(0.05)
        self._wait_columns_online()
        site = self.rig.site
        info = {cid: {"link": s.link, "interp": s.interp, "phases": s.phases, "circuit": s.circuit,
                      "rating_a": s.rating_a, "failsafe_a": self.rig.tuning.failsafe_a}
                for cid, s in self.specs.items()}
        self.t0 = time.monotonic()
        self.watch = SiteWatch(site, info, t0_utc_ms=payloads.utc_ms(),
                               failsafe_a=plan_failsafe(site).limits_a)
        self._note(0.0, "the site runs for %.0f s" % self.duration_s)

    def _wait_columns_online(self) -> None:
        """Until the gateway reports every column online (a CBOR column on a serial line boots
        again only every 10 s when its first boot went unheard), at most COLUMNS_ONLINE_S."""
        from gateway.north import topics

        site = self.rig.site_id
        wanted = {topics.column_status(site, cid): cid for cid in self.specs}
        start = time.monotonic()
        said = False
        while True:
            online = {wanted[m.topic] for m in self._dno.snapshot()
                      if m.topic in wanted and m.payload.get("online")}
            missing = sorted(set(self.specs) - online)
            waited = time.monotonic() - start
            if not missing or self.stop.event.is_set():
                return
            if waited > COLUMNS_ONLINE_S:
                print("  not online after %.0f s: %s (the run goes on without them)"
                      % (COLUMNS_ONLINE_S, ", ".join(missing)), flush=True)
                return
            if not said and waited > 1.0:
                said = True
                print("  waiting for the gateway to see %s online (a CBOR column boots again every 10 s)"
                      % ", ".join(missing), flush=True)
            if not self.rig.gateway_alive():
                raise DemoFailed("the gateway stopped at its start; its log ends:\n" + self._gateway_log())
            time.sleep(0.05)

    def _gateway_log(self, lines: int = 15) -> str:
        try:
            text = (self.rig.workdir / "gateway.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- run -------------------------------------------------------------------------------------
    def loop(self) -> None:
        """Every STEP_S: the schedule, the cars, a sample for the checks, the messages, the view."""
        watch, ports = self._watch, self.ports
        next_t = time.monotonic()
        cursor = 0
        last_health = 0.0
        while not self.stop.event.is_set():
            t_s = time.monotonic() - self.t0
            if t_s >= self.duration_s:
                break
            t_ms = int(t_s * 1000)
            self._due(t_s, t_ms)
            for port in ports.values():
                port.step(t_ms)
            watch.sample(t_ms, {c: p.currents_a for c, p in ports.items()},
                         {c: p.offered_a for c, p in ports.items()},
                         {c: p.energy_wh for c, p in ports.items()})
            fresh = self._dno.snapshot(cursor)
            cursor += len(fresh)
            for msg in fresh:
                line = watch.message(msg)
                if line:
                    ts = msg.payload.get("ts_ms")
                    self._note(max(watch.t_of(ts) / 1000.0, 0.0) if isinstance(ts, int) else t_s, line)
            self.iterations += 1
            self.ended_ms = t_ms
            if t_s - last_health >= 1.0 and not self.stop.event.is_set():
                last_health = t_s
                if not self._healthy(t_s):
                    break
            self.view.update(self.site_row(t_s), self.column_rows(), self.events)
            next_t += STEP_S
            delay = next_t - time.monotonic()
            if delay > 0:
                self.stop.event.wait(delay)
            else:
                next_t = time.monotonic()
        self.interrupted = self.stop.event.is_set()

    def _due(self, t_s: float, t_ms: int) -> None:
        while self.timeline and self.timeline[0][0] <= t_s:
            _at, _n, kind, visit = self.timeline.popleft()
            if kind == "dno":
                self._send_dno(t_ms)
                continue
            port = self.ports[visit.column]
            if kind == "arrive":
                port.arrive(t_ms, visit.profile, visit.soc)
                self._note(t_s, "%s: a car arrives (%s, %.0f%% charged)"
                           % (visit.column, visit.profile, visit.soc * 100))
            else:
                energy = port.ev.session_wh if port.ev is not None else 0.0
                port.leave(t_ms)
                self._note(t_s, "%s: the car leaves after taking %.0f Wh" % (visit.column, energy))

    def _send_dno(self, t_ms: int) -> None:
        from hil.demo_report import DnoCurtailment
        from hil.rig.dno_client import REPLIES

        limit = float(self.args.dno_limit)
        topic, cmd = self._dno.site_limit(limit, validity_s=self.dno_validity_s)
        watch = self._watch
        watch.dno = DnoCurtailment(limit, self.dno_validity_s, sent_ms=t_ms, command_id=cmd["id"],
                                   until_ms=watch.t_of(cmd["issued_ms"]) + self.dno_validity_s * 1000)
        self._dno.publish(topic, cmd, reply_to="%s/%s" % (REPLIES, self.rig.site_id),
                         correlation=cmd["id"].encode())
        self._note(t_ms / 1000.0, "DNO: signed site limit %.0f A per phase for %d s sent (%s)"
                   % (limit, self.dno_validity_s, cmd["id"]))

    def _healthy(self, t_s: float) -> bool:
        failures = []
        if not self.rig.gateway_alive():
            failures.append("the gateway stopped at %.0f s; its log ends:\n%s" % (t_s, self._gateway_log()))
        for cid in self.rig.dead_columns():
            failures.append("column %s's firmware stopped at %.0f s; its output ends:\n%s"
                            % (cid, t_s, self.rig.outputs[cid].output(0.5)[-1500:]))
        for failure in failures:
            self._note(t_s, failure.splitlines()[0])
        self.failures += failures
        return not failures

    def _note(self, t_s: float, text: str) -> None:
        self.events.append((t_s, text))
        self.view.note(t_s, text)

    # -- the live view's rows --------------------------------------------------------------------
    def site_row(self, t_s: float) -> SiteRow:
        from hil.demo_view import SiteRow

        tele = self._watch.site_telemetry
        until = tele.get("limit_valid_until_ms")
        return SiteRow(t_s=t_s, duration_s=self.duration_s, power_w=tele.get("power_w"),
                       current_a=tele.get("current_a"), limit_a=tele.get("limit_a"),
                       source=tele.get("limit_source"),
                       valid_until_s=self._watch.t_of(until) / 1000.0 if isinstance(until, int) else None,
                       sessions=tele.get("active_sessions"), voltage_v=float(self.rig.site.voltage_v))

    def column_rows(self) -> list[ColumnRow]:
        from hil.demo_view import ColumnRow

        rows = []
        for cid, spec in self.specs.items():
            seen = self._watch.columns[cid]
            tele, status = seen.telemetry, seen.status
            current = tele.get("current_a")
            rows.append(ColumnRow(
                id=cid, link=spec.link, interp=INTERP_SHORT.get(spec.interp, spec.interp),
                status=str(status.get("status") or tele.get("status") or "-"),
                cp=str(tele.get("state") or status.get("state") or "-"),
                offered_a=self.ports[cid].offered_a, limit_a=tele.get("applied_limit_a"),
                measured_a=max(current) if current else None, energy_wh=tele.get("energy_wh"),
                car=self.ports[cid].describe(), online=bool(status.get("online", True))))
        return rows

    # -- end -------------------------------------------------------------------------------------
    def finish(self) -> None:
        """The last view, then stop the gateway (it hands the columns their failsafes) and the
        DNO client; the rig stops the rest."""
        if self.watch is not None:
            t_s = self.ended_ms / 1000.0
            if self.interrupted:
                self._note(t_s, "stopping early (%s)" % (self.stop.signal_name or "interrupted"))
            self.view.update(self.site_row(t_s), self.column_rows(), self.events, force=True)
        self.view.close()
        print("stopping: the gateway (it hands the columns their failsafes), the bus, the columns%s"
              % (", the broker" if self.rig.embedded_broker else ""), flush=True)
        self.gateway_exit = self.rig.stop_gateway()
        if self.dno is not None:
            self.dno.close()
            self.dno = None

    def report(self, folder: Path, workdir: Path) -> int:
        """Judge, write the report folder, print the summary; the exit status."""
        from hil.demo_report import RunFacts, process_result, summary_lines, write_demo_report

        watch = self._watch
        results = watch.results(self.ended_ms)
        results.append(process_result(self.failures, self.gateway_exit))
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("column-*.png"):
            old.unlink()
        copied = []
        for name in ("site.toml", "gateway.log", "dno-audit.jsonl"):
            if (workdir / name).exists():
                shutil.copyfile(workdir / name, folder / name)
                copied.append(name)
        facts = RunFacts(
            site_id=self.rig.site_id, broker="%s:%d" % (self.rig.broker_host, self.rig.broker_port),
            embedded_broker=self.rig.embedded_broker, ran_s=self.ended_ms / 1000.0, seed=self.args.seed,
            interrupted=self.stop.signal_name if self.interrupted else "", gateway_exit=self.gateway_exit,
            columns=[(s.id, s.link, INTERP_SHORT.get(s.interp, s.interp)) for s in self.specs.values()],
            visits=["%s %s %.0f-%s s" % (v.column, v.profile, v.arrive_s,
                                         "end" if v.leave_s is None else "%.0f" % v.leave_s)
                    for v in self.visits])
        files = write_demo_report(folder, watch=watch, results=results, facts=facts,
                                  wall_s=time.monotonic() - self.wall0, iterations=self.iterations)
        ok = all(r.ok for r in results)
        for line in summary_lines(watch, results, facts, folder, [p.name for p in files] + copied):
            print(line)
        sys.stdout.flush()
        return 0 if ok else 1
