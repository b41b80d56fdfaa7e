# The gateway link over Modbus: the column's register image served as an RTU slave on
# the RS-485 bus or over Modbus TCP, and holding-register writes turned into controller
# commands. Only loaded when the config's link mode is modbus-rtu or modbus-tcp; the
# transports are in firmware/modbus.py (RTU) and firmware/modbus_tcp.py (TCP), each
# carried only by a board of its mode.
from array import array

from . import regmap
from .modbus_slave import ModbusSlave

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

_U16 = const(0xFFFF)
_EX_ILLEGAL_VALUE = const(3)    # Modbus exception codes (modbus_slave.EX_*)
_EX_DEVICE_FAILURE = const(4)


def fill_inputs(image, ctl, meter, energy_wh, boots, bad_frames, uptime_s, remaining_s):
    """The column's state into the input image (regmap IR_*): called every control step,
    so it allocates nothing (integer stores into an array('H'))."""
    image[regmap.IR_STATUS] = ctl.status
    image[regmap.IR_CP_STATE] = ctl.cp_state
    image[regmap.IR_ERROR] = ctl.error
    image[regmap.IR_LIMIT_SOURCE] = ctl.limit_source
    image[regmap.IR_OFFERED_CURRENT] = ctl.offered_da
    cur = meter.current_da if meter is not None else None
    volt = meter.voltage_dv if meter is not None else None
    for i in range(3):
        image[regmap.IR_CURRENT_L1 + i] = cur[i] & _U16 if cur is not None else 0
        image[regmap.IR_VOLTAGE_L1 + i] = volt[i] & _U16 if volt is not None else 0
    power = meter.power_w if meter is not None else 0
    regmap.put_u32(image, regmap.IR_POWER, power if power > 0 else 0)
    regmap.put_u32(image, regmap.IR_ENERGY, energy_wh)
    regmap.put_u32(image, regmap.IR_SESSION_ENERGY, ctl.session_energy_wh)
    image[regmap.IR_SESSION_ID] = ctl.session_id & _U16
    # The flag of the error, then the conditions that are not errors.
    err = ctl.error
    flags = regmap.ERROR_FLAGS[err] if err < len(regmap.ERROR_FLAGS) else 0
    if ctl.failsafe_active:
        flags |= regmap.FLAG_FAILSAFE_ACTIVE
    if ctl.paused:
        flags |= regmap.FLAG_PAUSED
    if not ctl.limits.enabled:
        flags |= regmap.FLAG_DISABLED
    image[regmap.IR_ERROR_FLAGS] = flags
    image[regmap.IR_ASSIGNED_REMAINING] = remaining_s & _U16
    image[regmap.IR_FAILSAFE_LIMIT] = ctl.limits.failsafe_da
    image[regmap.IR_BAD_FRAMES] = bad_frames & _U16
    image[regmap.IR_BOOTS] = boots & _U16
    image[regmap.IR_OVERDRAW_EVENTS] = ctl.limits.overdraw_count & _U16
    image[regmap.IR_CABLE_RATING] = ctl.cable_da
    regmap.put_u32(image, regmap.IR_UPTIME, uptime_s)


def _save_bus_address(path, new):
    """Rewrite the config file at path with bus_address = new: 0 when saved, 03 when the
    result would not validate (nothing written), 04 when the file cannot be read or
    written. The technician's file is kept as written (no defaults merged in)."""
    import json
    import sys

    import firmware

    loaded = "firmware.config" in sys.modules
    from firmware import config

    try:
        try:
            with open(path) as f:
                data = json.loads(f.read())
        except Exception:
            return _EX_DEVICE_FAILURE
        if not isinstance(data, dict):
            return _EX_ILLEGAL_VALUE
        data["bus_address"] = new
        if config.validate(data):
            return _EX_ILLEGAL_VALUE
        if config.save_config(path, data):
            return _EX_DEVICE_FAILURE
        return 0
    finally:
        if not loaded:  # as at boot (app._load_config_once): the validator costs ~13 KB of RAM
            del sys.modules["firmware.config"]
            if hasattr(firmware, "config"):
                delattr(firmware, "config")


class ModbusLink:
    """Owns the register images; the app refreshes `inputs` every control step."""

    def __init__(self, app, unit_id, parser=None):
        self.app = app
        self.inputs = array("H", [0] * regmap.INPUT_COUNT)
        self.holding = array("H", [0] * regmap.HOLDING_COUNT)
        self.holding[regmap.HR_ENABLE] = 1
        self.holding[regmap.HR_FAILSAFE_LIMIT] = app.ctl.limits.failsafe_da
        self.slave = ModbusSlave(unit_id, self.inputs, self.holding, self._on_write,
                                 self._on_broadcast)
        # An RS-485 column's RtuRequestParser (firmware/modbus.py: it holds a whole RTU
        # frame, 256 B); a TCP column has none, its connections frame their own requests
        # (firmware/modbus_tcp.py).
        self.parser = parser
        inp = self.inputs
        cfg = app.cfg
        inp[regmap.IR_FW_VERSION] = (app.version[0] << 8) | app.version[1]
        inp[regmap.IR_FW_PATCH] = app.version[2]
        inp[regmap.IR_BUS_ADDRESS] = unit_id
        regmap.put_ascii(inp, regmap.IR_COLUMN_ID, regmap.COLUMN_ID_WORDS, cfg.get("column_id", ""))
        # A broken config may lack these; the image then shows 0 next to the config flag.
        inp[regmap.IR_PHASES] = cfg.get("phases", 0)
        inp[regmap.IR_HARDWARE_RATING] = int(cfg.get("hardware_rating_a", 0) * 10)

    def refresh(self, now_ms):
        """Copy the column's state into the input image (every control step, no allocation)."""
        app = self.app
        ctl = app.ctl
        fill_inputs(self.inputs, ctl, app.meter, app.energy_wh, app.store.boots,
                          self.bad_frames(), app.uptime_s(now_ms),
                          ctl.limits.assignment_remaining_s(now_ms))

    def bad_frames(self):
        """Damaged RTU frames (the bad_frames register); 0 over TCP."""
        return self.parser.errors() if self.parser is not None else 0

    # -- writes from the gateway ---------------------------------------------------------
    def _on_write(self, start, count, now_ms):
        app = self.app
        if app.config_errors:
            return _EX_DEVICE_FAILURE  # a column with a broken config takes no commands
        end = start + count
        hold = self.holding
        if start <= regmap.HR_ADDRESS_CONFIRM < end:
            # A move is written alone (new address and/or confirm), so that a refused one
            # changes nothing and an accepted one has no other effect to fail after it.
            if start < regmap.HR_NEW_ADDRESS:
                return _EX_ILLEGAL_VALUE
            return self._change_address(hold[regmap.HR_NEW_ADDRESS], hold[regmap.HR_ADDRESS_CONFIRM])
        ctl = app.ctl
        ctl.heartbeat(now_ms)  # any accepted write proves the gateway is alive
        if start <= regmap.HR_FAILSAFE_LIMIT < end:
            if ctl.set_failsafe(hold[regmap.HR_FAILSAFE_LIMIT]) < 0:
                return _EX_ILLEGAL_VALUE
        if start <= regmap.HR_ASSIGNED_VALIDITY and end > regmap.HR_ASSIGNED_LIMIT:
            if ctl.assign_limit(hold[regmap.HR_ASSIGNED_LIMIT], hold[regmap.HR_ASSIGNED_VALIDITY],
                                now_ms) < 0:
                return _EX_ILLEGAL_VALUE
        if start <= regmap.HR_ENABLE < end:
            ctl.limits.set_enabled(hold[regmap.HR_ENABLE] == 1)
        if start <= regmap.HR_RESET < end:
            app.request_reset()
        return 0

    def _change_address(self, new, confirm):
        """Move the column to bus address `new` (commissioning, tools/commission.py): the
        confirm must be regmap.address_confirm(current, new), and the config with the new
        bus_address must validate and be saved (atomically) before the slave answers on
        it. The reply to this write still goes out from the old address; every request
        after it is answered on the new one. Rare and not on the control path: it may
        allocate (the config validator is loaded for it and unloaded after)."""
        current = self.slave.unit_id
        if confirm != regmap.address_confirm(current, new) or not 1 <= new <= regmap.BROADCAST_MAX_ADDRESS:
            return _EX_ILLEGAL_VALUE
        if new == current:
            return 0
        app = self.app
        code = _save_bus_address(app.config_path, new)
        if code:
            return code
        cfg = dict(app.cfg)
        cfg["bus_address"] = new
        app.cfg = cfg
        self.slave.unit_id = new
        self.inputs[regmap.IR_BUS_ADDRESS] = new
        app.log("bus address changed from %d to %d" % (current, new))
        return 0

    def _on_broadcast(self, limit_da, validity_s, now_ms):
        if self.app.config_errors:
            return
        self.app.ctl.heartbeat(now_ms)
        self.app.ctl.assign_limit(limit_da, validity_s, now_ms)
