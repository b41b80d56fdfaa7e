# Pieces both firmware harnesses share. MicroPython-compatible (no typing, no dataclasses).
#
# An input is a list of segments, each bytes that arrive from the bus in one burst:
#     [flags][length high][length low][length bytes]...
# flags: bit 0 the line goes quiet after the burst, bit 1 the app runs its periodic work
# after it, bit 2 a long time passes before it, bits 3-5 how the burst is cut into reads
# (CHUNKS). A length beyond the bytes left takes what is left, so every byte string is an
# input: byte-level mutation of the encoding stays meaningful.

QUIET = 1
PERIODIC = 2
LATER = 4
CHUNKS = (0, 1, 2, 3, 5, 8, 16, 64)   # 0: the whole burst in one read


class Finding(Exception):
    """A property is broken (fuzz.engine.Finding in CPython)."""


def segments(data):
    """(flags, bytes) of each segment of an input."""
    out = []
    i = 0
    n = len(data)
    while i < n:
        flags = data[i]
        if i + 2 >= n:
            break
        length = (data[i + 1] << 8) | data[i + 2]
        start = i + 3
        end = min(start + length, n)
        out.append((flags, bytes(data[start:end])))
        i = end
    return out


def encode(parts):
    """An input from (flags, bytes) segments."""
    out = bytearray()
    for flags, body in parts:
        out.append(flags & 0xFF)
        out.append((len(body) >> 8) & 0xFF)
        out.append(len(body) & 0xFF)
        out.extend(body)
    return bytes(out)


def chunks(flags, body):
    size = CHUNKS[(flags >> 3) & 7]
    if size == 0 or size >= len(body):
        return [body]
    return [body[i:i + size] for i in range(0, len(body), size)]


# CRC-16/MODBUS from a table, written independently of firmware/crc.py (the oracle must
# not share the code under test).
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = ((_c >> 1) ^ 0xA001) if _c & 1 else (_c >> 1)
    _TABLE.append(_c)


def ref_crc(data, start=0, end=-1):
    if end < 0:
        end = len(data)
    c = 0xFFFF
    t = _TABLE
    for i in range(start, end):
        c = (c >> 8) ^ t[(c ^ data[i]) & 0xFF]
    return c


def with_crc(body):
    c = ref_crc(body)
    return bytes(body) + bytes([c & 0xFF, c >> 8])


def mix(digest, data):
    """Fold bytes into a running 32-bit digest (FNV-1a): the same in both interpreters."""
    h = digest
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


class DigestHarness:
    """What both firmware harnesses share: the column's config file in the work folder, and
    `digest`, the sum of what the column sent (the parts a harness records), to compare the
    two interpreters."""

    def __init__(self, workdir):
        self.config_path = workdir + "/column.json"
        self._parts = []

    @property
    def digest(self):
        """Made on demand: only the interpreter comparison needs it."""
        d = 2166136261   # FNV-1a offset basis
        for part in self._parts:
            d = mix(d, part)
        return d

    @digest.setter
    def digest(self, value):   # mpy_run.py clears it before each input
        self._parts = []
