# CBOR (RFC 8949) codec for the gateway link, small enough for a column controller and
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
# Few, larger functions: each function object costs a board RAM, so the decoder is one
# recursive method with two helpers.
import math
import struct

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

MAX_DEPTH = const(16)    # nested arrays/maps a decoded item may have
MAX_ITEMS = const(2048)  # data items one loads() call may produce


class CBORError(ValueError):
    """Malformed or unsupported CBOR; `offset` is the byte where the problem starts."""

    def __init__(self, msg, offset):
        super().__init__("%s at byte %d" % (msg, offset))
        self.offset = offset


# The error texts, in one string (a string object each would cost a board ~40 B more);
# _error(_E_..., offset, args) picks one by its index, only when input is refused.
_TEXTS = (
    "cannot encode (%s)|nesting deeper than %d|cannot encode %s|"
    "%d trailing bytes|undecodable input (%s)|negative offset|indefinite length not supported|"
    "reserved additional information %d|truncated argument|"
    "declared length %d exceeds the %d bytes left|invalid UTF-8|unexpected end of data|"
    "more than the allowed number of items|truncated float|unexpected break|"
    "unsupported simple value|unsupported tag|array of %d items exceeds the %d bytes left|"
    "map of %d pairs exceeds the %d bytes left|map key of unhashable type"
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


def _error(i, offset, args=()):
    """The CBORError of text i (an _E_ index), formatted with args, at byte offset."""
    return CBORError(_TEXTS.split("|")[i] % args, offset)


# --- encoding -----------------------------------------------------------------------

def dumps(obj):
    """Encode obj (None, bool, int, float, str, bytes, list/tuple, dict) to bytes."""
    out = bytearray()
    try:
        _enc(out, obj, 0)
    except CBORError:
        raise
    except Exception as exc:  # recursion, memory: never leak another exception type
        raise _error(_E_ENCODE_EXC, len(out), type(exc).__name__)
    return bytes(out)


def _head(out, major, n):
    mt = major << 5
    if n < 24:
        out.append(mt | n)
        return
    ai = 24  # then 25, 26, 27 for 2, 4, 8 bytes
    size = 1
    while n >> (8 * size):
        ai += 1
        size <<= 1
    out.append(mt | ai)
    out.extend(n.to_bytes(size, "big"))


def _enc(out, obj, depth):
    if obj is None:
        out.append(0xF6)
    elif obj is True:
        out.append(0xF5)
    elif obj is False:
        out.append(0xF4)
    elif isinstance(obj, int):
        major = 0
        if obj < 0:
            major = 1
            obj = -1 - obj
        if not obj >> 64:
            _head(out, major, obj)
        else:  # bignum: tag 2 (or 3 for negatives) over the big-endian magnitude
            size = 9
            while obj >> (8 * size):
                size += 1
            out.append(0xC2 + major)
            _head(out, 2, size)
            out.extend(obj.to_bytes(size, "big"))
    elif isinstance(obj, float):
        if math.isnan(obj):
            out.extend(b"\xf9\x7e\x00")  # the canonical NaN
            return
        half = _to_half(obj)
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
    elif isinstance(obj, str):
        raw = obj.encode()
        _head(out, 3, len(raw))
        out.extend(raw)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        _head(out, 2, len(obj))
        out.extend(obj)
    elif isinstance(obj, (list, tuple, dict)):
        if depth >= MAX_DEPTH:
            raise _error(_E_DEEP, len(out), MAX_DEPTH)
        if isinstance(obj, dict):
            pairs = []
            for key in obj:
                kb = bytearray()
                _enc(kb, key, depth + 1)
                pairs.append((bytes(kb), obj[key]))
            pairs.sort()  # by the encoded key bytes (tied only by two NaN keys)
            _head(out, 5, len(pairs))
            for kb, value in pairs:
                out.extend(kb)
                _enc(out, value, depth + 1)
        else:
            _head(out, 4, len(obj))
            for item in obj:
                _enc(out, item, depth + 1)
    else:
        raise _error(_E_TYPE, len(out), type(obj).__name__)


def _to_half(x):
    """IEEE 754 half-precision bits when x is exactly representable, else -1."""
    sign = 0x8000 if math.copysign(1.0, x) < 0 else 0
    a = -x if sign else x
    if a == 0:
        return sign
    if a - a != 0:  # infinity (NaN never gets here)
        return sign | 0x7C00
    m, e = math.frexp(a)  # a = m * 2**e, 0.5 <= m < 1
    if e > 16:
        return -1
    if e >= -13:  # normal: 2**-14 <= a < 2**16
        s = math.ldexp(m, 11)
        if s != int(s):
            return -1
        return sign | ((e + 14) << 10) | (int(s) - 1024)
    s = math.ldexp(a, 24)  # subnormal: a = s * 2**-24
    if s != int(s):
        return -1
    return sign | int(s)


# --- decoding -----------------------------------------------------------------------

def loads(data, max_items=MAX_ITEMS):
    """Decode exactly one item filling the whole buffer; trailing bytes are an error."""
    obj, end = loads_from(data, 0, max_items)
    if end != len(data):
        raise _error(_E_TRAILING, end, len(data) - end)
    return obj


def loads_from(data, offset=0, max_items=MAX_ITEMS):
    """Decode one item starting at offset; return (item, offset after it)."""
    dec = None
    try:
        dec = _Decoder(data, offset, max_items)
        obj = dec.item(0)
        return obj, dec.pos
    except CBORError:
        raise
    except Exception as exc:  # anything else (memory, bad input type) becomes a CBORError
        raise _error(_E_UNDECODABLE, dec.pos if dec else offset, type(exc).__name__)


class _Decoder:
    def __init__(self, data, pos, max_items):
        if pos < 0:
            raise _error(_E_OFFSET, pos)
        self.mv = memoryview(data)
        self.pos = pos
        self.end = len(data)
        self.items = max_items

    def _arg(self, ai, at):
        """The head's argument (the bytes after it for ai 24..27)."""
        if ai < 24:
            return ai
        if ai == 31:
            raise _error(_E_INDEFINITE, at)
        if ai > 27:
            raise _error(_E_RESERVED, at, ai)
        n = 1 << (ai - 24)
        pos = self.pos
        if n > self.end - pos:
            raise _error(_E_TRUNCATED, at)
        mv = self.mv
        v = 0
        for i in range(pos, pos + n):
            v = (v << 8) | mv[i]
        self.pos = pos + n
        return v

    def _raw(self, n, at, major):
        """The next n bytes, as bytes (major 2) or checked UTF-8 text (major 3)."""
        left = self.end - self.pos
        if n > left:
            raise _error(_E_LENGTH, at, (n, left))
        start = self.pos
        self.pos = start + n
        raw = bytes(self.mv[start:start + n])
        if major == 2:
            return raw
        try:
            s = str(raw, "utf-8")
        except UnicodeError:
            s = None
        # MicroPython's decoder lets surrogates, overlong forms and > U+10FFFF through.
        if s is None or (len(s) != n and not _utf8_ok(raw)):
            raise _error(_E_UTF8, at)
        return s

    def item(self, depth):
        at = self.pos
        if at >= self.end:
            raise _error(_E_END, at)
        self.items -= 1
        if self.items < 0:
            raise _error(_E_ITEMS, at)
        ib = self.mv[at]
        self.pos = at + 1
        major = ib >> 5
        ai = ib & 31
        if major == 7:  # simple values and floats
            if ai == 20:
                return False
            if ai == 21:
                return True
            if ai == 22:
                return None
            if ai == 25:
                return struct.unpack(">e", self._arg(25, at).to_bytes(2, "big"))[0]
            if ai in (26, 27):
                size = 4 if ai == 26 else 8
                if size > self.end - self.pos:
                    raise _error(_E_FLOAT, at)
                v = struct.unpack_from(">f" if ai == 26 else ">d", self.mv, self.pos)[0]
                self.pos += size
                return v
            raise _error(_E_BREAK if ai == 31 else _E_SIMPLE, at)
        if major == 6:
            raise _error(_E_TAG, at)
        n = self._arg(ai, at)
        if major == 0:
            return n
        if major == 1:
            return -1 - n
        if major < 4:  # byte or text string
            return self._raw(n, at, major)
        if depth >= MAX_DEPTH:
            raise _error(_E_DEEP, at, MAX_DEPTH)
        left = self.end - self.pos
        if major == 4:  # array
            if n > left:  # every item takes at least one byte
                raise _error(_E_ARRAY, at, (n, left))
            if n > self.items:
                raise _error(_E_ITEMS, at)
            out = [None] * n
            for i in range(n):
                out[i] = self.item(depth + 1)
            return out
        # a map
        if n > left // 2:
            raise _error(_E_MAP, at, (n, left))
        out = {}
        for _ in range(n):
            kat = self.pos
            key = self.item(depth + 1)
            if isinstance(key, (list, dict)):
                raise _error(_E_KEY, kat)
            out[key] = self.item(depth + 1)
        return out


def _utf8_ok(b):
    """Strict UTF-8 (RFC 3629): no overlong forms, surrogates or code points > U+10FFFF."""
    i = 0
    n = len(b)
    while i < n:
        c = b[i]
        if c < 0x80:
            i += 1
            continue
        lo = 0x80
        hi = 0xBF
        if 0xC2 <= c <= 0xDF:
            k = 1
        elif 0xE0 <= c <= 0xEF:
            k = 2
            if c == 0xE0:
                lo = 0xA0
            elif c == 0xED:
                hi = 0x9F
        elif 0xF0 <= c <= 0xF4:
            k = 3
            if c == 0xF0:
                lo = 0x90
            elif c == 0xF4:
                hi = 0x8F
        else:
            return False
        if i + k >= n or not lo <= b[i + 1] <= hi:
            return False
        for j in range(i + 2, i + k + 1):
            if not 0x80 <= b[j] <= 0xBF:
                return False
        i += k + 1
    return True
