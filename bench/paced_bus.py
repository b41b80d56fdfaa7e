"""An RS-485 bus over pseudo-terminals that is no faster than the real wire.

hil.rig.bus_relay.BusRelay joins the master's line and the devices' lines but moves bytes as
fast as a pty does. PacedBusRelay is the same bus with the wire's speed: one half-duplex pair
of wires shared by everyone, so every chunk (a Modbus frame, as pymodbus and the firmware write
a frame at once) occupies the wire for len x 11 bits / baud after the wire is free, and is
delivered when it has gone through. Every frame is logged (wire start, wire end, direction,
first bytes) so a benchmark can add up the wire time of the frames actually sent.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from firmware import regmap
from gateway.south.schedule import BITS_PER_CHAR, LineTiming
from hil.rig.bus_relay import BusRelay
from hil.rig.fd_relay import write_all


@dataclass(frozen=True)
class WireFrame:
    start_s: float       # time.monotonic() when it started on the wire
    end_s: float         # ... and when its last bit was through
    from_master: bool
    size: int
    head: bytes          # the first 6 bytes: address, function, start register

    @property
    def is_limit_write(self) -> bool:
        """A write of assigned limits: the broadcast table (unit 0) or FC16 to HR_ASSIGNED_LIMIT."""
        if not self.from_master or len(self.head) < 4 or self.head[1] != 16:
            return False
        start = int.from_bytes(self.head[2:4], "big")
        if self.head[0] == 0:
            return start >= regmap.BROADCAST_TABLE
        return start == regmap.HR_ASSIGNED_LIMIT


class PacedBusRelay(BusRelay):
    """BusRelay with the wire's timing; ``frames`` is the log of what crossed it."""

    def __init__(self, device_paths: Sequence[str], baud: int) -> None:
        self.baud = baud
        self.timing = LineTiming(baud)
        self.frames: list[WireFrame] = []
        self._wire_free = 0.0
        self._dead: set[int] = set()
        super().__init__(device_paths)   # starts the relay thread

    def _sources(self) -> Sequence[int]:
        return (self._master, *(d for d in self._devices if d not in self._dead))

    def _on_gone(self, src: int) -> None:
        # A device's line is gone (its column stopped): off the bus, or select would report it
        # ready for ever. close() still closes it.
        if src != self._master:
            self._dead.add(src)
        else:
            super()._on_gone(src)

    def _on_chunk(self, src: int, chunk: bytes) -> None:
        start = max(time.monotonic(), self._wire_free)
        end = start + len(chunk) * BITS_PER_CHAR / self.baud
        delay = end - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._wire_free = end
        self.frames.append(WireFrame(start, end, src == self._master, len(chunk), bytes(chunk[:6])))
        if src == self._master:
            self.to_columns += len(chunk)
            for dev in self._devices:
                if dev not in self._dead:
                    write_all(dev, chunk)
        else:
            self.to_gateway += len(chunk)
            write_all(self._master, chunk)

    def wire_s(self, frame: WireFrame) -> float:
        """Wire time of a frame with the silence that must end it (1.75 ms above 19200 baud)."""
        return self.timing.frame_s(frame.size)

    def between(self, t0_s: float, t1_s: float) -> list[WireFrame]:
        return [f for f in list(self.frames) if f.start_s >= t0_s and f.start_s <= t1_s]

    def limit_wire_s(self, t0_s: float, t1_s: float) -> float:
        """Wire time of the limit writes sent in [t0, t1] and the echoes that answered them."""
        total = 0.0
        expect_echo = False
        for f in self.between(t0_s, t1_s):
            if f.is_limit_write:
                total += self.wire_s(f)
                expect_echo = f.head[0] != 0      # a broadcast has no reply
            elif not f.from_master and expect_echo:
                total += self.wire_s(f)
                expect_echo = False
            else:
                expect_echo = False
        return total
