"""Serial line pairs built from two `pty.openpty()` pairs joined by a relay thread.

Each end is a pty slave with a device path (`/dev/pts/N`) that pyserial, the MicroPython
unix port or mpremote opens like a USB–RS-485 adapter. The relay between the two pty
masters is where a real wire's properties are added when a test asks for them:
pacing at the baud rate (a pty is otherwise instant) and a manipulator hook that can
drop, split, delay or corrupt bytes.
"""

from __future__ import annotations

import os
import pty
import select
import termios
import threading
import time
import tty
from collections.abc import Callable

# A manipulator gets (direction, chunk) where direction is "ab" or "ba", and returns the
# bytes to forward (possibly empty, altered or longer). It runs on the relay thread.
Manipulator = Callable[[str, bytes], bytes]

BITS_PER_CHAR = 11  # start + 8 data + parity/stop + stop, as Modbus RTU counts a character


def _open_raw_pty() -> tuple[int, int, str]:
    master_fd, slave_fd = pty.openpty()
    for fd in (master_fd, slave_fd):
        tty.setraw(fd)
        attrs = termios.tcgetattr(fd)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(fd, termios.TCSANOW, attrs)
    os.set_blocking(master_fd, False)
    return master_fd, slave_fd, os.ttyname(slave_fd)


class SerialPair:
    """A null-modem cable between `a_path` and `b_path`.

    Use as a context manager or call `close()`; the relay thread stops and every fd is
    closed. `baud` (optional) paces each direction to the wire time of its bytes.
    """

    def __init__(self, baud: int | None = None, manipulator: Manipulator | None = None) -> None:
        self._a_master, self._a_slave, self.a_path = _open_raw_pty()
        self._b_master, self._b_slave, self.b_path = _open_raw_pty()
        self.baud = baud
        self.manipulator = manipulator
        self.bytes_ab = 0
        self.bytes_ba = 0
        self._stop_r, self._stop_w = os.pipe()
        self._closed = False
        self._thread = threading.Thread(target=self._relay, name="serial-pair", daemon=True)
        self._thread.start()

    # -- relay ---------------------------------------------------------------------------
    def _relay(self) -> None:
        routes = {self._a_master: (self._b_master, "ab"), self._b_master: (self._a_master, "ba")}
        while True:
            try:
                ready, _, _ = select.select([self._a_master, self._b_master, self._stop_r], [], [])
            except (OSError, ValueError):
                return
            if self._stop_r in ready:
                return
            for src in ready:
                dst, direction = routes[src]
                try:
                    chunk = os.read(src, 4096)
                except BlockingIOError:
                    continue
                except OSError:
                    # EIO: no process has the slave open right now; wait for a reopen.
                    time.sleep(0.002)
                    continue
                self._forward(dst, direction, chunk)

    def _forward(self, dst: int, direction: str, chunk: bytes) -> None:
        if self.manipulator is not None:
            chunk = self.manipulator(direction, chunk)
        if not chunk:
            return
        if direction == "ab":
            self.bytes_ab += len(chunk)
        else:
            self.bytes_ba += len(chunk)
        if self.baud:
            time.sleep(len(chunk) * BITS_PER_CHAR / self.baud)
        view = memoryview(chunk)
        while view:
            try:
                written = os.write(dst, view)
            except BlockingIOError:
                select.select([], [dst], [], 0.05)
                continue
            except OSError:
                return  # the far end has gone; a real wire would lose these bytes too
            view = view[written:]

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=2)
        for fd in (self._a_master, self._a_slave, self._b_master, self._b_slave,
                   self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> SerialPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
