# The column controller app: wires the HAL, the control core, the meter, the energy
# store and the gateway link into asyncio tasks. A board runs it from main.py; the HIL
# and the tests run the same code under the unix port or CPython with a virtual board.
#
# Tasks: control (every CONTROL_PERIOD_MS: sense, step, actuate, publish the image, and
# once a second feed the WDT, only if every other task has checked in since the last
# feed: a dead or hung task, the control task included, resets the board), meter (Modbus
# RTU master on the meter UART) and link (Modbus RTU/TCP slave or CBOR link). The
# watchdog has no task of its own: a task and its coroutine cost a board RAM.
import asyncio

from . import clock

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

VERSION = (0, 1, 0)
CONTROL_PERIOD_MS = const(10)
# The loops sleep with clock.sleep_ms(): asyncio.sleep(s) makes a float (s * 1000) every
# time on MicroPython, garbage a few hundred times a second.
_METER_PERIOD_MS = const(2)
_WATCHDOG_PERIOD_MS = const(1000)
_T_CONTROL = const(1)
_T_METER = const(2)
_T_LINK = const(4)
_EV_SESSION_START = const(1)   # firmware.session event kinds
_EV_SESSION_STOP = const(2)


class App:
    # Shared by every instance through the class: no slot in each app's attribute dict.
    clock = clock
    version = VERSION

    def __init__(self, machine, config_path="column.json", store_prefix="energy", pins=None,
                 use_wdt=True, log=None):
        self.log = log or print
        self.config_path = config_path
        self.meter = None
        self.link = None
        self._meter_prev_wh = -1
        self._meter_cycles = 0          # meter.cycles at the last control step
        self._alive = 0
        self._reset_requested = False
        self.tasks = {}  # name -> asyncio task, once run() has started them
        # Sets cfg, config_errors, hal, store, ctl, energy_wh (boot code, see run()).
        from firmware import wiring

        wiring.init(self, machine, config_path, store_prefix, pins, use_wdt)
        self._boot_ms = clock.ticks_ms()

    # -- energy register: advances by the meter's positive deltas, persisted by the store
    def _account_energy(self, now_ms):
        meter = self.meter
        if meter is None or meter.cycles == 0:
            return  # no reading yet: its zero registers are no baseline
        reading = meter.energy_wh
        if self._meter_prev_wh >= 0 and reading > self._meter_prev_wh:
            self.energy_wh += reading - self._meter_prev_wh
            self.store.update(self.energy_wh, now_ms)
        self._meter_prev_wh = reading

    def _drain_events(self, now_ms):
        ev = self.ctl.events
        while len(ev):
            kind, session_id, energy_wh, reason = ev.pop()
            if kind == _EV_SESSION_START:
                self.store.start_session(now_ms)
            elif kind == _EV_SESSION_STOP:
                self.store.stop_session(now_ms)
            if self.link is not None and hasattr(self.link, "on_event"):
                self.link.on_event(kind, session_id, energy_wh, reason, now_ms)

    def request_reset(self):
        self._reset_requested = True

    def uptime_s(self, now_ms):
        return clock.ticks_diff(now_ms, self._boot_ms) // 1000

    # -- tasks ---------------------------------------------------------------------------
    async def control_task(self):
        hal = self.hal
        ctl = self.ctl
        fed_ms = clock.ticks_ms()
        while True:
            now = clock.ticks_ms()
            hal.read_cp()
            meter = self.meter
            if meter is not None:
                # ok only on the step a new whole reading arrived: the controller's own
                # meter_stale_s timer then runs from the last good reading (the driver's
                # is_stale() already waits that long, and both together paused a column
                # only after twice meter_stale_s).
                ok = meter.cycles != self._meter_cycles
                self._meter_cycles = meter.cycles
                cur = meter.current_da
                i1 = cur[0]
                i2 = cur[1]
                i3 = cur[2]
            else:
                ok = False
                i1 = i2 = i3 = 0
            ctl.step(now, hal.cp_high_mv, hal.cp_low_mv, hal.read_pp_ohms(), i1, i2, i3, ok,
                     self.energy_wh, hal.rcd_tripped(), hal.contactor_closed())
            hal.set_duty(ctl.duty)
            hal.set_contactor(ctl.contactor_on)
            self._account_energy(now)
            self._drain_events(now)
            if self.link is not None:
                self.link.refresh(now)
            self._alive |= _T_CONTROL
            if clock.ticks_diff(now, fed_ms) >= _WATCHDOG_PERIOD_MS:
                fed_ms = now
                expected = _T_CONTROL   # and every other task there is (dead ones included)
                if "meter" in self.tasks:
                    expected |= _T_METER
                if "link" in self.tasks:
                    expected |= _T_LINK
                if self._alive & expected == expected:
                    hal.feed_watchdog()
                    self._alive = 0
            if self._reset_requested:
                await clock.sleep_ms(50)  # let the link finish the reply
                self.shutdown(now)
                hal.reset()
            await clock.sleep_ms(CONTROL_PERIOD_MS)

    async def meter_task(self, uart):
        meter = self.meter
        rx = bytearray(64)
        while True:
            now = clock.ticks_ms()
            meter.poll(now)
            n = uart.readinto(rx)
            if n:
                meter.on_bytes(rx, now, n)
            self._alive |= _T_METER
            await clock.sleep_ms(_METER_PERIOD_MS)

    def link_alive(self):
        self._alive |= _T_LINK

    @staticmethod
    def rs485_writer(uart, de):
        """write(data) for an RS-485 line: `de` drives the bus only while sending."""
        def write(data):
            if de is not None:
                de.value(1)
            uart.write(data)
            if hasattr(uart, "flush"):
                uart.flush()  # on a board: wait for the last stop bit before releasing DE
            if de is not None:
                de.value(0)
        return write

    def shutdown(self, now_ms):
        self.store.flush(now_ms)

    # -- wiring --------------------------------------------------------------------------
    async def run(self):
        """Start every task; the HAL opens the UARTs named by the board's pin map. The boot
        code (firmware/wiring.py) is unloaded once the tasks run."""
        from firmware import wiring

        await wiring.start(self)
        wiring.unload("wiring")
        del wiring  # this frame lives as long as the app: it must not hold the module
        await asyncio.gather(*self.tasks.values())


def main(config_path="column.json"):
    import machine

    app = App(machine, config_path)
    asyncio.run(app.run())
