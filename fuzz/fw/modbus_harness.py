# Fuzz harness for the column's Modbus RTU side: firmware/modbus.py (framer),
# modbus_slave.py (slave) and gw_modbus.py (register image, writes into the controller),
# driven the way firmware.modbus.serve_rtu drives them (feed, answer, gap, answer).
# MicroPython-compatible.
#
# Oracle: an independent model of the register map (regmap.py ranges, the broadcast table
# and the bus address move) says, for every request the framer delivers, the exact reply
# (or none) and the limit state after it. Checked for every delivered request: it is on
# the wire since the last gap with a good CRC; the reply matches byte for byte (so a
# wrong frame gets the right exception, and broadcasts and other units get none); the
# assigned limit, its validity, the failsafe, the enable flag, the holding image and the
# bus address match the model (so an invalid write changes nothing). A burst that is one
# whole, good request is delivered exactly once. Nothing raises.
from firmware import regmap
from firmware.controller import Controller
from firmware.gw_modbus import ModbusLink
from firmware.modbus import RtuRequestParser, _answer
from fuzz.fw.common import LATER, QUIET, DigestHarness, Finding, chunks, ref_crc, segments, with_crc

UNIT = 7
CONFIG = {
    "column_id": "fuzz-07", "bus_address": UNIT, "phases": 3, "hardware_rating_a": 32,
    "installation_rating_a": 25, "failsafe_a": 10,
    "meter": {"type": "sdm630", "address": 1, "baud": 9600},
    "link": {"mode": "modbus-rtu", "baud": 19200},
}
CAP_DA = 250          # min(hardware, installation) in deci-amps
START_MS = 100000
LATER_MS = 90000      # beyond a short validity, not beyond a day
_MAX_STEPS = 10000    # requests one input may deliver (a loop guard)


class _Store:
    boots = 3


class App:
    """What ModbusLink reads from the app, with a real Controller."""

    def __init__(self, config_path):
        self.cfg = dict(CONFIG)
        self.config_errors = []
        self.config_path = config_path
        self.version = (0, 1, 0)
        self.ctl = Controller(self.cfg, 1)
        self.meter = None
        self.energy_wh = 123456
        self.store = _Store()
        self.resets = 0

    def request_reset(self):
        self.resets += 1

    def log(self, msg):
        pass

    def uptime_s(self, now_ms):
        return now_ms // 1000


def _u16(b, i):
    return (b[i] << 8) | b[i + 1]


def _words(values):
    out = bytearray()
    for v in values:
        out.append(v >> 8)
        out.append(v & 0xFF)
    return out


class Model:
    """The register map as documented, kept next to the real slave."""

    def __init__(self, failsafe_da):
        self.unit = UNIT
        self.hold = [0] * regmap.HOLDING_COUNT
        self.hold[regmap.HR_ENABLE] = 1
        self.hold[regmap.HR_FAILSAFE_LIMIT] = failsafe_da
        self.gw_da = 0
        self.gw_valid = False
        self.gw_ms = 0
        self.gw_validity_ms = 0
        self.failsafe_da = failsafe_da
        self.enabled = True
        self.resets = 0
        self.dropped = None    # why the last broadcast was dropped

    def remaining_s(self, now):
        if not self.gw_valid:
            return 0
        left = self.gw_validity_ms - (now - self.gw_ms)
        return 0 if left <= 0 else (left + 999) // 1000

    def _assign(self, limit, validity, now):
        if validity == 0:
            self.gw_valid = False
            return
        validity = min(validity, 86400)
        self.gw_da = limit if limit < CAP_DA else CAP_DA
        self.gw_ms = now
        self.gw_validity_ms = validity * 1000
        self.gw_valid = True

    def reply(self, frame, inputs, now):
        """The reply the slave must send to a delivered request (None: no reply); applies
        the request's effects."""
        unit = frame[0]
        fc = frame[1]
        if unit == 0:
            self.dropped = self._broadcast(fc, frame, now)
            return None
        if unit != self.unit:
            return None
        if fc in (3, 4):
            start = _u16(frame, 2)
            count = _u16(frame, 4)
            image = self.hold if fc == 3 else inputs
            if not 1 <= count <= 125:
                return self._exc(fc, 3)
            if start + count > len(image):
                return self._exc(fc, 2)
            body = bytearray([unit, fc, 2 * count])
            body.extend(_words([image[i] for i in range(start, start + count)]))
            return with_crc(body)
        if fc == 6:
            code = self._write(_u16(frame, 2), [_u16(frame, 4)], now)
            return self._exc(fc, code) if code else with_crc(frame[0:6])
        if fc == 16:
            count = _u16(frame, 4)
            if not 1 <= count <= 123 or frame[6] != 2 * count:
                return self._exc(fc, 3)
            code = self._write(_u16(frame, 2), [_u16(frame, 7 + 2 * i) for i in range(count)], now)
            return self._exc(fc, code) if code else with_crc(frame[0:6])
        return self._exc(fc, 1)

    def _exc(self, fc, code):
        return with_crc(bytes([self.unit, (fc | 0x80) & 0xFF, code]))

    def _write(self, start, values, now):
        end = start + len(values)
        if end > regmap.HOLDING_COUNT:
            return 2
        for i in range(len(values)):
            lo, hi = regmap.HOLDING_RANGES[start + i]
            if not lo <= values[i] <= hi:
                return 3
        new = list(self.hold)
        for i in range(len(values)):
            new[start + i] = values[i]
        if start <= regmap.HR_ADDRESS_CONFIRM < end:   # a bus address move, written alone
            if start < regmap.HR_NEW_ADDRESS:
                return 3
            to = new[regmap.HR_NEW_ADDRESS]
            if new[regmap.HR_ADDRESS_CONFIRM] != regmap.address_confirm(self.unit, to) or not 1 <= to <= 247:
                return 3
            self.hold = new
            self.unit = to   # the reply still goes out from the old address
            return 0
        if start <= regmap.HR_FAILSAFE_LIMIT < end:
            fs = new[regmap.HR_FAILSAFE_LIMIT]
            self.failsafe_da = fs if fs < CAP_DA else CAP_DA
        if start <= regmap.HR_ASSIGNED_VALIDITY and end > regmap.HR_ASSIGNED_LIMIT:
            self._assign(new[regmap.HR_ASSIGNED_LIMIT], new[regmap.HR_ASSIGNED_VALIDITY], now)
        if start <= regmap.HR_ENABLE < end:
            self.enabled = new[regmap.HR_ENABLE] == 1
        if start <= regmap.HR_RESET < end:
            self.resets += 1
        self.hold = new
        return 0

    def _broadcast(self, fc, frame, now):
        """Apply our entry of a limit table; the reason a broadcast is dropped, else None."""
        if fc != 16:
            return "broadcast of " + _FUNCTIONS.get(fc, "another function")
        start = _u16(frame, 2)
        count = _u16(frame, 4)
        last = start + count - 1
        if not 1 <= count <= 123 or frame[6] != 2 * count or start < regmap.BROADCAST_TABLE \
                or last > regmap.BROADCAST_TABLE + regmap.BROADCAST_MAX_ADDRESS:
            return "broadcast outside the limit table"
        reg = regmap.BROADCAST_TABLE + self.unit
        if reg <= start or reg > last:
            return None
        limit = _u16(frame, 7 + 2 * (reg - start))
        if limit == regmap.NO_CHANGE:
            return None
        if limit > regmap.MAX_LIMIT_DA:
            return "broadcast limit out of range"
        validity = _u16(frame, 7)
        self.hold[regmap.HR_ASSIGNED_LIMIT] = limit
        self.hold[regmap.HR_ASSIGNED_VALIDITY] = validity
        self._assign(limit, validity, now)
        return None


def request_length(frame):
    """Length of a request of the function codes the gateway sends, from its first bytes;
    0 for anything else (the liveness check only looks at those)."""
    if len(frame) < 2:
        return 0
    fc = frame[1]
    if fc in (3, 4, 6):
        return 8
    if fc == 16 and len(frame) > 6:
        return 9 + frame[6]
    return 0


class _Uart:
    """Pairs each reply with the request delivered just before it."""

    def __init__(self, events):
        self.events = events

    def write(self, data):
        ev = self.events
        if not ev or ev[-1][1] is not None:
            raise Finding("a reply without a request: %s" % bytes(data).hex())
        ev[-1][1] = bytes(data)


_EXCEPTIONS = {1: "illegal function", 2: "illegal address", 3: "illegal value", 4: "device failure"}
_FUNCTIONS = {3: "read holding", 4: "read input", 6: "write single", 16: "write multiple"}
_COUNTERS = ("bad_crc", "truncated", "garbage", "too_long", "foreign")


class _Run:
    """One input's column, model and what was seen on the wire."""

    def __init__(self, app, link):
        self.app = app
        self.link = link
        self.model = Model(link.holding[regmap.HR_FAILSAFE_LIMIT])
        self.events = []       # [request frame, its reply or None], in order
        self.delivered = []    # requests delivered during the current burst
        self.replies = []
        self.window = bytearray()   # bytes fed since the last gap
        self.errors = []
        self.steps = 0
        self.now = 0
        self.uart = _Uart(self.events)

    def answer(self, now):
        """As firmware.modbus.serve_rtu after each read and at a gap; then check what happened."""
        self.now = now
        link = self.link
        _answer(link.slave, link.parser, self.uart.write, now)
        self.check()

    def check(self):
        """Judge the requests answered so far (called before the slave takes the next one, so
        that each is judged against the state right after it)."""
        if not self.events:
            return
        now = self.now
        wire = bytes(self.window)
        model = self.model
        for frame, got in self.events:
            if len(frame) < 4 or ref_crc(frame) != 0 or wire.find(frame) < 0:
                raise Finding("delivered a frame that is not a good frame on the wire: %s" % frame.hex())
            expected = model.reply(frame, self.link.inputs, now)
            if got != expected:
                raise Finding("request %s: reply %s, expected %s" % (
                    frame.hex(), got.hex() if got else None, expected.hex() if expected else None))
            if got is not None:
                self.replies.append(got)
                if got[1] & 0x80:
                    self.errors.append("exception %s to %s" % (_EXCEPTIONS.get(got[2], "?"),
                                                               _FUNCTIONS.get(frame[1], "another function")))
            elif frame[0] == 0 and model.dropped:
                self.errors.append(model.dropped)
            self.delivered.append(frame)
            self.compare(now, frame)
        self.steps += len(self.events)
        del self.events[:]
        if self.steps > _MAX_STEPS:
            raise Finding("more than %d requests from one input" % _MAX_STEPS)

    def compare(self, now, frame):
        link = self.link
        model = self.model
        lim = self.app.ctl.limits
        got = (lim.gateway_da, lim.gateway_valid, lim.failsafe_da, lim.enabled,
               lim.assignment_remaining_s(now), link.slave.unit_id)
        want = (model.gw_da, model.gw_valid, model.failsafe_da, model.enabled, model.remaining_s(now),
                model.unit)
        if got != want:
            raise Finding("after %s: limit state (limit_da, valid, failsafe_da, enabled, remaining_s, unit) "
                          "%r, expected %r" % (frame.hex(), got, want))
        for i in range(regmap.HOLDING_COUNT):
            if link.holding[i] != model.hold[i]:
                raise Finding("after %s: holding register %d is %d, expected %d"
                              % (frame.hex(), i, link.holding[i], model.hold[i]))


class Harness(DigestHarness):
    """run(data) feeds one input to a fresh column; returns the errors seen (counters and
    exception replies) as text, or None; raises Finding when a property is broken.
    `digest` sums up what the column sent, to compare the two interpreters."""

    def __init__(self, workdir):
        super().__init__(workdir)
        self._config_written = False

    def _fresh(self):
        if not self._config_written:   # the file an address move rewrites
            import json

            with open(self.config_path, "w") as f:
                f.write(json.dumps(CONFIG))
            self._config_written = True
        app = App(self.config_path)
        return _Run(app, ModbusLink(app, UNIT, RtuRequestParser()))

    def run(self, data):
        r = self._fresh()
        parser = r.link.parser
        next_request = parser.next_request

        def watched():
            r.check()
            n = next_request()
            if n > 0:
                r.events.append([bytes(parser.frame[0:n]), None])
            return n

        parser.next_request = watched
        now = START_MS
        r.link.refresh(now)
        clean = True           # the parser held nothing when the burst began
        for flags, body in segments(data):
            if flags & LATER:
                now += LATER_MS
            shaped = clean and 4 <= len(body) <= 256 and request_length(body) == len(body)
            whole = shaped and ref_crc(body) == 0
            damaged = shaped and not whole   # a request with a bad CRC alone between two gaps
            counted = parser.errors()
            r.delivered = []
            for chunk in chunks(flags, body):
                r.window.extend(chunk)
                taken = 0
                while taken < len(chunk):
                    taken += parser.feed(chunk, taken, len(chunk))
                    r.answer(now)
                now += 1
            clean = False
            if flags & QUIET:
                parser.gap()
                r.answer(now)
                r.window = bytearray()
                clean = True
                if whole and r.delivered != [body]:
                    raise Finding("a whole good request was delivered %d times: %s"
                                  % (len(r.delivered), body.hex()))
                if damaged and not r.delivered and parser.errors() == counted:
                    raise Finding("a request with a bad CRC was dropped uncounted: %s" % body.hex())
        if r.model.unit != UNIT:
            self._config_written = False   # moved: the file has another bus address now
        r.link.refresh(now)
        if r.link.inputs[regmap.IR_BAD_FRAMES] != parser.errors() & 0xFFFF:
            raise Finding("bad_frames register %d, the framer counted %d"
                          % (r.link.inputs[regmap.IR_BAD_FRAMES], parser.errors()))
        if r.app.resets != r.model.resets:
            raise Finding("reset requested %d times, expected %d" % (r.app.resets, r.model.resets))
        parts = list(r.replies)   # (no [*a, b]: MicroPython has no starred displays)
        parts.append(bytes([getattr(parser, name) & 0xFF for name in _COUNTERS]))
        self._parts = parts
        errors = []
        for e in r.errors + ["framer: " + name for name in _COUNTERS if getattr(parser, name)]:
            if e not in errors:
                errors.append(e)
        return "\n".join(errors) if errors else None
