# Framing of CBOR messages on a byte stream, the same on serial and TCP:
#     SYNC 0xC5 | LEN (2 bytes, big-endian, 1..MAX_PAYLOAD) | payload | CRC16 (2 bytes, LSB first)
# The CRC (firmware.crc, CRC-16/MODBUS) covers LEN and the payload. A receiver hunts for
# SYNC; on a bad LEN or CRC it drops only that SYNC byte and hunts again from the next
# byte, so garbage before, inside or after a frame costs at most the frames it overlaps.
from .crc import crc16

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

SYNC = const(0xC5)
MAX_PAYLOAD = const(1024)
OVERHEAD = const(5)  # SYNC + LEN + CRC
_HEADER = const(3)


def encode_frame(payload, max_payload=MAX_PAYLOAD):
    """The wire bytes of one frame; ValueError if the payload is empty or too long."""
    n = len(payload)
    if n < 1 or n > max_payload:
        raise ValueError("frame payload of %d bytes, allowed 1..%d" % (n, max_payload))
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
        self._release()
        if self._n:
            self.garbage_bytes += 1
            self._drop(1)

    def next_frame(self):
        buf = self._buf
        self._release()
        while True:
            if self._n == 0:
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
                self._n = 1
                self._pos = pos + 1
            if self._n < _HEADER and not self._fill(_HEADER):
                return None
            length = (buf[1] << 8) | buf[2]
            if length == 0 or length > self.max_payload:
                self.oversize += 1
            else:
                if not self._fill(length + OVERHEAD):
                    return None
                crc = crc16(buf, 1, _HEADER + length)
                if buf[_HEADER + length] == crc & 0xFF and buf[_HEADER + length + 1] == crc >> 8:
                    # Bytes after the frame (read ahead before a resync) stay until the next call.
                    self._done = length + OVERHEAD
                    self.frames += 1
                    return self._mv[_HEADER:_HEADER + length]
                self.bad_crc += 1
            # A false SYNC: drop it and hunt for the next one in the buffer.
            self.garbage_bytes += 1
            self._drop(1)

    def _fill(self, count):
        """Copy source bytes into the buffer until it holds count bytes; True when it does."""
        buf = self._buf
        src = self._src
        n = self._n
        pos = self._pos
        end = len(src)
        while n < count and pos < end:
            buf[n] = src[pos]
            n += 1
            pos += 1
        self._n = n
        self._pos = pos
        return n >= count

    def _release(self):
        """Drop the frame returned last, once its caller is done with it."""
        if self._done:
            done = self._done
            self._done = 0
            self._drop(done)

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
