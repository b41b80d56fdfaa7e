# The column as a Modbus slave: answers FC03/FC04 reads from the register images and
# validates FC06/FC16 writes against the register map before storing them. The app's
# controller fills `inputs` every step and reacts to writes through `on_write`; this
# module only moves words. Transport-neutral: RTU (`handle`) and TCP (modbus_tcp) share
# `respond`, which writes the reply PDU at an offset in a caller's buffer (the reply
# builders below); request framing is the transport's (modbus.py, modbus_tcp.py). Nothing
# on the request path allocates, so it runs under micropython.heap_lock().
from array import array

from . import regmap
from .crc import crc16

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

# Exception codes (the reply's function code gets the top bit set).
_EX_ILLEGAL_FUNCTION = const(1)
_EX_ILLEGAL_ADDRESS = const(2)
EX_ILLEGAL_VALUE = const(3)
EX_DEVICE_FAILURE = const(4)
_MAX_READ = const(125)
_MAX_WRITE = const(123)
_BROADCAST = const(0)


class ModbusSlave:
    """One column's register map on the bus.

    on_write(start, count, now_ms) runs after holding[start:start+count] was stored and
    returns 0, or an exception code (e.g. 04 device failure, 06 busy): then the old
    values are put back and the master gets that exception. on_broadcast_limit(limit_da,
    validity_s, now_ms) runs when a broadcast table write covers this column's address;
    the pair is stored in holding registers 0 and 1 first. Without it, a broadcast is
    handed to on_write as a write of those two registers. Callbacks are plain functions
    or bound methods created once: calling them allocates nothing.
    """

    def __init__(self, unit_id, inputs, holding, on_write=None, on_broadcast_limit=None):
        if len(holding) < regmap.HOLDING_COUNT:
            raise ValueError("holding image too small")
        self.unit_id = unit_id
        self.inputs = inputs
        self.holding = holding
        self.on_write = on_write
        self.on_broadcast_limit = on_broadcast_limit
        n = regmap.HOLDING_COUNT
        # Writes are checked against regmap.HOLDING_RANGES itself (read in place, nothing
        # copied); the only per-slave buffer is the values a rejected write puts back.
        self._saved = array("H", [0] * n)
        # The longest reply PDU: a read of a whole image (a read past an image's end is
        # refused, so no reply is longer); the reply buffers are sized by it, not by the
        # protocol's 256 bytes.
        self.pdu_max = 2 + 2 * max(len(inputs), n)
        # Replies: RTU (address, PDU, CRC) or Modbus TCP (MBAP header, PDU), the one buffer
        # of every TCP connection (firmware/modbus_tcp.py: a reply is sent, or copied, before
        # the next is made).
        self.out = bytearray(self.pdu_max + 7)
        self.requests = 0          # frames addressed to this column
        self.exceptions = 0        # exception replies sent
        self.broadcasts = 0        # unit-0 frames seen
        self.broadcast_rejected = 0  # broadcasts dropped: malformed, out of range, refused
        self.ignored = 0           # frames for other units
        self.callback_errors = 0   # on_write / on_broadcast_limit raised (answered 04)
        self.bad_crc = 0           # copied from the RTU parser by modbus.next_reply

    # -- transports ---------------------------------------------------------------------
    def handle(self, unit, fc, pdu, now_ms):
        """RTU: the whole reply frame's length in `out`, or 0 (broadcast, not for us)."""
        n = self.respond(unit, fc, pdu, now_ms, self.out, 1)
        if n == 0:
            return 0
        return finish_rtu(self.out, unit, n)

    def respond(self, unit, fc, pdu, now_ms, out, off):
        """Reply PDU written at out[off:]; returns its length, 0 for no reply. `pdu`
        starts at the function code and was length-checked by the framing."""
        if unit == _BROADCAST:
            self.broadcasts += 1
            if not self._broadcast(fc, pdu, now_ms):
                self.broadcast_rejected += 1
            return 0
        if unit != self.unit_id:
            self.ignored += 1
            return 0
        self.requests += 1
        if fc == 3:
            code = self._check_read(pdu, regmap.HOLDING_COUNT)
            if code == 0:
                return read_pdu(out, off, 3, self.holding, u16(pdu, 1), u16(pdu, 3))
        elif fc == 4:
            code = self._check_read(pdu, len(self.inputs))
            if code == 0:
                return read_pdu(out, off, 4, self.inputs, u16(pdu, 1), u16(pdu, 3))
        elif fc == 6:
            code = self._write(u16(pdu, 1), 1, pdu, 3, now_ms)
            if code == 0:
                return echo_pdu(out, off, 6, u16(pdu, 1), u16(pdu, 3))
        elif fc == 16:
            count = u16(pdu, 3)
            if count < 1 or count > _MAX_WRITE or pdu[5] != 2 * count:
                code = EX_ILLEGAL_VALUE
            else:
                code = self._write(u16(pdu, 1), count, pdu, 6, now_ms)
            if code == 0:
                return echo_pdu(out, off, 16, u16(pdu, 1), count)
        else:
            code = _EX_ILLEGAL_FUNCTION
        self.exceptions += 1
        return exception_pdu(out, off, fc, code)

    # -- reads and writes -----------------------------------------------------------------
    def _check_read(self, pdu, size):
        count = u16(pdu, 3)
        if count < 1 or count > _MAX_READ:
            return EX_ILLEGAL_VALUE
        if u16(pdu, 1) + count > size:
            return _EX_ILLEGAL_ADDRESS
        return 0

    def _write(self, start, count, pdu, at, now_ms):
        """Validate every value (pdu words from `at`), then store all or nothing."""
        if start + count > regmap.HOLDING_COUNT:
            return _EX_ILLEGAL_ADDRESS
        ranges = regmap.HOLDING_RANGES
        for i in range(count):
            v = u16(pdu, at + 2 * i)
            lo, hi = ranges[start + i]
            if v < lo or v > hi:
                return EX_ILLEGAL_VALUE
        holding = self.holding
        saved = self._saved
        for i in range(count):
            saved[i] = holding[start + i]
            holding[start + i] = u16(pdu, at + 2 * i)
        code = self._call(self.on_write, start, count, now_ms)
        if code:
            for i in range(count):
                holding[start + i] = saved[i]
        return code

    def _call(self, callback, a, b, now_ms):
        if callback is None:
            return 0
        try:
            code = callback(a, b, now_ms)
        except Exception:  # an app bug must not take the bus task down
            self.callback_errors += 1
            return EX_DEVICE_FAILURE
        return code or 0

    def _broadcast(self, fc, pdu, now_ms):
        """Apply this column's entry of a limit-table write. False = dropped."""
        if fc != 16:
            return False
        start = u16(pdu, 1)
        count = u16(pdu, 3)
        last = start + count - 1
        if (count < 1 or count > _MAX_WRITE or pdu[5] != 2 * count
                or start < regmap.BROADCAST_TABLE
                or last > regmap.BROADCAST_TABLE + regmap.BROADCAST_MAX_ADDRESS):
            return False
        reg = regmap.BROADCAST_TABLE + self.unit_id
        if reg <= start or reg > last:
            return True  # not covered: nothing for this column
        limit = u16(pdu, 6 + 2 * (reg - start))
        if limit == regmap.NO_CHANGE:
            return True
        if limit > regmap.MAX_LIMIT_DA:
            return False
        validity = u16(pdu, 6)
        holding = self.holding
        old_limit = holding[regmap.HR_ASSIGNED_LIMIT]
        old_validity = holding[regmap.HR_ASSIGNED_VALIDITY]
        holding[regmap.HR_ASSIGNED_LIMIT] = limit
        holding[regmap.HR_ASSIGNED_VALIDITY] = validity
        if self.on_broadcast_limit is not None:
            code = self._call(self.on_broadcast_limit, limit, validity, now_ms)
        else:
            code = self._call(self.on_write, regmap.HR_ASSIGNED_LIMIT, 2, now_ms)
        if code:
            holding[regmap.HR_ASSIGNED_LIMIT] = old_limit
            holding[regmap.HR_ASSIGNED_VALIDITY] = old_validity
            return False
        return True


# -- response building: PDU at `off` in a caller's buffer -------------------------------

def u16(buf, off):
    """Big-endian word at buf[off] (unpack_from would allocate a tuple)."""
    return (buf[off] << 8) | buf[off + 1]


def put_u16(buf, off, value):
    buf[off] = (value >> 8) & 0xFF
    buf[off + 1] = value & 0xFF


def exception_pdu(out, off, fc, code):
    """Exception reply PDU: function code with the top bit, then the code. Returns 2."""
    out[off] = (fc | 0x80) & 0xFF
    out[off + 1] = code
    return 2


def read_pdu(out, off, fc, image, start, count):
    """FC03/FC04 reply PDU: fc, byte count, then count words from image[start:]."""
    out[off] = fc
    out[off + 1] = count * 2
    o = off + 2
    for i in range(start, start + count):
        v = image[i]
        out[o] = v >> 8
        out[o + 1] = v & 0xFF
        o += 2
    return 2 + count * 2


def echo_pdu(out, off, fc, first, second):
    """FC06 (address, value) / FC16 (start, count) reply PDU. Returns 5."""
    out[off] = fc
    put_u16(out, off + 1, first)
    put_u16(out, off + 3, second)
    return 5


def finish_rtu(out, unit, pdu_len):
    """Complete an RTU reply whose PDU is at out[1:]: address first, CRC low byte last.
    Returns the frame length."""
    out[0] = unit
    end = 1 + pdu_len
    crc = crc16(out, 0, end)
    out[end] = crc & 0xFF
    out[end + 1] = crc >> 8
    return end + 2

