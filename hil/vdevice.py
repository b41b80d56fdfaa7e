"""A virtual MicroPython board on a serial port, for the field tools and their tests.

`VirtualDevice(flash_dir)` starts the MicroPython unix port running `hil/vdevice_repl.py`
behind one end of a serial line pair; `.port` is the other end, a `/dev/pts/N` path that
the real `mpremote` (or `python -m tools.flash`) opens like a board's USB serial port.
The device speaks the board's REPL protocol (friendly prompt, raw REPL, raw-paste,
Ctrl-B/C/D) and `flash_dir` is its flash: the process runs there, so the files mpremote
copies land in it. Use relative paths on the device (as mpremote and the flash tool do):
absolute ones would reach the host's root.

A reset (Ctrl-D at a prompt, `sys.exit()`, `machine.reset()` from the virtual board's
`machine`) ends the MicroPython process and the device starts a fresh one, as a board
starts a fresh interpreter: `MPY: soft reboot`, boot.py, then main.py when `run_main` is
on and the board comes up at the friendly prompt (never after a soft reset in raw mode,
as on a board). `run_main` is off by default because main.py starts the column app.

    with VirtualDevice(tmp_path / "flash") as dev:
        subprocess.run(["mpremote", "connect", dev.port, "fs", "ls"])

From a shell (to practise flashing without a board): `python -m hil.vdevice FLASH_DIR`
prints the port and runs until Ctrl-C.

The board's `machine` is the virtual board's (hil/vboard/machine.py); `uart_paths={1: path}`
backs its UART 1 with a serial device, which the column app needs when main.py runs it
(UART 1 meter, 2 RS-485 link). `wait_ready()` waits for the prompt after a boot,
`wait_busy()` for user code to run or end; `boots` lists every interpreter started.

Fault injection: `corrupt_writes=["firmware/app.mpy"]` flips a bit in what is written to
those files (a failing flash chip); `raw_paste=False` makes the device answer raw-paste
requests with `R\\x00`, so mpremote falls back to the plain raw REPL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import termios
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

from hil.rig.firmware_proc import micropython_binary
from hil.rig.serial_pair import SerialPair

HERE = Path(__file__).resolve().parent
REPL_SCRIPT = HERE / "vdevice_repl.py"
VBOARD = HERE / "vboard"
# The column app (its goal: a peak under 96 KB on this 64-bit port) shares the heap with
# the REPL and with the code mpremote sends.
DEFAULT_HEAP = "256K"
# Exit codes of hil/vdevice_repl.py: how the next interpreter starts.
_RESETS = {10: ("soft", "raw"), 11: ("soft", "friendly"), 12: ("hard", "friendly")}


class VirtualDeviceError(RuntimeError):
    pass


class VirtualDevice:
    """A MicroPython board on `.port`, with `flash_dir` as its flash. Context manager."""

    def __init__(self, flash_dir: Path | str, *, run_main: bool = False, raw_paste: bool = True,
                 heap: str = DEFAULT_HEAP, uart_paths: Mapping[int, str] | None = None,
                 corrupt_writes: Iterable[str] = (), baud: int | None = None) -> None:
        self.flash_dir = Path(flash_dir)
        self.run_main = run_main
        self.raw_paste = raw_paste
        self.heap = heap
        self.uart_paths = dict(uart_paths or {})
        self.corrupt_writes = [p.lstrip("/") for p in corrupt_writes]
        self.baud = baud
        self.boots: list[str] = []   # "power", "soft", "hard": one entry per interpreter started
        self.exit_codes: list[int] = []
        self._log: deque[str] = deque(maxlen=400)
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._busy = False
        self._ready = False
        self._stopping = False
        self._dead = False
        self._proc: subprocess.Popen[bytes] | None = None
        self._pair: SerialPair | None = None
        self._line_fd = -1
        self._thread: threading.Thread | None = None

    # -- what tests look at --------------------------------------------------------------
    @property
    def port(self) -> str:
        """The host's end of the device's serial line (give it to mpremote)."""
        if self._pair is None:
            raise VirtualDeviceError("the virtual device is not started")
        return self._pair.b_path

    @property
    def bytes_to_device(self) -> int:
        """Bytes the host has sent to the device so far."""
        return self._pair.bytes_ba if self._pair is not None else 0

    @property
    def busy(self) -> bool:
        """True while the device runs user code (an exec, boot.py, main.py)."""
        return self._busy

    @property
    def alive(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    @property
    def dead(self) -> bool:
        """True when the interpreter ended without asking for a reset (a crash)."""
        return self._dead

    def log(self) -> str:
        """What the MicroPython processes wrote to stderr (device events, crashes)."""
        with self._lock:
            return self._log_text()

    def _log_text(self) -> str:  # the caller holds the lock
        return "\n".join(self._log)

    def wait_boots(self, count: int, timeout_s: float = 10.0) -> None:
        """Wait until `count` interpreters have started (1 = the power-on one)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self.boots) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VirtualDeviceError(f"device booted {len(self.boots)} times, expected {count}; "
                                             f"log:\n{self._log_text()}")
                self._changed.wait(left)

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Wait until the running interpreter has booted and waits for input (after boot.py,
        main.py when it ends, and the prompt it printed)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not self._ready:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VirtualDeviceError(f"device not at a prompt after {timeout_s} s; "
                                             f"log:\n{self._log_text()}")
                self._changed.wait(left)

    def wait_busy(self, busy: bool = True, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._busy != busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise VirtualDeviceError(f"device not {'busy' if busy else 'idle'} after {timeout_s} s")
                self._changed.wait(left)

    # -- lifetime ------------------------------------------------------------------------
    def start(self) -> VirtualDevice:
        self.flash_dir.mkdir(parents=True, exist_ok=True)
        self._pair = SerialPair(baud=self.baud, manipulator=self._on_bytes)
        # The device's console: its stdin and stdout, like a board's USB serial port.
        self._line_fd = os.open(self._pair.a_path, os.O_RDWR | os.O_NOCTTY)
        # A board's console prints "\r\n" for every "\n" (cooked output); the pair's
        # ends are raw, so the device's end gets that back here.
        attrs = termios.tcgetattr(self._line_fd)
        attrs[1] |= termios.OPOST | termios.ONLCR
        termios.tcsetattr(self._line_fd, termios.TCSANOW, attrs)
        self._thread = threading.Thread(target=self._supervise, name="vdevice", daemon=True)
        self._thread.start()
        self.wait_boots(1)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout_s)
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
        if self._line_fd >= 0:
            os.close(self._line_fd)
            self._line_fd = -1
        if self._pair is not None:
            self._pair.close()

    def __enter__(self) -> VirtualDevice:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inside --------------------------------------------------------------------------
    def _command(self, boot: str, mode: str) -> list[str]:
        opts = {"boot": boot, "mode": mode, "run_main": self.run_main, "raw_paste": self.raw_paste,
                "vboard": str(VBOARD), "uart_paths": {str(k): v for k, v in self.uart_paths.items()},
                "corrupt": self.corrupt_writes}
        return [micropython_binary(), "-X", f"heapsize={self.heap}", str(REPL_SCRIPT), json.dumps(opts)]

    def _supervise(self) -> None:
        boot, mode = "power", "friendly"
        env = dict(os.environ)
        env["MICROPYPATH"] = ".frozen"  # the script sets the board's path itself
        while True:
            with self._changed:
                if self._stopping:
                    return
                self._proc = proc = subprocess.Popen(
                    self._command(boot, mode), cwd=self.flash_dir, env=env, stdin=self._line_fd,
                    stdout=self._line_fd, stderr=subprocess.PIPE, start_new_session=True)
                self._busy = False
                self._ready = False
                self.boots.append(boot)
                self._changed.notify_all()
            assert proc.stderr is not None
            for raw in proc.stderr:
                text = raw.decode(errors="replace").rstrip("\n")
                with self._changed:
                    if text in ("vdev:busy", "vdev:idle"):
                        self._busy = text == "vdev:busy"
                    elif text == "vdev:ready":
                        self._ready = True
                    else:
                        self._log.append(text)
                    self._changed.notify_all()
            try:
                code = proc.wait(timeout=10)  # its stderr closed: it has ended or is ending
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(timeout=10)
            with self._changed:
                self.exit_codes.append(code)
                self._busy = False
                self._changed.notify_all()
                if self._stopping:
                    return
            if code not in _RESETS:
                with self._changed:
                    self._dead = True
                    self._log.append(f"vdevice: interpreter ended with exit code {code}; device is dead")
                return
            boot, mode = _RESETS[code]

    def _on_bytes(self, direction: str, chunk: bytes) -> bytes:
        """Relay hook: a Ctrl-C from the host while user code runs interrupts it (SIGINT),
        as a board's UART interrupt raises KeyboardInterrupt in the running program."""
        if direction == "ba" and b"\x03" in chunk and self._busy:
            proc = self._proc
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        return chunk


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m hil.vdevice",
        description="A virtual MicroPython board on a serial port, with a folder as its flash: "
                    "flash it with `python -m tools.flash PORT ...` or use mpremote on it.")
    parser.add_argument("flash_dir", type=Path, help="folder that is the board's flash (created if missing)")
    parser.add_argument("--run-main", action="store_true",
                        help="run main.py at power-on and after a reset, as a board does "
                             "(starts the column app)")
    parser.add_argument("--uart", action="append", default=[], metavar="ID=PATH",
                        help="back the board's UART ID with a serial device PATH (the column app opens "
                             "UART 1 for the meter, 2 for the RS-485 link); repeatable")
    args = parser.parse_args(argv)
    uarts = {}
    for item in args.uart:
        uart_id, sep, path = item.partition("=")
        if not sep or not uart_id.isdigit():
            parser.error(f"--uart wants ID=PATH, got {item!r}")
        uarts[int(uart_id)] = path
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started with SIGINT ignored (`cmd &`)
        signal.signal(sig, lambda *_: stop.set())
    with VirtualDevice(args.flash_dir, run_main=args.run_main, uart_paths=uarts) as dev:
        print(f"virtual device on {dev.port}, flash in {args.flash_dir}; Ctrl-C to stop", flush=True)
        while not stop.wait(0.5):
            if dev.dead:
                print(f"the device died:\n{dev.log()}", flush=True)
                return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
