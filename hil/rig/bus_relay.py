"""One RS-485 bus over pseudo-terminals: several devices' line ends joined into one.

A real two-wire bus delivers every byte the master sends to every device on it, and what
any device answers to the master; the devices only talk when addressed, so replies never
mix. `BusRelay` does that in a thread between one pty (the master's end, `path`, which a
gateway opens like a USB adapter) and the devices' line ends (e.g. each virtual column's
`link_path`). Used by the gateway tests and the site demo. Nothing is paced: a pty moves
bytes as fast as they come (see serial_pair.SerialPair for paced lines).
"""

from __future__ import annotations

import os
import pty
import select
import termios
import threading
import time
import tty
from collections.abc import Sequence


def raw_mode(fd: int) -> None:
    """A pty end as a plain byte pipe: no line discipline, no echo."""
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def write_all(fd: int, data: bytes, timeout_s: float = 0.5) -> None:
    """Write everything to a non-blocking fd, giving up after timeout_s (a stalled reader)."""
    view = memoryview(data)
    deadline = time.monotonic() + timeout_s
    while view and time.monotonic() < deadline:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [], 0.05)
        except OSError:
            return


class BusRelay:
    """One RS-485 line with several devices on it. The master opens ``path``; every byte it
    sends reaches every device line in ``device_paths``, and what any device answers
    reaches the master. Counters: ``to_columns`` and ``to_gateway`` bytes."""

    def __init__(self, device_paths: Sequence[str]) -> None:
        self._master, self._slave = pty.openpty()
        self._devices: list[int] = []
        self._stop_r, self._stop_w = os.pipe()
        try:
            raw_mode(self._master)
            raw_mode(self._slave)
            os.set_blocking(self._master, False)
            self.path = os.ttyname(self._slave)
            for p in device_paths:
                fd = os.open(p, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
                self._devices.append(fd)
                raw_mode(fd)
        except BaseException:
            self._close_fds()
            raise
        self.to_columns = 0
        self.to_gateway = 0
        self._thread = threading.Thread(target=self._run, name="bus-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self._master, *self._devices, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except (BlockingIOError, OSError):
                    continue
                if not data:
                    continue
                if fd == self._master:
                    self.to_columns += len(data)
                    for dev in self._devices:
                        write_all(dev, data)
                else:
                    self.to_gateway += len(data)
                    write_all(self._master, data)

    def _close_fds(self) -> None:
        for fd in (self._master, self._slave, *self._devices, self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def close(self) -> None:
        thread = getattr(self, "_thread", None)
        if thread is not None and thread.is_alive():
            os.write(self._stop_w, b"x")
            thread.join(timeout=2)
        self._close_fds()

    def __enter__(self) -> BusRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
