# A virtual column: the real firmware app on the virtual board, under the MicroPython
# unix port or CPython. The board's lines are pty paths handed in by the harness:
#
#   vcolumn_main.py CONFIG METER_PTY LINK_PTY|- IO_PTY
#
# IO_PTY carries the board's analogue world as JSON lines. In: {"cp_mv": 6000,
# "diode": 1, "pp_ohms": 220, "rcd": 0, "fb": -1} (fb -1 = the contactor's feedback
# follows its coil, 0/1 = stuck). Out: a line whenever the pilot duty or the contactor
# changes: {"t": ms, "duty": 5000, "contactor": 1, "offered_da": 300, "status": 2,
# "heap_used": bytes}. MicroPython-compatible code only (it runs on the unix port), kept
# small: its code shares the column's heap (a few functions, no classes). {"live": 1} in adds
# "heap_live" to every line out: gc.mem_alloc() after a gc.collect() run right after the
# heap_used sample (bench/firmware_footprint.py).
#
# {"tap": 1} in adds the firmware's own view to every line out, for a harness that is not
# the gateway on the link (hil/replay/site_target.py): CP state "cp", limit source "src",
# failsafe active "fs", error "err", energy register "wh", and what the link handed the
# controller: assignments "na" (count), "ada" (deci-amps), "as" (validity s); heartbeats
# "nh"; failsafe limits "nf" (count), "fda" (deci-amps, the one in force). The counts start
# from what the controller holds when the tap is switched on: "na" 1 for a valid assignment
# (with the seconds it has left), "nh" 1 for a live gateway, "nf" 0.
import asyncio
import gc
import json
import sys

import machine

from firmware import app as firmware_app
from firmware import clock, hal


def open_line(path):
    """A pty end as a stream whose reads return what is there and never block."""
    import termios

    if sys.implementation.name == "micropython":
        line = open(path, "r+b")
    else:
        line = open(path, "r+b", buffering=0)
    attrs = termios.tcgetattr(line.fileno())
    attrs[6][6] = 0   # VMIN
    attrs[6][5] = 0   # VTIME
    termios.tcsetattr(line.fileno(), termios.TCSANOW, attrs)
    return line


def set_cp(cp_mv, diode):
    """The CP ADC sees the PWM's high plateau and, with the EV's diode, -12 V low."""
    pins = hal.PINS
    machine.board.adc_pwm[pins["cp_adc"]] = (pins["cp_pwm"], hal.cp_mv_to_raw(cp_mv),
                                             hal.cp_mv_to_raw(-12000 if diode else -cp_mv))


def tap_link(ctl, now_ms):
    """Wrap the controller's link entry points to count and remember what the gateway link
    hands it; returns the tap record [na, ada, as, nh, nf, fda] the wrappers update."""
    lim = ctl.limits
    valid = lim.gateway_valid
    tap = [1 if valid else 0, lim.gateway_da if valid else 0, lim.assignment_remaining_s(now_ms),
           1 if lim.gateway_alive else 0, 0, lim.failsafe_da]
    assign, beat, failsafe = ctl.assign_limit, ctl.heartbeat, ctl.set_failsafe

    def assign_limit(limit_da, validity_s, now_ms):
        applied = assign(limit_da, validity_s, now_ms)
        if applied >= 0:
            tap[0] += 1
            tap[1] = limit_da
            tap[2] = validity_s
        return applied

    def heartbeat(now_ms):
        beat(now_ms)
        tap[3] += 1

    def set_failsafe(limit_da):
        applied = failsafe(limit_da)
        if applied >= 0:
            tap[4] += 1
            tap[5] = applied
        return applied

    ctl.assign_limit = assign_limit
    ctl.heartbeat = heartbeat
    ctl.set_failsafe = set_failsafe
    return tap


async def board_world(io, column):
    """Applies the harness's analogue inputs to the virtual board and reports outputs."""
    board = machine.board
    pins = hal.PINS
    cp_mv = 12000
    diode = 1
    fb = -1     # contactor feedback: -1 follows the coil, 0/1 stuck
    buf = b""
    rx = bytearray(256)  # reused: reading into a new buffer every 5 ms would churn the heap
    last = None
    tap = None
    live = 0
    while True:
        changed = False
        n = io.readinto(rx)
        if n:
            buf += rx[:n]
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                changed = True
                try:
                    msg = json.loads(line)
                    cp_mv = int(msg.get("cp_mv", cp_mv))
                    diode = int(msg.get("diode", diode))
                    fb = int(msg.get("fb", fb))
                    if "pp_ohms" in msg:
                        board.adc_u16[pins["pp_adc"]] = hal.pp_ohms_to_raw(int(msg["pp_ohms"]))
                    if "rcd" in msg:
                        board.pin_levels[pins["rcd"]] = int(msg["rcd"])
                    live = int(msg.get("live", live))
                    if msg.get("tap") and tap is None:
                        tap = tap_link(column.ctl, clock.ticks_ms())
                except (ValueError, KeyError, TypeError, AttributeError):
                    print("vcolumn: bad io line", line)
        if changed:
            set_cp(cp_mv, diode)
        coil = board.pin_levels.get(pins["contactor"], 0)
        board.pin_levels[pins["contactor_fb"]] = coil if fb < 0 else fb
        ctl = column.ctl
        if tap is None:
            state = (ctl.duty, coil, ctl.offered_da, ctl.status)
        else:
            state = (ctl.duty, coil, ctl.offered_da, ctl.status, ctl.cp_state, ctl.limit_source,
                     ctl.failsafe_active, ctl.error, column.energy_wh, tap[0], tap[3], tap[4])
        if state != last:
            last = state
            out = {"t": clock.ticks_ms(), "duty": ctl.duty, "contactor": coil,
                   "offered_da": ctl.offered_da, "status": ctl.status,
                   "heap_used": gc.mem_alloc() if hasattr(gc, "mem_alloc") else 0}
            if tap is not None:
                out.update(cp=ctl.cp_state, src=ctl.limit_source, fs=int(ctl.failsafe_active),
                           err=ctl.error, wh=column.energy_wh, na=tap[0], ada=tap[1],
                           nh=tap[3], nf=tap[4], fda=tap[5])
                out["as"] = tap[2]
            if live and hasattr(gc, "mem_alloc"):
                gc.collect()
                out["heap_live"] = gc.mem_alloc()
            io.write(json.dumps(out).encode() + b"\n")
        await asyncio.sleep(0.005)


async def _main(config, meter_path, link_path, io_path):
    board = machine.board
    board.clear()
    io = open_line(io_path)
    board.adc_u16[hal.PINS["pp_adc"]] = hal.pp_ohms_to_raw(-1)   # no cable
    set_cp(12000, 1)                                              # no vehicle
    # The firmware opens its UARTs through the HAL, as on a board; the virtual board
    # backs them with the harness's pty ends.
    board.uart_paths[hal.PINS["meter_uart"]] = meter_path
    if link_path != "-":
        board.uart_paths[hal.PINS["link_uart"]] = link_path
    column = firmware_app.App(machine, config, use_wdt=True)
    print("vcolumn: ready")
    await asyncio.gather(board_world(io, column), column.run())


if len(sys.argv) != 5:
    print("usage: vcolumn_main.py CONFIG METER_PTY LINK_PTY|- IO_PTY")
    sys.exit(2)
asyncio.run(_main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]))
