"""A virtual column: the real firmware app (hil/vcolumn_main.py) in CPython or the
MicroPython unix port, with a simulated SDM meter on its meter line, its board's analogue
world on an I/O line, and its gateway link on a serial line pair or a TCP port.

Used by the tests, the HIL's `column` command and the demo. Everything it starts is
stopped on exit.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from hil.models.sdm_meter import SdmMeterModel, ThreadedSdmMeter
from hil.rig.fd_relay import open_raw
from hil.rig.firmware_proc import REPO, start_firmware, stop_process
from hil.rig.serial_pair import SerialPair

RUNNER = REPO / "hil" / "vcolumn_main.py"
SERIAL_LINKS = ("modbus-rtu", "cbor-serial")


class VirtualColumn:
    """Start with `with VirtualColumn(...) as col:`. For serial link modes the gateway's
    end of the link is `col.link_path`; for TCP modes the column listens on
    127.0.0.1:config["link"]["tcp_port"]."""

    def __init__(self, interp: str, workdir: Path, config: dict[str, Any], *,
                 bundle: Path | None = None, meter: SdmMeterModel | None = None,
                 heap: str = "128K") -> None:
        self.interp = interp
        self.workdir = workdir
        self.config = config
        self.bundle = bundle
        self.heap = heap
        meter_cfg = config.get("meter", {})
        self.meter = meter or SdmMeterModel(meter_cfg.get("type", "sdm630"), meter_cfg.get("address", 1))
        self.link_path: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.output = b""
        self.board_log: list[dict[str, int]] = []
        self._io_fd = -1
        self._buf = b""
        self._stack = ExitStack()

    def __enter__(self) -> VirtualColumn:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "column.json").write_text(json.dumps(self.config))
        stack = self._stack
        meter_line = stack.enter_context(SerialPair())
        io_line = stack.enter_context(SerialPair())
        link_arg = "-"
        if self.config.get("link", {}).get("mode") in SERIAL_LINKS:
            link_line = stack.enter_context(SerialPair())
            self.link_path = link_line.a_path
            link_arg = link_line.b_path
        meter_server = ThreadedSdmMeter(self.meter, meter_line.a_path,
                                        baudrate=self.config.get("meter", {}).get("baud", 9600))
        meter_server.start()
        stack.callback(meter_server.stop)
        self._io_fd = open_raw(io_line.a_path)
        stack.callback(os.close, self._io_fd)
        self.proc = start_firmware(self.interp, RUNNER, ["column.json", meter_line.b_path, link_arg,
                                                         io_line.b_path],
                                   cwd=self.workdir, bundle=self.bundle, heap=self.heap)
        stack.callback(self._stop_proc)

    def _stop_proc(self) -> None:
        if self.proc is not None:
            self.output += stop_process(self.proc)
            self.proc = None

    def close(self) -> None:
        self._stack.close()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the board's analogue world ------------------------------------------------------
    def board(self, **inputs: int) -> None:
        """Set CP voltage (cp_mv), diode, PP resistance (pp_ohms), RCD, contactor feedback (fb)."""
        os.write(self._io_fd, json.dumps(inputs).encode() + b"\n")

    def outputs(self) -> dict[str, int]:
        """The latest board outputs (duty, contactor, offered_da, status, t)."""
        while select.select([self._io_fd], [], [], 0)[0]:
            try:
                chunk = os.read(self._io_fd, 4096)
            except BlockingIOError:
                break
            if not chunk:
                break
            self._buf += chunk
        *lines, self._buf = self._buf.split(b"\n")
        self.board_log += [json.loads(line) for line in lines if line.strip()]
        return self.board_log[-1] if self.board_log else {}
