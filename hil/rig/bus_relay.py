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
from collections.abc import Sequence

from hil.rig.fd_relay import FdRelay, open_raw, raw_mode, write_all


class BusRelay(FdRelay):
    """One RS-485 line with several devices on it. The master opens ``path``; every byte it
    sends reaches every device line in ``device_paths``, and what any device answers
    reaches the master. Counters: ``to_columns`` and ``to_gateway`` bytes."""

    thread_name = "bus-relay"

    def __init__(self, device_paths: Sequence[str]) -> None:
        super().__init__()
        try:
            self._master, slave = (self._own(fd) for fd in pty.openpty())
            raw_mode(self._master)
            raw_mode(slave)
            os.set_blocking(self._master, False)
            self.path = os.ttyname(slave)
            self._devices = [self._own(open_raw(p)) for p in device_paths]
        except BaseException:
            self.close()
            raise
        self.to_columns = 0
        self.to_gateway = 0
        self._start()

    def _sources(self) -> Sequence[int]:
        return (self._master, *self._devices)

    def _on_chunk(self, src: int, chunk: bytes) -> None:
        if src == self._master:
            self.to_columns += len(chunk)
            for dev in self._devices:
                write_all(dev, chunk)
        else:
            self.to_gateway += len(chunk)
            write_all(self._master, chunk)
