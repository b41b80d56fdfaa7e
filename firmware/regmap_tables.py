# The register map as named, described tables: for the gateway, the HIL and the
# generated docs/firmware-contract.md. Addresses and ranges come from regmap.py (the one
# definition); a board never imports this module, so its strings cost no device RAM.
from . import regmap as m

# The error_flags bits' names (index = bit number, regmap.FLAG_*).
FLAG_NAMES = ("overdraw", "meter_failure", "rcd", "cp_short", "diode", "contactor", "config",
              "failsafe_active", "paused", "disabled")


def input_map():
    """Input registers: (name_with_unit, address, words, encoding, description).
    Encodings: u16, u32 (high word first), enum (the firmware.status codes named), bits,
    ascii (2 chars a word, high byte first, zero-padded: get_ascii)."""
    return (
        ("status_code", m.IR_STATUS, 1, "enum ST_*", "connector status"),
        ("cp_state", m.IR_CP_STATE, 1, "enum CP_*", "pilot state A..F = 0..5"),
        ("error_code", m.IR_ERROR, 1, "enum ERR_*", "error with the status"),
        ("limit_source", m.IR_LIMIT_SOURCE, 1, "enum SRC_*", "what binds the offer"),
        ("offered_current_da", m.IR_OFFERED_CURRENT, 1, "u16", "offered on the pilot"),
        ("current_l1_da", m.IR_CURRENT_L1, 1, "u16", "measured"),
        ("current_l2_da", m.IR_CURRENT_L2, 1, "u16", "measured"),
        ("current_l3_da", m.IR_CURRENT_L3, 1, "u16", "measured"),
        ("voltage_l1_dv", m.IR_VOLTAGE_L1, 1, "u16", "measured"),
        ("voltage_l2_dv", m.IR_VOLTAGE_L2, 1, "u16", "measured"),
        ("voltage_l3_dv", m.IR_VOLTAGE_L3, 1, "u16", "measured"),
        ("power_w", m.IR_POWER, 2, "u32", "active power, total"),
        ("energy_wh", m.IR_ENERGY, 2, "u32", "lifetime register"),
        ("session_energy_wh", m.IR_SESSION_ENERGY, 2, "u32", "this session"),
        ("session_id", m.IR_SESSION_ID, 1, "u16", "+1 per session"),
        ("error_flags", m.IR_ERROR_FLAGS, 1, "bits FLAG_*", "active conditions"),
        ("fw_version", m.IR_FW_VERSION, 1, "u16", "major << 8 | minor"),
        ("fw_patch", m.IR_FW_PATCH, 1, "u16", "patch level"),
        ("assigned_limit_remaining_s", m.IR_ASSIGNED_REMAINING, 1, "u16", "0 = no assignment"),
        ("failsafe_limit_da", m.IR_FAILSAFE_LIMIT, 1, "u16", "failsafe in force"),
        ("bad_frames", m.IR_BAD_FRAMES, 1, "u16", "Modbus frames dropped, wraps"),
        ("boots", m.IR_BOOTS, 1, "u16", "wraps"),
        ("overdraw_events", m.IR_OVERDRAW_EVENTS, 1, "u16", "wraps"),
        ("bus_address", m.IR_BUS_ADDRESS, 1, "u16", "unit id"),
        ("phases", m.IR_PHASES, 1, "u16", "1 or 3"),
        ("hardware_rating_da", m.IR_HARDWARE_RATING, 1, "u16", "config"),
        ("cable_rating_da", m.IR_CABLE_RATING, 1, "u16", "PP; 0 = no cable"),
        ("uptime_s", m.IR_UPTIME, 2, "u32", "since boot"),
        ("column_id", m.IR_COLUMN_ID, m.COLUMN_ID_WORDS, "ascii", "config column_id, static"),
    )


def _holding(name, addr, description):
    lo, hi = m.HOLDING_RANGES[addr]
    return (name, addr, 1, "u16", lo, hi, description)


def holding_map():
    """Holding registers: (name_with_unit, address, words, encoding, min, max, description).
    A write of any value outside min..max is refused whole with exception 03."""
    return (
        _holding("assigned_limit_da", m.HR_ASSIGNED_LIMIT, "write of reg 0 and/or 1 starts the validity now"),
        _holding("assigned_validity_s", m.HR_ASSIGNED_VALIDITY, "0 clears"),
        _holding("failsafe_limit_da", m.HR_FAILSAFE_LIMIT, "once expired or silent"),
        _holding("heartbeat", m.HR_HEARTBEAT, "any write = alive"),
        _holding("enable", m.HR_ENABLE, "0 = Unavailable"),
        _holding("reset", m.HR_RESET, "0xA5A5 reboots"),
        _holding("command_seq", m.HR_COMMAND_SEQ, "echoed"),
        _holding("new_address", m.HR_NEW_ADDRESS, "bus address to move to; no effect alone"),
        _holding("address_confirm", m.HR_ADDRESS_CONFIRM,
                 "((current << 8) | new) XOR 0xA5A5 moves the column to new_address"),
    )


def broadcast_map():
    """Broadcast table (unit 0, FC16), rows as in holding_map; the limit row stands for
    one register per bus address (0x0100 + a)."""
    return (
        ("validity_s", m.BROADCAST_TABLE, 1, "u16", 0, 0xFFFF, "first register written"),
        ("limit_da", m.BROADCAST_TABLE + 1, m.BROADCAST_MAX_ADDRESS, "u16", 0, m.MAX_LIMIT_DA,
         "0xFFFF = no change"),
    )


def get_u32(image, addr):
    """A 32-bit value stored by regmap.put_u32: two words, high word first."""
    return (image[addr] << 16) | image[addr + 1]


def get_ascii(image, addr, words):
    """The text regmap.put_ascii stored (e.g. the column id): up to the first zero byte."""
    out = []
    for i in range(2 * words):
        w = image[addr + (i >> 1)]
        c = w & 0xFF if i & 1 else w >> 8
        if c == 0:
            break
        out.append(chr(c))
    return "".join(out)
