"""Columns for the southbound tests: the real firmware Modbus slave (CPython, in-process).

`FirmwareColumn` is one column's register images behind `firmware.modbus_slave.ModbusSlave`.
`RtuColumnBus` serves several of them on one end of a serial line (a pty of a
`SerialPair`) from a thread: every column sees every byte, as on RS-485, through its own
`firmware.modbus.RtuRequestParser`. `TcpColumnServer` serves one column with
`firmware.modbus_tcp.serve` on a loopback port, also from a thread.
"""

from __future__ import annotations

import os
import select
import socket
import termios
import threading
import time
import tty
from array import array

from firmware import regmap, status
from firmware.modbus import RtuRequestParser
from firmware.modbus_slave import ModbusSlave
from firmware.modbus_tcp_serve import serve


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


class FirmwareColumn:
    """A column charging at 16 A on three phases; `set_charging` changes the picture."""

    def __init__(self, address: int, *, input_count: int = regmap.INPUT_COUNT) -> None:
        self.address = address
        self.inputs = array("H", [0] * input_count)
        self.holding = array("H", [0] * regmap.HOLDING_COUNT)
        self.slave = ModbusSlave(address, self.inputs, self.holding, on_write=self._on_write)
        self.parser = RtuRequestParser()
        self.silent = False            # swallow requests: a column that stops answering
        self.writes: list[tuple[int, list[int]]] = []   # (start, values) of accepted writes
        self.set_charging(offered_da=160, current_da=(158, 157, 156))

    def set_charging(self, *, offered_da: int, current_da: tuple[int, int, int]) -> None:
        if len(self.inputs) < regmap.INPUT_COUNT:
            return
        im = self.inputs
        im[regmap.IR_STATUS] = status.ST_CHARGING
        im[regmap.IR_CP_STATE] = status.CP_C
        im[regmap.IR_ERROR] = status.ERR_NONE
        im[regmap.IR_LIMIT_SOURCE] = status.SRC_GATEWAY
        im[regmap.IR_OFFERED_CURRENT] = offered_da
        im[regmap.IR_CURRENT_L1], im[regmap.IR_CURRENT_L2], im[regmap.IR_CURRENT_L3] = current_da
        im[regmap.IR_VOLTAGE_L1], im[regmap.IR_VOLTAGE_L2], im[regmap.IR_VOLTAGE_L3] = 2301, 2299, 2305
        regmap.put_u32(im, regmap.IR_POWER, 10950)
        regmap.put_u32(im, regmap.IR_ENERGY, 1_234_567)
        regmap.put_u32(im, regmap.IR_SESSION_ENERGY, 4321)
        im[regmap.IR_SESSION_ID] = 7
        im[regmap.IR_ERROR_FLAGS] = 0
        im[regmap.IR_FW_VERSION] = (1 << 8) | 2
        im[regmap.IR_FW_PATCH] = 3
        im[regmap.IR_FAILSAFE_LIMIT] = 60
        im[regmap.IR_BUS_ADDRESS] = self.address
        im[regmap.IR_PHASES] = 3
        im[regmap.IR_HARDWARE_RATING] = 320
        im[regmap.IR_CABLE_RATING] = 200

    def _on_write(self, start: int, count: int, now_ms: int) -> int:
        self.writes.append((start, list(self.holding[start:start + count])))
        return 0


class RtuColumnBus:
    """Columns answering on `path` (one end of a serial pair) from a thread.

    `requests` records every complete request frame on the line (as bytes), in order.
    """

    def __init__(self, path: str, columns: list[FirmwareColumn], *, gap_s: float = 0.002) -> None:
        self.columns = columns
        self.gap_s = gap_s
        self.requests: list[bytes] = []
        self.errors: list[BaseException] = []
        self._fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self._fd)
        attrs = termios.tcgetattr(self._fd)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(self._fd, termios.TCSANOW, attrs)
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="rtu-columns", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                ready, _, _ = select.select([self._fd, self._stop_r], [], [], self.gap_s)
                if self._stop_r in ready:
                    return
                if not ready:
                    for col in self.columns:
                        col.parser.gap()
                    continue
                try:
                    data = os.read(self._fd, 512)
                except (BlockingIOError, OSError):
                    continue
                self._take(data)
        except BaseException as exc:  # surfaced by close(): a helper bug must fail the test
            self.errors.append(exc)

    def _take(self, data: bytes) -> None:
        now = _now_ms()
        for i, col in enumerate(self.columns):
            taken = 0
            while taken < len(data):
                taken += col.parser.feed(data, taken)
                while True:
                    n = col.parser.next_request()
                    if n == 0:
                        break
                    if i == 0:
                        self.requests.append(bytes(col.parser.frame[0:n]))
                    reply = col.slave.handle(col.parser.unit, col.parser.fc, col.parser.pdu, now)
                    if reply and not col.silent:
                        self._write(bytes(col.slave.out[0:reply]))

    def _write(self, frame: bytes) -> None:
        view = memoryview(frame)
        while view:
            try:
                view = view[os.write(self._fd, view):]
            except BlockingIOError:
                select.select([], [self._fd], [], 0.05)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=2)
        for fd in (self._fd, self._stop_r, self._stop_w):
            os.close(fd)
        if self.errors:
            raise self.errors[0]

    def __enter__(self) -> RtuColumnBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class TcpColumnServer:
    """One column behind `firmware.modbus_tcp.serve` on 127.0.0.1:`port`, in a thread.
    `stop()` then `start()` again models a column that drops off the network and returns."""

    def __init__(self, column: FirmwareColumn, port: int) -> None:
        self.column = column
        self.port = port
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(4)
        self._sock = sock
        self._stop.clear()
        self._thread = threading.Thread(
            target=serve, args=(sock, self.column.slave, _now_ms),
            kwargs={"poll_ms": 5, "should_stop": self._stop.is_set}, name="tcp-column", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> TcpColumnServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
