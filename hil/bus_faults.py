"""Faults on a serial line: dropped, split, delayed and corrupted bytes, a silent column.

`BusFaults` is a manipulator for `hil.rig.serial_pair.SerialPair`:

    faults = BusFaults(seed=1, corrupt_rate=0.01)
    with SerialPair(baud=19200, manipulator=faults) as line: ...
    faults.counts()   # what it did

It sees every chunk the pair's relay moves, with its direction ("ab": from the a end to
the b end, "ba" back), and returns the bytes to forward. Every decision comes from one
seeded `random.Random`, so a run with the same traffic and seed does the same damage.

- drop_rate: each byte is lost with this probability;
- corrupt_rate: each byte gets one bit flipped with this probability (a CRC catches it);
- split_rate: a chunk of two or more bytes is cut at a random byte; the head goes on at
  once, the tail waits for the next chunk in the same direction (a gap as long as the
  line stays quiet: on Modbus RTU the receiver sees a broken frame, then the tail as
  garbage in front of the next one);
- delay_rate / delay_s: a chunk is held for delay_s before it goes on. The relay thread
  sleeps, so everything behind it waits too, as on a slow wire;
- silent: nothing from the column's side gets through (`column_side` says which end of
  the pair the column is on). Switch it at any time with `silence(True/False)`.

`directions` limits the random faults to some directions (default both); `set(...)`
changes the rates while the line runs (the `mpy` target does so for a trace's
`link.fault` windows). `LineSplice`
joins two existing line ends, so a faulty stretch of wire (a `SerialPair` with faults)
can be put in front of a line someone else opened, such as a virtual column's link.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from hil.rig.fd_relay import FdRelay, open_raw, write_all


@dataclass
class FaultCounts:
    """What a `BusFaults` did so far (all counters only grow)."""

    chunks: int = 0            # chunks seen
    bytes_in: int = 0          # bytes seen
    bytes_out: int = 0         # bytes forwarded
    dropped: int = 0           # bytes dropped at drop_rate
    corrupted: int = 0         # bytes with a flipped bit
    split: int = 0             # chunks cut in two
    delayed: int = 0           # chunks held back for delay_s
    silenced: int = 0          # bytes swallowed while the column was silent


class BusFaults:
    """A seeded manipulator: `SerialPair(manipulator=BusFaults(...))`."""

    def __init__(self, *, seed: int = 0, drop_rate: float = 0.0, corrupt_rate: float = 0.0,
                 split_rate: float = 0.0, delay_rate: float = 0.0, delay_s: float = 0.0,
                 silent: bool = False, column_side: str = "b",
                 directions: Iterable[str] = ("ab", "ba")) -> None:
        if column_side not in ("a", "b"):
            raise ValueError("column_side must be 'a' or 'b', got %r" % (column_side,))
        self.directions = frozenset(directions)
        if not self.directions <= {"ab", "ba"}:
            raise ValueError("directions must be 'ab' and/or 'ba', got %r" % (sorted(self.directions),))
        self._lock = threading.Lock()
        self.drop_rate = self.corrupt_rate = self.split_rate = self.delay_rate = self.delay_s = 0.0
        self.set(drop_rate=drop_rate, corrupt_rate=corrupt_rate, split_rate=split_rate,
                 delay_rate=delay_rate, delay_s=delay_s)
        self.silent = silent
        # Bytes from the column travel away from its end: b -> a is "ba".
        self.column_direction = "ba" if column_side == "b" else "ab"
        self._rng = random.Random(seed)
        self._held: dict[str, bytes] = {"ab": b"", "ba": b""}
        self._counts = FaultCounts()

    def set(self, **rates: float) -> None:
        """Change drop_rate, corrupt_rate, split_rate, delay_rate and/or delay_s at any time."""
        for name, value in rates.items():
            if name not in ("drop_rate", "corrupt_rate", "split_rate", "delay_rate", "delay_s"):
                raise ValueError("unknown setting %r" % (name,))
            if name == "delay_s" and not value >= 0:
                raise ValueError("delay_s must be >= 0, got %r" % (value,))
            if name != "delay_s" and not 0.0 <= value <= 1.0:
                raise ValueError("%s must be in 0..1, got %r" % (name, value))
        with self._lock:
            for name, value in rates.items():
                setattr(self, name, float(value))

    def silence(self, on: bool) -> None:
        """A silent column: its replies stop reaching the line (True) or flow again."""
        self.silent = bool(on)

    def counts(self) -> FaultCounts:
        """A snapshot of the counters."""
        with self._lock:
            return FaultCounts(**vars(self._counts))

    def __call__(self, direction: str, chunk: bytes) -> bytes:
        with self._lock:
            out = self._apply(direction, chunk)
            delay = self.delay_s if out and self._hit(self.delay_rate, direction) else 0.0
            if delay:
                self._counts.delayed += 1
            self._counts.bytes_out += len(out)
        if delay:
            time.sleep(delay)  # outside the lock: counts() stays quick
        return out

    def _hit(self, rate: float, direction: str) -> bool:
        return rate > 0.0 and direction in self.directions and self._rng.random() < rate

    def _apply(self, direction: str, chunk: bytes) -> bytes:
        c = self._counts
        c.chunks += 1
        c.bytes_in += len(chunk)
        if self.silent and direction == self.column_direction:
            c.silenced += len(chunk) + len(self._held[direction])
            self._held[direction] = b""
            return b""
        data = self._held[direction] + chunk
        self._held[direction] = b""
        if direction not in self.directions:
            return data
        if self.drop_rate > 0.0 or self.corrupt_rate > 0.0:
            out = bytearray()
            rng = self._rng
            for byte in data:
                if self.drop_rate > 0.0 and rng.random() < self.drop_rate:
                    c.dropped += 1
                    continue
                if self.corrupt_rate > 0.0 and rng.random() < self.corrupt_rate:
                    out.append(byte ^ (1 << rng.randrange(8)))
                    c.corrupted += 1
                else:
                    out.append(byte)
            data = bytes(out)
        if len(data) >= 2 and self._hit(self.split_rate, direction):
            cut = self._rng.randrange(1, len(data))
            self._held[direction] = data[cut:]
            data = data[:cut]
            c.split += 1
        return data


class LineSplice(FdRelay):
    """Join two existing line ends (device paths) with a plain relay, both ways.

    Use to put a `SerialPair` (with faults, with baud pacing) in front of a line end that
    someone else created: splice the pair's b end to that end, and talk to the pair's a
    end. `with LineSplice(x, y):` or `close()`; the relay thread stops, the fds close.
    """

    thread_name = "line-splice"

    def __init__(self, path_x: str, path_y: str) -> None:
        super().__init__()
        try:
            self._x = self._own(open_raw(path_x))
            self._y = self._own(open_raw(path_y))
        except BaseException:
            self.close()
            raise
        self.moved = 0
        self._peer = {self._x: self._y, self._y: self._x}
        self._start()

    def _sources(self) -> Sequence[int]:
        return (self._x, self._y)

    def _on_chunk(self, src: int, chunk: bytes) -> None:
        self.moved += write_all(self._peer[src], chunk, timeout_s=1.0)
