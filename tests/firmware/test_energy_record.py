# Energy-store records across firmware versions and torn writes: a version 1 record (no
# tail) is still read after an update; a record torn by a power cut is refused by its tail
# even when its CRC happens to match. Runs under CPython and MicroPython.
from fwtest import hexbytes

from firmware import energy_store
from firmware.crc import crc16
from firmware.energy_store import RECORD_SIZE, SLOT_CORRUPT, SLOT_MISSING, SLOT_OK, EnergyStore

MPY_HEAP = "64K"


class MemFlash:
    def __init__(self):
        self.slots = [None, None]

    def read(self, slot):
        return self.slots[slot]

    def write(self, slot, data):
        self.slots[slot] = bytes(data)


# The same state as a version 1 record (38 bytes, no tail), as firmware 0.1.0 wrote it.
V1_RECORD = ("45 53 01 01 07 00 00 00 40 e2 01 00 00 00 00 00 03 00 00 00 c0 d4 01 00 00 00 00 00"
             " 02 00 00 00 05 00 00 00 07 67")


def test_a_version_1_record_is_still_read_and_rewritten_as_version_2():
    flash = MemFlash()
    flash.slots = [hexbytes(V1_RECORD), None]
    store = EnergyStore(flash)
    assert store.load() is True  # a firmware update keeps the register
    assert store.slot_status == [SLOT_OK, SLOT_MISSING]
    assert (store.energy_wh, store.session_id, store.session_start_wh, store.sessions_total) == \
        (123456, 3, 120000, 2)
    assert store.session_active and store.boots == 6 and store.seq == 8
    assert len(flash.slots[1]) == RECORD_SIZE and flash.slots[1][2] == energy_store.VERSION
    again = EnergyStore(flash)
    again.load(count_boot=False)
    assert again.seq == 8 and again.boots == 6 and again.slot_status == [SLOT_OK, SLOT_OK]
    damaged = bytearray(hexbytes(V1_RECORD))
    damaged[9] ^= 0x10
    flash.slots = [bytes(damaged), None]
    assert EnergyStore(flash).load(count_boot=False) is False


def _with_crc(data):
    data = bytearray(data)
    crc = crc16(data, 0, RECORD_SIZE - 2)
    data[RECORD_SIZE - 2] = crc & 0xFF
    data[RECORD_SIZE - 1] = crc >> 8
    return bytes(data)


def test_a_torn_record_is_refused_even_when_its_crc_matches():
    # A cut after byte 12 of a rewrite: the new record's head (new seq, part of the new
    # energy) on the slot's old tail. Give the mix a matching CRC, as 1 in 65536 torn
    # writes would have by chance: the tail still names the old sequence number.
    flash = MemFlash()
    store = EnergyStore(flash)
    store.load(count_boot=False)       # nothing written
    store.update(0x00FF, 0)
    assert store.flush(1)              # seq 1 -> slot 0
    old = flash.slots[0]
    store.update(0x0100, 2)
    store.flush(3)                     # seq 2 -> slot 1
    store.update(0x0200, 4)
    store.flush(5)                     # seq 3 -> slot 0
    new = flash.slots[0]
    for mix in (new[:12] + old[12:], new[:12] + b"\xff" * (RECORD_SIZE - 12)):
        flash.slots[0] = _with_crc(mix)
        probe = EnergyStore(flash)
        probe.load(count_boot=False)
        assert probe.slot_status[0] == SLOT_CORRUPT
        assert probe.energy_wh == 0x0100 and probe.seq == 2  # slot 1, the previous write
    flash.slots[0] = _with_crc(new[:RECORD_SIZE - 2] + bytes(2))  # every data byte arrived
    probe = EnergyStore(flash)
    probe.load(count_boot=False)
    assert probe.energy_wh == 0x0200 and probe.seq == 3
