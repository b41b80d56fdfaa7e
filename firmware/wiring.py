# The app's boot: reads and checks the config, builds the HAL, the energy store, the
# controller, the meter reader and the gateway link, and starts the tasks. Code a board
# runs once: App.run() unloads this module when the tasks run, so its RAM goes to data.
# The HIL's column farm (hil/rig/column_farm.py) builds its hosted columns with the same
# functions.
import asyncio
import gc
import sys

from . import clock
from .controller import Controller
from .energy_store import EnergyStore
from .flash import FileFlash
from .hal import Hal
from .status import ERR_CONFIG

_MODBUS = ("modbus-rtu", "modbus-tcp")
_SERIAL = ("modbus-rtu", "cbor-serial")


def _load(*names):
    """Import firmware modules one at a time with a collection after each: the garbage an
    import leaves (its module body's code) is then reused by the next module's code
    instead of staying as holes between long-lived objects, where a buffer of 1 KB would
    no longer find room on a small heap. Returns the last one."""
    for name in names:
        __import__("firmware." + name)
        gc.collect()
    return sys.modules["firmware." + name]


def unload(name):
    """Forget a firmware module that is read once: the collection after reuses its RAM."""
    import firmware

    del sys.modules["firmware." + name]
    if hasattr(firmware, name):
        delattr(firmware, name)
    gc.collect()


def init(app, machine, config_path, store_prefix, pins, use_wdt):
    """App.__init__: the config (validated, then the validator unloaded: its schema and
    messages are only needed at boot and for a rare ChangeConfiguration), the HAL, the
    energy store and the controller."""
    before = list(sys.modules)
    from firmware import config

    cfg, errors = config.load_config(config_path)
    errors = tuple(errors)  # without errors the shared empty tuple: no list kept for nothing
    app.cfg, app.config_errors = cfg, errors
    config = None
    # The validator and what it loaded for itself go (a link that needs one of those loads
    # it again), and the JSON text is gone: long-lived objects fill their room.
    for name in list(sys.modules):
        if name == "firmware.config" or (name.startswith("firmware.") and name not in before):
            unload(name[9:])
    for err in errors:
        app.log("config error: " + err)
    app.hal = Hal(machine, pins, use_wdt=use_wdt)
    store = app.store = EnergyStore(FileFlash(store_prefix + "_a.bin", store_prefix + "_b.bin"),
                                    quantum_wh=int(cfg["energy_quantum_wh"]),
                                    quantum_ms=int(cfg["energy_quantum_s"]) * 1000)
    store.load()
    # A ring of 4 session events, not the default 16: the control task pops them after every
    # step, a step pushes at most 2 (an error, and a stop or a start), the boot 1 (power loss).
    ctl = app.ctl = Controller(None if errors else cfg, store.session_id + 1, 4)
    if errors:
        ctl.fail(ERR_CONFIG)  # safe, non-charging; the link reports why
    elif store.session_active:
        # Power was lost mid-session: close it with the energy we had on flash.
        ctl.record_power_loss(store.session_id, store.energy_wh)
        store.stop_session(clock.ticks_ms())
    app.energy_wh = store.energy_wh


def link_mode(app):
    """The configured link mode, or None. A broken config may have lost the link section
    or the bus address: the column then stays safe and silent rather than guess where its
    gateway is."""
    cfg = app.cfg
    mode = (cfg.get("link") or {}).get("mode")
    if mode in _MODBUS and "bus_address" not in cfg:
        return None
    return mode


def meter(app, uart, de):
    """The meter reader on `uart` (RS-485: `de` drives the bus only while sending). No
    closure here: it would keep this module's globals, and so all of its code, alive."""
    cfg = app.cfg
    _load("sdm", "meter")
    from firmware.meter import Meter

    m = cfg["meter"]
    app.meter = Meter(m["type"], m["address"], app.rs485_writer(uart, de),
                      stale_ms=int(cfg["meter_stale_s"]) * 1000)


def link(app, mode):
    """The gateway link of `mode` (its modules loaded by name from firmware/links.py, so a
    board's bundle holds its own mode's link only), or None for an unknown mode."""
    from firmware import links

    modules = None
    for name, names in links.LINKS:
        if name == mode:
            modules = names
    unload("links")
    if not modules:
        app.log("unknown link mode %s: the column runs without a gateway link" % mode)
        return None
    module = _load(*modules)
    if mode in _MODBUS:
        # An RS-485 column's request parser (firmware/modbus.py, loaded for modbus-rtu only).
        parser = sys.modules["firmware.modbus"].RtuRequestParser() if mode in _SERIAL else None
        app.link = module.ModbusLink(app, app.cfg["bus_address"], parser)
    else:
        app.link = module.CborLink(app)
    return app.link


def serve_serial(app, mode, line, de):
    """The task body serving the link of a serial mode on the UART `line` (RS-485: `de`
    drives the bus only while sending). The serial loop is taken by its loaded name
    (firmware/links.py loads it for the mode), as in serve_tcp()."""
    mods = sys.modules
    if mode in _MODBUS:
        return mods["firmware.modbus"].serve_rtu(app.link, line, de, clock, asyncio, app.link_alive)
    return mods["firmware.cbor_serial"].serve_serial(app.link, line, de, clock, app.link_alive)


def serve_tcp(app, mode):
    """Start serving the link of a TCP mode on its port (firmware/tcp_link.py): returns the
    server task, which never ends by itself (cancel it to close the port and its
    connections). Its modules are taken by their loaded names (firmware/links.py loads
    them for the mode): an import here would put them in every board's bundle."""
    lcfg = app.cfg["link"]
    port = lcfg["tcp_port"]
    host = lcfg.get("host", "0.0.0.0")
    mods = sys.modules
    if mode in _MODBUS:
        return mods["firmware.modbus_tcp"].serve_tcp(app.link, port, host)
    return mods["firmware.cbor_tcp"].serve_tcp(app.link, port, host)


async def start(app):
    """Load every module the column runs on and build the meter reader and the link, then
    start the tasks (in app.tasks; the control task feeds the watchdog): code loaded between the
    tasks' allocations would leave the heap fragmented."""
    cfg = app.cfg
    hal = app.hal
    mode = link_mode(app)
    gc.collect()
    tasks = app.tasks
    if not app.config_errors:
        uart, de = hal.uart("meter", cfg["meter"]["baud"])
        meter(app, uart, de)
    link(app, mode)
    gc.collect()
    tasks["control"] = asyncio.create_task(app.control_task())
    if not app.config_errors:
        tasks["meter"] = asyncio.create_task(app.meter_task(uart))
    if app.link is None:
        pass
    elif mode in _SERIAL:
        line, line_de = hal.uart("link", cfg["link"]["baud"])
        tasks["link"] = asyncio.create_task(serve_serial(app, mode, line, line_de))
    else:  # modbus-tcp, cbor-tcp: the gateway connects to us
        tasks["tcp"] = serve_tcp(app, mode)
