# The energy register and session counters: round trip, slot alternation, write quantum,
# never backwards, corrupt-slot fallback. Runs under CPython and MicroPython.
import os

from fwtest import IS_MICROPYTHON, hexbytes

from firmware import energy_store
from firmware.energy_store import RECORD_SIZE, SLOT_CORRUPT, SLOT_MISSING, SLOT_OK, EnergyStore
from firmware.flash import FileFlash

MPY_HEAP = "64K"


class MemFlash:
    """Two slots in RAM; logs which slot each write went to; can be told to fail."""

    def __init__(self):
        self.slots = [None, None]
        self.log = []
        self.fail = False

    def read(self, slot):
        return self.slots[slot]

    def write(self, slot, data):
        if self.fail:
            raise OSError(5)
        self.slots[slot] = bytes(data)
        if len(self.log) < 32:  # the first writes only: long runs must not grow the heap
            self.log.append(slot)


def _fresh_files():
    for name in ("ea.bin", "eb.bin"):
        try:
            os.remove(name)
        except OSError:
            pass
    return FileFlash("ea.bin", "eb.bin")


def _corrupt(path, index):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[index] ^= 0x01
    with open(path, "wb") as f:
        f.write(data)


def test_first_boot_starts_empty_and_counts_the_boot():
    store = EnergyStore(_fresh_files())
    assert store.load() is False
    assert store.recovered_empty
    assert store.slot_status == [SLOT_MISSING, SLOT_MISSING]
    assert store.energy_wh == 0 and store.boots == 1 and store.writes == 1


def test_round_trip_through_files():
    flash = _fresh_files()
    store = EnergyStore(flash)
    store.load()
    sid = store.start_session(0)
    store.update(123456, 1000)
    store.flush(2000)
    again = EnergyStore(FileFlash("ea.bin", "eb.bin"))
    assert again.load() is True
    assert not again.recovered_empty
    assert again.energy_wh == 123456
    assert again.session_id == sid == 1
    assert again.session_active and again.session_start_wh == 0
    assert again.session_energy_wh() == 123456
    assert again.boots == 2
    assert again.slot_status == [SLOT_OK, SLOT_OK]


def test_record_layout_is_fixed():
    # Little-endian magic "ES", version 2, flags (bit 0 session open), seq, energy u64,
    # session id, session start u64, sessions total, boots, tail (seq & 0x7FFF),
    # CRC-16/MODBUS.
    flash = MemFlash()
    store = EnergyStore(flash)
    store.load(count_boot=False)
    store.seq = 6
    store.energy_wh = 123456
    store.session_id = 3
    store.session_start_wh = 120000
    store.sessions_total = 2
    store.boots = 5
    store.session_active = True
    assert store.flush(0)
    assert len(flash.slots[0]) == RECORD_SIZE == 40
    assert flash.slots[0] == hexbytes(
        "45 53 02 01 07 00 00 00 40 e2 01 00 00 00 00 00 03 00 00 00 c0 d4 01 00 00 00 00 00"
        " 02 00 00 00 05 00 00 00 07 00 01 cc")


def test_writes_alternate_between_slots():
    flash = MemFlash()
    store = EnergyStore(flash, quantum_wh=10)
    store.load()  # boot count -> slot 0
    for i in range(1, 6):
        store.update(10 * i, i)
    assert flash.log == [0, 1, 0, 1, 0, 1]
    assert store.seq == 6


def test_next_write_goes_to_the_older_slot_after_load():
    flash = MemFlash()
    store = EnergyStore(flash)
    store.load()           # seq 1 -> slot 0
    store.update(10, 0)    # seq 2 -> slot 1 (newest)
    again = EnergyStore(flash)
    again.load(count_boot=False)
    again.update(20, 0)
    assert flash.log == [0, 1, 0]
    assert EnergyStore(flash).load() and again.seq == 3


def test_energy_quantum_throttles_writes():
    flash = MemFlash()
    store = EnergyStore(flash, quantum_wh=10, quantum_ms=60000)
    store.load(count_boot=False)
    for wh in range(1, 10):
        assert store.update(wh, wh * 100) is False
    assert store.writes == 0 and store.pending_wh() == 9
    assert store.update(10, 1000) is True
    assert store.writes == 1 and store.pending_wh() == 0


def test_time_quantum_writes_a_small_change():
    store = EnergyStore(MemFlash(), quantum_wh=10, quantum_ms=60000)
    store.load(count_boot=False)
    assert store.update(0, 0) is False       # starts the time quantum, nothing changed
    assert store.update(1, 1000) is False
    assert store.update(1, 59999) is False
    assert store.update(1, 60000) is True    # 60 s since the quantum started, 1 Wh pending
    assert store.update(2, 119999) is False
    assert store.update(2, 120000) is True   # 60 s since the last write
    assert store.update(1, 500000) is False  # nothing changed: no write however long
    assert store.writes == 2


def test_clock_going_back_does_not_stall_writes():
    store = EnergyStore(MemFlash(), quantum_wh=10, quantum_ms=60000)
    store.load(count_boot=False)
    store.update(0, 1000000)
    assert store.update(1, 5) is True  # a wrapped/reset clock counts as a full quantum


def _session(store, watts, seconds, step_s, t0_ms, wh0):
    """Meter readings every step_s at constant power; returns (end ms, end Wh, max pending)."""
    t_ms = t0_ms
    worst = 0
    for i in range(1, seconds // step_s + 1):
        t_ms = t0_ms + i * step_s * 1000
        store.update(wh0 + watts * i * step_s // 3600, t_ms)
        if store.pending_wh() > worst:
            worst = store.pending_wh()
    return t_ms, wh0 + watts * seconds // 3600, worst


def test_flash_writes_bounded_over_a_10_kwh_session():
    for watts in (11000, 3700, 1400):
        store = EnergyStore(MemFlash(), quantum_wh=10, quantum_ms=60000)
        store.load(count_boot=False)
        seconds = 10000 * 3600 // watts
        t_ms, wh, worst = _session(store, watts, seconds, 1, 0, 0)
        assert wh >= 9990
        # at most one write per quantum of energy plus one per quantum of time
        bound = wh // 10 + t_ms // 60000 + 2
        assert store.writes <= bound, (watts, store.writes, bound)
        step_wh = watts // 3600 + 1
        assert store.writes >= wh // (10 + step_wh)  # and it did keep up with the energy
        assert worst < 10  # never more than one quantum at risk
        assert store.flush(t_ms + 1) and store.pending_wh() == 0


def test_large_quantum_means_few_writes():
    store = EnergyStore(MemFlash(), quantum_wh=100, quantum_ms=600000)
    store.load(count_boot=False)
    _session(store, 11000, 3273, 1, 0, 0)
    assert 95 <= store.writes <= 102


def test_never_goes_backwards():
    flash = MemFlash()
    store = EnergyStore(flash)
    store.load(count_boot=False)
    store.update(5000, 0)
    assert store.update(4999, 1) is False
    assert store.update(0, 2) is False
    assert store.energy_wh == 5000 and store.rejected_backwards == 2
    store.update(5000, 3)  # equal is fine, not counted
    assert store.rejected_backwards == 2
    again = EnergyStore(flash)
    again.load(count_boot=False)
    assert again.energy_wh == 5000
    again.update(100, 4)
    assert again.energy_wh == 5000 and again.rejected_backwards == 1


def test_invalid_readings_are_counted_not_raised():
    store = EnergyStore(MemFlash())
    store.load(count_boot=False)
    store.update(100, 0)
    for bad in (float("nan"), float("inf"), -1, "12", None, 2 ** 64):
        assert store.update(bad, 1) is False
    assert store.rejected_invalid == 6 and store.energy_wh == 100
    assert store.update(250.7, 2) is True  # a float reading from the meter is truncated to Wh
    assert store.energy_wh == 250


def test_corrupt_newest_slot_a_falls_back_to_b():
    store = EnergyStore(_fresh_files())
    store.load()              # seq 1 -> A
    store.update(10, 0)       # seq 2 -> B
    store.update(20, 1)       # seq 3 -> A (newest)
    _corrupt("ea.bin", 9)     # a flipped bit in A's energy
    again = EnergyStore(FileFlash("ea.bin", "eb.bin"))
    assert again.load(count_boot=False) is True
    assert again.energy_wh == 10 and not again.recovered_empty
    assert again.slot_status == [SLOT_CORRUPT, SLOT_OK]
    again.update(30, 2)       # rewrites the damaged A, leaves the good B alone
    third = EnergyStore(FileFlash("ea.bin", "eb.bin"))
    third.load(count_boot=False)
    assert third.slot_status == [SLOT_OK, SLOT_OK] and third.energy_wh == 30


def test_corrupt_newest_slot_b_falls_back_to_a():
    store = EnergyStore(_fresh_files())
    store.load()              # seq 1 -> A
    store.update(10, 0)       # seq 2 -> B (newest)
    _corrupt("eb.bin", RECORD_SIZE - 1)  # a flipped bit in B's CRC
    again = EnergyStore(FileFlash("ea.bin", "eb.bin"))
    again.load(count_boot=False)
    assert again.energy_wh == 0 and again.boots == 1
    assert again.slot_status == [SLOT_OK, SLOT_CORRUPT]


def test_corrupt_older_slot_is_ignored():
    store = EnergyStore(_fresh_files())
    store.load()
    store.update(10, 0)       # B newest
    _corrupt("ea.bin", 0)     # A's magic
    again = EnergyStore(FileFlash("ea.bin", "eb.bin"))
    again.load(count_boot=False)
    assert again.energy_wh == 10 and again.slot_status == [SLOT_CORRUPT, SLOT_OK]


def test_short_long_and_garbage_slots_are_corrupt():
    good = MemFlash()
    store = EnergyStore(good)
    store.load()
    record = good.slots[0]
    cases = (b"\x00", record[:-1], record + b"\x00", b"\xff" * RECORD_SIZE, bytes(RECORD_SIZE))
    for data in cases:
        flash = MemFlash()
        flash.slots = [data, None]
        probe = EnergyStore(flash)
        assert probe.load(count_boot=False) is False
        assert probe.slot_status == [SLOT_CORRUPT, SLOT_MISSING]


def test_both_slots_corrupt_start_from_zero():
    flash = MemFlash()
    flash.slots = [b"\x12" * RECORD_SIZE, b"junk"]
    store = EnergyStore(flash)
    assert store.load() is False
    assert store.recovered_empty and store.energy_wh == 0 and store.seq == 1
    assert store.slot_status == [SLOT_CORRUPT, SLOT_CORRUPT]
    assert store.update(15, 0) is True


def test_unknown_record_version_is_not_trusted():
    flash = MemFlash()
    store = EnergyStore(flash)
    store.load()
    data = bytearray(flash.slots[0])
    data[2] = energy_store.VERSION + 1
    from firmware.crc import crc16
    crc = crc16(data, 0, RECORD_SIZE - 2)
    data[RECORD_SIZE - 2] = crc & 0xFF
    data[RECORD_SIZE - 1] = crc >> 8
    flash.slots[0] = bytes(data)
    probe = EnergyStore(flash)
    assert probe.load(count_boot=False) is False and probe.slot_status[0] == SLOT_CORRUPT


def test_flash_that_raises_on_read_counts_as_missing():
    class Broken(MemFlash):
        def read(self, slot):
            raise OSError(5)
    store = EnergyStore(Broken())
    assert store.load() is False and store.recovered_empty


def test_sequence_number_wraps():
    flash = MemFlash()
    store = EnergyStore(flash)
    store.load(count_boot=False)
    store.seq = 0xFFFFFFFE
    store.update(10, 0)   # seq 0xFFFFFFFF -> A
    store.update(20, 1)   # seq 0 -> B
    assert store.seq == 0
    again = EnergyStore(flash)
    again.load(count_boot=False)
    assert again.energy_wh == 20 and again.seq == 0


def test_sessions_persist_and_count():
    flash = MemFlash()
    store = EnergyStore(flash)
    store.load(count_boot=False)
    store.update(1000, 0)
    assert store.start_session(1) == 1
    store.update(1004, 2)  # below the quantum: not written...
    again = EnergyStore(flash)
    again.load(count_boot=False)
    assert again.session_active and again.session_start_wh == 1000  # ...but the start was
    assert again.energy_wh == 1000
    store.update(1500, 3)
    assert store.session_energy_wh() == 500
    assert store.stop_session(4) == 500
    assert store.stop_session(5) == 0  # no session open: nothing happens
    assert store.sessions_total == 1 and store.session_energy_wh() == 0
    third = EnergyStore(flash)
    third.load(count_boot=False)
    assert not third.session_active and third.sessions_total == 1 and third.session_id == 1
    assert third.start_session(6) == 2 and third.session_start_wh == 1500


def test_failed_write_is_counted_and_retried_on_the_same_slot():
    flash = MemFlash()
    store = EnergyStore(flash, quantum_wh=10, quantum_ms=60000)
    store.load()                # seq 1 -> slot 0
    good = flash.slots[0]
    flash.fail = True
    assert store.update(10, 0) is False  # would go to slot 1: fails, no exception
    assert store.write_errors == 1 and store.seq == 2  # seq 2 is used up by the failed write
    assert store.update(30, 1000) is False  # backoff: no retry within the time quantum
    assert store.write_errors == 1
    flash.fail = False
    assert store.update(40, 60000) is True
    assert flash.log == [0, 1] and flash.slots[0] == good  # the good slot was never touched
    assert store.seq == 3  # the failed write used up seq 2: the retry never shares its number


def test_update_without_a_write_allocates_nothing():
    if not IS_MICROPYTHON:
        return  # heap_lock exists only on MicroPython
    import micropython
    store = EnergyStore(MemFlash(), quantum_wh=1000, quantum_ms=10 ** 9)
    store.load(count_boot=False)
    store.update(1, 0)
    micropython.heap_lock()
    try:
        for i in range(2, 200):
            store.update(i, i)
        store.update(5, 300)  # rejected backwards: counted, no allocation either
    finally:
        micropython.heap_unlock()
    assert store.energy_wh == 199 and store.rejected_backwards == 1
