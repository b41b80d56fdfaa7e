# The column's Modbus register map: THE contract with the gateway and the HIL, which
# import it from here. Every register is an unsigned 16-bit big-endian word; a 32-bit
# value takes two words, high word first. Currents are in deci-amps (_da, 0.1 A),
# voltages in deci-volts (_dv, 0.1 V). Append only: never move a register.
#
# The tables (input_map/holding_map/broadcast_map) are functions, not module globals,
# so a board does not keep ~2 KB of tuples alive: the slave reads the holding ranges
# once at start, the docs generator and the gateway call them when they need them.
try:
    from micropython import const
except ImportError:  # CPython
    const = lambda x: x  # noqa: E731

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
INPUT_COUNT = const(32)

# -- holding registers (FC03 read, FC06/FC16 write), each with a valid range -------------
HR_ASSIGNED_LIMIT = const(0)      # deci-amps 0..800; a write (re)starts the validity
HR_ASSIGNED_VALIDITY = const(1)   # seconds; 0 clears the assignment
HR_FAILSAFE_LIMIT = const(2)      # deci-amps 0..800
HR_HEARTBEAT = const(3)           # any write = gateway alive
HR_ENABLE = const(4)              # 0 disabled (Unavailable), 1 enabled
HR_RESET = const(5)               # only RESET_MAGIC accepted: reboot after the reply
HR_COMMAND_SEQ = const(6)         # gateway bookkeeping, echoed
HOLDING_COUNT = const(7)

MAX_LIMIT_DA = const(800)         # 80 A: the top of the IEC 61851 duty range
RESET_MAGIC = const(0xA5A5)

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
# Index = bit number.
FLAG_NAMES = ("overdraw", "meter_failure", "rcd", "cp_short", "diode", "contactor", "config",
              "failsafe_active", "paused", "disabled")


def input_map():
    """Input registers: (name_with_unit, address, words, encoding, description).
    Encodings: u16, u32 (high word first), enum (the firmware.status codes named), bits."""
    return (
        ("status_code", IR_STATUS, 1, "enum ST_*", "connector status"),
        ("cp_state", IR_CP_STATE, 1, "enum CP_*", "pilot state A..F = 0..5"),
        ("error_code", IR_ERROR, 1, "enum ERR_*", "error with the status"),
        ("limit_source", IR_LIMIT_SOURCE, 1, "enum SRC_*", "what binds the offer"),
        ("offered_current_da", IR_OFFERED_CURRENT, 1, "u16", "offered on the pilot"),
        ("current_l1_da", IR_CURRENT_L1, 1, "u16", "measured"),
        ("current_l2_da", IR_CURRENT_L2, 1, "u16", "measured"),
        ("current_l3_da", IR_CURRENT_L3, 1, "u16", "measured"),
        ("voltage_l1_dv", IR_VOLTAGE_L1, 1, "u16", "measured"),
        ("voltage_l2_dv", IR_VOLTAGE_L2, 1, "u16", "measured"),
        ("voltage_l3_dv", IR_VOLTAGE_L3, 1, "u16", "measured"),
        ("power_w", IR_POWER, 2, "u32", "active power, total"),
        ("energy_wh", IR_ENERGY, 2, "u32", "lifetime register"),
        ("session_energy_wh", IR_SESSION_ENERGY, 2, "u32", "this session"),
        ("session_id", IR_SESSION_ID, 1, "u16", "+1 per session"),
        ("error_flags", IR_ERROR_FLAGS, 1, "bits FLAG_*", "active conditions"),
        ("fw_version", IR_FW_VERSION, 1, "u16", "major << 8 | minor"),
        ("fw_patch", IR_FW_PATCH, 1, "u16", "patch level"),
        ("assigned_limit_remaining_s", IR_ASSIGNED_REMAINING, 1, "u16", "0 = no assignment"),
        ("failsafe_limit_da", IR_FAILSAFE_LIMIT, 1, "u16", "failsafe in force"),
        ("bad_frames", IR_BAD_FRAMES, 1, "u16", "Modbus frames dropped, wraps"),
        ("boots", IR_BOOTS, 1, "u16", "wraps"),
        ("overdraw_events", IR_OVERDRAW_EVENTS, 1, "u16", "wraps"),
        ("bus_address", IR_BUS_ADDRESS, 1, "u16", "unit id"),
        ("phases", IR_PHASES, 1, "u16", "1 or 3"),
        ("hardware_rating_da", IR_HARDWARE_RATING, 1, "u16", "config"),
        ("cable_rating_da", IR_CABLE_RATING, 1, "u16", "PP; 0 = no cable"),
        ("uptime_s", IR_UPTIME, 2, "u32", "since boot"),
    )


def holding_map():
    """Holding registers: (name_with_unit, address, words, encoding, min, max, description).
    A write of any value outside min..max is refused whole with exception 03."""
    return (
        ("assigned_limit_da", HR_ASSIGNED_LIMIT, 1, "u16", 0, MAX_LIMIT_DA,
         "write of reg 0 and/or 1 starts the validity now"),
        ("assigned_validity_s", HR_ASSIGNED_VALIDITY, 1, "u16", 0, 0xFFFF, "0 clears"),
        ("failsafe_limit_da", HR_FAILSAFE_LIMIT, 1, "u16", 0, MAX_LIMIT_DA,
         "once expired or silent"),
        ("heartbeat", HR_HEARTBEAT, 1, "u16", 0, 0xFFFF, "any write = alive"),
        ("enable", HR_ENABLE, 1, "u16", 0, 1, "0 = Unavailable"),
        ("reset", HR_RESET, 1, "u16", RESET_MAGIC, RESET_MAGIC, "0xA5A5 reboots"),
        ("command_seq", HR_COMMAND_SEQ, 1, "u16", 0, 0xFFFF, "echoed"),
    )


def broadcast_map():
    """Broadcast table (unit 0, FC16), rows as in holding_map; the limit row stands for
    one register per bus address (0x0100 + a)."""
    return (
        ("validity_s", BROADCAST_TABLE, 1, "u16", 0, 0xFFFF, "first register written"),
        ("limit_da", BROADCAST_TABLE + 1, BROADCAST_MAX_ADDRESS, "u16", 0, MAX_LIMIT_DA,
         "0xFFFF = no change"),
    )


def put_u32(image, addr, value):
    """Store a 32-bit value as two words, high word first (values wrap at 2^32)."""
    image[addr] = (value >> 16) & 0xFFFF
    image[addr + 1] = value & 0xFFFF


def get_u32(image, addr):
    return (image[addr] << 16) | image[addr + 1]
