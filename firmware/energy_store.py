# The column's lifetime energy register and session counters, kept across power loss.
#
# Two slots (A/B) hold fixed-size records; each write goes to the slot that does NOT hold
# the newest good record, so a power cut at any byte of a write damages at most the record
# being written and the other slot still holds the previous one. At load, the valid record
# (magic, version, size, tail, CRC-16) with the newest sequence number wins.
#
# Torn writes: a cut leaves the slot with the new record's first bytes followed by the
# slot's old bytes, erased flash (0xFF) or nothing. The sequence number sits at byte 4 and
# its low 15 bits again in the last field before the CRC, so such a mix carries the new
# number at the head and the old one (or 0xFFFF, which no tail holds) at the tail and is
# rejected whatever its CRC says: only a record whose data bytes all arrived can pass.
# Other damage (bits flipped in place) is left to the CRC-16. A failed write still uses
# up its sequence number, so a retry never shares a number with what the failure left.
#
# Write quantum (flash wear vs. loss): the energy is kept in RAM and written when it has
# moved by >= quantum_wh since the last write, or when quantum_ms has passed since the last
# write and anything changed. So a power cut loses the energy since the last completed
# write: less than quantum_wh plus the one reading being written when the cut came. With
# the defaults (10 Wh / 60 s) a 10 kWh session costs at most ~1000 writes of one 40-byte
# record. Session start/stop and the boot count are written at once: they are rare and
# must not be lost. The register never goes backwards: a lower reading is rejected and
# counted.
import struct

from .clock import elapsed_ms
from .crc import crc16

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

# Record, little-endian: magic u16, version u8, flags u8, seq u32, energy_wh u64,
# session_id u32, session_start_wh u64, sessions_total u32, boots u32, tail u16 (seq &
# 0x7FFF), crc u16 (over all bytes before it). Version 1 records (38 bytes: no tail) are
# still read, so a firmware update keeps the register; every write is version 2.
_FMT = "<HBBIQIQIIHH"
_FMT_V1 = "<HBBIQIQIIH"
RECORD_SIZE = const(40)
_V1_SIZE = const(38)
_CRC_AT = const(38)
_TAIL_MASK = const(0x7FFF)
_MAGIC = const(0x5345)  # "ES" little-endian
VERSION = const(2)
_FLAG_SESSION = const(1)
_U32 = const(0xFFFFFFFF)
_HALF = const(0x7FFFFFFF)
_U64_MAX = 0xFFFFFFFFFFFFFFFF  # not const: a big int on 32-bit boards

# Reasons load() found a slot unusable (counted in slot_errors).
SLOT_OK = const(0)
SLOT_MISSING = const(1)
SLOT_CORRUPT = const(2)


class EnergyStore:
    """Lifetime import energy (Wh) and session counters on a two-slot flash (see flash.py)."""

    def __init__(self, flash, quantum_wh=10, quantum_ms=60000):
        self.flash = flash
        self.quantum_wh = quantum_wh
        self.quantum_ms = quantum_ms
        self._buf = bytearray(RECORD_SIZE)  # owned here: the only record ever packed
        # Persisted state (RAM copy; energy_wh may be ahead of flash by < one quantum).
        self.energy_wh = 0
        self.session_id = 0
        self.session_start_wh = 0
        self.sessions_total = 0
        self.boots = 0
        self.session_active = False
        self.seq = 0
        # What load() found.
        self.recovered_empty = False  # no valid slot: started from zero
        self.slot_status = [SLOT_MISSING, SLOT_MISSING]
        # Counters for telemetry.
        self.writes = 0
        self.write_errors = 0
        self.rejected_backwards = 0
        self.rejected_invalid = 0
        self._loaded = False
        self._next_slot = 0
        self._written_wh = 0
        self._dirty = False       # counters changed since the last good write
        self._last_ms = None      # time of the last write (or of the first update)
        self._fail_ms = None      # time of the last failed write (backoff)

    # ---- loading -------------------------------------------------------------------
    def _parse(self, slot):
        """Fields tuple of the slot's record, or None (slot_status says why)."""
        try:
            data = self.flash.read(slot)
        except Exception:  # a flash that raises is a slot we cannot use
            data = None
        if data is None or len(data) == 0:
            self.slot_status[slot] = SLOT_MISSING
            return None
        n = len(data)
        v1 = n == _V1_SIZE and data[2] == 1
        if n != RECORD_SIZE and not v1:
            self.slot_status[slot] = SLOT_CORRUPT
            return None
        fields = struct.unpack_from(_FMT_V1 if v1 else _FMT, data, 0)
        if fields[0] != _MAGIC or (not v1 and (fields[1] != VERSION or fields[9] != fields[3] & _TAIL_MASK)) \
                or fields[-1] != crc16(data, 0, n - 2) or fields[6] > fields[4]:
            self.slot_status[slot] = SLOT_CORRUPT
            return None
        self.slot_status[slot] = SLOT_OK
        return fields

    def load(self, count_boot=True):
        """Read both slots and take the newest valid one. Never raises.

        Both slots invalid or missing -> start from zero with recovered_empty set
        (slot_status tells a first boot, MISSING, from a damaged store, CORRUPT).
        count_boot adds one to `boots` and writes it at once. Returns True if a valid
        record was found."""
        a = self._parse(0)
        b = self._parse(1)
        best = a
        slot = 0
        # b wins if its sequence number is after a's in u32 serial arithmetic (survives the wrap).
        if b is not None and (a is None or 0 < (b[3] - a[3]) & _U32 <= _HALF):
            best = b
            slot = 1
        self._loaded = True
        if best is None:
            self.recovered_empty = True
            self.seq = 0
            self.energy_wh = self.session_id = self.session_start_wh = 0
            self.sessions_total = self.boots = 0
            self.session_active = False
            self._next_slot = 0
        else:
            self.recovered_empty = False
            self.session_active = bool(best[2] & _FLAG_SESSION)
            self.seq = best[3]
            self.energy_wh = best[4]
            self.session_id = best[5]
            self.session_start_wh = best[6]
            self.sessions_total = best[7]
            self.boots = best[8]
            self._next_slot = 1 - slot
        self._written_wh = self.energy_wh
        self._dirty = False
        self._last_ms = None
        self._fail_ms = None
        if count_boot:
            self.boots = (self.boots + 1) & _U32
            self._write(None)
        return best is not None

    # ---- writing -------------------------------------------------------------------
    def _write(self, now_ms):
        """Pack the RAM state into the older slot. False (and counted) if the flash failed."""
        seq = (self.seq + 1) & _U32
        buf = self._buf
        struct.pack_into(_FMT, buf, 0, _MAGIC, VERSION,
                         _FLAG_SESSION if self.session_active else 0, seq, self.energy_wh,
                         self.session_id, self.session_start_wh, self.sessions_total,
                         self.boots, seq & _TAIL_MASK, 0)
        struct.pack_into("<H", buf, _CRC_AT, crc16(buf, 0, _CRC_AT))
        self.seq = seq  # used up even if the write fails (see the torn-write note above)
        try:
            self.flash.write(self._next_slot, buf)
        except Exception:
            # The slot may now be torn; keep writing to it (never to the good one) next time.
            self.write_errors += 1
            self._fail_ms = now_ms
            return False
        self._next_slot = 1 - self._next_slot
        self._written_wh = self.energy_wh
        self._dirty = False
        self._last_ms = now_ms
        self._fail_ms = None
        self.writes += 1
        return True

    def update(self, energy_wh, now_ms):
        """Take a new register reading (Wh). Returns True if it was written to flash.

        Allocation-free unless a write happens. Readings lower than the register, negative,
        or not numbers are rejected and counted; the register keeps its value."""
        if not self._loaded:
            self.load(False)
        if type(energy_wh) is float:
            try:
                energy_wh = int(energy_wh)  # a float from the meter; NaN/inf raise
            except Exception:
                energy_wh = -1
        elif type(energy_wh) is not int:
            energy_wh = -1
        if energy_wh < 0 or energy_wh > _U64_MAX:
            self.rejected_invalid += 1
            return False
        if energy_wh < self.energy_wh:
            self.rejected_backwards += 1
            return False
        self.energy_wh = energy_wh
        if self._last_ms is None:
            self._last_ms = now_ms  # the time quantum starts with the first reading
        if energy_wh == self._written_wh and not self._dirty:
            return False
        # Time since the last failed write / the last write; a clock that wrapped or went
        # back counts as a full quantum.
        if self._fail_ms is not None and 0 <= elapsed_ms(now_ms, self._fail_ms) < self.quantum_ms:
            return False  # the flash just failed: retry once per time quantum, not every reading
        d = elapsed_ms(now_ms, self._last_ms)
        if energy_wh - self._written_wh >= self.quantum_wh or d < 0 or d >= self.quantum_ms:
            return self._write(now_ms)
        return False

    def flush(self, now_ms):
        """Write now if anything is unwritten (clean shutdown). True if flash is up to date."""
        if not self._loaded:
            self.load(False)
        if self.energy_wh == self._written_wh and not self._dirty:
            return True
        return self._write(now_ms)

    def pending_wh(self):
        """Energy in RAM not yet on flash: what a power cut now would lose."""
        return self.energy_wh - self._written_wh

    # ---- sessions ------------------------------------------------------------------
    def start_session(self, now_ms):
        """Open a session at the current register value; written at once. Returns its id."""
        if not self._loaded:
            self.load(False)
        self.session_id = (self.session_id + 1) & _U32
        self.session_start_wh = self.energy_wh
        self.session_active = True
        self._dirty = True
        self._write(now_ms)
        return self.session_id

    def stop_session(self, now_ms):
        """Close the open session (no-op if none); written at once. Returns its energy in Wh."""
        if not self._loaded:
            self.load(False)
        if not self.session_active:
            return 0
        self.session_active = False
        self.sessions_total = (self.sessions_total + 1) & _U32
        self._dirty = True
        self._write(now_ms)
        return self.energy_wh - self.session_start_wh

    def session_energy_wh(self):
        """Energy of the open session (0 when none)."""
        if not self.session_active:
            return 0
        return self.energy_wh - self.session_start_wh
