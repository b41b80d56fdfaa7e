"""`python -m hil column`: a virtual column to point a gateway, the demo or a tool at.

    python -m hil column [--interp micropython|cpython]
                         [--link modbus-rtu|modbus-tcp|cbor-serial|cbor-tcp]
                         [--config FILE] [--port N] [--ev PROFILE|none]

Runs the real firmware app (hil.rig.vcolumn.VirtualColumn; on MicroPython from the .mpy
bundle, as a board loads it) with a simulated SDM meter and a simulated car
(hil.models.ev) that plugs in at the start and follows the pilot. It prints where to
connect (a pty path for the serial links, host:port for the TCP ones) and then one live
status line, until Ctrl-C or SIGTERM; then it stops everything it started and exits 0.
Exit 2: a user mistake (bad option, unreadable config), one `error:` line on stderr;
exit 1: the firmware died (its last output is printed).

A config that firmware/config.py rejects is still run: the column boots into its safe,
non-charging state and reports why on its link, which is worth seeing; the problems are
printed as warnings.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from firmware import status_names
from firmware.config import LINK_MODES

_Subparsers = argparse._SubParsersAction  # what ArgumentParser.add_subparsers() returns

DEFAULT_CONFIG: dict[str, Any] = {
    "column_id": "vcol-1", "bus_address": 1, "phases": 3,
    "hardware_rating_a": 32, "installation_rating_a": 32, "failsafe_a": 6,
    "meter": {"type": "sdm630", "address": 1, "baud": 9600},
    "link": {"mode": "modbus-rtu", "baud": 19200},
}
DEFAULT_BAUD = 19200
_STEP_S = 0.1
_BOOT_TIMEOUT_S = 30.0
_PP_32A_OHMS = 220


class UserError(Exception):
    """A mistake in the options or the config file: reported as one line, exit 2."""


def add_parser(subparsers: _Subparsers[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    from hil.models.ev_profiles import BUILTIN

    p = subparsers.add_parser(
        "column", help="run a virtual column (real firmware, simulated car and meter)",
        description="Run the column firmware with a simulated car and meter behind a Modbus RTU "
                    "serial port, a Modbus TCP port or the CBOR link, until Ctrl-C.")
    p.add_argument("--interp", choices=("micropython", "cpython"), default="micropython",
                   help="interpreter for the firmware (default micropython)")
    p.add_argument("--link", choices=LINK_MODES,
                   help="gateway link (default: the config's, else modbus-rtu)")
    p.add_argument("--config", metavar="FILE", help="column config (JSON, as commissioned)")
    p.add_argument("--port", type=int, metavar="N", help="TCP links: port to listen on (default: a free one)")
    p.add_argument("--host", default="127.0.0.1", help="TCP links: address to listen on (default 127.0.0.1)")
    p.add_argument("--ev", default="generic-3ph-11kw", metavar="PROFILE|none",
                   help="the car that plugs in: %s, or none" % ", ".join(sorted(BUILTIN)))
    p.add_argument("--soc", type=float, default=0.5, help="the car's state of charge at the start (0..1)")
    p.add_argument("--workdir", metavar="DIR",
                   help="the column's folder (energy store files persist there); default: a temp folder")
    p.add_argument("--symlink", metavar="PATH", help="serial links: also make PATH point at the pty")
    p.set_defaults(func=run)
    return p


def _error(message: str) -> int:
    print("error: %s" % message, file=sys.stderr)
    return 2


def build_config(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """The config to run, and the problems firmware/config.py finds in it."""
    from firmware.config import validate

    if args.config:
        path = Path(args.config)
        try:
            cfg = json.loads(path.read_text())
        except OSError as exc:
            raise UserError("cannot read config %s: %s" % (path, exc.strerror or exc)) from None
        except ValueError as exc:
            raise UserError("config %s is not valid JSON: %s" % (path, exc)) from None
        if not isinstance(cfg, dict):
            raise UserError("config %s: expected a JSON object" % path)
    else:
        cfg = json.loads(json.dumps(DEFAULT_CONFIG))
    link = dict(cfg.get("link") or {}) if isinstance(cfg.get("link"), dict) else {}
    mode = args.link or link.get("mode") or "modbus-rtu"
    if mode not in LINK_MODES:
        raise UserError("link mode %r is not one of %s" % (mode, ", ".join(LINK_MODES)))
    link["mode"] = mode
    if mode.endswith("-tcp"):
        if args.port is not None:
            if not 1 <= args.port <= 65535:
                raise UserError("--port %d is not in 1..65535" % args.port)
            link["tcp_port"] = args.port
        elif "tcp_port" not in link:
            from hil.rig.ports import free_port

            link["tcp_port"] = free_port()
        link["host"] = args.host
        link.pop("baud", None)
    else:
        if args.port is not None:
            raise UserError("--port applies to the TCP links (modbus-tcp, cbor-tcp), not %s" % mode)
        link.setdefault("baud", DEFAULT_BAUD)
        link.pop("tcp_port", None)
        link.pop("host", None)
    cfg["link"] = link
    return cfg, validate(cfg)


def _tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _where(cfg: dict[str, Any], link_path: str | None) -> str:
    link = cfg["link"]
    mode = link["mode"]
    unit = cfg.get("bus_address", "?")
    if mode == "modbus-rtu":
        return "%s (modbus-rtu, unit %s, %s baud 8N1)" % (link_path, unit, link["baud"])
    if mode == "cbor-serial":
        return "%s (cbor-serial, %s baud)" % (link_path, link["baud"])
    if mode == "modbus-tcp":
        return "%s:%s (modbus-tcp, unit %s)" % (link["host"], link["tcp_port"], unit)
    return "%s:%s (cbor-tcp)" % (link["host"], link["tcp_port"])


class _CarLoop:
    """The simulated car between the column's pilot and its meter, stepped in wall time."""

    def __init__(self, vcol: Any, profile_name: str, soc: float, phases: int) -> None:
        from hil.models.ev import EvModel
        from hil.models.ev_profiles import BUILTIN

        self.vcol = vcol
        self.t0 = time.monotonic()
        self.base_kwh = vcol.meter.import_kwh
        self.ev = None
        if profile_name != "none":
            self.ev = EvModel(BUILTIN[profile_name], now_ms=0, plugged=True, soc=soc,
                              column_phases=phases if phases in (1, 3) else 3)
        self.sent: dict[str, int] = {}

    def now_ms(self) -> int:
        return int((time.monotonic() - self.t0) * 1000)

    def step(self) -> dict[str, Any]:
        out = self.vcol.outputs()
        now = self.now_ms()
        ev = self.ev
        if ev is None:
            wanted = {"cp_mv": 12000, "diode": 1, "pp_ohms": -1}
        else:
            duty = int(out.get("duty", 10000))
            offered = int(out.get("offered_da", 0)) / 10 if 0 < duty < 10000 else 0.0
            ev.set_pilot(now, offered)
            ev.set_supply(now, bool(out.get("contactor", 0)))
            ev.step(now)
            wanted = {"cp_mv": ev.cp_high_mv, "diode": int(ev.diode_present), "pp_ohms": _PP_32A_OHMS}
            meter = self.vcol.meter
            meter.set_load(list(ev.phase_currents_a)[: meter.phases])
            meter.set_energy(import_kwh=self.base_kwh + ev.energy_wh / 1000.0)
        changed = {k: v for k, v in wanted.items() if self.sent.get(k) != v}
        if changed:
            self.vcol.board(**changed)
            self.sent.update(changed)
        return out

    def status_line(self, out: dict[str, Any]) -> str:
        ev = self.ev
        st = int(out.get("status", -1))
        name = status_names.STATUS_NAMES[st] if 0 <= st < len(status_names.STATUS_NAMES) else "booting"
        draw = ev.draw_a if ev is not None else 0.0
        car = ("car %s %.0f%% SoC" % (ev.cp_name, ev.soc * 100)) if ev is not None else "no car"
        heap = int(out.get("heap_used", 0))
        return ("%7.1f s  %-13s offer %4.1f A  draw %4.1f A  contactor %-6s  %s  meter %.3f kWh%s"
                % (time.monotonic() - self.t0, name, int(out.get("offered_da", 0)) / 10, draw,
                   "closed" if out.get("contactor") else "open", car, self.vcol.meter.import_kwh,
                   "  heap %d B" % heap if heap else ""))


def run(args: argparse.Namespace) -> int:
    from hil.models.ev_profiles import BUILTIN

    if args.ev != "none" and args.ev not in BUILTIN:
        return _error("unknown car %r; choose from %s or none" % (args.ev, ", ".join(sorted(BUILTIN))))
    if not 0.0 <= args.soc <= 1.0:
        return _error("--soc %s is not in 0..1" % args.soc)
    try:
        cfg, problems = build_config(args)
    except UserError as exc:
        return _error(str(exc))
    if args.symlink and cfg["link"]["mode"].endswith("-tcp"):
        return _error("--symlink applies to the serial links, not %s" % cfg["link"]["mode"])
    for problem in problems:
        print("warning: config: %s (the column boots into its safe state and reports it)" % problem)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve(args, cfg, stop)
    except UserError as exc:
        return _error(str(exc))
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _serve(args: argparse.Namespace, cfg: dict[str, Any], stop: threading.Event) -> int:
    from hil.replay.mpy import ColumnPower
    from hil.rig.vcolumn import VirtualColumn

    with ExitStack() as stack:
        if args.workdir:
            workdir = Path(args.workdir)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hil-column-")))
        bundle = None
        if args.interp == "micropython":
            from tools.firmware_build import BuildError, build

            try:
                bundle = build(out=Path(stack.enter_context(tempfile.TemporaryDirectory(
                    prefix="hil-bundle-"))) / "bundle").root
            except BuildError as exc:
                print("error: cannot build the firmware: %s" % exc, file=sys.stderr)
                return 1
        vcol = stack.enter_context(VirtualColumn(args.interp, workdir, cfg, bundle=bundle))
        output = ColumnPower(vcol)   # only to keep draining the firmware's output
        car = _CarLoop(vcol, args.ev, args.soc, int(cfg.get("phases", 3)))
        state = _wait_ready(vcol, cfg, car, stop)
        if state == "stopped":
            return 0
        if state != "ready":
            return _died(vcol, output, state)
        if args.symlink:
            link = Path(args.symlink)
            if link.is_symlink():
                link.unlink()
            try:
                link.symlink_to(vcol.link_path or "")
            except OSError as exc:
                raise UserError("cannot make the symlink %s: %s" % (link, exc.strerror or exc)) from None
            stack.callback(link.unlink, True)
        pid = vcol.proc.pid if vcol.proc else 0
        print("virtual column %s: firmware on %s (pid %d), folder %s"
              % (cfg.get("column_id", "?"), args.interp, pid, workdir))
        print("connect to: %s" % _where(cfg, args.symlink or vcol.link_path), flush=True)
        tty = sys.stdout.isatty()
        last_print = 0.0
        while not stop.wait(_STEP_S):
            if vcol.proc is None or vcol.proc.poll() is not None:
                return _died(vcol, output)
            out = car.step()
            now = time.monotonic()
            if tty:
                sys.stdout.write("\r" + car.status_line(out) + "\x1b[K")
                sys.stdout.flush()
            elif now - last_print >= 5.0:
                print(car.status_line(out), flush=True)
                last_print = now
        if tty:
            sys.stdout.write("\n")
        print("stopping virtual column %s" % cfg.get("column_id", "?"), flush=True)
    return 0


def _wait_ready(vcol: Any, cfg: dict[str, Any], car: _CarLoop, stop: threading.Event) -> str:
    """Wait until the board reports and (TCP links) the link accepts a connection:
    "ready", "stopped" (a signal came first), "died" or "timeout"."""
    link = cfg["link"]
    deadline = time.monotonic() + _BOOT_TIMEOUT_S
    while not stop.is_set():
        if vcol.proc is None or vcol.proc.poll() is not None:
            return "died"
        if car.step() and (not link["mode"].endswith("-tcp") or _tcp_open(link["host"], link["tcp_port"])):
            return "ready"
        if time.monotonic() > deadline:
            return "timeout"
        stop.wait(0.05)
    return "stopped"


def _died(vcol: Any, output: Any, why: str = "died") -> int:
    time.sleep(0.2)  # let the output drain
    code = vcol.proc.poll() if vcol.proc is not None else None
    what = ("did not come up within %.0f s" % _BOOT_TIMEOUT_S if why == "timeout"
            else "stopped (exit %s)" % code)
    print("error: the column's firmware %s; its last output:\n%s" % (what, output.output()[-3000:]),
          file=sys.stderr)
    return 1
