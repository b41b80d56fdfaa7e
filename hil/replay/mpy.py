"""`mpy`: every column's whole firmware app in its own MicroPython unix port process
(or CPython, `interp="cpython"`), in real time (see hil.replay.target).

Each column is a hil.rig.vcolumn.VirtualColumn: the firmware (the .mpy bundle that
tools.firmware_build makes, as a board loads it) runs hil/vcolumn_main.py with a
simulated SDM meter on its meter line, the board's analogue world on a JSON-lines I/O
line and a Modbus RTU link (the config's link section is replaced by
{"mode": "modbus-rtu"}). The harness plays the gateway on that link with the same
Modbus master as the `serial:` target (hil.replay.column_link.ModbusBus): assignments
as FC16 writes, heartbeats while the gateway is not silent, input-register polls.

What is observed comes from the board line with its tap on (hil.replay.tap, as on the
`site` target): the outputs, and what the link actually handed each firmware
(`gateway_writes()`, `reports_writes`): the engine judges the column's offer against an
assignment from when the firmware received it (after the master's turn, retries on a
noisy wire, a reboot), not from when its gateway model decided it.

`power_cut` kills the column's process (SIGKILL: no shutdown code runs, as when the
supply drops) and starts it again, on the same lines and in the same working folder,
when trace time reaches the end of the cut: the energy store's files are what survives.

Bus noise: each column's link runs through a stretch of faulty wire (a SerialPair with
a hil.bus_faults.BusFaults manipulator, clean until told otherwise), so the engine's
`link_fault` hook puts real dropped, corrupted and delayed bytes on it; `link_faults`
gives a manipulator of your own instead (for every column, or per column id), and
`fault_wire=False` connects the link directly.

Additions to the Target contract (optional): `link_faults`, `fault_wire`, `link_fault`,
`gateway_writes`, `reports_writes`, `workdir` (kept after close when given), `vcolumn(column_id)`,
`column_output(column_id)` (the tail of what its firmware printed), and as for every
realtime target (hil.replay.realtime) `stats(column_id)`, `registers(column_id)`,
`max_lag_ms`, `TargetError`.
`ColumnPower` is the process power switch, also usable as the `power` of a SerialTarget
whose board is a VirtualColumn.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import tempfile
import termios
import threading
import time
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from hil.bus_faults import BusFaults, LineSplice
from hil.replay.column_link import DEFAULT_BAUD, ModbusBus, TargetError
from hil.replay.realtime import Column
from hil.replay.tap import TapColumns
from hil.rig.firmware_proc import INTERPRETERS, start_firmware
from hil.rig.serial_pair import Manipulator, SerialPair
from hil.rig.vcolumn import RUNNER, VirtualColumn

__all__ = ["ColumnPower", "MpyTarget", "TargetError"]


def _drain(stream: IO[bytes], tail: collections.deque[str]) -> None:
    """Keep reading a process's output so it never blocks on a full pipe; keep the tail."""
    try:
        for line in iter(stream.readline, b""):
            tail.append(line.decode(errors="replace").rstrip())
    except (OSError, ValueError):
        pass  # the pipe was closed under us at shutdown


def _flush_input(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return
    try:
        termios.tcflush(fd, termios.TCIFLUSH)
    except termios.error:
        pass  # not a tty
    finally:
        os.close(fd)


class ColumnPower:
    """The supply of a VirtualColumn's firmware: `power(False)` kills the process (no
    shutdown code runs), `power(True)` starts it again with the same lines, working
    folder (energy store files) and interpreter. The tail of its output is kept."""

    def __init__(self, vcol: VirtualColumn, tail_lines: int = 200) -> None:
        self.vcol = vcol
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.cuts = 0
        self._args: list[str] | None = None
        self._drainer: threading.Thread | None = None
        self._watch()

    def _watch(self) -> None:
        proc = self.vcol.proc
        if proc is not None and proc.stdout is not None:
            self._drainer = threading.Thread(target=_drain, args=(proc.stdout, self.tail),
                                             name="vcolumn-output", daemon=True)
            self._drainer.start()

    def __call__(self, on: bool) -> None:
        (self.on if on else self.off)()

    def off(self) -> None:
        proc = self.vcol.proc
        if proc is None:
            return
        self._args = [str(a) for a in proc.args][-4:]   # vcolumn_main.py's four line arguments
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired as exc:
            raise TargetError("column process %d does not die" % proc.pid) from exc
        self.vcol.proc = None
        self.cuts += 1

    def on(self) -> None:
        if self.vcol.proc is not None or self._args is None:
            return
        vcol = self.vcol
        # A board's UARTs start empty; the pty ends still hold what arrived while it was
        # off (a meter reply to the last request, say), so empty them as a reset would.
        for path in self._args[1:]:
            if path != "-":
                _flush_input(path)
        vcol.proc = start_firmware(vcol.interp, RUNNER, self._args, cwd=vcol.workdir,
                                   bundle=vcol.bundle, heap=vcol.heap)
        self._watch()

    def output(self, wait_s: float = 0.0) -> str:
        """The tail of the firmware's output; wait_s lets a dead process's last lines in."""
        if wait_s and self._drainer is not None:
            self._drainer.join(wait_s)
        return "\n".join(self.tail)


def _folder_name(column_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", column_id) or "column"


class MpyTarget(TapColumns):
    """Virtual columns running the real firmware, one process each."""

    def __init__(self, interp: str = "micropython", speed: float | str | None = 1.0,
                 bundle: Path | None = None, *, workdir: Path | None = None,
                 link_faults: Manipulator | Mapping[str, Manipulator] | None = None,
                 fault_wire: bool = True,
                 heap: str = "128K", poll_s: float = 0.1, timeout_s: float | None = None,
                 retries: int = 3, boot_timeout_s: float = 20.0) -> None:
        if interp not in INTERPRETERS:
            raise TargetError("unknown interpreter %r; choose from %s" % (interp, ", ".join(INTERPRETERS)))
        super().__init__(speed, boot_timeout_s)
        self.interp = interp
        self.bundle = Path(bundle) if bundle is not None else None
        self.workdir = Path(workdir) if workdir is not None else None
        self.link_faults = link_faults
        self.fault_wire = fault_wire
        self.heap = heap
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.retries = retries
        self._stack = ExitStack()
        self._vcols: dict[str, VirtualColumn] = {}
        self._powers: dict[str, ColumnPower] = {}

    def vcolumn(self, column_id: str) -> VirtualColumn:
        self._column(column_id)
        return self._vcols[column_id]

    def start(self, columns: dict[str, dict[str, object]]) -> None:
        if not columns:
            raise TargetError("no columns to start")
        try:
            self._start(columns)
        except BaseException:
            self.close()
            raise

    def _prepare(self) -> Path:
        if self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            root = self.workdir
        else:
            root = Path(tempfile.mkdtemp(prefix="hil-mpy-"))
            self._stack.callback(shutil.rmtree, root, True)
        if self.interp == "micropython" and self.bundle is None:
            from tools.firmware_build import BuildError, build

            try:
                self.bundle = build(out=root / "bundle").root
            except BuildError as exc:
                raise TargetError("cannot build the firmware bundle: %s" % exc) from exc
        return root

    def _faults_for(self, column_id: str) -> Manipulator | None:
        faults = self.link_faults
        if faults is None or not isinstance(faults, Mapping):
            return faults
        return faults.get(column_id)

    def _start(self, columns: dict[str, dict[str, Any]]) -> None:
        root = self._prepare()
        stack = self._stack
        for column_id, given in columns.items():
            cfg = dict(given)
            link = given.get("link") if isinstance(given.get("link"), dict) else {}
            cfg["link"] = {"mode": "modbus-rtu", "baud": int(link.get("baud", DEFAULT_BAUD))}
            vcol = stack.enter_context(VirtualColumn(self.interp, root / _folder_name(column_id), cfg,
                                                     bundle=self.bundle, heap=self.heap))
            self._vcols[column_id] = vcol
            power = ColumnPower(vcol)
            self._powers[column_id] = power
            assert vcol.link_path is not None
            port = vcol.link_path
            faults = self._faults_for(column_id)
            if faults is None and self.fault_wire:
                faults = BusFaults(seed=len(self.columns))   # clean until link_fault() says otherwise
            if faults is not None:
                wire = stack.enter_context(SerialPair(manipulator=faults))
                stack.enter_context(LineSplice(wire.b_path, vcol.link_path))
                port = wire.a_path
            bus = ModbusBus(port, baud=cfg["link"]["baud"], timeout_s=self.timeout_s,
                            retries=self.retries, poll_s=self.poll_s, name="mpy-link-%s" % column_id)
            bus.add_unit(column_id, int(cfg["bus_address"]), float(cfg.get("heartbeat_timeout_s", 60)))
            stack.callback(bus.close)
            bus.start()
            col = Column(column_id, cfg, bus, board=vcol, meter=vcol.meter, power=power,
                         faults=faults if isinstance(faults, BusFaults) else None)
            self.columns[column_id] = col
            self._tap_on(col, vcol)
        try:
            self._wait_booted()
            self._wait_tapped(self.boot_timeout_s)
            self._t0 = time.monotonic()   # trace time 0: every column answers and reports
        except TargetError as exc:
            tails = ["--- %s output ---\n%s" % (cid, p.output()[-2000:]) for cid, p in self._powers.items()]
            raise TargetError("%s\n%s" % (exc, "\n".join(tails))) from None

    def _check_alive(self, col: Column) -> None:
        vcol = self._vcols.get(col.column_id)
        proc = vcol.proc if vcol is not None else None
        code = proc.poll() if proc is not None else None
        if code is not None:
            raise TargetError("column %s: its firmware stopped (exit %s); its last output:\n%s"
                              % (col.column_id, code, self._powers[col.column_id].output(wait_s=1.0)[-2000:]))

    def column_output(self, column_id: str) -> str:
        """The tail of what a column's firmware printed."""
        self._column(column_id)
        return self._powers[column_id].output()

    def close(self) -> None:
        self._stack.close()
