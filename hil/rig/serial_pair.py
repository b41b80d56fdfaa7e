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
import time
from collections.abc import Callable, Sequence

from hil.rig.fd_relay import FdRelay, raw_mode, write_all

# A manipulator gets (direction, chunk) where direction is "ab" or "ba", and returns the
# bytes to forward (possibly empty, altered or longer). It runs on the relay thread.
Manipulator = Callable[[str, bytes], bytes]

BITS_PER_CHAR = 11  # start + 8 data + parity/stop + stop, as Modbus RTU counts a character


class SerialPair(FdRelay):
    """A null-modem cable between `a_path` and `b_path`.

    Use as a context manager or call `close()`; the relay thread stops and every fd is
    closed. `baud` (optional) paces each direction to the wire time of its bytes.
    """

    thread_name = "serial-pair"

    def __init__(self, baud: int | None = None, manipulator: Manipulator | None = None) -> None:
        super().__init__()
        try:
            self._a_master, self.a_path = self._open_pty()
            self._b_master, self.b_path = self._open_pty()
        except BaseException:
            self.close()
            raise
        self.baud = baud
        self.manipulator = manipulator
        self.bytes_ab = 0
        self.bytes_ba = 0
        self._routes = {self._a_master: (self._b_master, "ab"), self._b_master: (self._a_master, "ba")}
        self._start()

    def _open_pty(self) -> tuple[int, str]:
        master_fd, slave_fd = (self._own(fd) for fd in pty.openpty())
        raw_mode(master_fd)
        raw_mode(slave_fd)
        os.set_blocking(master_fd, False)
        return master_fd, os.ttyname(slave_fd)

    # -- relay ---------------------------------------------------------------------------
    def _sources(self) -> Sequence[int]:
        return (self._a_master, self._b_master)

    def _on_chunk(self, src: int, chunk: bytes) -> None:
        dst, direction = self._routes[src]
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
        write_all(dst, chunk, timeout_s=None)   # a cable holds bytes until the far end reads
