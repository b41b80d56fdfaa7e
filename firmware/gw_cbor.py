# The gateway link over the OCPP-like CBOR message set (firmware/msg_link.py), on a serial
# line (firmware/cbor_serial.py) or as a TCP server the gateway connects to
# (firmware/cbor_tcp.py, which reads and writes the link's transport state, _out and
# accepted): each board carries its own transport only. Only loaded when the config's link
# mode is cbor-serial or cbor-tcp, after firmware/cbor_wire.py and msg_link.py. The column
# announces itself (BootNotification), keeps the gateway informed (StatusNotification on
# change, MeterValues periodically, Start/StopTransaction from session events, Heartbeat)
# and serves the gateway's calls. Payloads are built as dict(name=value): their keys are
# then interned names, shared with msg_link.py's contract, instead of string objects.
from .clock import elapsed_ms
from .msg_link import _TEXTS, Link, MessageError, _error
from .status_names import CP_NAMES, ERROR_NAMES, LIMIT_SOURCE_NAMES, STATUS_NAMES, STOP_NAMES

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

if 0:  # never runs: interned names for these literals, not heap strings (see msg_link.py)
    BootNotification = StatusNotification = MeterValues = StartTransaction = StopTransaction = 0
    heartbeatIntervalS = requestedMessage = SecurityError = GenericError = NotSupported = 0
    RebootRequired = configError = unconfigured = bus_address = hardware_rating_a = 0

# The column's own answers are the last two of msg_link._TEXTS (one string for every text
# of the link: an object each would cost more), there _T_NOT_ACCEPTED and _T_CONFIG_INVALID.
_T_NOT_ACCEPTED = const(19)
_T_CONFIG_INVALID = const(20)
_BOOT_RETRY_FIRST_MS = const(1000)  # a boot nobody answered is sent again after 1 s ...
_BOOT_RETRY_MAX_MS = const(30000)   # ... doubling up to 30 s (a gateway that opens late)
_MAX_HELD_EVENTS = const(8)         # session events kept while the gateway is not there
_METER_VALUES_MS = const(10000)
_STATUS_MIN_MS = const(1000)   # offered-current-only changes are reported at most this often
_MV_CHANGE_DA = const(10)      # a phase current moved this much (1 A): MeterValues now, not in 10 s
_EV_START = const(1)           # firmware.session.EV_SESSION_START
_EV_STOP = const(2)            # firmware.session.EV_SESSION_STOP


class CborLink:
    def __init__(self, app):
        self.app = app
        serve = self._serve  # one method serves every call (a function object each costs RAM)
        self.link = Link(self._write, dict(SetChargingLimit=serve, GetConfiguration=serve,
                                           ChangeConfiguration=serve, Reset=serve,
                                           TriggerMessage=serve))
        self._out = None            # the transport's write(bytes), None while disconnected
        self.accepted = False       # BootNotification accepted by the gateway
        self._boot_ms = None
        self._boot_wait_ms = _BOOT_RETRY_FIRST_MS
        self._boot_id = None
        # Queues kept as tuples: the empty one is shared, so an idle column holds no list.
        self._held = ()             # session events not yet told to the gateway (bounded)
        self.events_dropped = 0     # held events lost to the bound (energy is on flash anyway)
        self._heartbeat_ms = 60000
        self._hb_sent_ms = 0
        self._mv_sent_ms = 0
        self._mv_current_da = None  # the phase currents of the last real reading that went out
        self._status = None         # (status, error, cp, source, offered, sent_ms) last reported
        self._seq = 0
        self._triggered = ()        # messages asked for by TriggerMessage, sent after its result

    # -- transport side ------------------------------------------------------------------
    def _write(self, data):
        if self._out is None:
            raise OSError("link down")
        self._out(data)

    def connected(self, write, now_ms):
        """A transport is up (write(bytes) sends): boot again on it, with no partial frame
        of the last connection (pending calls run to their timeout)."""
        self._out = write
        self.link.reader.reset()
        self.accepted = False
        self._boot_ms = None
        self._boot_wait_ms = _BOOT_RETRY_FIRST_MS
        self._status = None

    def on_bytes(self, data, now_ms):
        if self.accepted and not self.app.config_errors:
            self.app.ctl.heartbeat(now_ms)  # any frame from the gateway proves it is alive
        self.link.on_bytes(data, now_ms)

    # -- periodic work (called from the app's control task) -------------------------------
    def refresh(self, now_ms):
        if self._out is None:
            return
        link = self.link
        link.poll(now_ms)
        if not self.accepted:
            if self._boot_ms is None or elapsed_ms(now_ms, self._boot_ms) >= self._boot_wait_ms:
                if self._boot_ms is not None:
                    self._boot_wait_ms = min(self._boot_wait_ms * 2, _BOOT_RETRY_MAX_MS)
                self._boot_ms = now_ms
                self._send("BootNotification", now_ms)
            return
        pending = link._pending
        while self._held and len(pending) - pending.count(None) < 2:  # leave room for our own calls
            kind, session_id, energy_wh, reason = self._held[0]
            self._held = self._held[1:]
            self.on_event(kind, session_id, energy_wh, reason, now_ms)  # told now: accepted
        while self._triggered:
            action = self._triggered[0]
            self._triggered = self._triggered[1:]
            self._send(action, now_ms)
        if elapsed_ms(now_ms, self._hb_sent_ms) >= self._heartbeat_ms:
            self._send("Heartbeat", now_ms)
        ctl = self.app.ctl
        last = self._status
        if last is None or last[0] != ctl.status or last[1] != ctl.error or last[2] != ctl.cp_state \
                or last[3] != ctl.limit_source or (last[4] != ctl.offered_da and elapsed_ms(
                    now_ms, last[5]) >= _STATUS_MIN_MS):
            self._send("StatusNotification", now_ms)
        meter = self.app.meter
        sent = self._mv_current_da
        since = elapsed_ms(now_ms, self._mv_sent_ms)
        due = since >= _METER_VALUES_MS or (sent is None and meter is not None and meter.cycles > 0)
        if not due and sent is not None and since >= _STATUS_MIN_MS:
            # The gateway shares the site on measured current: a real change must not wait 10 s.
            cur = meter.current_da
            for i in range(3):
                if abs(cur[i] - sent[i]) >= _MV_CHANGE_DA:
                    due = True
        if due:
            self._send("MeterValues", now_ms)

    def on_event(self, kind, session_id, energy_wh, reason, now_ms):
        """Session events are told once the gateway has accepted our boot; until then they
        are held (a bounded few: the register and session counters are on flash anyway)."""
        if kind != _EV_START and kind != _EV_STOP:
            return
        if self._out is None or not self.accepted:
            held = self._held
            if len(held) >= _MAX_HELD_EVENTS:
                held = held[1:]
                self.events_dropped += 1
            self._held = held + ((kind, session_id, energy_wh, reason),)
        elif kind == _EV_START:
            self.link.call("StartTransaction", dict(sessionId=session_id, meterStartWh=energy_wh),
                           now_ms)
        else:
            name = STOP_NAMES[reason] if 0 <= reason < len(STOP_NAMES) else "Other"
            self.link.call("StopTransaction", dict(sessionId=session_id, meterStopWh=energy_wh,
                                                   reason=name), now_ms)

    # -- messages we send ----------------------------------------------------------------
    def _send(self, action, now_ms):
        """Send BootNotification, Heartbeat, StatusNotification or MeterValues."""
        app = self.app
        ctl = app.ctl
        m = app.meter
        on_result = None
        payload = {}  # a Heartbeat's
        if action == "BootNotification":
            if self.accepted:  # asked for by TriggerMessage: boot again from the start
                self.accepted = False
                self._boot_ms = None
                return
            # A boot nobody answered is replaced, not stacked: stale boots would fill the
            # link's few pending-call slots and crowd out everything after acceptance. Its
            # slot frees without a callback (a late answer then counts as unmatched).
            i = self.link._slot(self._boot_id)
            if i >= 0:
                self.link._pending[i] = None
            cfg = app.cfg
            phases = cfg.get("phases", 3)
            payload = dict(columnId=str(cfg.get("column_id", "unconfigured")),
                           firmwareVersion="%d.%d.%d" % app.version, model="evedge-column",
                           phases=phases if phases in (1, 3) else 3,
                           hardwareRatingA=min(80, max(0, cfg.get("hardware_rating_a", 0))),
                           busAddress=cfg.get("bus_address", 0))
            if app.config_errors:
                payload["configError"] = "; ".join(app.config_errors)[:200]
            on_result = self._on_boot
        elif action == "StatusNotification":
            reported = (ctl.status, ctl.error, ctl.cp_state, ctl.limit_source, ctl.offered_da, now_ms)
            payload = dict(status=STATUS_NAMES[ctl.status], errorCode=ERROR_NAMES[ctl.error],
                           cpState=CP_NAMES[ctl.cp_state], offeredA=ctl.offered_da / 10,
                           limitSource=LIMIT_SOURCE_NAMES[ctl.limit_source])
        elif action == "MeterValues":
            self._seq = (self._seq + 1) & 0x7FFFFFFF
            cur = [0, 0, 0]
            volt = [0, 0, 0]
            if m is not None:
                for i in range(3):
                    cur[i] = m.current_da[i] / 10
                    volt[i] = m.voltage_dv[i] / 10
            payload = dict(energyWh=app.energy_wh, sessionEnergyWh=ctl.session_energy_wh,
                           powerW=m.power_w if m is not None else 0, currentA=cur,
                           voltageV=volt, offeredA=ctl.offered_da / 10, seq=self._seq)
        elif action != "Heartbeat":
            return
        msg_id = self.link.call(action, payload, now_ms, on_result)
        if msg_id is None:
            return  # refused (all call slots busy): due again at the next refresh
        # Only what actually went out counts as sent.
        if action == "BootNotification":
            self._boot_id = msg_id
        elif action == "Heartbeat":
            self._hb_sent_ms = now_ms
        elif action == "StatusNotification":
            self._status = reported
        else:
            self._mv_sent_ms = now_ms
            if m is not None and m.cycles > 0:  # a real reading went out
                sent = self._mv_current_da
                if sent is None:
                    sent = self._mv_current_da = [0, 0, 0]
                for i in range(3):
                    sent[i] = m.current_da[i]

    def _on_boot(self, answer):
        if isinstance(answer, dict) and answer.get("status") == "Accepted":
            self.accepted = True
            self._heartbeat_ms = answer["heartbeatIntervalS"] * 1000

    # -- calls we serve ------------------------------------------------------------------
    def _serve(self, payload, now_ms):
        """The gateway's calls. The link has checked the payload against its action's request
        fields, so a required field names the action: limitA SetChargingLimit, key
        ChangeConfiguration, type Reset, requestedMessage TriggerMessage, none GetConfiguration."""
        app = self.app
        ctl = app.ctl
        if "requestedMessage" in payload:
            self._triggered += (payload["requestedMessage"],)
            return dict(status="Accepted")
        if "limitA" in payload or "type" in payload or "key" in payload:
            # A column with a broken config takes no limit, config write or reset; config
            # writes and resets come only from the gateway that accepted our boot on this
            # connection (see firmware.md).
            if "limitA" not in payload and not self.accepted:
                raise _error(_T_NOT_ACCEPTED, "SecurityError")
            if app.config_errors:
                raise MessageError("GenericError", _TEXTS.split("|")[_T_CONFIG_INVALID] +
                                   "; ".join(app.config_errors)[:120])
        if "limitA" in payload:
            ctl.heartbeat(now_ms)
            applied = -1
            if "failsafeA" not in payload or ctl.set_failsafe(int(payload["failsafeA"] * 10)) >= 0:
                applied = ctl.assign_limit(int(payload["limitA"] * 10), payload["validityS"], now_ms)
            if applied < 0:
                return dict(status="Rejected", appliedA=0)
            return dict(status="Accepted", appliedA=applied / 10)
        if "type" in payload:  # Reset
            app.request_reset()
            return dict(status="Accepted")
        if "key" in payload:
            # Only the keys of config_runtime.RUN_TIME, checked against the config the column
            # booted with (valid, or the call was refused): not the whole validator, which a
            # running column no longer has room for. config_runtime is loaded for the call
            # and unloaded after it (as gw_modbus.py does with the validator), so a running
            # column holds no code for a write it rarely gets.
            import sys

            key = payload["key"]
            loaded = "firmware.config_runtime" in sys.modules
            from firmware.config_runtime import change

            try:
                new = change(app.config_path, app.cfg, key, payload["value"])
            finally:
                if not loaded:
                    import firmware

                    del sys.modules["firmware.config_runtime"]
                    if hasattr(firmware, "config_runtime"):
                        delattr(firmware, "config_runtime")
            if new is None:
                return dict(status="NotSupported")  # ratings above all
            if not new:
                return dict(status="Rejected")  # invalid value or failed write: nothing changed
            app.cfg = new
            if key == "failsafe_a":
                ctl.set_failsafe(int(payload["value"] * 10))
                return dict(status="Accepted")
            return dict(status="RebootRequired")
        cfg = app.cfg  # GetConfiguration
        known = {}
        unknown = []
        for key in payload.get("keys") or list(cfg.keys()):
            if key in cfg:
                known[key] = cfg[key]
            else:
                unknown.append(key)
        return dict(configuration=known, unknownKeys=unknown)
