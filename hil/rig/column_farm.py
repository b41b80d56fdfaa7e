"""A column farm: many virtual columns running the real firmware in ONE process.

A VirtualColumn is the firmware app in a process of its own, with a meter server and line
relays beside it: a few % of a core each even when idle, so a 100-column site does not fit
on a small machine. The farm (hil/column_farm_main.py, CPython or the MicroPython unix
port, from the .mpy bundle) hosts every column in one interpreter, each its own
firmware.app.App on a virtual board of its own, built by the app's boot code and running
its own control task and link server; one asyncio loop drives them all. What the farm
does not have per column: a WDT (columns are built with use_wdt=False, so the control task,
which feeds a board's WDT, feeds nothing), and a meter process (each column's meter
answers in-process, read by the column's own meter driver).

Link modes: modbus-tcp and cbor-tcp columns listen on their own ports; modbus-rtu columns
share ONE serial line, `farm.bus_path`, as the columns of one RS-485 bus do: a gateway (or
bench/paced_bus.PacedBusRelay) opens it and every column hears every frame, answering to its
own bus address. A CBOR serial link is point to point: a farm holds at most one such column
(on that line).

Each hosted column is a `FarmColumn` with the surface the rigs use on a VirtualColumn:
`config`, `board(...)`, `outputs()`, `board_log` (with the firmware's own `t`), `meter.
set_load(...)`, `link_path`, `proc`, `close()` (stops that column alone).

    with ColumnFarm("micropython", work, configs, bundle=bundle) as farm:
        for col in farm.columns: ...
"""

from __future__ import annotations

import json
import os
import pty
import random
import select
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from hil.rig.bus_relay import raw_mode, write_all
from hil.rig.firmware_proc import REPO, firmware_command, firmware_env, stop_process
from hil.rig.serial_pair import SerialPair

RUNNER = REPO / "hil" / "column_farm_main.py"
SERIAL_LINKS = ("modbus-rtu", "cbor-serial")
# The heap of a MicroPython farm: the firmware's code once, plus each column's data (about
# 20 KB on the 64-bit unix port) and its share of the loop.
HEAP_BASE_KB = 512
HEAP_PER_COLUMN_KB = 40


def tcp_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct free ports for hosted columns to listen on, below the kernel's ephemeral
    range: the gateway's own connections (and everything else's) take their local ports
    from that range, and a farm binds a hundred ports over a few seconds."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    chosen: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(chosen) < n:
            port = rng.randrange(10000, max(10001, low))
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind((host, port))
            except OSError:
                sock.close()
                continue
            held.append(sock)      # held until every port is chosen: no port twice
            chosen.append(port)
    finally:
        for sock in held:
            sock.close()
    return chosen


class FarmError(RuntimeError):
    """The farm did not come up; the message holds the end of its log."""


class FarmMeter:
    """A hosted column's meter: what it measures."""

    def __init__(self, farm: ColumnFarm, index: int) -> None:
        self._farm = farm
        self._index = index

    def set_load(self, current_a: float | Sequence[float]) -> None:
        """Phase currents in A (one value: every phase); power follows at 230 V."""
        amps = [float(current_a)] * 3 if isinstance(current_a, int | float) else [float(a) for a in current_a]
        self._farm.send({"i": self._index, "load_a": amps})


class FarmColumn:
    """One column of the farm (see the module docstring)."""

    def __init__(self, farm: ColumnFarm, index: int, config: dict[str, Any]) -> None:
        self.farm = farm
        self.index = index
        self.config = config
        self.meter = FarmMeter(farm, index)
        self.board_log: list[dict[str, int]] = []
        self.stopped = False

    @property
    def link_path(self) -> str | None:
        """The gateway's end of this column's serial line (shared by the farm's serial columns)."""
        mode = self.config.get("link", {}).get("mode")
        return self.farm.bus_path if mode in SERIAL_LINKS else None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The farm's process (every column's)."""
        return self.farm.proc

    def board(self, **inputs: int) -> None:
        """Set CP voltage (cp_mv), diode, PP resistance (pp_ohms), RCD, contactor feedback (fb)."""
        self.farm.send({"i": self.index, **inputs})

    def outputs(self) -> dict[str, int]:
        """The latest board outputs (duty, contactor, offered_da, status, t)."""
        return self.board_log[-1] if self.board_log else {}

    def close(self) -> None:
        """Stop this column (its tasks and its server); the others run on."""
        if not self.stopped and self.farm.proc is not None:
            self.farm.send({"i": self.index, "stop": 1})
            self.farm.wait_for(lambda: self.stopped, 10.0, f"column {self.index} to stop")


class ColumnFarm:
    """Start with `with ColumnFarm(...) as farm:`; everything it starts is stopped on exit."""

    def __init__(self, interp: str, workdir: Path, configs: Sequence[dict[str, Any]], *,
                 bundle: Path | None = None, heap: str | None = None, start_timeout_s: float = 120.0) -> None:
        self.interp = interp
        self.workdir = workdir
        self.bundle = bundle
        self.heap = heap or f"{HEAP_BASE_KB + HEAP_PER_COLUMN_KB * len(configs)}K"
        self.start_timeout_s = start_timeout_s
        self.columns = [FarmColumn(self, i, dict(cfg)) for i, cfg in enumerate(configs)]
        serial = [c.config.get("link", {}).get("mode") for c in self.columns]
        serial = [m for m in serial if m in SERIAL_LINKS]
        if "cbor-serial" in serial and len(serial) > 1:
            raise ValueError("a CBOR serial link is point to point: one such column per farm, and no "
                             "other serial column beside it")
        self.bus_path: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready = False
        self._stack = ExitStack()
        self._io = -1
        self._buf = b""
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = -1, -1
        self._reader: threading.Thread | None = None

    # -- lifetime ---------------------------------------------------------------------------
    def __enter__(self) -> ColumnFarm:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def log_path(self) -> Path:
        return self.workdir / "farm.log"

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        folders = []
        for col in self.columns:
            folder = f"c{col.index:03d}"
            (self.workdir / folder).mkdir(exist_ok=True)
            (self.workdir / folder / "column.json").write_text(json.dumps(col.config))
            folders.append(folder)
        (self.workdir / "farm.json").write_text(json.dumps({"columns": folders}))
        master, slave = pty.openpty()
        self._stack.callback(os.close, master)
        self._stack.callback(os.close, slave)
        raw_mode(master)
        raw_mode(slave)
        os.set_blocking(master, False)
        self._io = master
        bus_arg = "-"
        if any(c.config.get("link", {}).get("mode") in SERIAL_LINKS for c in self.columns):
            line = self._stack.enter_context(SerialPair())
            self.bus_path = line.a_path
            bus_arg = line.b_path
        self._stop_r, self._stop_w = os.pipe()
        self._stack.callback(os.close, self._stop_r)
        self._stack.callback(os.close, self._stop_w)
        self._reader = threading.Thread(target=self._read_loop, name="column-farm-io", daemon=True)
        self._reader.start()
        self._stack.callback(self._stop_reader)
        log = self._stack.enter_context(open(self.log_path, "wb"))
        self.proc = subprocess.Popen(
            firmware_command(self.interp, RUNNER, ["farm.json", os.ttyname(slave), bus_arg], self.heap),
            cwd=self.workdir, env=firmware_env(None, self.bundle), stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT)
        self._stack.callback(self._stop_proc)
        self.wait_for(lambda: self.ready, self.start_timeout_s,
                      f"{len(self.columns)} hosted columns to start")

    def _stop_proc(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None

    def _stop_reader(self) -> None:
        if self._reader is not None and self._reader.is_alive():
            os.write(self._stop_w, b"x")
            self._reader.join(timeout=2)

    def close(self) -> None:
        self._stack.close()

    def output(self) -> str:
        """What the farm printed (its log)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_for(self, done: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not done():
            if self.proc is None or self.proc.poll() is not None:
                raise FarmError(f"the column farm exited while waiting for {what}:\n{self.output()[-2000:]}")
            if time.monotonic() > deadline:
                raise FarmError(f"timed out after {timeout_s:g} s waiting for {what}:\n"
                                f"{self.output()[-2000:]}")
            time.sleep(0.02)

    # -- the I/O line ------------------------------------------------------------------------
    def send(self, obj: dict[str, Any]) -> None:
        with self._lock:
            write_all(self._io, json.dumps(obj).encode() + b"\n", timeout_s=2.0)

    def _read_loop(self) -> None:
        """Drains the farm's output lines as they come (the farm must never block on a full
        pty) into each column's board_log."""
        while True:
            ready, _, _ = select.select([self._io, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                chunk = os.read(self._io, 65536)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not chunk:
                continue
            *lines, self._buf = (self._buf + chunk).split(b"\n")
            for line in lines:
                if line.strip():
                    self._dispatch(json.loads(line))

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "ready" in msg:
            self.ready = True
            return
        col = self.columns[int(msg["i"])]
        if msg.get("stopped") or msg.get("reset"):
            col.stopped = True
            return
        col.board_log.append(msg)
