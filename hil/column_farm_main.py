# A column farm: many virtual columns in one interpreter process, each the real firmware
# app (firmware/app.py: its controller, energy store, meter reader, register image and
# gateway link) on a virtual board of its own, all driven by one asyncio loop. A process
# per column costs a few % of a core idle; a hosted column costs its control steps only.
#
#   column_farm_main.py SPEC IO_PTY BUS_PTY|-
#
# SPEC (a JSON file): {"columns": ["c000", ...]}, one folder per column holding its
# column.json; its energy register files are written there too. Each column is built by
# the app's own boot code (App(), wiring.meter, wiring.link) and runs what the app runs:
# its control task (App.control_task, every 10 ms) and its link: wiring.serve_tcp on
# its own port (Modbus TCP, CBOR over TCP), or wiring.serve_serial (RTU / CBOR)
# on its own end of the farm's one serial line BUS_PTY, which every column hears, as on a
# real RS-485 bus (Modbus columns tell requests apart by their bus addresses; a CBOR serial
# link is point to point, so hil/rig/column_farm.py puts one such column on a line). The meter
# answers in-process from the column's own simulated SDM registers (firmware/sdm.py maps),
# read by the column's real meter driver (App.meter_task's body, run for every column by
# one task every 50 ms). No WDT: the columns are built with use_wdt=False, so the control
# task, which feeds a board's WDT, feeds nothing.
# Shared between columns: the interpreter, the loop and the firmware's code; never state.
#
# IO_PTY carries JSON lines. In: {"i": 3, "cp_mv": 6000, "diode": 1, "pp_ohms": 220,
# "rcd": 0, "fb": -1} (column 3's board inputs, as in hil/vcolumn_main.py), {"i": 3,
# "load_a": [5, 5, 5]} (its meter's phase currents), {"i": 3, "stop": 1}. Out: {"ready":
# N} once every column runs; {"i": 3, "t": ms, "duty": 5000, "contactor": 1, "offered_da":
# 300, "status": 2} whenever column 3's pilot duty, contactor, offered current or status
# changes, where t is the column's own ticks_ms when its control step wrote the duty to the
# PWM (the instant its pilot applied a new limit); {"i": 3, "stopped": 1}, {"i": 3,
# "reset": 1} (the firmware asked for a reset: the column stops). MicroPython-compatible.
import asyncio
import gc
import json
import struct
import sys

from firmware import app as firmware_app
from firmware import clock, hal, sdm
from firmware.crc import crc16

PINS = hal.PINS
_SERIAL = ("modbus-rtu", "cbor-serial")
_METER_PERIOD_S = 0.05


def open_line(path):
    """A pty end as a stream whose reads return what is there and never block."""
    import termios

    line = open(path, "r+b") if sys.implementation.name == "micropython" else open(path, "r+b", buffering=0)
    attrs = termios.tcgetattr(line.fileno())
    attrs[6][6] = 0   # VMIN
    attrs[6][5] = 0   # VTIME
    termios.tcsetattr(line.fileno(), termios.TCSANOW, attrs)
    return line


class Reset(Exception):
    """machine.reset() on a hosted column: its control task ends with this."""


# -- one column's virtual board ------------------------------------------------------------

class Board:
    """A column's analogue world and outputs: what hal.py reads and writes through its
    `machine` (Machine below), and the board output lines for the host."""

    def __init__(self, farm, index, kind, address):
        self.farm = farm
        self.index = index
        self.app = None
        self.meter_line = MeterLine(kind, address)
        self.port = None             # its end of the serial line (serial link modes)
        self.duty_u16 = -1
        self.t_duty = 0
        self.coil = 0
        self.fb = -1                 # contactor feedback: -1 follows the coil, 0/1 stuck
        self.rcd = 0
        self.pp_raw = hal.pp_ohms_to_raw(-1)     # no cable
        self.cp_mv = 12000                       # no vehicle
        self.diode = 1
        self.cp_hi = 0
        self.cp_lo = 0
        self.set_cp(12000, 1)
        # What the last output line said.
        self._duty = -1
        self._coil = -1
        self._offered = -1
        self._status = -1

    def set_cp(self, cp_mv, diode):
        """The CP ADC sees the PWM's high plateau and, with the EV's diode, -12 V low."""
        self.cp_mv = cp_mv
        self.diode = diode
        self.cp_hi = hal.cp_mv_to_raw(cp_mv)
        self.cp_lo = hal.cp_mv_to_raw(-12000 if diode else -cp_mv)

    def set_contactor(self, level):
        self.coil = level
        self.report()   # set after the duty in every control step: the step is complete

    def set_duty(self, value):
        if value != self.duty_u16:
            self.duty_u16 = value
            self.t_duty = clock.ticks_ms()

    def report(self):
        """An output line when what the column shows changed (allocates only then)."""
        app = self.app
        if app is None:
            return
        ctl = app.ctl
        if (ctl.duty == self._duty and self.coil == self._coil and ctl.offered_da == self._offered
                and ctl.status == self._status):
            return
        t = self.t_duty if ctl.duty != self._duty else clock.ticks_ms()
        self._duty = ctl.duty
        self._coil = self.coil
        self._offered = ctl.offered_da
        self._status = ctl.status
        self.farm.send({"i": self.index, "t": t, "duty": ctl.duty, "contactor": self.coil,
                        "offered_da": ctl.offered_da, "status": ctl.status})

    def uart(self, uart_id):
        if uart_id == PINS["meter_uart"]:
            return self.meter_line
        if uart_id == PINS["link_uart"] and self.port is not None:
            return self.port
        raise OSError("no line for UART %s on hosted column %d" % (uart_id, self.index))

    def reset(self):
        self.farm.send({"i": self.index, "reset": 1})
        raise Reset()


# The board's parts: one small class per kind of pin, so that the reads the control step
# makes every 10 ms (8 CP samples, PP, RCD, contactor feedback) cost one call each.
class _Pin:
    """A pin nobody reads back (RS-485 direction pins)."""

    def __init__(self, board):
        self.board = board
        self.level = 0

    def value(self, level=None):
        if level is None:
            return self.level
        self.level = 1 if level else 0
        return None


class _ContactorPin(_Pin):
    def value(self, level=None):
        if level is None:
            return self.board.coil
        self.board.set_contactor(1 if level else 0)
        return None


class _FeedbackPin(_Pin):
    def value(self, level=None):
        b = self.board
        return b.coil if b.fb < 0 else b.fb


class _RcdPin(_Pin):
    def value(self, level=None):
        return self.board.rcd


class _PinFactory:
    """machine.Pin for one board: called like the class, with its IN / OUT."""

    IN = 0
    OUT = 1

    def __init__(self, board):
        self.board = board
        self.kinds = {PINS["contactor"]: _ContactorPin, PINS["contactor_fb"]: _FeedbackPin,
                      PINS["rcd"]: _RcdPin}

    def __call__(self, pin_id, mode=-1, pull=-1, value=None):
        pin = self.kinds.get(pin_id, _Pin)(self.board)
        pin.id = pin_id
        if value is not None:
            pin.value(value)
        return pin


class _Pwm:
    def __init__(self, board, duty_u16):
        self.board = board
        board.set_duty(duty_u16)

    def duty_u16(self, value=None):
        if value is None:
            return self.board.duty_u16
        self.board.set_duty(value)
        return None


class _CpAdc:
    """The CP line's ADC: the PWM's high plateau and, while it runs, its low level in turn."""

    def __init__(self, board):
        self.board = board
        self.phase = 0

    def read_u16(self):
        b = self.board
        duty = b.duty_u16
        if duty >= 65535 or duty < 0:
            return b.cp_hi
        if duty == 0:
            return 0            # constant -12 V
        self.phase ^= 1
        return b.cp_hi if self.phase else b.cp_lo


class _PpAdc:
    def __init__(self, board):
        self.board = board

    def read_u16(self):
        return self.board.pp_raw


class _Wdt:
    def feed(self):
        pass


class Machine:
    """The part of `machine` the firmware's HAL uses, for one board (hil/vboard/machine.py
    is the same for a process that runs one column)."""

    def __init__(self, board):
        self._board = board
        self.Pin = _PinFactory(board)

    def PWM(self, pin, freq=1000, duty_u16=0):
        return _Pwm(self._board, duty_u16)

    def ADC(self, pin):
        if pin.id == PINS["cp_adc"]:
            return _CpAdc(self._board)
        if pin.id == PINS["pp_adc"]:
            return _PpAdc(self._board)
        raise OSError("no ADC on pin %s" % pin.id)

    def WDT(self, id=0, timeout=5000):
        return _Wdt()

    def UART(self, uart_id, baudrate=9600, **kwargs):
        return self._board.uart(uart_id)

    def reset(self):
        self._board.reset()


# -- the lines ---------------------------------------------------------------------------------

class MeterLine:
    """A column's meter UART with an Eastron meter on it that answers at once: FC04 reads
    of its registers (firmware/sdm.py), float32 values from what it measures."""

    def __init__(self, kind, address):
        self.kind = kind
        self.address = address
        self.current_a = [0.0, 0.0, 0.0]
        self.voltage_v = 230.0
        self._replies = {}     # (start, count) -> reply bytes, until the values change
        self._pending = None

    def set_load(self, amps):
        self.current_a = [float(a) for a in amps]
        self._replies = {}

    def _values(self):
        v = self.voltage_v
        i = self.current_a
        p = [v * i[0], v * i[1], v * i[2]]
        return (v, v, v, i[0], i[1], i[2], p[0], p[1], p[2], p[0] + p[1] + p[2], 50.0, 0.0, 0.0)

    def _reply(self, start, count):
        data = bytearray(3 + 2 * count + 2)
        data[0] = self.address
        data[1] = sdm.FC_READ_INPUT
        data[2] = 2 * count
        values = self._values()
        regs = sdm.FIELDS[self.kind]
        for f in range(sdm.NFIELDS):
            reg = regs[f]
            if reg >= 0 and start <= reg < start + count - 1:
                struct.pack_into(">f", data, 3 + 2 * (reg - start), values[f])
        crc = crc16(data, 0, len(data) - 2)
        data[-2] = crc & 0xFF
        data[-1] = crc >> 8
        return bytes(data)

    def write(self, req):
        if (len(req) == 8 and req[0] == self.address and req[1] == sdm.FC_READ_INPUT
                and crc16(req) == 0):
            key = ((req[2] << 8) | req[3], (req[4] << 8) | req[5])
            reply = self._replies.get(key)
            if reply is None:
                reply = self._replies[key] = self._reply(key[0], key[1])
            self._pending = reply
        return len(req)

    def flush(self):
        pass

    def readinto(self, buf):
        reply = self._pending
        if reply is None:
            return None
        self._pending = None
        n = len(reply)
        buf[0:n] = reply
        return n


class Port:
    """A column's end of the farm's serial line: it hears every byte on the line (an RS-485
    bus; the farm's reader hands each chunk to every port) and writes to it."""

    def __init__(self, line):
        self.line = line
        self.inbox = b""

    def readinto(self, buf):
        data = self.inbox
        if not data:
            return None
        n = len(data)
        n = min(n, len(buf))
        buf[0:n] = data[0:n]
        self.inbox = data[n:]
        return n

    def write(self, data):
        return self.line.write(data)

    def flush(self):
        pass


# -- the farm ----------------------------------------------------------------------------------

class Column:
    def __init__(self, farm, index, folder):
        with open(folder + "/column.json") as f:
            raw = json.loads(f.read())
        meter = raw.get("meter") or {}
        self.board = Board(farm, index, meter.get("type", sdm.SDM630), meter.get("address", 1))
        self.folder = folder
        self.mode = (raw.get("link") or {}).get("mode")
        self.app = None
        self.tasks = []
        self.live = False


class Farm:
    def __init__(self, io, bus):
        self.io = io
        self.bus = bus
        self.columns = []

    def send(self, obj):
        self.io.write(json.dumps(obj).encode() + b"\n")

    async def start(self, folders):
        from firmware import wiring

        for index, folder in enumerate(folders):
            col = Column(self, index, folder)
            board = col.board
            if col.mode in _SERIAL and self.bus is not None:
                board.port = Port(self.bus)
            app = col.app = firmware_app.App(Machine(board), folder + "/column.json",
                                            store_prefix=folder + "/energy", use_wdt=False,
                                            log=_logger(index))
            board.app = app
            cfg = app.cfg
            if not app.config_errors:
                uart, de = app.hal.uart("meter", cfg["meter"]["baud"])
                wiring.meter(app, uart, de)
            mode = wiring.link_mode(app)
            link = wiring.link(app, mode)
            col.tasks.append(asyncio.create_task(app.control_task()))
            if link is None:
                pass
            elif mode in _SERIAL:
                if board.port is None:
                    raise OSError("column %d needs the farm's serial line (%s)" % (index, mode))
                line, de = app.hal.uart("link", cfg["link"]["baud"])
                col.tasks.append(asyncio.create_task(wiring.serve_serial(app, mode, line, de)))
            else:   # its server task: cancelling it closes the port and its connections
                col.tasks.append(wiring.serve_tcp(app, mode))
            col.live = True
            self.columns.append(col)
            gc.collect()
        self.send({"ready": len(self.columns)})

    def stop(self, col):
        if not col.live:
            return
        col.live = False
        col.board.port = None
        for task in col.tasks:
            task.cancel()
        self.send({"i": col.board.index, "stopped": 1})

    def command(self, msg):
        i = msg.get("i", -1)
        if not 0 <= i < len(self.columns):
            return
        col = self.columns[i]
        board = col.board
        if msg.get("stop"):
            self.stop(col)
            return
        if "load_a" in msg:
            board.meter_line.set_load(msg["load_a"])
        if "cp_mv" in msg or "diode" in msg:
            board.set_cp(int(msg.get("cp_mv", board.cp_mv)), int(msg.get("diode", board.diode)))
        if "pp_ohms" in msg:
            board.pp_raw = hal.pp_ohms_to_raw(int(msg["pp_ohms"]))
        if "rcd" in msg:
            board.rcd = int(msg["rcd"])
        if "fb" in msg:
            board.fb = int(msg["fb"])

    async def meter_task(self):
        """App.meter_task's body for every live column (its meter answers at once, so a
        poll every 50 ms keeps the driver's 1 s cycle)."""
        rx = bytearray(256)
        while True:
            for col in self.columns:
                meter = col.app.meter
                if col.live and meter is not None:
                    now = clock.ticks_ms()
                    meter.poll(now)
                    n = col.board.meter_line.readinto(rx)
                    if n:
                        meter.on_bytes(rx, now, n)
            await asyncio.sleep(_METER_PERIOD_S)

    async def bus_task(self):
        """Every chunk on the serial line goes to every live column's port."""
        rx = bytearray(512)
        line = self.bus
        while True:
            n = line.readinto(rx)
            if n:
                chunk = bytes(rx[0:n])
                for col in self.columns:
                    port = col.board.port
                    if col.live and port is not None:
                        port.inbox += chunk
            await asyncio.sleep(0.001)

    async def io_task(self):
        rx = bytearray(1024)
        buf = b""
        while True:
            n = self.io.readinto(rx)
            if n:
                buf += rx[0:n]
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        self.command(json.loads(line))
                    except (ValueError, KeyError, TypeError, AttributeError):
                        print("farm: bad io line", line)
            await asyncio.sleep(0.01)


def _logger(index):
    def log(msg):
        print("column %d: %s" % (index, msg))
    return log


async def _main(spec_path, io_path, bus_path):
    with open(spec_path) as f:
        spec = json.loads(f.read())
    io = open_line(io_path)
    bus = open_line(bus_path) if bus_path != "-" else None
    farm = Farm(io, bus)
    await farm.start(spec["columns"])
    print("farm: %d columns running" % len(farm.columns))
    tasks = [farm.meter_task(), farm.io_task()]
    if bus is not None:
        tasks.append(farm.bus_task())
    await asyncio.gather(*tasks)


if len(sys.argv) != 4:
    print("usage: column_farm_main.py SPEC IO_PTY BUS_PTY|-")
    sys.exit(2)
asyncio.run(_main(sys.argv[1], sys.argv[2], sys.argv[3]))
