# The register map is the contract with the gateway: its tables must be complete,
# non-overlapping and agree with the address constants (CPython and MicroPython).
from firmware import regmap, regmap_tables, status_names


def covered(table, count):
    """Every address 0..count-1 exactly once, from (name, address, words, ...) rows."""
    seen = [0] * count
    for row in table:
        for a in range(row[1], row[1] + row[2]):
            assert a < count, row[0]
            seen[a] += 1
    return seen


def test_input_map_covers_every_register_once():
    assert covered(regmap_tables.input_map(), regmap.INPUT_COUNT) == [1] * regmap.INPUT_COUNT


def test_holding_map_covers_every_register_once():
    assert covered(regmap_tables.holding_map(), regmap.HOLDING_COUNT) == [1] * regmap.HOLDING_COUNT


def test_names_are_unique_and_rows_well_formed():
    names = []
    for row in regmap_tables.input_map():
        assert len(row) == 5 and (row[2] in (1, 2) or row[3] == "ascii")
        assert (row[2] == 2) == (row[3] == "u32"), row[0]
        names.append(row[0])
    for row in regmap_tables.holding_map() + regmap_tables.broadcast_map():
        assert len(row) == 7
        assert 0 <= row[4] <= row[5] <= 0xFFFF, row[0]
    assert len(set(names)) == len(names)


def test_the_proposed_layout_is_kept():
    # The gateway and the docs rely on these addresses: moving one breaks the field.
    rows = {}
    for row in regmap_tables.input_map():
        rows[row[0]] = row[1]
    assert rows["status_code"] == 0 and rows["offered_current_da"] == 4
    assert rows["power_w"] == 11 and rows["energy_wh"] == 13 and rows["session_energy_wh"] == 15
    assert rows["uptime_s"] == 30 and rows["column_id"] == 32 and regmap.INPUT_COUNT == 48
    assert regmap.POLL_COUNT == regmap.IR_COLUMN_ID  # a poll reads every register that changes
    assert regmap.IR_CURRENT_L1 + 2 == regmap.IR_CURRENT_L3
    assert regmap.IR_VOLTAGE_L1 + 2 == regmap.IR_VOLTAGE_L3
    assert regmap.HR_ASSIGNED_LIMIT == 0 and regmap.HR_ASSIGNED_VALIDITY == 1
    assert regmap.HR_RESET == 5 and regmap.HR_NEW_ADDRESS == 7 and regmap.HR_ADDRESS_CONFIRM == 8
    assert regmap.HOLDING_COUNT == 9


def test_holding_ranges():
    ranges = {}
    for row in regmap_tables.holding_map():
        ranges[row[0]] = (row[4], row[5])
    assert ranges["assigned_limit_da"] == (0, 800)
    assert ranges["failsafe_limit_da"] == (0, 800)
    assert ranges["enable"] == (0, 1)
    assert ranges["reset"] == (0xA5A5, 0xA5A5)
    assert ranges["heartbeat"] == (0, 0xFFFF)


def test_broadcast_table_fits_one_frame_per_122_addresses():
    assert regmap.BROADCAST_TABLE == 0x0100
    assert regmap.BROADCAST_TABLE + regmap.BROADCAST_MAX_ADDRESS <= 0xFFFF
    # The table lies outside the holding block, so an addressed write there is refused.
    assert regmap.BROADCAST_TABLE >= regmap.HOLDING_COUNT
    assert regmap.NO_CHANGE > regmap.MAX_LIMIT_DA


def test_enum_encodings_name_the_status_vocabulary():
    prefixes = {"ST_": status_names.STATUS_NAMES, "CP_": status_names.CP_NAMES,
                "ERR_": status_names.ERROR_NAMES, "SRC_": status_names.LIMIT_SOURCE_NAMES}
    enums = [row for row in regmap_tables.input_map() if row[3].startswith("enum ")]
    assert len(enums) == 4
    for row in enums:
        assert row[3][5:-1] in prefixes, row


def test_flag_bits():
    flags = [regmap.FLAG_OVERDRAW, regmap.FLAG_METER_FAILURE, regmap.FLAG_RCD, regmap.FLAG_CP_SHORT,
             regmap.FLAG_DIODE, regmap.FLAG_CONTACTOR, regmap.FLAG_CONFIG,
             regmap.FLAG_FAILSAFE_ACTIVE, regmap.FLAG_PAUSED, regmap.FLAG_DISABLED]
    assert len(flags) == len(regmap_tables.FLAG_NAMES)
    for bit, flag in enumerate(flags):
        assert flag == 1 << bit
    assert regmap_tables.FLAG_NAMES[7] == "failsafe_active"


def test_put_u32_is_high_word_first():
    image = [0] * regmap.INPUT_COUNT
    regmap.put_u32(image, regmap.IR_ENERGY, 0x0001E240)   # 123456 Wh
    assert image[regmap.IR_ENERGY] == 0x0001 and image[regmap.IR_ENERGY + 1] == 0xE240
    assert regmap_tables.get_u32(image, regmap.IR_ENERGY) == 123456
    regmap.put_u32(image, regmap.IR_UPTIME, 0x1_0000_0005)  # wraps at 2^32
    assert regmap_tables.get_u32(image, regmap.IR_UPTIME) == 5
