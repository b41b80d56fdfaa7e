"""The board's analogue world as a realtime target reaches it: the virtual board's
JSON-lines I/O protocol (hil/vcolumn_main.py) on a serial port path.

In: {"cp_mv": 6000, "diode": 1, "pp_ohms": 220, "rcd": 0, "fb": -1}, any subset.
Out: a line whenever the pilot duty or the contactor changes: {"t": ms, "duty": 5000,
"contactor": 1, "offered_da": 300, "status": 2, "heap_used": n}.
"""

from __future__ import annotations

import json
import os
import select
import termios
import time
import tty
from typing import Protocol

from hil.replay.column_link import TargetError


class BoardIo(Protocol):
    """The board's analogue world: inputs in, the latest outputs back (a
    hil.rig.vcolumn.VirtualColumn is one; `JsonLinesBoard` another)."""

    def board(self, **inputs: int) -> None: ...

    def outputs(self) -> dict[str, int]: ...


class JsonLinesBoard:
    """The virtual board's I/O line protocol (hil/vcolumn_main.py) on a serial port path."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            tty.setraw(self._fd)
            attrs = termios.tcgetattr(self._fd)
            attrs[3] &= ~termios.ECHO
            termios.tcsetattr(self._fd, termios.TCSANOW, attrs)
        except termios.error:
            pass
        self._buf = b""
        self._last: dict[str, int] = {}
        self.bad_lines = 0

    def board(self, **inputs: int) -> None:
        data = json.dumps(inputs).encode() + b"\n"
        deadline = time.monotonic() + 1.0
        while data:
            try:
                data = data[os.write(self._fd, data):]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TargetError("the board's I/O line %s does not take input" % self.path) from None
                select.select([], [self._fd], [], 0.05)

    def outputs(self) -> dict[str, int]:
        while select.select([self._fd], [], [], 0)[0]:
            try:
                chunk = os.read(self._fd, 4096)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                self.bad_lines += 1
                continue
            if isinstance(msg, dict):
                self._last = msg
            else:
                self.bad_lines += 1
        return dict(self._last)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


