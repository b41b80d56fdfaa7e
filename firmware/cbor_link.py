# One end of the CBOR message link (the column's, or the gateway's with side=FROM_GATEWAY),
# with the CBOR codec and the framing it puts messages in: one module, as a board loads them
# together (each module costs a board RAM of its own); firmware/cbor.py and firmware/frames.py
# name the codec and the framing for host code.
# Pure: bytes and time come in through on_bytes()/poll(), bytes leave through write().
# Incoming calls go to handlers[action](payload, now_ms), which return the result payload
# (or raise MessageError for an error reply); calls we send are matched to their results
# by id and expire after call_timeout_ms. Bad input never raises: it is counted in
# `counters` and answered with an error frame when the call's id can be read, else dropped.
import math
import struct

from . import messages
from .clock import elapsed_ms as _elapsed
from .crc import crc16
from .messages import CALL, MAX_ID, RESULT, MessageError

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
# Few, larger functions: each function object costs a board RAM, so the decoder is one
# recursive function (and a strict UTF-8 check).
MAX_DEPTH = const(16)    # nested arrays/maps a decoded item may have
MAX_ITEMS = const(2048)  # data items one loads() call may produce


class CBORError(ValueError):
    """Malformed or unsupported CBOR; `offset` is the byte where the problem starts (set by
    _error: an __init__ would cost a board RAM)."""

    offset = None


# The error texts of the codec, the framing and the link, in one string (a string object
# each would cost a board ~40 B more), picked by index only when something is refused:
# _error(_E_..., offset, args) for the codec's, _TEXTS.split("|")[_T_...] for the others.
_TEXTS = (
    "cannot encode (%s)|nesting deeper than %d|cannot encode %s|"
    "%d trailing bytes|undecodable input (%s)|negative offset|indefinite length not supported|"
    "reserved additional information %d|truncated argument|"
    "declared length %d exceeds the %d bytes left|invalid UTF-8|unexpected end of data|"
    "more than the allowed number of items|truncated float|unexpected break|"
    "unsupported simple value|unsupported tag|array of %d items exceeds the %d bytes left|"
    "map of %d pairs exceeds the %d bytes left|map key of unhashable type|"
    "frame payload of %d bytes, allowed 1..%d|malformed CBOR: %s|%s is not served here|"
    "%s failed: %s|invalid %s result: %s|%s result could not be sent"
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
_T_FRAME = const(20)  # the framing's and the link's texts
_T_MALFORMED = const(21)
_T_NOT_SERVED = const(22)
_T_FAILED = const(23)
_T_INVALID = const(24)
_T_UNSENT = const(25)


def _error(i, offset, args=()):
    """The CBORError of text i (an _E_ index), formatted with args, at byte offset."""
    exc = CBORError("%s at byte %d" % (_TEXTS.split("|")[i] % args, offset))
    exc.offset = offset
    return exc


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


def _enc(out, obj, depth):
    """Append obj's encoding to out."""
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
                _enc(kb, key, depth + 1)
                items.append((bytes(kb), obj[key]))
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
            _enc(out, item, depth + 1)


# --- decoding -----------------------------------------------------------------------

def loads(data, max_items=MAX_ITEMS):
    """Decode exactly one item filling the whole buffer; trailing bytes are an error."""
    obj, end = loads_from(data, 0, max_items)
    if end != len(data):
        raise _error(_E_TRAILING, end, len(data) - end)
    return obj


def loads_from(data, offset=0, max_items=MAX_ITEMS):
    """Decode one item starting at offset; return (item, offset after it)."""
    st = [offset, max_items]  # the read position, the items still allowed
    try:
        if offset < 0:
            raise _error(_E_OFFSET, offset)
        return _item(memoryview(data), len(data), st, 0), st[0]
    except CBORError:
        raise
    except Exception as exc:  # anything else (memory, bad input type) becomes a CBORError
        raise _error(_E_UNDECODABLE, st[0], type(exc).__name__)


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
            text = None
        # MicroPython's decoder lets surrogates, overlong forms and > U+10FFFF through:
        # strict UTF-8 (RFC 3629) is checked here unless the text is plain ASCII.
        ok = text is not None
        i = n if ok and len(text) == n else 0
        while ok and i < n:
            c = raw[i]
            i += 1
            if c < 0x80:
                continue
            lo = 0x80  # the range of the first continuation byte
            hi = 0xBF
            k = 0      # continuation bytes: 0 for a byte that cannot lead
            if 0xC2 <= c <= 0xDF:
                k = 1
            elif 0xE0 <= c <= 0xEF:
                k = 2
                if c == 0xE0:
                    lo = 0xA0   # no overlong forms
                elif c == 0xED:
                    hi = 0x9F   # no surrogates
            elif 0xF0 <= c <= 0xF4:
                k = 3
                if c == 0xF0:
                    lo = 0x90
                elif c == 0xF4:
                    hi = 0x8F   # nothing above U+10FFFF
            if not k or i + k > n or not lo <= raw[i] <= hi:
                ok = False
            for j in range(i + 1, min(i + k, n)):
                if not 0x80 <= raw[j] <= 0xBF:
                    ok = False
            i += k
        if not ok:
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
        raise ValueError(_TEXTS.split("|")[_T_FRAME] % (n, max_payload))
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
        self._n = 0  # bytes held in _buf; when > 0, _buf[0] is a SYNC byte
        self._done = 0  # length of the frame last returned, still at the front of _buf
        self._src = b""  # the chunk fed last, read from _pos on
        self._pos = 0
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


# --- the link -----------------------------------------------------------------------

if 0:  # never runs: names the counters longer than 10 characters, so that mpy-cross makes
    # them interned qstrs rather than heap string objects (see firmware/messages.py)
    bad_messages = unknown_actions = unsupported = handler_errors = errors_sent = 0
    tx_failures = calls_refused = callback_errors = internal_errors = garbage_bytes = 0

# Built from a list: a constant tuple would load each name as a heap string object.
COUNTERS = tuple([
    "rx_frames",        # frames with a good CRC (bad ones: reader.bad_crc, .oversize, ...)
    "rx_calls",         # valid calls dispatched to a handler
    "rx_results",       # results matched to a pending call
    "rx_errors",        # error frames matched to a pending call
    "bad_cbor",         # frames whose payload is not one CBOR item
    "bad_messages",     # CBOR that is not a valid frame, or a call with a bad payload
    "unknown_actions",  # calls naming an action outside the contract
    "unsupported",      # calls this side does not serve (no handler, wrong direction)
    "unmatched",        # results/errors for no pending call (late, duplicate, foreign)
    "handler_errors",   # handlers that crashed or returned an invalid result
    "errors_sent",      # error frames we sent
    "tx_frames",        # frames written
    "tx_failures",      # frames we could not encode or write
    "calls_refused",    # call() refused: invalid payload, wrong direction, too many pending
    "timeouts",         # our calls that got no answer in time
    "callback_errors",  # on_result callbacks that raised
    "rx_stale",         # partial frames given up after the line went quiet
    "internal_errors",  # anything unexpected, caught so the link keeps running
])


class Link:
    """write(frame_bytes) sends; handlers maps action -> fn(payload, now_ms) -> result payload.

    A handler that wants to send a call itself (TriggerMessage) should do it after it has
    returned (e.g. from the app's next poll), so that its result goes out first."""

    def __init__(self, write, handlers, call_timeout_ms=10000, max_pending=4,
                 side=messages.FROM_COLUMN, max_payload=MAX_PAYLOAD, frame_gap_ms=500):
        # (side, max_payload and frame_gap_ms are passed by name: keyword-only parameters
        # would cost a board a dict of their defaults.)
        self._write = write
        self.handlers = handlers
        self.call_timeout_ms = call_timeout_ms
        self.frame_gap_ms = frame_gap_ms  # quiet time after which a partial frame is stale
        self.side = side
        self.reader = FrameReader(max_payload)  # its max_payload bounds what we send too
        self._pending = [None] * max_pending  # slots: [id, action, sent_ms, on_result]
        self._next_id = 1
        self._rx_ms = 0
        self.counters = dict.fromkeys(COUNTERS, 0)  # sized once (a dict grown key by key is larger)

    def reset(self):
        """A new connection: forget any partial frame (pending calls run to their timeout)."""
        self.reader.reset()

    def pending_calls(self):
        return len(self._pending) - self._pending.count(None)

    def stats(self):
        """Link counters plus the frame reader's, in one new dict (for reporting)."""
        out = dict(self.counters)
        r = self.reader
        out["frames"] = r.frames
        out["bad_crc"] = r.bad_crc
        out["oversize"] = r.oversize
        out["garbage_bytes"] = r.garbage_bytes
        out["dropped"] = r.dropped
        return out

    # --- receiving ------------------------------------------------------------------

    def on_bytes(self, chunk, now_ms):
        """Bytes from the transport, in order; dispatches every complete frame. (None: no new
        bytes, only what the reader still holds.)"""
        if chunk is not None:
            self._rx_ms = now_ms
            self.reader.feed(chunk)
        while True:
            frame = self.reader.next_frame()
            if frame is None:
                return
            self.counters["rx_frames"] += 1
            try:
                self._on_frame(frame, now_ms)
            except Exception:  # a bug here must not stop the link
                self.counters["internal_errors"] += 1

    def poll(self, now_ms):
        """Expire calls past their timeout and give up on a partial frame gone quiet."""
        for i in range(len(self._pending)):
            slot = self._pending[i]
            if slot is not None and _elapsed(now_ms, slot[2]) >= self.call_timeout_ms:
                self.counters["timeouts"] += 1
                self._resolve(i, None)
        reader = self.reader
        if reader.pending and _elapsed(now_ms, self._rx_ms) >= self.frame_gap_ms:
            self.counters["rx_stale"] += 1
            while reader.pending:
                reader.abort()
                self.on_bytes(None, now_ms)

    def _on_frame(self, frame, now_ms):
        try:
            msg = loads(frame)
        except CBORError as exc:
            self.counters["bad_cbor"] += 1
            # A call whose CBOR breaks only after its id is answered.
            if len(frame) < 3 or frame[0] not in (0x84, 0x9F):  # array(4) or indefinite array
                return
            try:
                kind, pos = loads_from(frame, 1)
                msg_id = loads_from(frame, pos)[0]
            except CBORError:
                return
            if type(kind) is int and kind == CALL and type(msg_id) is int and 0 <= msg_id <= MAX_ID:
                self._send_error(msg_id, messages.FORMATION_VIOLATION,
                                 _TEXTS.split("|")[_T_MALFORMED] % exc)
            return
        try:
            messages.parse(msg)
        except MessageError as exc:
            self.counters["unknown_actions" if exc.code == messages.NOT_IMPLEMENTED else "bad_messages"] += 1
            if exc.frame_type == CALL:
                self._send_error(exc.msg_id, exc.code, exc.description)
            elif exc.frame_type is not None:
                # A malformed answer still ends the call it answers.
                i = self._slot(exc.msg_id)
                if i >= 0:
                    self._resolve(i, exc)
            return
        kind = msg[0]
        if kind == CALL:  # serve it and answer: a result, else an error with a description
            msg_id = msg[1]
            action = msg[2]
            counters = self.counters
            handler = self.handlers.get(action)
            code = messages.INTERNAL_ERROR
            if handler is None or messages.direction(action) == self.side:
                counters["unsupported"] += 1
                code = messages.NOT_SUPPORTED
                text = _TEXTS.split("|")[_T_NOT_SERVED] % action
            else:
                counters["rx_calls"] += 1
                try:
                    res = handler(msg[3], now_ms)
                    if res is None:
                        res = {}
                except MessageError as exc:  # the handler's own error answer
                    code = exc.code
                    text = exc.description
                except Exception as exc:
                    counters["handler_errors"] += 1
                    text = _TEXTS.split("|")[_T_FAILED] % (action, type(exc).__name__)
                else:
                    try:
                        messages.validate_payload(action, res, True)
                    except MessageError as exc:
                        counters["handler_errors"] += 1
                        text = _TEXTS.split("|")[_T_INVALID] % (action, exc.description)
                    else:
                        if self._send(messages.result(msg_id, res)):
                            return
                        text = _TEXTS.split("|")[_T_UNSENT] % action
            self._send_error(msg_id, code, text)
            return
        i = self._slot(msg[1])
        if i < 0:
            self.counters["unmatched"] += 1
        elif kind == RESULT:
            try:
                messages.validate_payload(self._pending[i][1], msg[2], True)
            except MessageError as exc:
                self.counters["bad_messages"] += 1
                self._resolve(i, exc)
                return
            self.counters["rx_results"] += 1
            self._resolve(i, msg[2])
        else:
            self.counters["rx_errors"] += 1
            exc = MessageError(msg[2], msg[3])
            exc.msg_id = msg[1]
            exc.frame_type = kind
            exc.details = msg[4]
            self._resolve(i, exc)

    # --- sending --------------------------------------------------------------------

    def call(self, action, payload, now_ms, on_result=None):
        """Send a call; return its id, or None if refused (counted in calls_refused).

        on_result(answer) runs once: answer is the valid result payload, a MessageError
        (an error frame, or an invalid result), or None when the call timed out."""
        i = self._pending.index(None) if None in self._pending else -1
        if i < 0 or messages.direction(action) != self.side:
            self.counters["calls_refused"] += 1
            return None
        msg_id = self._next_id
        while self._slot(msg_id) >= 0:
            msg_id = 0 if msg_id >= MAX_ID else msg_id + 1
        self._next_id = 0 if msg_id >= MAX_ID else msg_id + 1
        try:
            msg = messages.call(msg_id, action, payload)
        except MessageError:
            self.counters["calls_refused"] += 1
            return None
        if not self._send(msg):
            self.counters["calls_refused"] += 1
            return None
        self._pending[i] = [msg_id, action, now_ms, on_result]
        return msg_id

    def _send(self, msg):
        try:
            frame = encode_frame(dumps(msg), self.reader.max_payload)
            self._write(frame)
        except Exception:  # unencodable, too long, or the transport failed
            self.counters["tx_failures"] += 1
            return False
        self.counters["tx_frames"] += 1
        return True

    def _send_error(self, msg_id, code, description):
        if code not in messages.ERROR_CODES:  # a handler's own code: not in the contract
            code = messages.GENERIC_ERROR
        self.counters["errors_sent"] += 1
        self._send(messages.error(msg_id, code, str(description)[:200]))

    # --- pending calls --------------------------------------------------------------

    def forget(self, msg_id):
        """Stop waiting for a call's answer (its slot frees, no callback). A late answer then
        counts as unmatched. True if the call was pending."""
        i = self._slot(msg_id) if msg_id is not None else -1
        if i < 0:
            return False
        self._pending[i] = None
        return True

    def _slot(self, msg_id):
        for i in range(len(self._pending)):
            slot = self._pending[i]
            if slot is not None and slot[0] == msg_id:
                return i
        return -1

    def _resolve(self, i, answer):
        callback = self._pending[i][3]
        self._pending[i] = None
        if callback is not None:
            try:
                callback(answer)
            except Exception:
                self.counters["callback_errors"] += 1

