# The column's Modbus register map: THE contract with the gateway and the HIL, which
# import it from here. Every register is an unsigned 16-bit big-endian word; a 32-bit
# value takes two words, high word first. Currents are in deci-amps (_da, 0.1 A),
# voltages in deci-volts (_dv, 0.1 V). Append only: never move a register.
#
# The named, described tables (input_map/holding_map/broadcast_map) live in
# regmap_tables.py, which a board never imports: their strings would cost it ~8 KB of
# RAM. The gateway, the HIL and the docs generator import them from there.
const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

# -- input registers (FC04), filled by the controller every step ------------------------
IR_STATUS = const(0)              # firmware.status ST_*
IR_CP_STATE = const(1)            # firmware.status CP_*
IR_ERROR = const(2)               # firmware.status ERR_*
IR_LIMIT_SOURCE = const(3)        # firmware.status SRC_*
IR_OFFERED_CURRENT = const(4)     # deci-amps
IR_CURRENT_L1 = const(5)          # deci-amps, L2 at +1, L3 at +2
IR_CURRENT_L2 = const(6)
IR_CURRENT_L3 = const(7)
IR_VOLTAGE_L1 = const(8)          # deci-volts, L2 at +1, L3 at +2
IR_VOLTAGE_L2 = const(9)
IR_VOLTAGE_L3 = const(10)
IR_POWER = const(11)              # uint32 W
IR_ENERGY = const(13)             # uint32 Wh, lifetime register
IR_SESSION_ENERGY = const(15)     # uint32 Wh
IR_SESSION_ID = const(17)
IR_ERROR_FLAGS = const(18)        # FLAG_* bits
IR_FW_VERSION = const(19)         # major << 8 | minor
IR_FW_PATCH = const(20)
IR_ASSIGNED_REMAINING = const(21) # seconds left of the gateway's assignment (0 = none)
IR_FAILSAFE_LIMIT = const(22)     # failsafe limit in force, deci-amps
IR_BAD_FRAMES = const(23)
IR_BOOTS = const(24)
IR_OVERDRAW_EVENTS = const(25)
IR_BUS_ADDRESS = const(26)
IR_PHASES = const(27)
IR_HARDWARE_RATING = const(28)    # deci-amps
IR_CABLE_RATING = const(29)       # deci-amps (0 = no cable)
IR_UPTIME = const(30)             # uint32 s
# A gateway polls registers 0..POLL_COUNT-1 every cycle; the column id after them is
# static (read it once), so it costs the bus nothing per poll.
POLL_COUNT = const(32)
IR_COLUMN_ID = const(32)          # config column_id as ASCII, 2 chars a word (high byte
COLUMN_ID_WORDS = const(16)       # first), zero-padded to 32 chars; static from boot
INPUT_COUNT = const(48)

# -- holding registers (FC03 read, FC06/FC16 write), each with a valid range -------------
HR_ASSIGNED_LIMIT = const(0)      # deci-amps 0..800; a write (re)starts the validity
HR_ASSIGNED_VALIDITY = const(1)   # seconds; 0 clears the assignment
HR_FAILSAFE_LIMIT = const(2)      # deci-amps 0..800
HR_HEARTBEAT = const(3)           # any write = gateway alive
HR_ENABLE = const(4)              # 0 disabled (Unavailable), 1 enabled
HR_RESET = const(5)               # only RESET_MAGIC accepted: reboot after the reply
HR_COMMAND_SEQ = const(6)         # gateway bookkeeping, echoed
HR_NEW_ADDRESS = const(7)         # 1..247: bus address to move to; a write alone does nothing
HR_ADDRESS_CONFIRM = const(8)     # address_confirm(current, new): applies HR_NEW_ADDRESS
HOLDING_COUNT = const(9)

MAX_LIMIT_DA = const(800)         # 80 A: the top of the IEC 61851 duty range
RESET_MAGIC = const(0xA5A5)
ADDRESS_CONFIRM_KEY = const(0xA5A5)

# -- broadcast limit table (unit id 0, FC16 only, no reply) ------------------------------
# Register BROADCAST_TABLE + a holds the limit for bus address a (1..247). The FIRST
# register of the write carries the validity in seconds; a column applies its entry only
# when the write covers it (first register < its register <= last register). A write
# starting at BROADCAST_TABLE (validity, then addresses 1..122) is the usual form; a
# gateway reaches addresses above 122 with a write that starts higher, e.g. at
# BROADCAST_TABLE + 122 (validity, then addresses 123..244).
BROADCAST_TABLE = const(0x0100)
BROADCAST_MAX_ADDRESS = const(247)
NO_CHANGE = const(0xFFFF)         # table entry: leave this address's assignment alone

# -- error_flags bits (IR_ERROR_FLAGS) ---------------------------------------------------
FLAG_OVERDRAW = const(0x0001)
FLAG_METER_FAILURE = const(0x0002)
FLAG_RCD = const(0x0004)
FLAG_CP_SHORT = const(0x0008)
FLAG_DIODE = const(0x0010)
FLAG_CONTACTOR = const(0x0020)
FLAG_CONFIG = const(0x0040)
FLAG_FAILSAFE_ACTIVE = const(0x0080)
FLAG_PAUSED = const(0x0100)
FLAG_DISABLED = const(0x0200)
# Their names (index = bit number): regmap_tables.FLAG_NAMES, for the host.
# The flag each error code (firmware.status ERR_*, the index) sets; 0: none.
ERROR_FLAGS = (
    0,                      # ERR_NONE
    FLAG_OVERDRAW,          # ERR_OVER_CURRENT
    FLAG_METER_FAILURE,     # ERR_POWER_METER
    FLAG_RCD,               # ERR_GROUND
    FLAG_CP_SHORT,          # ERR_CP_SHORT
    FLAG_DIODE,             # ERR_DIODE
    FLAG_CONTACTOR,         # ERR_CONTACTOR
    FLAG_CONFIG,            # ERR_CONFIG
    0,                      # ERR_INTERNAL
)


# Valid range of each holding register, indexed by address: the slave checks every
# write against it. The documented tables (regmap_tables.py) read their ranges from here.
HOLDING_RANGES = (
    (0, MAX_LIMIT_DA),      # HR_ASSIGNED_LIMIT
    (0, 0xFFFF),            # HR_ASSIGNED_VALIDITY
    (0, MAX_LIMIT_DA),      # HR_FAILSAFE_LIMIT
    (0, 0xFFFF),            # HR_HEARTBEAT
    (0, 1),                 # HR_ENABLE
    (RESET_MAGIC, RESET_MAGIC),  # HR_RESET
    (0, 0xFFFF),            # HR_COMMAND_SEQ
    (1, BROADCAST_MAX_ADDRESS),  # HR_NEW_ADDRESS
    (0, 0xFFFF),            # HR_ADDRESS_CONFIRM (checked against address_confirm())
)


def put_u32(image, addr, value):
    """Store a 32-bit value as two words, high word first (values wrap at 2^32). Read it
    back with regmap_tables.get_u32 (not needed on a board)."""
    image[addr] = (value >> 16) & 0xFFFF
    image[addr + 1] = value & 0xFFFF


def address_confirm(current, new):
    """The HR_ADDRESS_CONFIRM value that moves a column from bus address `current` to
    `new`: it names both, so a stray or stale write cannot move a column anywhere."""
    return ((current << 8) | new) ^ ADDRESS_CONFIRM_KEY


def put_ascii(image, addr, words, text):
    """Store text as ASCII, two chars a word, high byte first, zero-padded to `words`
    words (longer text is cut; a char outside ASCII is stored as '?'). Read it back with
    regmap_tables.get_ascii (not needed on a board)."""
    n = len(text)
    for i in range(2 * words):
        c = ord(text[i]) if i < n else 0
        if c > 0x7E:
            c = 0x3F
        if i & 1:
            image[addr + (i >> 1)] |= c
        else:
            image[addr + (i >> 1)] = c << 8
