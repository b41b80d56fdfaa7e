# The column controller app: wires the HAL, the control core, the meter, the energy
# store and the gateway link into asyncio tasks. A board runs it from main.py; the HIL
# and the tests run the same code under the unix port or CPython with a virtual board.
#
# Tasks: control (every CONTROL_PERIOD_MS: sense, step, actuate, publish the image),
# meter (Modbus RTU master on the meter UART), link (Modbus RTU/TCP slave or CBOR link)
# and watchdog (feeds the WDT only while every other task has checked in since the
# last feed, so a hung task resets the board).
import asyncio
import gc

from firmware import clock
from firmware.controller import Controller
from firmware.energy_store import EnergyStore
from firmware.flash import FileFlash
from firmware.hal import Hal
from firmware.status import ERR_CONFIG

try:
    from micropython import const
except ImportError:  # CPython
    const = lambda x: x  # noqa: E731

VERSION = (0, 1, 0)
CONTROL_PERIOD_MS = const(10)
WATCHDOG_PERIOD_MS = const(1000)
# The same periods in seconds for asyncio.sleep, made once: a float is a heap object.
_CONTROL_PERIOD_S = CONTROL_PERIOD_MS / 1000
_WATCHDOG_PERIOD_S = WATCHDOG_PERIOD_MS / 1000
_T_CONTROL = const(1)
_T_METER = const(2)
_T_LINK = const(4)
_EV_SESSION_START = const(1)   # firmware.session event kinds
_EV_SESSION_STOP = const(2)


def _load(*names):
    """Import firmware modules one at a time with a collection after each: the garbage an
    import leaves (its module body's code) is then reused by the next module's code
    instead of staying as holes between long-lived objects, where a buffer of 1 KB would
    no longer find room on a small heap."""
    for name in names:
        __import__("firmware." + name)
        gc.collect()


def _load_config_once(path):
    """Validate the config, then unload the validator: its schema and messages are only
    needed at boot (and for a rare ChangeConfiguration), and cost ~13 KB of RAM."""
    import sys

    import firmware
    from firmware import config

    cfg, errors = config.load_config(path)
    del sys.modules["firmware.config"]
    if hasattr(firmware, "config"):
        delattr(firmware, "config")
    return cfg, errors


class App:
    def __init__(self, machine, config_path="column.json", store_prefix="energy", pins=None,
                 use_wdt=True, log=None):
        self.clock = clock
        self.version = VERSION
        self.log = log or print
        self.config_path = config_path
        self.cfg, self.config_errors = _load_config_once(config_path)
        gc.collect()  # the validator and the JSON text are gone: long-lived objects fill their room
        for err in self.config_errors:
            self.log("config error: " + err)
        self.hal = Hal(machine, pins, use_wdt=use_wdt)
        cfg = self.cfg
        self.store = EnergyStore(FileFlash(store_prefix + "_a.bin", store_prefix + "_b.bin"),
                                 quantum_wh=int(cfg["energy_quantum_wh"]),
                                 quantum_ms=int(cfg["energy_quantum_s"]) * 1000)
        self.store.load()
        self.ctl = Controller(None if self.config_errors else cfg, self.store.session_id + 1)
        if self.config_errors:
            self.ctl.fail(ERR_CONFIG)  # safe, non-charging; the link reports why
        elif self.store.session_active:
            # Power was lost mid-session: close it with the energy we had on flash.
            self.ctl.record_power_loss(self.store.session_id, self.store.energy_wh)
            self.store.stop_session(clock.ticks_ms())
        self.energy_wh = self.store.energy_wh
        self._meter_prev_wh = -1
        self.meter = None
        self.link = None
        self._alive = 0
        self._reset_requested = False
        self._boot_ms = clock.ticks_ms()
        self._machine = machine
        self.tasks = {}  # name -> asyncio task, once run() has started them

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
        while True:
            now = clock.ticks_ms()
            hal.read_cp()
            meter = self.meter
            if meter is not None:
                ok = not meter.is_stale(now)
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
            if self._reset_requested:
                await asyncio.sleep(0.05)  # let the link finish the reply
                self.shutdown(now)
                hal.reset()
            await asyncio.sleep(_CONTROL_PERIOD_S)

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
            await asyncio.sleep(0.002)

    async def watchdog_task(self, expected):
        while True:
            if self._alive & expected == expected:
                self.hal.feed_watchdog()
                self._alive = 0
            await asyncio.sleep(_WATCHDOG_PERIOD_S)

    def link_alive(self):
        self._alive |= _T_LINK

    def shutdown(self, now_ms):
        self.store.flush(now_ms)

    # -- wiring --------------------------------------------------------------------------
    async def run(self):
        """Start every task; the HAL opens the UARTs named by the board's pin map."""
        cfg = self.cfg
        hal = self.hal
        # A broken config may have lost the link section or the bus address: the column
        # then stays safe and silent rather than guess where its gateway is.
        link = cfg.get("link") or {}
        mode = link.get("mode")
        modbus = mode in ("modbus-rtu", "modbus-tcp")
        if modbus and "bus_address" not in cfg:
            mode = None
            modbus = False
        # Load every module the column runs on (dependencies first, see _load), and build
        # the meter reader and the link, before any task runs: code loaded between the
        # tasks' allocations would leave the heap fragmented.
        gc.collect()
        if not self.config_errors:
            _load("sdm", "meter")
            from firmware.meter import Meter

            meter_uart, meter_de = hal.uart("meter", cfg["meter"]["baud"])

            def write(data):  # RS-485: drive the bus only while sending
                if meter_de is not None:
                    meter_de.value(1)
                meter_uart.write(data)
                if hasattr(meter_uart, "flush"):
                    meter_uart.flush()
                if meter_de is not None:
                    meter_de.value(0)

            m = cfg["meter"]
            self.meter = Meter(m["type"], m["address"], write, stale_ms=int(cfg["meter_stale_s"]) * 1000)
        if modbus:
            _load("regmap", "image", "modbus", "modbus_slave", "gw_modbus")
            if mode == "modbus-tcp":
                _load("modbus_tcp")  # for the clients to come
            from firmware.gw_modbus import ModbusLink

            self.link = ModbusLink(self, cfg["bus_address"])
        elif mode in ("cbor-serial", "cbor-tcp"):
            _load("cbor", "frames", "messages", "cbor_link", "gw_cbor")
            from firmware.gw_cbor import CborLink

            self.link = CborLink(self)
        else:
            self.log("unknown link mode %s: the column runs without a gateway link" % mode)
        gc.collect()
        self.tasks = tasks = {"control": asyncio.create_task(self.control_task())}
        expected = _T_CONTROL
        if not self.config_errors:
            tasks["meter"] = asyncio.create_task(self.meter_task(meter_uart))
            expected |= _T_METER
        if mode in ("modbus-rtu", "cbor-serial"):
            uart, de = hal.uart("link", link["baud"])
            serve = self.link.serve_rtu if modbus else self.link.serve_serial
            tasks["link"] = asyncio.create_task(serve(uart, de, clock, asyncio, self.link_alive))
            expected |= _T_LINK
        elif self.link is not None:  # modbus-tcp, cbor-tcp: the gateway connects to us
            await self.link.serve_tcp(link["tcp_port"], clock, asyncio, link.get("host", "0.0.0.0"))
        tasks["watchdog"] = asyncio.create_task(self.watchdog_task(expected))
        await asyncio.gather(*tasks.values())


def main(config_path="column.json"):
    import machine

    app = App(machine, config_path)
    asyncio.run(app.run())
