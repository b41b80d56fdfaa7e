# Fuzz harness for the column's CBOR link: the frame reader and decoder (firmware/cbor_wire.py,
# named for host code by frames.py and cbor.py), the contract's validation and the link
# (msg_link.py, named by messages.py and cbor_link.py) and the column's handlers (gw_cbor.py's
# CborLink), driven as the column's transports drive the link (firmware/cbor_tcp.py's server
# task, firmware/cbor_serial.py's serve_serial(link, line, de, clock, alive)): connected(),
# bytes in through on_bytes(), the app's periodic refresh(), quiet lines. MicroPython-compatible.
#
# Oracle: no exception out; the link's internal_errors, handler_errors, callback_errors and
# tx_failures stay 0 (a handler of ours that crashes is a bug, not a bad input); everything
# the column writes is whole good frames holding valid messages; a SetChargingLimit or
# ChangeConfiguration reaches its handler only when valid by an independent check of the
# contract; the limit state (assigned limit, validity, failsafe, enable) changes only
# inside an accepted SetChargingLimit / failsafe_a change, and then to what the call asked
# (capped by the ratings, never above them); the ratings in the config never change.
from firmware import cbor, messages

try:   # the oracle's own decoder where there is one (CPython): faster, and not the code under test
    from cbor2 import loads as _decode
except ImportError:  # MicroPython
    _decode = cbor.loads
from firmware.controller import Controller
from firmware.frames import SYNC
from firmware.gw_cbor import CborLink
from fuzz.fw.common import LATER, PERIODIC, QUIET, DigestHarness, Finding, chunks, ref_crc, segments

CONFIG = {
    "column_id": "fuzz-c1", "bus_address": 1, "phases": 3, "hardware_rating_a": 32,
    "installation_rating_a": 25, "failsafe_a": 10,
    "meter": {"type": "sdm630", "address": 1, "baud": 9600},
    "link": {"mode": "cbor-tcp", "tcp_port": 7301},
}
CAP_DA = 250
START_MS = 100000
LATER_MS = 11000      # past the link's call timeout (10 s)
QUIET_MS = 600        # past the frame gap (500 ms): a partial frame is given up
_BAD = ("internal_errors", "handler_errors", "callback_errors", "tx_failures")
_COUNTED = ("bad_cbor", "bad_messages", "unknown_actions", "unsupported", "unmatched", "rx_stale",
            "calls_refused", "timeouts")
_READER = ("bad_crc", "oversize", "garbage_bytes", "dropped")


class App:
    """What CborLink reads from the app, with a real Controller."""

    def __init__(self, config_path):
        self.cfg = dict(CONFIG)
        self.config_errors = []
        self.config_path = config_path
        self.version = (0, 1, 0)
        self.ctl = Controller(self.cfg, 1)
        self.meter = None
        self.energy_wh = 4321
        self.resets = 0

    def request_reset(self):
        self.resets += 1

    def log(self, msg):
        pass


def _num(v, lo, hi):
    t = type(v)
    return (t is int or t is float) and v - v == 0 and lo <= v <= hi


def limit_call_ok(p):
    """SetChargingLimit's request fields, checked here without firmware/messages.py."""
    if type(p) is not dict:
        return False
    for k in p:
        if k not in ("limitA", "validityS", "failsafeA"):
            return False
    if "limitA" not in p or "validityS" not in p or not _num(p["limitA"], 0, 80):
        return False
    if type(p["validityS"]) is not int or not 0 <= p["validityS"] <= 86400:
        return False
    return "failsafeA" not in p or _num(p["failsafeA"], 0, 80)


def _cap(da):
    return da if da < CAP_DA else CAP_DA


def parse_frames(data):
    """The payloads of data if it is whole good frames back to back, else None."""
    out = []
    i = 0
    n = len(data)
    while i < n:
        if n - i < 5 or data[i] != SYNC:
            return None
        length = (data[i + 1] << 8) | data[i + 2]
        end = i + 3 + length
        if length == 0 or end + 2 > n:
            return None
        c = ref_crc(data, i + 1, end)
        if data[end] != c & 0xFF or data[end + 1] != c >> 8:
            return None
        out.append(bytes(data[i + 3:end]))
        i = end + 2
    return out


def parse_frames_lenient(data):
    """The payloads of every good frame anywhere in data (as a receiver hunting for them)."""
    out = []
    n = len(data)
    for i in range(n - 4):
        if data[i] != SYNC:
            continue
        length = (data[i + 1] << 8) | data[i + 2]
        end = i + 3 + length
        if length == 0 or end + 2 > n:
            continue
        c = ref_crc(data, i + 1, end)
        if data[end] == c & 0xFF and data[end + 1] == c >> 8:
            out.append(bytes(data[i + 3:end]))
    return out


class Harness(DigestHarness):
    """run(data) feeds one input to a fresh column link; returns the errors counted (as
    text) or None; raises Finding when a property is broken. `digest` sums up what the
    column sent, to compare the two interpreters."""

    def _fresh(self):
        app = App(self.config_path)
        link = CborLink(app)
        return app, link

    def run(self, data):
        app, cl = self._fresh()
        self.app = app
        self.sent = []
        self.finding = None    # a property broken inside a handler (the link catches exceptions)
        self._parts = []       # what the digest is made of
        self._checked = 0      # frames in `sent` already checked
        self.errors = []
        self.expected = self._state(START_MS)
        handlers = cl.link.handlers
        for action in list(handlers):
            handlers[action] = self._watch(action, handlers[action])
        now = START_MS
        cl.connected(self.sent.append, now)
        cl.refresh(now)   # boots: BootNotification goes out
        self._after(now)
        for flags, body in segments(data):
            if flags & LATER:
                now += LATER_MS
            for chunk in chunks(flags, body):
                cl.on_bytes(chunk, now)
                self._after(now)
                now += 1
            if flags & QUIET:   # the link gives up a partial frame (what refresh does first)
                now += QUIET_MS
                cl.link.poll(now)
                self._after(now)
            if flags & PERIODIC:
                cl.refresh(now)
                self._after(now)
        stats = cl.link.stats()
        for name in _BAD:
            if stats[name]:
                raise Finding("link counted %s: %d" % (name, stats[name]))
        cfg = app.cfg
        if cfg["hardware_rating_a"] != CONFIG["hardware_rating_a"] or \
                cfg["installation_rating_a"] != CONFIG["installation_rating_a"]:
            raise Finding("ratings changed over the link: %r" % cfg)
        if not _num(cfg["failsafe_a"], 0, CONFIG["installation_rating_a"]):
            raise Finding("failsafe_a %r above the installation rating" % (cfg["failsafe_a"],))
        self._parts.append(bytes([stats[k] & 0xFF for k in _COUNTED + _READER]))
        for name in _COUNTED + _READER:
            if stats[name]:
                self.errors.append("link: " + name)
        if not self.errors:
            return None
        seen = []
        for e in self.errors:
            if e not in seen:
                seen.append(e)
        return "\n".join(seen)

    def _state(self, now):
        lim = self.app.ctl.limits
        return (lim.gateway_da, lim.gateway_valid, lim.failsafe_da, lim.enabled,
                lim.assignment_remaining_s(now))

    def _after(self, now):
        """Nothing but an accepted handler call may have changed the limits; what went out is
        whole frames of valid messages."""
        if self.finding:
            raise Finding(self.finding)
        state = self._state(now)
        if state[:4] != self.expected[:4] or state[4] > self.expected[4]:
            raise Finding("limit state (limit_da, valid, failsafe_da, enabled, remaining_s) changed outside "
                          "an accepted call: %r, expected %r" % (state, self.expected))
        self.expected = state   # the validity runs down with time
        for frame in self.sent[self._checked:]:
            payloads = parse_frames(frame)
            if payloads is None or len(payloads) != 1:
                raise Finding("the column wrote something that is not one good frame: %s"
                              % bytes(frame).hex())
            try:
                msg = messages.parse(_decode(payloads[0]))
            except Exception as exc:
                raise Finding("the column sent an invalid message (%s): %s"
                              % (exc, payloads[0].hex())) from None
            if msg[0] == messages.ERROR:
                self.errors.append("error sent: " + msg[2])
                # Its description may name the first bad key of a map, and MicroPython's maps
                # have another order: the digest takes the code only.
                self._parts.append(("%d %d %s" % (msg[0], msg[1], msg[2])).encode())
            else:
                self._parts.append(payloads[0])
        self._checked = len(self.sent)

    def _watch(self, action, handler):
        def watched(payload, now_ms):
            try:
                return judged(payload, now_ms)
            except Finding as exc:   # the link would take it for a handler crash: keep it for _after
                self.finding = str(exc)
                raise

        def judged(payload, now_ms):
            before = self._state(now_ms)
            cfg_before = dict(self.app.cfg)
            if action == "SetChargingLimit" and not limit_call_ok(payload):
                raise Finding("an invalid SetChargingLimit reached its handler: %r" % (payload,))
            try:
                result = handler(payload, now_ms)
            except messages.MessageError:
                self._unchanged(action, before, now_ms)
                raise
            status = result.get("status") if type(result) is dict else None
            if action == "SetChargingLimit":
                self._check_limit(payload, status, before, now_ms)
            elif action == "ChangeConfiguration":
                self._check_change(payload, status, before, cfg_before, now_ms)
            else:
                self._unchanged(action, before, now_ms)
            if status in ("Rejected", "NotSupported"):
                self.errors.append("%s %s" % (action, status))
            self.expected = self._state(now_ms)
            return result

        return watched

    def _unchanged(self, action, before, now):
        if self._state(now)[:4] != before[:4]:
            raise Finding("%s changed the limit state without being accepted: %r -> %r"
                          % (action, before, self._state(now)))

    def _check_limit(self, p, status, before, now):
        if status != "Accepted":
            self._unchanged("SetChargingLimit", before, now)
            return
        da, valid, fs, _enabled, left = self._state(now)
        want_fs = _cap(int(p["failsafeA"] * 10)) if "failsafeA" in p else before[2]
        if fs != want_fs:
            raise Finding("SetChargingLimit %r: failsafe %d dA, expected %d" % (p, fs, want_fs))
        if p["validityS"] == 0:
            if valid:
                raise Finding("SetChargingLimit %r with validity 0 left an assignment" % (p,))
            return
        want = _cap(int(p["limitA"] * 10))
        if not valid or da != want or da > p["limitA"] * 10 or left != min(p["validityS"], 86400):
            raise Finding("SetChargingLimit %r applied as %r (expected %d dA for %d s)"
                          % (p, (da, valid, left), want, p["validityS"]))

    def _check_change(self, p, status, before, cfg_before, now):
        key = p.get("key")
        value = p.get("value")
        if status == "Accepted" and key == "failsafe_a":
            if not (type(value) is int or type(value) is float) or not (value == 0 or 6 <= value <= 25):
                raise Finding("ChangeConfiguration accepted failsafe_a = %r" % (value,))
            if self._state(now)[2] != _cap(int(value * 10)):
                raise Finding("failsafe_a %r accepted but the failsafe is %d dA"
                              % (value, self._state(now)[2]))
            return
        self._unchanged("ChangeConfiguration", before, now)
        if status != "RebootRequired" and self.app.cfg != cfg_before:
            raise Finding("ChangeConfiguration %r (%s) changed the config" % (p, status))
