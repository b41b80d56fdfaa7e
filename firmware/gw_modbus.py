# The gateway link over Modbus: the column's register image served as an RTU slave on
# the RS-485 bus or over Modbus TCP, and holding-register writes turned into controller
# commands. Only loaded when the config's link mode is modbus-rtu or modbus-tcp; the TCP
# serving is in firmware/modbus_tcp.py, which only a modbus-tcp board carries.
from array import array

from firmware import image, regmap
from firmware.modbus import RtuRequestParser
from firmware.modbus_slave import ModbusSlave

_EX_DEVICE_FAILURE = 4
_EX_ILLEGAL_VALUE = 3
_RX_CHUNK = 64   # bytes read from the bus at a time


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

    def __init__(self, app, unit_id, rtu=True):
        self.app = app
        self.inputs = array("H", [0] * regmap.INPUT_COUNT)
        self.holding = array("H", [0] * regmap.HOLDING_COUNT)
        self.holding[regmap.HR_ENABLE] = 1
        self.holding[regmap.HR_FAILSAFE_LIMIT] = app.ctl.limits.failsafe_da
        self.slave = ModbusSlave(unit_id, self.inputs, self.holding, self._on_write,
                                 self._on_broadcast)
        # The RTU request parser holds a whole RTU frame (256 B): a TCP column (rtu=False)
        # has none, its connections frame their own requests (firmware/modbus_tcp.py).
        self.parser = RtuRequestParser() if rtu else None
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
        image.fill_inputs(self.inputs, ctl, app.meter, app.energy_wh, app.store.boots,
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

    # -- transports ----------------------------------------------------------------------
    async def serve_rtu(self, uart, de_pin, clock, asyncio, alive, gap_ms=2):
        """Poll the UART, answer requests for our unit; a silence marks a frame gap."""
        # A small read buffer emptied in a loop: the parser holds the frame (RTU_MAX bytes),
        # so a second buffer of that size would only copy it on its way there.
        rx = bytearray(_RX_CHUNK)
        parser = self.parser
        pending = False
        last_rx = clock.ticks_ms()
        while True:
            alive()
            n = uart.readinto(rx)
            now = clock.ticks_ms()
            if n:
                pending = True
                last_rx = now
                while n:
                    taken = 0
                    while taken < n:
                        taken += parser.feed(rx, taken, n)
                        self._answer(uart, de_pin, now)
                    n = uart.readinto(rx) if n == _RX_CHUNK else 0  # a full read: more may wait
            elif pending and clock.ticks_diff(now, last_rx) >= gap_ms:
                pending = False
                parser.gap()
                self._answer(uart, de_pin, now)
            await asyncio.sleep(0.001 if pending else 0.002)

    def _answer(self, uart, de_pin, now):
        slave = self.slave
        while True:
            r = slave.serve_rtu(self.parser, now)
            if r < 0:
                return
            if r > 0:
                if de_pin is not None:
                    de_pin.value(1)
                uart.write(memoryview(slave.out)[0:r])
                if hasattr(uart, "flush"):
                    uart.flush()  # on a board: wait for the last stop bit before releasing DE
                if de_pin is not None:
                    de_pin.value(0)
