"""The relay thread under the serial rigs: SerialPair (a null-modem cable), LineSplice (two
existing line ends joined), BusRelay (one RS-485 bus of many devices) and the benchmarks'
PacedBusRelay. Each waits on its line ends' file descriptors and does something with every
chunk read; they differ only in where a chunk goes and what happens to it on the way, which
is all a rig says (`_sources`, `_on_chunk`). Here: the thread, its stop, the fds it owns, and
the pty helpers they all use.
"""

from __future__ import annotations

import os
import select
import termios
import threading
import time
import tty
from collections.abc import Sequence
from typing import Self


def raw_mode(fd: int) -> None:
    """A pty end as a plain byte pipe: no line discipline, no echo."""
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


def open_raw(path: str) -> int:
    """Open a line end (a pty's device path) non-blocking, in raw mode when it is a tty."""
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        raw_mode(fd)
    except termios.error:
        pass  # not a tty: nothing to set
    return fd


def write_all(fd: int, data: bytes, timeout_s: float | None = 0.5) -> int:
    """Write everything to a non-blocking fd; returns the bytes written. Gives up after
    timeout_s (a stalled reader; None: wait for ever) or when the far end has gone, as a wire
    loses what nobody is there to hear."""
    view = memoryview(data)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while view and (deadline is None or time.monotonic() < deadline):
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [], 0.05)
        except OSError:
            break
    return len(data) - len(view)


class FdRelay:
    """A thread moving chunks between file descriptors until close(). A rig subclasses it,
    opens its fds through `_own` (close() closes them), names what to read (`_sources`) and
    handles each chunk (`_on_chunk`), then calls `_start`. Use as a context manager."""

    thread_name = "fd-relay"

    def __init__(self) -> None:
        self._fds: list[int] = []
        self._stop_r, self._stop_w = os.pipe()
        self._thread: threading.Thread | None = None
        self._closed = False

    def _own(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._relay, name=self.thread_name, daemon=True)
        self._thread.start()

    def _sources(self) -> Sequence[int]:
        raise NotImplementedError

    def _on_chunk(self, src: int, chunk: bytes) -> None:
        raise NotImplementedError

    def _on_gone(self, src: int) -> None:
        """A read failed (EIO: nobody has that pty's other end open now, e.g. a rebooting
        column) or hit its end: wait a little for it to be reopened."""
        time.sleep(0.002)

    def _relay(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([*self._sources(), self._stop_r], [], [])
            except (OSError, ValueError):
                return
            if self._stop_r in ready:
                return
            for src in ready:
                try:
                    chunk = os.read(src, 4096)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if chunk:
                    self._on_chunk(src, chunk)
                else:
                    self._on_gone(src)

    def close(self) -> None:
        """Stop the thread, close every fd; safe to call twice or after a failed start."""
        if self._closed:
            return
        self._closed = True
        if self._thread is not None and self._thread.is_alive():
            os.write(self._stop_w, b"x")
            self._thread.join(timeout=2)
        for fd in (*self._fds, self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
