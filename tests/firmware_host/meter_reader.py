# Firmware-side peer for the meter interop tests: runs firmware.meter.Meter against a serial
# line (a pty path) under CPython or the MicroPython unix port, and prints JSON reports.
# Usage: meter_reader.py PATH KIND [key=value ...]
#   address=1 timeout_ms=300 retries=2 interval_ms=1000 stale_ms=5000
#   run_ms=3000 (stop after this long)  cycles=0 (stop after this many good cycles, 0: never)
#   report_ms=0 (also print a report line this often, 0: only the final one)
# MicroPython-compatible: the unix port has no os.open, so there the pty is opened with
# open() and made non-blocking for reads with termios (VMIN = VTIME = 0).
import json
import select
import sys
import time

from firmware.meter import Meter, ticks_diff

IS_MPY = sys.implementation.name == "micropython"

if hasattr(time, "ticks_ms"):
    ticks_ms = time.ticks_ms
else:
    def ticks_ms():
        return time.monotonic_ns() // 1000000


class Line:
    """One end of a serial line pair; readinto() returns what has arrived (0 if nothing)."""

    def __init__(self, path):
        self.buf = bytearray(256)
        if IS_MPY:
            import termios
            self.f = open(path, "r+b")
            self.fd = self.f.fileno()
            attrs = termios.tcgetattr(self.fd)
            attrs[6][6] = 0        # VMIN (Linux index): a read returns at once ...
            attrs[6][5] = 0        # VTIME: ... with whatever has arrived
            termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
        else:
            import os
            self.os = os
            self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY)

    def write(self, data):
        if IS_MPY:
            self.f.write(data)
            return
        view = memoryview(data)
        while view:
            try:
                view = view[self.os.write(self.fd, view):]
            except BlockingIOError:
                select.select([], [self.fd], [], 0.05)

    def readinto(self):
        if IS_MPY:
            return self.f.readinto(self.buf) or 0
        try:
            return self.os.readv(self.fd, [self.buf])
        except BlockingIOError:
            return 0


def options(argv):
    opts = {"address": 1, "timeout_ms": 300, "retries": 2, "interval_ms": 1000, "stale_ms": 5000,
            "run_ms": 3000, "cycles": 0, "report_ms": 0}
    for arg in argv:
        key, value = arg.split("=")
        if key not in opts:
            raise SystemExit("unknown option " + key)
        opts[key] = int(value)
    return opts


def report(m, now, final):
    return json.dumps({
        "final": final, "kind": m.kind, "stale": m.is_stale(now), "cycles": m.cycles,
        "voltage_dv": m.voltage_dv, "current_da": m.current_da, "power_phase_w": m.power_phase_w,
        "power_w": m.power_w, "energy_wh": m.energy_wh, "export_wh": m.export_wh,
        "freq_chz": m.freq_chz, "requests": m.requests, "replies": m.replies,
        "timeouts": m.timeouts, "crc_errors": m.crc_errors, "exceptions": m.exceptions,
        "last_exception": m.last_exception, "bad_replies": m.bad_replies,
        "failed_cycles": m.failed_cycles, "stray_bytes": m.stray_bytes,
        "meter_backwards": m.meter_backwards, "meter_jumps": m.meter_jumps,
        "impl": sys.implementation.name,
    })


def main():
    path = sys.argv[1]
    kind = sys.argv[2]
    o = options(sys.argv[3:])
    line = Line(path)
    m = Meter(kind, o["address"], line.write, timeout_ms=o["timeout_ms"], retries=o["retries"],
              poll_interval_ms=o["interval_ms"], stale_ms=o["stale_ms"])
    waiter = select.poll()
    waiter.register(line.fd, select.POLLIN)
    start = ticks_ms()
    last_report = start
    while True:
        now = ticks_ms()
        if ticks_diff(now, start) >= o["run_ms"]:
            break
        if o["cycles"] and m.cycles >= o["cycles"]:
            break
        if o["report_ms"] and ticks_diff(now, last_report) >= o["report_ms"]:
            last_report = now
            print(report(m, now, False))
        m.poll(now)
        if waiter.poll(2):
            n = line.readinto()
            if n:
                m.on_bytes(line.buf, ticks_ms(), n)
    print(report(m, ticks_ms(), True))


main()
