# CBOR (RFC 8949) codec for the gateway link, small enough for a column controller and
# interoperable with the `cbor2` package. Encoding is deterministic (RFC 8949 4.2.1):
# shortest integer and float forms, definite lengths, map keys sorted by their encoded
# bytes, so both interpreters produce the same bytes (MicroPython dicts are unordered).
# Decoding is strict and hostile-input safe: bounded depth and item count, lengths checked
# against the bytes left before anything is allocated, strict UTF-8, and every failure
# is a CBORError naming the byte offset.
import math
import struct

try:
    from micropython import const
except ImportError:  # CPython
    const = lambda x: x  # noqa: E731

MAX_DEPTH = const(16)    # nested arrays/maps/tags a decoded item may have
MAX_ITEMS = const(2048)  # data items one loads() call may produce
_BREAK = const(0xFF)
_F16 = const(0xF9)
_F32 = const(0xFA)
_F64 = const(0xFB)
_F32_MAX = 3.4028234663852886e38
_INF = float("inf")
_NAN = float("nan")
_2_64 = 1 << 64


class CBORError(ValueError):
    """Malformed or unsupported CBOR; `offset` is the byte where the problem starts."""

    def __init__(self, msg, offset):
        super().__init__("%s at byte %d" % (msg, offset))
        self.offset = offset


# --- encoding -----------------------------------------------------------------------

def dumps(obj):
    """Encode obj (None, bool, int, float, str, bytes, list/tuple, dict) to bytes."""
    out = bytearray()
    try:
        _enc(out, obj, 0)
    except CBORError:
        raise
    except Exception as exc:  # recursion, memory: never leak another exception type
        raise CBORError("cannot encode (%s)" % type(exc).__name__, len(out))
    return bytes(out)


def _head(out, major, n):
    mt = major << 5
    if n < 24:
        out.append(mt | n)
    elif n < 0x100:
        out.append(mt | 24)
        out.append(n)
    elif n < 0x10000:
        out.append(mt | 25)
        out.extend(n.to_bytes(2, "big"))
    elif n < 0x100000000:
        out.append(mt | 26)
        out.extend(n.to_bytes(4, "big"))
    else:
        out.append(mt | 27)
        out.extend(n.to_bytes(8, "big"))


def _bignum(out, tag, n):
    digits = []
    while n:
        digits.append(n & 0xFF)
        n >>= 8
    out.append(0xC0 | tag)
    _head(out, 2, len(digits))
    for i in range(len(digits) - 1, -1, -1):
        out.append(digits[i])


def _enc(out, obj, depth):
    if obj is None:
        out.append(0xF6)
    elif obj is True:
        out.append(0xF5)
    elif obj is False:
        out.append(0xF4)
    elif isinstance(obj, int):
        if obj >= 0:
            if obj < _2_64:
                _head(out, 0, obj)
            else:
                _bignum(out, 2, obj)
        elif -1 - obj < _2_64:
            _head(out, 1, -1 - obj)
        else:
            _bignum(out, 3, -1 - obj)
    elif isinstance(obj, float):
        _float(out, obj)
    elif isinstance(obj, str):
        raw = obj.encode()
        _head(out, 3, len(raw))
        out.extend(raw)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        _head(out, 2, len(obj))
        out.extend(obj)
    elif isinstance(obj, (list, tuple, dict)):
        if depth >= MAX_DEPTH:
            raise CBORError("nesting deeper than %d" % MAX_DEPTH, len(out))
        if isinstance(obj, dict):
            _map(out, obj, depth)
        else:
            _head(out, 4, len(obj))
            for item in obj:
                _enc(out, item, depth + 1)
    else:
        raise CBORError("cannot encode %s" % type(obj).__name__, len(out))


def _map(out, obj, depth):
    pairs = []
    for key in obj:
        kb = bytearray()
        _enc(kb, key, depth + 1)
        pairs.append((bytes(kb), obj[key]))
    pairs.sort(key=lambda p: p[0])
    _head(out, 5, len(pairs))
    for kb, value in pairs:
        out.extend(kb)
        _enc(out, value, depth + 1)


def _float(out, x):
    if math.isnan(x):
        out.extend(b"\xf9\x7e\x00")  # the canonical NaN
        return
    half = _to_half(x)
    if half >= 0:
        out.append(_F16)
        out.extend(half.to_bytes(2, "big"))
        return
    if -_F32_MAX <= x <= _F32_MAX:
        raw = struct.pack(">f", x)
        if struct.unpack(">f", raw)[0] == x:
            out.append(_F32)
            out.extend(raw)
            return
    out.append(_F64)
    out.extend(struct.pack(">d", x))


def _to_half(x):
    """IEEE 754 half-precision bits when x is exactly representable, else -1."""
    sign = 0x8000 if math.copysign(1.0, x) < 0 else 0
    a = -x if sign else x
    if a == 0:
        return sign
    if a == _INF:
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


def _from_half(h):
    e = (h >> 10) & 0x1F
    f = h & 0x3FF
    if e == 0:
        v = math.ldexp(f, -24)
    elif e == 31:
        v = _INF if f == 0 else _NAN
    else:
        v = math.ldexp(f + 1024, e - 25)
    return -v if h & 0x8000 else v


# --- decoding -----------------------------------------------------------------------

def loads(data, max_items=MAX_ITEMS):
    """Decode exactly one item filling the whole buffer; trailing bytes are an error."""
    obj, end = loads_from(data, 0, max_items)
    if end != len(data):
        raise CBORError("%d trailing bytes" % (len(data) - end), end)
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
        raise CBORError("undecodable input (%s)" % type(exc).__name__, dec.pos if dec else offset)


class _Decoder:
    def __init__(self, data, pos, max_items):
        if pos < 0:
            raise CBORError("negative offset", pos)
        self.mv = memoryview(data)
        self.pos = pos
        self.end = len(data)
        self.items = max_items

    def _uint(self, n, at):
        pos = self.pos
        if n > self.end - pos:
            raise CBORError("truncated argument", at)
        mv = self.mv
        v = 0
        for i in range(pos, pos + n):
            v = (v << 8) | mv[i]
        self.pos = pos + n
        return v

    def _arg(self, ai, at):
        """The head's argument; -1 for indefinite length."""
        if ai < 24:
            return ai
        if ai < 28:
            return self._uint(1 << (ai - 24), at)
        if ai == 31:
            return -1
        raise CBORError("reserved additional information %d" % ai, at)

    def _count(self, n, at):
        self.items -= n
        if self.items < 0:
            raise CBORError("more than the allowed number of items", at)

    def item(self, depth):
        at = self.pos
        if at >= self.end:
            raise CBORError("unexpected end of data", at)
        self._count(1, at)
        ib = self.mv[at]
        self.pos = at + 1
        major = ib >> 5
        ai = ib & 31
        if major == 7:
            return self._simple(ai, at)
        n = self._arg(ai, at)
        if n < 0 and major in (0, 1, 6):
            raise CBORError("indefinite length not allowed for major type %d" % major, at)
        if major == 0:
            return n
        if major == 1:
            return -1 - n
        if major < 4:
            return self._string(major, n, at)
        if depth >= MAX_DEPTH:
            raise CBORError("nesting deeper than %d" % MAX_DEPTH, at)
        if major == 4:
            return self._array(n, depth, at)
        if major == 5:
            return self._map(n, depth, at)
        return self._tag(n, depth, at)

    def _at_break(self):
        if self.pos >= self.end:
            raise CBORError("unexpected end of data (missing break)", self.pos)
        if self.mv[self.pos] == _BREAK:
            self.pos += 1
            return True
        return False

    def _raw(self, n, at):
        if n > self.end - self.pos:
            raise CBORError("declared length %d exceeds the %d bytes left" % (n, self.end - self.pos), at)
        start = self.pos
        self.pos = start + n
        return bytes(self.mv[start:start + n])

    def _string(self, major, n, at):
        if n >= 0:
            raw = self._raw(n, at)
            return raw if major == 2 else _text(raw, at)
        parts = []
        while not self._at_break():
            cat = self.pos
            ib = self.mv[cat]
            if ib >> 5 != major:
                raise CBORError("indefinite string chunk of another type", cat)
            self.pos = cat + 1
            self._count(1, cat)
            m = self._arg(ib & 31, cat)
            if m < 0:
                raise CBORError("nested indefinite string chunk", cat)
            raw = self._raw(m, cat)
            parts.append(raw if major == 2 else _text(raw, cat))
        return (b"" if major == 2 else "").join(parts)

    def _array(self, n, depth, at):
        if n < 0:
            out = []
            while not self._at_break():
                out.append(self.item(depth + 1))
            return out
        if n > self.end - self.pos:  # every item takes at least one byte
            raise CBORError("array of %d items exceeds the %d bytes left" % (n, self.end - self.pos), at)
        if n > self.items:
            raise CBORError("more than the allowed number of items", at)
        out = [None] * n
        for i in range(n):
            out[i] = self.item(depth + 1)
        return out

    def _map(self, n, depth, at):
        if n >= 0 and n > (self.end - self.pos) // 2:
            raise CBORError("map of %d pairs exceeds the %d bytes left" % (n, self.end - self.pos), at)
        out = {}
        while True:
            if n < 0:
                if self._at_break():
                    return out
            elif n == 0:
                return out
            else:
                n -= 1
            kat = self.pos
            key = self.item(depth + 1)
            if isinstance(key, (list, dict)):
                raise CBORError("map key of unhashable type", kat)
            out[key] = self.item(depth + 1)

    def _tag(self, tag, depth, at):
        value = self.item(depth + 1)
        if tag in (2, 3):
            if not isinstance(value, bytes):
                raise CBORError("bignum tag %d needs a byte string" % tag, at)
            n = 0
            for b in value:
                n = (n << 8) | b
            return n if tag == 2 else -1 - n
        return value  # other tags (dates, URIs, ...): the tagged value itself

    def _simple(self, ai, at):
        if ai == 20:
            return False
        if ai == 21:
            return True
        if ai in (22, 23):  # null, undefined
            return None
        if ai == 25:
            return _from_half(self._uint(2, at))
        if ai in (26, 27):
            size = 4 if ai == 26 else 8
            if size > self.end - self.pos:
                raise CBORError("truncated float", at)
            v = struct.unpack_from(">f" if ai == 26 else ">d", self.mv, self.pos)[0]
            self.pos += size
            return v
        if ai == 31:
            raise CBORError("unexpected break", at)
        raise CBORError("unsupported simple value", at)


def _text(raw, at):
    try:
        s = str(raw, "utf-8")
    except UnicodeError:
        raise CBORError("invalid UTF-8", at)
    # MicroPython's decoder lets surrogates, overlong forms and > U+10FFFF through.
    if len(s) != len(raw) and not _utf8_ok(raw):
        raise CBORError("invalid UTF-8", at)
    return s


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
