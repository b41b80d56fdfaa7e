# Energy meter reader: a non-blocking Modbus RTU master for an Eastron SDM630 / SDM120.
# Pure logic: the caller passes time in (now_ms, from ticks_ms), hands over the bytes the
# UART received (on_bytes) and supplies write(bytes) for the requests; RS-485 direction
# control is the writer's job. One poll cycle reads every register block of the meter
# type (firmware.sdm.BLOCKS); the results change only when a whole cycle succeeded.
#
# Energy never goes backwards: a cycle whose import or export energy is lower than the
# last accepted one is rejected whole (meter_backwards) and nothing of it is applied; a
# cycle whose energy rose faster than max_power_w could explain since the last good
# cycle (plus 20 Wh for the meter's own rounding) is rejected too (meter_jumps). The
# bound applies between consecutive fresh cycles only: after the meter was stale, the
# next reading is checked for going backwards but not for size. A meter that keeps
# reporting such values stays stale, which stops charging (the safe side) until it is
# replaced; the first reading after boot is accepted as it is.
from . import sdm
from .crc import crc16

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

_FC = const(4)
_FC_ERR = const(0x84)
_EXC_LEN = const(5)       # addr, 0x84, code, crc lo, crc hi

# Transaction states.
_IDLE = const(0)          # waiting for the next poll cycle
_WAIT = const(1)          # request sent, assembling the reply
_DRAIN = const(2)         # bad or unwanted bytes: wait for the bus to go quiet, then retry
_NEXT = const(3)          # block done, next block of the cycle after the bus gap

_SLACK_WH = const(20)
_GAP_MS = const(5)        # quiet bus before a request (>= 3.5 characters)

# Tick arithmetic on 30 bits: works for any ticks_ms whose period is a multiple of 2^30
# (boards: 2^30, unix port: 2^62, CPython monotonic: no wrap) for differences < 2^29 ms.


from .clock import elapsed_ms as ticks_diff  # noqa: E402


def read_request(address, start, count, fc=_FC):
    """The 8 bytes of a read request (FC 03/04) with its CRC, as a new bytes object (built
    once, at construction)."""
    buf = bytearray(8)
    buf[0] = address
    buf[1] = fc
    buf[2] = (start >> 8) & 0xFF
    buf[3] = start & 0xFF
    buf[4] = (count >> 8) & 0xFF
    buf[5] = count & 0xFF
    crc = crc16(buf, 0, 6)
    buf[6] = crc & 0xFF       # CRC low byte first
    buf[7] = crc >> 8
    return bytes(buf)


class Meter:
    """Reads one meter; see the module comment for the energy guarantees.

    Results (ints): voltage_dv[3], current_da[3], power_phase_w[3], power_w (total),
    energy_wh (import), export_wh, freq_chz, last_ok_ms; phases not measured stay 0.
    """

    # Bus timing at its defaults as class attributes: a meter that keeps them (a board's
    # does: the config does not set them) holds no slot for them in its attribute dict.
    timeout_ms = 300        # from the request, or the last byte received
    retries = 2             # extra attempts per block before the cycle fails
    poll_interval_ms = 1000

    def __init__(self, kind, address, write, timeout_ms=None, retries=None,  # noqa: PLR0917
                 poll_interval_ms=None, stale_ms=5000, max_power_w=0):
        blocks = sdm.BLOCKS.get(kind)
        if blocks is None:
            raise ValueError("unknown meter type %r" % (kind,))
        if not 1 <= address <= 247:
            raise ValueError("meter address %r not in 1..247" % (address,))
        self.kind = kind
        self.write = write
        if timeout_ms is not None:
            self.timeout_ms = timeout_ms
        if retries is not None:
            self.retries = retries
        if poll_interval_ms is not None:
            self.poll_interval_ms = poll_interval_ms
        self.stale_ms = stale_ms
        self.max_power_w = max_power_w or sdm.MAX_POWER_W[kind]
        # Per block: request bytes (the meter's address at [0]; the count at [5] gives the
        # reply's length). Where each field sits in a reply is read from firmware.sdm's
        # tables when the reply comes: an attribute costs every meter RAM, so what can be
        # derived is not kept.
        reqs = []
        most = 0
        for s, c in blocks:
            reqs.append(read_request(address, s, c))
            most = max(most, c)
        self._reqs = tuple(reqs)
        # Buffers, owned here and reused for every reply: rx holds the reply being
        # assembled, stage the values of the cycle in progress (applied when it completes).
        self._rx = bytearray(sdm.reply_len(most))
        self._stage = [0] * sdm.NFIELDS
        self._n = 0
        self._expect = 0
        self._state = _IDLE
        self._block = 0
        self._attempt = 0
        self._t_act = 0            # last bus activity: request sent or byte received
        self._cycle_ms = -1        # start of the last cycle; -1: none yet (ticks are >= 0)
        self._fresh = False        # a good cycle within stale_ms (latched off when stale)
        # Results.
        self.voltage_dv = [0, 0, 0]
        self.current_da = [0, 0, 0]
        self.power_phase_w = [0, 0, 0]
        self.power_w = 0
        self.energy_wh = 0
        self.export_wh = 0
        self.freq_chz = 0
        self.last_ok_ms = 0
        self.last_exception = 0    # code of the last exception reply
        # Counters.
        self.requests = 0
        self.replies = 0           # good normal replies (one per block)
        self.timeouts = 0
        self.crc_errors = 0
        self.exceptions = 0
        self.bad_replies = 0       # wrong address, function, length or value
        self.stray_bytes = 0       # bytes while no reply was expected
        self.write_errors = 0
        self.cycles = 0            # complete good cycles (results updated)
        self.failed_cycles = 0     # cycles abandoned after the retries
        self.meter_backwards = 0
        self.meter_jumps = 0

    # -- state ---------------------------------------------------------------------------
    def is_stale(self, now_ms):
        """True when no whole cycle succeeded within stale_ms (and before the first)."""
        if self._fresh and ticks_diff(now_ms, self.last_ok_ms) >= self.stale_ms:
            self._fresh = False    # latch, so a ticks wrap cannot make old data look new
        return not self._fresh

    @property
    def busy(self):
        """True while a cycle is in progress."""
        return self._state != _IDLE

    # -- driving -------------------------------------------------------------------------
    def poll(self, now_ms):
        """Send the next request when one is due; returns True when it wrote one."""
        self.is_stale(now_ms)
        st = self._state
        if st == _WAIT:
            if ticks_diff(now_ms, self._t_act) >= self.timeout_ms:
                self.timeouts += 1
                return self._failed_attempt(now_ms)
            return False
        if st == _DRAIN:
            if ticks_diff(now_ms, self._t_act) >= _GAP_MS:
                return self._failed_attempt(now_ms)
            return False
        if st == _NEXT:
            if ticks_diff(now_ms, self._t_act) >= _GAP_MS:
                return self._send(now_ms)
            return False
        if self._cycle_ms >= 0 and ticks_diff(now_ms, self._cycle_ms) < self.poll_interval_ms:
            return False
        self._cycle_ms = now_ms
        self._block = 0
        self._attempt = 0
        return self._send(now_ms)

    def on_bytes(self, chunk, now_ms, n=-1):
        """Take received bytes (the first n of chunk, all if n < 0). Never raises."""
        if n < 0:
            n = len(chunk)
        if n == 0:
            return
        st = self._state
        if st != _WAIT:
            if st != _DRAIN:
                self.stray_bytes += n
            if st != _IDLE:
                self._t_act = now_ms   # the bus is not quiet yet
            return
        self._t_act = now_ms
        rx = self._rx
        for i in range(n):
            b = chunk[i]
            k = self._n
            rx[k] = b
            k += 1
            self._n = k
            if k == 1:
                if b != self._reqs[0][0]:   # the meter's address
                    self._bad(now_ms)
                    return
            elif k == 2:
                if b == _FC_ERR:
                    self._expect = _EXC_LEN
                elif b != _FC:
                    self._bad(now_ms)
                    return
            elif k == 3 and rx[1] == _FC:
                if b != self._expect - 5:
                    self._bad(now_ms)
                    return
            if k == self._expect:
                self._frame(now_ms)
                rest = n - i - 1
                if rest:
                    self.stray_bytes += rest
                return

    # -- internals -----------------------------------------------------------------------
    def _send(self, now_ms):
        self._attempt += 1
        self._n = 0
        self._expect = sdm.reply_len(self._reqs[self._block][5])   # counts are < 256
        self._state = _WAIT
        self._t_act = now_ms
        self.requests += 1
        try:
            self.write(self._reqs[self._block])
        except OSError:
            self.write_errors += 1     # the reply timeout turns this into a retry
        return True

    def _failed_attempt(self, now_ms):
        if self._attempt <= self.retries:
            return self._send(now_ms)
        self.failed_cycles += 1
        self._state = _IDLE
        return False

    def _bad(self, now_ms):
        self.bad_replies += 1
        self._state = _DRAIN
        self._t_act = now_ms

    def _frame(self, now_ms):
        """A reply of the expected length is in rx: check it and take its values."""
        rx = self._rx
        k = self._n
        if crc16(rx, 0, k - 2) != rx[k - 2] | (rx[k - 1] << 8):
            self.crc_errors += 1
            self._state = _DRAIN
            return
        if rx[1] == _FC_ERR:
            self.exceptions += 1
            self.last_exception = rx[2]
            self._state = _DRAIN
            return
        stage = self._stage
        start, count = sdm.BLOCKS[self.kind][self._block]
        fields = sdm.FIELDS[self.kind]
        for f in range(sdm.NFIELDS):
            reg = fields[f]
            if reg >= 0 and start <= reg < start + count:
                v = sdm.decode_f32(rx, 3 + 2 * (reg - start), sdm.SCALE[f])
                if v is None:
                    self._bad(now_ms)
                    return
                stage[f] = v
        self.replies += 1
        self._block += 1
        self._attempt = 0
        if self._block < len(self._reqs):
            self._state = _NEXT
            return
        self._state = _IDLE
        # The cycle is complete: check its energy, then take all of it.
        s = stage
        imp = s[sdm.F_IMPORT]
        exp = s[sdm.F_EXPORT]
        if imp < 0 or exp < 0:
            self.bad_replies += 1
            return
        if self.cycles:            # energy accepted before: it may not go back or jump
            if imp < self.energy_wh or exp < self.export_wh:
                self.meter_backwards += 1
                return
            if not self.is_stale(now_ms):
                age = ticks_diff(now_ms, self.last_ok_ms)
                bound = self.max_power_w * age // 3600000 + _SLACK_WH
                if imp - self.energy_wh > bound or exp - self.export_wh > bound:
                    self.meter_jumps += 1
                    return
        v = self.voltage_dv
        c = self.current_da
        p = self.power_phase_w
        for ph in range(3):
            v[ph] = s[sdm.F_V1 + ph]
            c[ph] = s[sdm.F_I1 + ph]
            p[ph] = s[sdm.F_P1 + ph]
        if sdm.FIELDS[self.kind][sdm.F_PTOTAL] >= 0:   # the meter has a total
            self.power_w = s[sdm.F_PTOTAL]
        else:
            self.power_w = p[0] + p[1] + p[2]
        self.freq_chz = s[sdm.F_FREQ]
        self.energy_wh = imp
        self.export_wh = exp
        self.last_ok_ms = now_ms
        self._fresh = True
        self.cycles += 1
