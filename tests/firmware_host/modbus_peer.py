# Columns' Modbus slaves on a serial line or a TCP port, for the interop tests. Runs
# under CPython and the MicroPython unix port (MicroPython-compatible code only).
#
#   modbus_peer.py rtu DEVICE UNITS RUN_S   UNITS like "1" or "1,2,3": several columns
#                                           on one RS-485 bus, each hearing the others
#   modbus_peer.py tcp PORT UNIT RUN_S      one column on 127.0.0.1:PORT
#
# Prints READY once listening and exits by itself after RUN_S seconds. The stand-in
# controller below only mirrors writes into input registers, so a client can see that
# a write reached the column's logic; the real arbitration lives in the firmware core.
import select
import sys
import time
from array import array

from firmware import regmap, status
from firmware.modbus import RTU_MAX, RtuRequestParser, next_reply
from firmware.modbus_slave import ModbusSlave

IS_MICROPYTHON = sys.implementation.name == "micropython"
_GAP_MS = 2          # > 1.5 character times at 9600 baud (1.7 ms)


def now_ms():
    if IS_MICROPYTHON:
        return time.ticks_ms()
    return int(time.monotonic() * 1000)


class Column:
    def __init__(self, unit):
        self.inputs = array("H", [0] * regmap.INPUT_COUNT)
        self.holding = array("H", [0] * regmap.HOLDING_COUNT)
        inp = self.inputs
        inp[regmap.IR_STATUS] = status.ST_CHARGING
        inp[regmap.IR_CP_STATE] = status.CP_C
        inp[regmap.IR_LIMIT_SOURCE] = status.SRC_FAILSAFE
        inp[regmap.IR_OFFERED_CURRENT] = 60
        for i in range(3):
            inp[regmap.IR_CURRENT_L1 + i] = 100 + i
            inp[regmap.IR_VOLTAGE_L1 + i] = 2302 + i
        regmap.put_u32(inp, regmap.IR_POWER, 70000 + unit)
        regmap.put_u32(inp, regmap.IR_ENERGY, 123456789)
        inp[regmap.IR_FW_VERSION] = 0x0102
        inp[regmap.IR_BUS_ADDRESS] = unit
        inp[regmap.IR_PHASES] = 3
        inp[regmap.IR_HARDWARE_RATING] = 320
        inp[regmap.IR_FAILSAFE_LIMIT] = 60
        self.holding[regmap.HR_FAILSAFE_LIMIT] = 60
        self.holding[regmap.HR_ENABLE] = 1
        self.slave = ModbusSlave(unit, self.inputs, self.holding, self.on_write)
        self.parser = RtuRequestParser()

    def on_write(self, start, count, t_ms):
        inp = self.inputs
        hold = self.holding
        end = start + count
        if start <= regmap.HR_ASSIGNED_VALIDITY and end > regmap.HR_ASSIGNED_LIMIT:
            validity = hold[regmap.HR_ASSIGNED_VALIDITY]
            inp[regmap.IR_ASSIGNED_REMAINING] = validity
            if validity:
                inp[regmap.IR_OFFERED_CURRENT] = min(hold[regmap.HR_ASSIGNED_LIMIT], 320)
                inp[regmap.IR_LIMIT_SOURCE] = status.SRC_GATEWAY
            else:
                inp[regmap.IR_OFFERED_CURRENT] = inp[regmap.IR_FAILSAFE_LIMIT]
                inp[regmap.IR_LIMIT_SOURCE] = status.SRC_FAILSAFE
        if start <= regmap.HR_FAILSAFE_LIMIT < end:
            inp[regmap.IR_FAILSAFE_LIMIT] = hold[regmap.HR_FAILSAFE_LIMIT]
        return 0


def open_line(path):
    """The pty as a stream whose reads return what is there (VMIN 0), never block."""
    import termios

    if IS_MICROPYTHON:
        line = open(path, "r+b")
    else:
        line = open(path, "r+b", buffering=0)
    attrs = termios.tcgetattr(line.fileno())
    attrs[6][6] = 0   # VMIN
    attrs[6][5] = 0   # VTIME
    termios.tcsetattr(line.fileno(), termios.TCSANOW, attrs)
    return line


def feed(column, data, n):
    """Give bytes heard on the bus to one column; returns the replies it sends."""
    replies = []
    taken = 0
    while taken < n:
        taken += column.parser.feed(data, taken, n)
        replies.extend(answer(column))
    return replies


def answer(column):
    replies = []
    while True:
        r = next_reply(column.slave, column.parser, now_ms())
        if r < 0:
            break
        if r > 0:
            replies.append(bytes(column.slave.out[0:r]))
    column.inputs[regmap.IR_BAD_FRAMES] = column.parser.errors() & 0xFFFF
    return replies


def run_rtu(path, units, run_s):
    line = open_line(path)
    columns = [Column(u) for u in units]
    poller = select.poll()
    poller.register(line, select.POLLIN)
    rx = bytearray(RTU_MAX)
    print("READY")
    t0 = now_ms()
    pending = False   # bytes since the last gap
    while now_ms() - t0 < run_s * 1000:
        if poller.poll(_GAP_MS if pending else 50):
            n = line.readinto(rx)
            if not n:
                continue
            pending = True
            for column in columns:
                for reply in feed(column, rx, n):
                    line.write(reply)
                    for other in columns:   # the other columns hear it on the bus
                        if other is not column:
                            feed(other, reply, len(reply))
        elif pending:
            pending = False
            for column in columns:
                column.parser.gap()
                for reply in answer(column):   # an unknown function, delimited by the gap
                    line.write(reply)


def run_tcp(port, unit, run_s):
    import socket

    from firmware.modbus_tcp_serve import serve

    column = Column(unit)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(socket.getaddrinfo("127.0.0.1", port)[0][-1])
    listener.listen(2)
    print("READY")
    try:
        serve(listener, column.slave, now_ms, run_ms=run_s * 1000)
    finally:
        listener.close()


def main():
    mode = sys.argv[1]
    run_s = int(sys.argv[4])
    if mode == "rtu":
        run_rtu(sys.argv[2], [int(u) for u in sys.argv[3].split(",")], run_s)
    elif mode == "tcp":
        run_tcp(int(sys.argv[2]), int(sys.argv[3]), run_s)
    else:
        raise SystemExit("unknown mode " + mode)


main()
