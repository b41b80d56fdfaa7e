# The bytes of the gateway link: the CBOR codec and the framing that carries CBOR messages on
# a byte stream. A CBOR board loads it with firmware/msg_link.py (the message contract and
# the link) and firmware/gw_cbor.py (the column's end); host code names its parts through
# firmware/cbor.py (the codec) and frames.py (the framing). Three modules, not one: each
# compiles from source in a small MicroPython heap (the test peers run that way), and a
# board still loads only what it runs.
import math
import struct

from .crc import crc16

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

# --- the CBOR codec ---------------------------------------------------------------
# The CBOR (RFC 8949) codec for the gateway link, small enough for a column controller and
# interoperable with the `cbor2` package. Encoding is deterministic (RFC 8949 4.2.1):
# shortest integer and float forms, definite lengths, map keys sorted by their encoded
# bytes, so both interpreters produce the same bytes (MicroPython dicts are unordered).
# Decoding is strict and hostile-input safe: bounded depth and item count, lengths checked
# against the bytes left before anything is allocated, strict UTF-8, and every failure
# is a CBORError naming the byte offset. The decoder takes only what the message set can
# carry: integers within 64 bits, floats, strings, byte strings, arrays and maps of
# definite length, true, false, null; indefinite lengths, tags (bignums included) and other
# simple values are refused as bad input. The encoder still writes an int beyond 64 bits
# as a bignum (tag 2/3), so that a value the contract lets through as `any` reaches the
# peer, which refuses it there (a column: a FormationViolation answer) rather than here.
# Few, larger functions: each function object costs a board RAM, so the encoder and the
# decoder are one recursive function each.
MAX_DEPTH = const(16)    # nested arrays/maps a decoded item may have
MAX_ITEMS = const(2048)  # data items one loads() call may produce


class CBORError(ValueError):
    """Malformed or unsupported CBOR; `offset` is the byte where the problem starts (set by
    _error: an __init__ would cost a board RAM)."""

    offset = None


# The error texts of the codec and the framing, in one string (a string object each would
# cost a board ~40 B more), picked by index only when something is refused:
# _error(_E_..., offset, args) for the codec's, _TEXTS.split("|")[_T_FRAME_SIZE] for the
# framing's.
_TEXTS = (
    "cannot encode (%s)|nesting deeper than %d|cannot encode %s|"
    "%d trailing bytes|undecodable input (%s)|negative offset|indefinite length not supported|"
    "reserved additional information %d|truncated argument|"
    "declared length %d exceeds the %d bytes left|invalid UTF-8|unexpected end of data|"
    "more than the allowed number of items|truncated float|unexpected break|"
    "unsupported simple value|unsupported tag|array of %d items exceeds the %d bytes left|"
    "map of %d pairs exceeds the %d bytes left|map key of unhashable type|"
    "frame payload of %d bytes, allowed 1..%d"
)
_E_ENCODE_EXC = const(0)
_E_DEEP = const(1)
_E_TYPE = const(2)
_E_TRAILING = const(3)
_E_UNDECODABLE = const(4)
_E_OFFSET = const(5)
_E_INDEFINITE = const(6)
_E_RESERVED = const(7)
_E_TRUNCATED = const(8)
_E_LENGTH = const(9)
_E_UTF8 = const(10)
_E_END = const(11)
_E_ITEMS = const(12)
_E_FLOAT = const(13)
_E_BREAK = const(14)
_E_SIMPLE = const(15)
_E_TAG = const(16)
_E_ARRAY = const(17)
_E_MAP = const(18)
_E_KEY = const(19)
_T_FRAME_SIZE = const(20)


def _error(i, offset, args=()):
    """The CBORError of text i (an _E_ index), formatted with args, at byte offset."""
    exc = CBORError("%s at byte %d" % (_TEXTS.split("|")[i] % args, offset))
    exc.offset = offset
    return exc


# --- encoding -----------------------------------------------------------------------

def dumps(obj, out=None, depth=0):
    """Encode obj (None, bool, int, float, str, bytes, list/tuple, dict) to bytes. (The
    encoder recurses with out, the bytearray it appends to, and the depth: it then returns
    nothing.)"""
    if out is None:
        out = bytearray()
        try:
            dumps(obj, out, 0)
        except CBORError:
            raise
        except Exception as exc:  # recursion, memory: never leak another exception type
            raise _error(_E_ENCODE_EXC, len(out), type(exc).__name__)
        return bytes(out)
    if obj is None:
        out.append(0xF6)
        return
    if obj is True:
        out.append(0xF5)
        return
    if obj is False:
        out.append(0xF4)
        return
    if isinstance(obj, float):
        if math.isnan(obj):
            out.extend(b"\xf9\x7e\x00")  # the canonical NaN
            return
        # IEEE 754 half precision when obj is exactly representable in it (half < 0: not)
        sign = 0x8000 if math.copysign(1.0, obj) < 0 else 0
        a = -obj if sign else obj
        half = sign
        if a - a != 0:  # infinity (NaN never gets here)
            half = sign | 0x7C00
        elif a != 0:
            m, e = math.frexp(a)  # a = m * 2**e, 0.5 <= m < 1
            half = -1
            if e >= -13:  # normal: 2**-14 <= a < 2**16
                m = math.ldexp(m, 11)
                if e <= 16 and m == int(m):
                    half = sign | ((e + 14) << 10) | (int(m) - 1024)
            else:
                m = math.ldexp(a, 24)  # subnormal: a = m * 2**-24
                if m == int(m):
                    half = sign | int(m)
        if half >= 0:
            out.append(0xF9)
            out.extend(half.to_bytes(2, "big"))
            return
        if abs(obj) <= 3.4028234663852886e38:  # the largest float32
            raw = struct.pack(">f", obj)
            if struct.unpack(">f", raw)[0] == obj:
                out.append(0xFA)
                out.extend(raw)
                return
        out.append(0xFB)
        out.extend(struct.pack(">d", obj))
        return
    data = None   # the bytes after the head (strings, a bignum's magnitude)
    items = None  # the items after the head (an array's; a map's as (key bytes, value))
    if isinstance(obj, int):
        major = 0
        if obj < 0:
            major = 1
            obj = -1 - obj
        n = obj
        if obj >> 64:  # bignum: tag 2 (or 3 for negatives) over the big-endian magnitude
            n = 9
            while obj >> (8 * n):
                n += 1
            out.append(0xC2 + major)
            major = 2
            data = obj.to_bytes(n, "big")
    elif isinstance(obj, str):
        major = 3
        data = obj.encode()
        n = len(data)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        major = 2
        data = obj
        n = len(obj)
    elif isinstance(obj, (list, tuple, dict)):
        if depth >= MAX_DEPTH:
            raise _error(_E_DEEP, len(out), MAX_DEPTH)
        major = 4
        items = obj
        if isinstance(obj, dict):
            major = 5
            items = []
            for key in obj:
                kb = bytearray()
                dumps(key, kb, depth + 1)
                items.append((kb, obj[key]))  # (bytearrays compare as bytes do: no copy)
            items.sort()  # by the encoded key bytes (tied only by two NaN keys)
        n = len(items)
    else:
        raise _error(_E_TYPE, len(out), type(obj).__name__)
    # The head: major type and n, in the shortest form.
    if n < 24:
        out.append(major << 5 | n)
    else:
        ai = 24  # then 25, 26, 27 for 2, 4, 8 bytes
        size = 1
        while n >> (8 * size):
            ai += 1
            size <<= 1
        out.append(major << 5 | ai)
        out.extend(n.to_bytes(size, "big"))
    if data is not None:
        out.extend(data)
    elif items is not None:
        for item in items:
            if major == 5:
                out.extend(item[0])
                item = item[1]
            dumps(item, out, depth + 1)


# --- decoding -----------------------------------------------------------------------

def loads(data, max_items=MAX_ITEMS, offset=None):
    """Decode exactly one item filling the whole buffer; trailing bytes are an error. With
    an offset, decode one item starting there and return (item, offset after it) (host code:
    firmware/cbor.py's loads_from)."""
    st = [offset or 0, max_items]  # the read position, the items still allowed
    try:
        if st[0] < 0:
            raise _error(_E_OFFSET, st[0])
        obj = _item(memoryview(data), len(data), st, 0)
    except CBORError:
        raise
    except Exception as exc:  # anything else (memory, bad input type) becomes a CBORError
        raise _error(_E_UNDECODABLE, st[0], type(exc).__name__)
    if offset is not None:
        return obj, st[0]
    if st[0] != len(data):
        raise _error(_E_TRAILING, st[0], len(data) - st[0])
    return obj


def _item(mv, end, st, depth):
    """The item at st[0] of mv[:end]; moves st[0] past it and counts it off st[1]."""
    at = st[0]
    if at >= end:
        raise _error(_E_END, at)
    st[1] -= 1
    if st[1] < 0:
        raise _error(_E_ITEMS, at)
    ib = mv[at]
    pos = at + 1
    st[0] = pos
    major = ib >> 5
    ai = ib & 31
    if major == 7:  # simple values and floats
        if ai == 20:
            return False
        if ai == 21:
            return True
        if ai == 22:
            return None
        if 25 <= ai <= 27:
            size = 1 << (ai - 24)
            if size > end - pos:
                raise _error(_E_TRUNCATED if ai == 25 else _E_FLOAT, at)
            st[0] = pos + size
            return struct.unpack_from(">e" if ai == 25 else ">f" if ai == 26 else ">d", mv, pos)[0]
        raise _error(_E_BREAK if ai == 31 else _E_SIMPLE, at)
    if major == 6:
        raise _error(_E_TAG, at)
    # The head's argument: ai itself, or the 1, 2, 4 or 8 bytes after it (ai 24..27).
    n = ai
    if ai > 23:
        if ai == 31:
            raise _error(_E_INDEFINITE, at)
        if ai > 27:
            raise _error(_E_RESERVED, at, ai)
        size = 1 << (ai - 24)
        if size > end - pos:
            raise _error(_E_TRUNCATED, at)
        n = 0
        for i in range(pos, pos + size):
            n = (n << 8) | mv[i]
        pos += size
        st[0] = pos
    if major == 0:
        return n
    if major == 1:
        return -1 - n
    left = end - pos
    if major < 4:  # byte or text string: the next n bytes
        if n > left:
            raise _error(_E_LENGTH, at, (n, left))
        st[0] = pos + n
        raw = bytes(mv[pos:pos + n])
        if major == 2:
            return raw
        try:
            text = str(raw, "utf-8")
        except UnicodeError:
            raise _error(_E_UTF8, at)
        if len(text) != n:
            # MicroPython's decoder lets surrogates, overlong forms and code points beyond
            # U+10FFFF through: strict UTF-8 (RFC 3629) holds when every character is a
            # Unicode scalar value and takes as many bytes as its shortest form.
            k = 0
            for c in text:
                c = ord(c)
                if 0xD7FF < c < 0xE000 or c > 0x10FFFF:
                    k = -1
                    break
                k += 1 if c < 0x80 else 2 if c < 0x800 else 3 if c < 0x10000 else 4
            if k != n:
                raise _error(_E_UTF8, at)
        return text
    if depth >= MAX_DEPTH:
        raise _error(_E_DEEP, at, MAX_DEPTH)
    if major == 4:  # array
        if n > left:  # every item takes at least one byte
            raise _error(_E_ARRAY, at, (n, left))
        if n > st[1]:
            raise _error(_E_ITEMS, at)
        out = [None] * n
        for i in range(n):
            out[i] = _item(mv, end, st, depth + 1)
        return out
    # a map
    if n > left // 2:
        raise _error(_E_MAP, at, (n, left))
    out = {}
    for _ in range(n):
        kat = st[0]
        key = _item(mv, end, st, depth + 1)
        if isinstance(key, (list, dict)):
            raise _error(_E_KEY, kat)
        out[key] = _item(mv, end, st, depth + 1)
    return out


# --- framing ------------------------------------------------------------------------
# The framing of CBOR messages on a byte stream, the same on serial and TCP:
#     SYNC 0xC5 | LEN (2 bytes, big-endian, 1..MAX_PAYLOAD) | payload | CRC16 (2 bytes, LSB first)
# The CRC (firmware.crc, CRC-16/MODBUS) covers LEN and the payload. A receiver hunts for
# SYNC; on a bad LEN or CRC it drops only that SYNC byte and hunts again from the next
# byte, so garbage before, inside or after a frame costs at most the frames it overlaps.

SYNC = const(0xC5)
MAX_PAYLOAD = const(1024)
OVERHEAD = const(5)  # SYNC + LEN + CRC
_HEADER = const(3)


def encode_frame(payload, max_payload=MAX_PAYLOAD):
    """The wire bytes of one frame; ValueError if the payload is empty or too long."""
    n = len(payload)
    if n < 1 or n > max_payload:
        raise ValueError(_TEXTS.split("|")[_T_FRAME_SIZE] % (n, max_payload))
    out = bytearray(n + OVERHEAD)
    out[0] = SYNC
    out[1] = n >> 8
    out[2] = n & 0xFF
    out[_HEADER:_HEADER + n] = payload
    crc = crc16(out, 1, _HEADER + n)
    out[_HEADER + n] = crc & 0xFF
    out[_HEADER + n + 1] = crc >> 8
    return bytes(out)


class FrameReader:
    """Incremental frame decoder with one preallocated buffer; allocates nothing per byte.

    feed(chunk) hands over the next received bytes (kept by reference, not copied, until
    next_frame() returns None: do not reuse the chunk's buffer before that). next_frame()
    returns the next good frame's payload as a memoryview into the reader's buffer, valid
    until the next call, or None when more bytes are needed.
    """

    def __init__(self, max_payload=MAX_PAYLOAD):
        self.max_payload = max_payload  # the longest payload taken (longer LENs count as oversize)
        self._buf = bytearray(max_payload + OVERHEAD)  # one whole frame
        self._mv = memoryview(self._buf)
        self.reset()  # _n: bytes held in _buf (when > 0, _buf[0] is a SYNC byte); _done:
        # length of the frame last returned, still at the front of _buf; _src: the chunk fed
        # last, read from _pos on
        self.frames = 0         # good frames returned
        self.bad_crc = 0        # candidate frames whose CRC did not match
        self.oversize = 0       # candidate frames with LEN 0 or LEN > max_payload
        self.garbage_bytes = 0  # bytes dropped while hunting for SYNC (false SYNCs included)
        self.dropped = 0        # bytes of a chunk replaced by feed() before they were read

    def feed(self, chunk):
        left = len(self._src) - self._pos
        if left > 0:
            self.dropped += left
        self._src = chunk
        self._pos = 0

    @property
    def pending(self):
        """Bytes held of frames not yet complete (0 when idle)."""
        return self._n - self._done

    def reset(self):
        """Forget everything buffered (a new connection starts clean)."""
        self._n = 0
        self._done = 0
        self._src = b""
        self._pos = 0

    def abort(self):
        """Give up on the partial frame (the line went quiet): drop its SYNC and hunt on."""
        if self._done:  # the frame returned last goes first
            self._drop(self._done)
            self._done = 0
        if self._n:
            self.garbage_bytes += 1
            self._drop(1)

    def next_frame(self):
        buf = self._buf
        if self._done:  # drop the frame returned last: its caller is done with it
            self._drop(self._done)
            self._done = 0
        while True:
            n = self._n
            if n == 0:
                # Hunt: skip source bytes up to a SYNC and start a frame with it.
                src = self._src
                pos = self._pos
                end = len(src)
                while pos < end and src[pos] != SYNC:
                    pos += 1
                self.garbage_bytes += pos - self._pos
                if pos == end:
                    self._pos = pos
                    return None
                buf[0] = SYNC
                n = self._n = 1
                self._pos = pos + 1
            need = _HEADER  # first the header, then the whole frame its LEN announces
            length = 0
            if n >= _HEADER:
                length = (buf[1] << 8) | buf[2]
                need = length + OVERHEAD
                if length == 0 or length > self.max_payload:
                    self.oversize += 1
                    need = 0
            if need:
                # Copy source bytes into the buffer until it holds `need` bytes.
                src = self._src
                pos = self._pos
                end = len(src)
                while n < need and pos < end:
                    buf[n] = src[pos]
                    n += 1
                    pos += 1
                self._n = n
                self._pos = pos
                if n < need:
                    return None
                if need == _HEADER:
                    continue  # the header is in: its LEN tells how much more to wait for
                crc = crc16(buf, 1, _HEADER + length)
                if buf[_HEADER + length] == crc & 0xFF and buf[_HEADER + length + 1] == crc >> 8:
                    # Bytes after the frame (read ahead before a resync) stay until the next call.
                    self._done = need
                    self.frames += 1
                    return self._mv[_HEADER:_HEADER + length]
                self.bad_crc += 1
            # A false SYNC: drop it and hunt for the next one in the buffer.
            self.garbage_bytes += 1
            self._drop(1)

    def _drop(self, k):
        """Drop k bytes from the front, then any non-SYNC bytes (garbage) after them."""
        buf = self._buf
        n = self._n
        i = k
        while i < n and buf[i] != SYNC:
            i += 1
        self.garbage_bytes += i - k
        for j in range(i, n):
            buf[j - i] = buf[j]
        self._n = n - i
