# Power cuts in the middle of an energy-store write: after the cut, a fresh boot must load
# the previous or the new record, never less than the previous, never a corrupt one.
# Runs under CPython and MicroPython. Random cuts of every write (energy and config), a
# thousand per run: test_power_cut_random.py.
import os

from firmware.energy_store import RECORD_SIZE, EnergyStore
from firmware.flash import FileFlash

MPY_HEAP = "64K"

# How the medium looks after the cut (all three are seen on real flash filesystems):
TRUNCATE = 0  # the file holds only the bytes written before the cut
ERASED = 1    # the rest of the record reads as erased flash (0xFF)
TORN = 2      # the rest still holds the slot's old record (in-place overwrite)
MODES = (TRUNCATE, ERASED, TORN)


class PowerCut(Exception):
    pass


class CutFlash(FileFlash):
    """A FileFlash whose write number `cut_write` (0 = the next one) stops after `cut_at`
    bytes, leaving those bytes in the file, then raises PowerCut (the board is dead)."""

    def __init__(self, path_a, path_b):
        FileFlash.__init__(self, path_a, path_b)
        self.cut_write = -1
        self.cut_at = 0
        self.mode = TRUNCATE
        self.cuts = 0

    def arm(self, cut_write, cut_at, mode):
        self.cut_write = cut_write
        self.cut_at = cut_at
        self.mode = mode

    def write(self, slot, data):
        if self.cut_write != 0:
            if self.cut_write > 0:
                self.cut_write -= 1
            FileFlash.write(self, slot, data)
            return
        self.cut_write = -1
        self.cuts += 1
        n = self.cut_at
        old = self.read(slot) or b""
        if self.mode == TRUNCATE:
            torn = bytes(data)[:n]
        elif self.mode == ERASED:
            torn = bytes(data)[:n] + b"\xff" * (len(data) - n)
        else:
            torn = bytes(data)[:n] + old[n:]
        FileFlash.write(self, slot, torn)
        raise PowerCut()


def _reset():
    for name in ("ca.bin", "cb.bin"):
        try:
            os.remove(name)
        except OSError:
            pass


def _boot(count_boot=False):
    store = EnergyStore(CutFlash("ca.bin", "cb.bin"), quantum_wh=10, quantum_ms=60000)
    store.load(count_boot)
    return store


def _prepare(writes_before):
    """A store that has made `writes_before` good writes, energy 10 Wh per write."""
    _reset()
    store = _boot(count_boot=True)  # write 1: the boot count
    for i in range(1, writes_before):
        assert store.update(i * 10, i)
    assert store.writes == writes_before
    return store


def test_cut_at_every_byte_of_an_energy_write():
    for writes_before in (1, 2, 3, 4):      # the cut write lands on both slots, old and new
        for mode in MODES:
            for n in range(RECORD_SIZE + 1):
                store = _prepare(writes_before)
                before = store.energy_wh
                new = before + 17
                store.flash.arm(0, n, mode)
                store.update(new, 100)
                assert store.flash.cuts == 1
                after = _boot()
                assert after.energy_wh in (before, new), (writes_before, mode, n, after.energy_wh)
                assert not after.recovered_empty
                assert after.boots == 1
                if n == RECORD_SIZE:
                    assert after.energy_wh == new  # the whole record made it
                # the next write after the reboot works and goes forward
                assert after.update(new + 10, 200) and _boot().energy_wh == new + 10


def test_cut_at_every_byte_of_the_first_write_ever():
    for mode in MODES:
        for n in range(RECORD_SIZE + 1):
            _reset()
            store = EnergyStore(CutFlash("ca.bin", "cb.bin"))
            store.flash.arm(0, n, mode)
            store.load()  # the boot-count write is cut
            after = _boot()
            assert after.energy_wh == 0
            assert after.boots == (1 if n == RECORD_SIZE else 0)
            assert after.recovered_empty == (n < RECORD_SIZE)


def test_cut_at_every_byte_of_session_start_and_stop():
    for mode in MODES:
        for n in range(RECORD_SIZE + 1):
            store = _prepare(3)
            store.flash.arm(0, n, mode)
            store.start_session(100)
            after = _boot()
            # the record is all-or-nothing: never a session id without its start energy
            if after.session_active:
                assert after.session_id == 1 and after.session_start_wh == 20
            else:
                assert after.session_id == 0 and after.session_start_wh == 0
            assert after.energy_wh == 20
            if not after.session_active:
                continue
            after.update(45, 200)
            after.flash.arm(0, n, mode)
            after.stop_session(300)
            final = _boot()
            assert final.energy_wh in (20, 45)
            assert final.sessions_total == (0 if final.session_active else 1)
            assert final.session_id == 1 and final.session_start_wh == 20
