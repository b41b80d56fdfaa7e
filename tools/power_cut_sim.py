# The firmware side of the power-cut campaign (python -m tools.power_cut_campaign): runs
# in the interpreter under test (CPython or the MicroPython unix port), on the firmware's
# own energy store, flash slots and config writer, in the current folder. Each cut stops a
# write at a random instant, leaves on the medium what a flash file system can leave, and
# "reboots": a fresh store / a fresh App reads what survived.
#
#   power_cut_sim.py SEED CUTS   -> one JSON line: the figures (see Campaign.figures)
#
# Energy writes are cut after any byte of the 40-byte record, with the rest of the slot
# truncated, erased (0xFF), still holding the old record, or with a half-programmed byte at
# the cut, or just after the last byte (before the store knows the write is done); boot-
# count and session writes too. Config writes (save_config, CBOR ChangeConfiguration,
# the Modbus bus-address change) are cut after any character of the temp file, before
# its sync, before the rename, and on FAT between the removal of the old file and the
# rename. Checks after every cut: the register never goes backwards, never reads
# anything but a record that was written, loses less than one quantum plus the reading
# being written; the column boots with the old or the new config, in a safe state.
# MicroPython-compatible: no typing, a small xorshift generator, plain files.
import json
import os
import sys

import machine

from firmware import app as firmware_app
from firmware import regmap
from firmware.energy_store import RECORD_SIZE, EnergyStore
from firmware.flash import FileFlash
from firmware.limits import amps_to_da
from firmware.status import ERR_CONFIG, ST_FAULTED

QUANTUM_WH = 10            # the config default (controller.DEFAULTS)
QUANTUM_MS = 60000
MAX_STEP_WH = 16           # one reading: 1 s at the 80 A three-phase maximum is 15.3 Wh
CONFIG = "column.json"
SLOTS = ("pc_a.bin", "pc_b.bin")
BASE = {
    "column_id": "cut-col", "bus_address": 5, "phases": 3,
    "hardware_rating_a": 32, "installation_rating_a": 25, "failsafe_a": 10,
    "meter": {"type": "sdm630"}, "link": {"mode": "modbus-rtu", "baud": 19200},
}

# How the rest of a cut write looks on the medium.
TRUNCATE = 0   # the bytes before the cut only
ERASED = 1     # then erased flash
TORN = 2       # then the old content (rewritten in place)
HALF = 3       # a half-programmed byte at the cut, then erased flash
HALF_TORN = 4  # a garbled byte at the cut, then the old content
MODES = ("truncate", "erased", "torn", "half", "half_torn")


class PowerCut(BaseException):
    """Not an Exception: the firmware's own error handling never sees a power cut."""


class Rng:
    """xorshift32: the same sequence on both interpreters."""

    def __init__(self, seed):
        self.s = (seed & 0xFFFFFFFF) or 0x9E3779B9

    def below(self, n):
        x = self.s
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self.s = x
        return x % n


def _cut_bytes(new, old, n, mode, rng):
    """What a write of `new` over `old` cut after n bytes leaves."""
    head = bytes(new[:n])
    if n >= len(new) or mode == TRUNCATE:
        return head
    if mode == HALF:  # programming only clears bits: some of the byte's 0s are still 1s
        return head + bytes([new[n] | rng.below(256)]) + b"\xff" * (len(new) - n - 1)
    if mode == HALF_TORN:
        return head + bytes([rng.below(256)]) + bytes(old[n + 1:])
    if mode == ERASED:
        return head + b"\xff" * (len(new) - n)
    return head + bytes(old[n:])


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def _remove(path):
    try:
        os.remove(path)
    except OSError:
        pass


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def fields(store):
    """Everything a record holds, from a store's RAM (what it writes or has loaded)."""
    return (store.seq, store.energy_wh, store.session_id, store.session_start_wh,
            store.sessions_total, store.boots, store.session_active)


class CutFlash(FileFlash):
    """The energy store's slot files; write number `after` (0 = the next) is cut."""

    def __init__(self, campaign):
        FileFlash.__init__(self, SLOTS[0], SLOTS[1])
        self.campaign = campaign
        self.after = -1
        self.at = 0
        self.mode = TRUNCATE
        self.owner = None

    def arm(self, after, at, mode):
        self.after = after
        self.at = at
        self.mode = mode

    def write(self, slot, data):
        c = self.campaign
        if self.after != 0:
            if self.after > 0:
                self.after -= 1
            FileFlash.write(self, slot, data)
            c.completed = fields(self.owner)
            c.completed_slot = slot
            return
        self.after = -1
        c.inflight = fields(self.owner)
        c.inflight_slot = slot
        c.modes[self.mode] += 1
        FileFlash.write(self, slot, _cut_bytes(data, self.read(slot) or b"", self.at, self.mode, c.rng))
        raise PowerCut()


# The instants of a config write a cut is aimed at: inside the temp file's bytes, before
# its sync, before FAT removes the old file (only when it renames over one), before the
# rename; a cut aimed at a step the write does not take lands after the write.
STEPS = ("write", "sync", "remove", "rename")


class CutFs:
    """Stands in for `open` and `os` in firmware.config_runtime, which writes every config
    file, and cuts the power at the armed step. `fat` renames over an existing file as
    MicroPython's FAT driver does: remove the old file, then rename."""

    def __init__(self, campaign):
        self.campaign = campaign
        self.where = None
        self.per_mille = 0   # of the temp file's bytes, for a cut in "write"
        self.mode = TRUNCATE
        self.fat = False

    def arm(self, where, per_mille, mode, fat):
        self.where = where
        self.per_mille = per_mille
        self.mode = mode
        self.fat = fat

    def step(self, what):
        if self.where == what:
            self.where = None
            self.campaign.config_cut_at[what] += 1
            raise PowerCut()

    def open(self, path, mode="r"):
        if "w" in mode:
            return CutFile(self, path)
        return open(path, mode)

    def sync(self):
        self.step("sync")

    def remove(self, path):
        os.remove(path)

    def rename(self, a, b):
        if self.fat and _exists(b):
            self.step("remove")
            os.remove(b)
        self.step("rename")
        os.rename(a, b)


class CutFile:
    def __init__(self, fs, path):
        self.fs = fs
        self.old = _read(path)
        self.f = open(path, "wb")

    def write(self, text):
        fs = self.fs
        data = text.encode()
        if fs.where == "write":
            fs.where = None
            fs.campaign.config_cut_at["write"] += 1
            n = len(data) * fs.per_mille // 1000
            self.f.write(_cut_bytes(data, self.old, n, fs.mode, fs.campaign.rng))
            self.close()
            raise PowerCut()
        return self.f.write(data)

    def flush(self):
        pass

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


class Campaign:
    def __init__(self, seed):
        self.seed = seed
        self.rng = Rng(seed)
        self.cuts = 0
        self.kinds = {"energy": 0, "boot": 0, "save": 0, "cbor": 0, "modbus": 0, "first": 0}
        self.modes = [0] * len(MODES)
        self.config_cut_at = {"write": 0, "sync": 0, "remove": 0, "rename": 0, "after": 0}
        self.recovered = {"a": 0, "b": 0, "new": 0, "previous": 0, "empty": 0}
        self.booted = {"old": 0, "new": 0, "unconfigured": 0}
        self.max_loss_wh = 0
        self.lost_wh = 0
        self.corrupt = 0
        self.backwards = 0
        self.over_loss = 0
        self.bad_boots = 0
        self.failures = []
        self.completed = None      # the last record written in full, as fields()
        self.completed_slot = -1
        self.inflight = None       # the record being written when the power went
        self.inflight_slot = -1
        for name in ("pc_a.bin", "pc_b.bin", CONFIG, CONFIG + ".tmp", "app_energy_a.bin", "app_energy_b.bin"):
            _remove(name)
        self._write_config(BASE)
        self.store = self._boot()

    def fail(self, text):
        if len(self.failures) < 5:
            self.failures.append("seed %d, cut %d: %s" % (self.seed, self.cuts, text))

    # -- energy ----------------------------------------------------------------------------
    def _boot(self, cut_it=False):
        """A fresh store on the slot files, loading and counting the boot as the App does."""
        flash = CutFlash(self)
        store = EnergyStore(flash, quantum_wh=QUANTUM_WH, quantum_ms=QUANTUM_MS)
        flash.owner = store
        if cut_it:
            flash.arm(0, self.rng.below(RECORD_SIZE + 1), self.rng.below(len(MODES)))
        store.load()
        return store

    def _check_energy(self, at_cut_wh, step_wh):
        """After a cut: what a reboot reads must be the last full record or the cut one."""
        probe = EnergyStore(FileFlash(SLOTS[0], SLOTS[1]))
        probe.load(False)
        got = fields(probe)
        if got == self.inflight:
            self.recovered["new"] += 1
            slot = self.inflight_slot
        elif got == self.completed:
            self.recovered["previous"] += 1
            slot = self.completed_slot
        elif probe.recovered_empty and self.completed is None:
            self.recovered["empty"] += 1  # the very first write ever was cut
            slot = -1
        else:
            self.corrupt += 1
            self.fail("read %s, wrote %s then %s" % (got, self.completed, self.inflight))
            slot = -1
        if slot >= 0:
            self.recovered["ab"[slot]] += 1
        done = self.completed[1] if self.completed is not None else 0
        if probe.energy_wh < done:
            self.backwards += 1
            self.fail("register went back from %d to %d Wh" % (done, probe.energy_wh))
        loss = at_cut_wh - probe.energy_wh
        self.lost_wh += loss
        self.max_loss_wh = max(self.max_loss_wh, loss)
        if loss >= QUANTUM_WH + step_wh:
            self.over_loss += 1
            self.fail("lost %d Wh (quantum %d, reading %d)" % (loss, QUANTUM_WH, step_wh))
        if slot >= 0:  # what the next boot starts from
            self.completed = got
            self.completed_slot = slot
        self.inflight = None

    def energy_cut(self, t_ms):
        """Readings (and now and then a session start/stop) until a write is cut."""
        rng = self.rng
        store = self.store
        store.flash.arm(rng.below(4), rng.below(RECORD_SIZE + 1), rng.below(len(MODES)))
        while True:
            step = 0
            t_ms += 1000 * (1 + rng.below(30))
            try:
                if rng.below(20) == 0:
                    if store.session_active:
                        store.stop_session(t_ms)
                    else:
                        store.start_session(t_ms)
                else:
                    step = rng.below(MAX_STEP_WH + 1)
                    store.update(store.energy_wh + step, t_ms)
            except PowerCut:
                self._check_energy(store.energy_wh, step)
                return t_ms

    def boot_cut(self):
        """The boot-count write of a fresh boot is cut."""
        try:
            self._boot(True)
        except PowerCut:
            self._check_energy(self.inflight[1], 0)

    # -- config ----------------------------------------------------------------------------
    def _write_config(self, cfg):
        with open(CONFIG, "w") as f:
            f.write(json.dumps(cfg))

    def _app(self):
        machine.board.clear()
        return firmware_app.App(machine, CONFIG, store_prefix="app_energy", use_wdt=False,
                                log=lambda *a: None)

    def _config_module(self, cut):
        """firmware.config as the link code will find it, with its file writes cut."""
        from firmware import config, config_runtime

        config_runtime.open = cut.open
        config_runtime.os = cut
        return config

    def config_cut(self, kind):
        rng = self.rng
        if kind == "first":  # commissioning writes the first config ever
            _remove(CONFIG)
            _remove(CONFIG + ".tmp")
            old = None
        app = self._app()
        if kind != "first":
            old = app.cfg
            if app.config_errors:
                self.bad_boots += 1
                self.fail("no valid config before the write: %s" % app.config_errors)
                self._write_config(BASE)  # counted once: the next cuts start from a good one
                return
        cut = CutFs(self)
        config = self._config_module(cut)
        new, call = self._change(kind, app, config, old)
        new = config.check(new)[0]  # as a boot reads it: defaults merged in
        where = STEPS[rng.below(len(STEPS))] if rng.below(2) else "write"
        cut.arm(where, rng.below(1001), rng.below(len(MODES)), rng.below(2) == 1)
        result = None
        try:
            result = call()
            self.config_cut_at["after"] += 1
        except PowerCut:
            pass
        finally:
            from firmware import config_runtime

            del config_runtime.open
            config_runtime.os = os
        if result is not None and not self._written(kind, result):
            new = old  # refused: nothing may change
        self._check_boot(old, new, kind)

    def _change(self, kind, app, config, old):
        """(the config a successful write leaves, the call that writes it)."""
        rng = self.rng
        if kind == "cbor":
            from firmware.gw_cbor import CborLink

            link = CborLink(app)
            link._on_boot({"status": "Accepted", "heartbeatIntervalS": 60})
            key = ("failsafe_a", "heartbeat_timeout_s", "min_pause_s", "meter_stale_s")[rng.below(4)]
            value = (rng.below(31), 10 + rng.below(3591), rng.below(3601), 2 + rng.below(119))[
                ("failsafe_a", "heartbeat_timeout_s", "min_pause_s", "meter_stale_s").index(key)]
            new = dict(old)
            new[key] = value
            return new, lambda: link.link.handlers["ChangeConfiguration"]({"key": key, "value": value}, 0)
        if kind == "modbus":
            from firmware.gw_modbus import ModbusLink

            unit = old["bus_address"]
            link = ModbusLink(app, unit)
            to = 1 + rng.below(247)
            confirm = regmap.address_confirm(unit, to)
            pdu = bytes([16, 0, regmap.HR_NEW_ADDRESS, 0, 2, 4, to >> 8, to & 0xFF, confirm >> 8,
                         confirm & 0xFF])
            new = dict(old)
            new["bus_address"] = to
            return new, lambda: link.slave.handle(unit, 16, pdu, 0) and link.slave.out[1]
        new = dict(BASE) if old is None else dict(old)
        new["column_id"] = "cut-col-%d" % rng.below(100000)
        new["failsafe_a"] = 6 + rng.below(20)
        return new, lambda: config.save_config(CONFIG, new)

    def _written(self, kind, result):
        """Whether a write that ran to its end says it changed the config."""
        if kind == "cbor":
            return result["status"] in ("Accepted", "RebootRequired")
        if kind == "modbus":
            return result == 16  # the echo, not 0x90 (an exception)
        return result == []

    def _check_boot(self, old, new, kind):
        """Reboot: the config must be the old or the new one, and the column safe with it."""
        app = self._app()
        if app.config_errors:
            if old is not None:
                self.bad_boots += 1
                self.fail("%s: boots with config errors %s" % (kind, app.config_errors))
                self._write_config(BASE)
                return
            self.booted["unconfigured"] += 1
            self._write_config(BASE)  # commissioning would try again
        elif app.cfg == new:
            self.booted["new"] += 1
        elif app.cfg == old:
            self.booted["old"] += 1
        else:
            self.bad_boots += 1
            self.fail("%s: boots with %s, neither %s nor %s" % (kind, app.cfg, old, new))
            return
        # A car plugged in right after the boot: the failsafe at most, or nothing at all.
        ctl = app.ctl
        for t in (0, 100, 200, 300):
            ctl.step(t, 9000, -12000, 220, 0, 0, 0, True, 0, False, False)
        if app.config_errors:
            safe = ctl.status == ST_FAULTED and ctl.error == ERR_CONFIG and ctl.offered_da == 0
        else:
            fs = min(amps_to_da(app.cfg["failsafe_a"]), amps_to_da(app.cfg["installation_rating_a"]))
            safe = ctl.limits.failsafe_da == fs and ctl.offered_da <= fs
        if not safe or ctl.contactor_on:
            self.bad_boots += 1
            self.fail("%s: unsafe boot: status %d offered %d" % (kind, ctl.status, ctl.offered_da))

    # -- the run ---------------------------------------------------------------------------
    def run(self, cuts):
        t_ms = 0
        rng = self.rng
        for _ in range(cuts):
            self.cuts += 1
            r = rng.below(100)
            if r < 70:
                kind = "energy"
                t_ms = self.energy_cut(t_ms)
            elif r < 75:
                kind = "boot"
                self.boot_cut()
            else:
                kind = ("save", "cbor", "modbus", "save", "cbor", "modbus", "first")[rng.below(7)]
                self.config_cut(kind)
            self.kinds[kind] += 1
            if kind in ("energy", "boot"):
                self.store = self._boot()
        return self.figures()

    def figures(self):
        modes = {}
        for i in range(len(MODES)):
            modes[MODES[i]] = self.modes[i]
        return {
            "seed": self.seed, "cuts": self.cuts, "kinds": self.kinds, "energy_cut_modes": modes,
            "config_cut_at": self.config_cut_at, "quantum_wh": QUANTUM_WH,
            "max_reading_wh": MAX_STEP_WH, "max_loss_wh": self.max_loss_wh,
            "lost_wh_total": self.lost_wh, "recovered": self.recovered, "booted": self.booted,
            "corrupt_reads": self.corrupt, "backwards": self.backwards,
            "over_quantum": self.over_loss, "bad_boots": self.bad_boots,
            "register_wh": self.store.energy_wh, "failures": self.failures,
            "ok": not (self.corrupt or self.backwards or self.over_loss or self.bad_boots),
        }


def run(seed, cuts):
    return Campaign(seed).run(cuts)


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]), int(sys.argv[2]))))
