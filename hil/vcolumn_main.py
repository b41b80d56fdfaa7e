# A virtual column: the real firmware app on the virtual board, under the MicroPython
# unix port or CPython. The board's lines are pty paths handed in by the harness:
#
#   vcolumn_main.py CONFIG METER_PTY LINK_PTY|- IO_PTY
#
# IO_PTY carries the board's analogue world as JSON lines. In: {"cp_mv": 6000,
# "diode": 1, "pp_ohms": 220, "rcd": 0, "fb": -1} (fb -1 = the contactor's feedback
# follows its coil, 0/1 = stuck). Out: a line whenever the pilot duty or the contactor
# changes: {"t": ms, "duty": 5000, "contactor": 1, "offered_da": 300, "status": 2}.
# MicroPython-compatible code only (it runs on the unix port).
import asyncio
import gc
import json
import sys

import machine

from firmware import app as firmware_app
from firmware import clock, hal

IS_MICROPYTHON = sys.implementation.name == "micropython"


def open_line(path):
    """A pty end as a stream whose reads return what is there and never block."""
    import termios

    line = open(path, "r+b") if IS_MICROPYTHON else open(path, "r+b", buffering=0)
    attrs = termios.tcgetattr(line.fileno())
    attrs[6][6] = 0   # VMIN
    attrs[6][5] = 0   # VTIME
    termios.tcsetattr(line.fileno(), termios.TCSANOW, attrs)
    return line


class BoardWorld:
    """Applies the harness's analogue inputs to the virtual board and reports outputs."""

    def __init__(self, io_line):
        self.io = io_line
        self.cp_mv = 12000
        self.diode = 1
        self.fb = -1
        self._buf = b""
        self._last = None
        board = machine.board
        board.adc_u16[hal.PINS["pp_adc"]] = hal.pp_ohms_to_raw(-1)
        self.apply()

    def apply(self):
        board = machine.board
        low = -12000 if self.diode else -self.cp_mv
        board.adc_pwm[hal.PINS["cp_adc"]] = (hal.PINS["cp_pwm"], hal.cp_mv_to_raw(self.cp_mv),
                                             hal.cp_mv_to_raw(low))

    def handle(self, msg):
        board = machine.board
        if "cp_mv" in msg:
            self.cp_mv = int(msg["cp_mv"])
        if "diode" in msg:
            self.diode = int(msg["diode"])
        if "pp_ohms" in msg:
            board.adc_u16[hal.PINS["pp_adc"]] = hal.pp_ohms_to_raw(int(msg["pp_ohms"]))
        if "rcd" in msg:
            board.pin_levels[hal.PINS["rcd"]] = int(msg["rcd"])
        if "fb" in msg:
            self.fb = int(msg["fb"])
        self.apply()

    async def run(self, column):
        while True:
            data = self.io.read(256)
            if data:
                self._buf += data
                while b"\n" in self._buf:
                    line, self._buf = self._buf.split(b"\n", 1)
                    try:
                        self.handle(json.loads(line))
                    except (ValueError, KeyError, TypeError):
                        print("vcolumn: bad io line", line)
            board = machine.board
            coil = board.pin_levels.get(hal.PINS["contactor"], 0)
            board.pin_levels[hal.PINS["contactor_fb"]] = coil if self.fb < 0 else self.fb
            ctl = column.ctl
            state = (ctl.duty, coil, ctl.offered_da, ctl.status)
            if state != self._last:
                self._last = state
                out = {"t": clock.ticks_ms(), "duty": ctl.duty, "contactor": coil,
                       "offered_da": ctl.offered_da, "status": ctl.status,
                       "heap_used": gc.mem_alloc() if hasattr(gc, "mem_alloc") else 0}
                self.io.write(json.dumps(out).encode() + b"\n")
            await asyncio.sleep(0.005)


async def _main(config, meter_path, link_path, io_path):
    machine.board.clear()
    world = BoardWorld(open_line(io_path))
    # The firmware opens its UARTs through the HAL, as on a board; the virtual board
    # backs them with the harness's pty ends.
    machine.board.uart_paths[hal.PINS["meter_uart"]] = meter_path
    if link_path != "-":
        machine.board.uart_paths[hal.PINS["link_uart"]] = link_path
    column = firmware_app.App(machine, config, use_wdt=True)
    print("vcolumn: ready")
    await asyncio.gather(world.run(column), column.run())


def main():
    args = sys.argv[1:]
    if len(args) != 4:
        print("usage: vcolumn_main.py CONFIG METER_PTY LINK_PTY|- IO_PTY")
        sys.exit(2)
    asyncio.run(_main(args[0], args[1], args[2], args[3]))


main()
