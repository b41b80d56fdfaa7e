# Eastron SDM630 / SDM120 energy meters as data: which input registers (function 04) to
# read for each meter type, where each quantity sits, and how to turn the meter's IEEE 754
# float32 values (two registers, high word first, big-endian) into the integers the
# firmware works in: voltage 0.1 V, current 0.1 A, power W, energy Wh, frequency 0.01 Hz.
# The simulated meter in hil/models imports these tables: one register map, used by both.
const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

SDM630 = "sdm630"
SDM120 = "sdm120"
KINDS = (SDM630, SDM120)

FC_READ_INPUT = const(4)

# Input register addresses (each value is a float32 in two registers).
REG_VOLTAGE = (0x0000, 0x0002, 0x0004)   # V, L1..L3 (SDM120: L1 only)
REG_CURRENT = (0x0006, 0x0008, 0x000A)   # A
REG_POWER = (0x000C, 0x000E, 0x0010)     # W, signed (negative = export)
REG_TOTAL_POWER = const(0x0034)          # W, SDM630 only
REG_FREQUENCY = const(0x0046)            # Hz
REG_IMPORT_KWH = const(0x0048)           # kWh
REG_EXPORT_KWH = const(0x004A)           # kWh
REG_TOTAL_KWH = const(0x0156)            # kWh (not read by the firmware; the simulator serves it)

# Field ids: the firmware's own numbering of the quantities it reads.
F_V1 = const(0)
F_V2 = const(1)
F_V3 = const(2)
F_I1 = const(3)
F_I2 = const(4)
F_I3 = const(5)
F_P1 = const(6)
F_P2 = const(7)
F_P3 = const(8)
F_PTOTAL = const(9)
F_FREQ = const(10)
F_IMPORT = const(11)
F_EXPORT = const(12)
NFIELDS = const(13)

# Meter unit -> firmware unit, per field: V->dV, A->dA, W->W, Hz->cHz, kWh->Wh.
SCALE = (10, 10, 10, 10, 10, 10, 1, 1, 1, 1, 100, 1000, 1000)

# Per meter type: field id -> register address, -1 where the meter has no such value.
FIELDS = {
    SDM630: (0x0000, 0x0002, 0x0004, 0x0006, 0x0008, 0x000A, 0x000C, 0x000E, 0x0010,
             0x0034, 0x0046, 0x0048, 0x004A),
    SDM120: (0x0000, -1, -1, 0x0006, -1, -1, 0x000C, -1, -1, -1, 0x0046, 0x0048, 0x004A),
}

# Per meter type: the (start, count) register blocks one poll cycle reads, in order.
# SDM630: one read of 76 registers (0x0000..0x004B) covers every field; the SDM630 answers
# reads across its unused addresses and STANDARDS allows up to ~80 registers a request.
# SDM120: its map has holes (0x0002..0x0005, 0x0008..0x000B, 0x000E..0x0045) and sources
# disagree on whether it answers reads that span them, so each block holds defined
# registers only: V, I and P alone, then frequency + import + export (contiguous).
# Costs 4 exchanges (~80 ms of wire time at 9600 baud) per cycle, well inside 1 s.
BLOCKS = {
    SDM630: ((0x0000, 76),),
    SDM120: ((0x0000, 2), (0x0006, 2), (0x000C, 2), (0x0046, 6)),
}

PHASES = {SDM630: 3, SDM120: 1}

# Default bound on how fast the energy register may rise (see meter.Meter): the largest
# power the meter type can measure, with margin (SDM630 100 A direct: 3 x 230 V x 100 A).
MAX_POWER_W = {SDM630: 100000, SDM120: 15000}


def reply_len(count):
    """Bytes in a normal FC04 reply for `count` registers: addr, fc, n, data, crc."""
    return 5 + 2 * count


def decode_f32(buf, off, scale):
    """The float32 at buf[off:off+4] (big-endian) times `scale`, rounded half away from
    zero to an int; None for NaN, infinity or a magnitude of 2^63 and above.

    Integer arithmetic only, so the result is exact and identical on CPython, on the
    64-bit unix port and on boards with single-precision floats, and allocates nothing
    for the values a meter reports (on the 64-bit port).
    """
    b0 = buf[off]
    b1 = buf[off + 1]
    exp = ((b0 & 0x7F) << 1) | (b1 >> 7)
    if exp >= 190:          # 0xFF: NaN/inf; 190..254: >= 2^63, no meter reads that
        return None
    if exp == 0:            # zero or subnormal (< 1.2e-38): zero at any resolution we use
        return 0
    mant = (((b1 & 0x7F) | 0x80) << 16) | (buf[off + 2] << 8) | buf[off + 3]
    n = mant * scale
    shift = exp - 150       # value = mant * 2^(exp - 127 - 23)
    if shift >= 0:
        v = n << shift
    elif shift < -40:       # n < 2^35: rounds to 0
        v = 0
    else:
        s = -shift
        v = (n + (1 << (s - 1))) >> s
    if b0 & 0x80:
        return -v
    return v
