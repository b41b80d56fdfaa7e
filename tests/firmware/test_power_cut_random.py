# 1000 power cuts at random instants of the firmware's flash writes (tools/power_cut_sim.py,
# the short form of `python -m tools.power_cut_campaign --cuts 10000`): energy-store
# writes cut after any byte in five ways, boot-count and session writes, and config writes
# by save_config, CBOR ChangeConfiguration and the Modbus address change, cut inside the
# temp file, before its sync, before FAT's removal of the old file and before the rename.
# Every cut must leave a register that never went back, reads only a record that was
# written, lost less than one quantum plus the reading being written, and a column that
# boots with the old or the new config, in a safe state. A random seed each run (set
# POWER_CUT_SEED to repeat one); a failure names it. Runs under CPython and MicroPython.
import gc
import os

from tools import power_cut_sim

MPY_HEAP = "256K"  # the campaign holds the App, both gateway links and its bookkeeping
MPY_TIMEOUT_S = 120
CUTS = 1000


def _seed():
    text = os.getenv("POWER_CUT_SEED")
    if text:
        return int(text)
    b = os.urandom(4)
    return ((b[0] << 24) | (b[1] << 16) | (b[2] << 8) | b[3]) % 0x7FFFFFFF + 1


def test_a_thousand_random_power_cuts():
    seed = _seed()
    # The CPython leg runs inside pytest's large heap, which every App boot's gc.collect()
    # would walk again: leave what exists now out of the collections (MicroPython: no-op).
    freeze = getattr(gc, "freeze", None)
    if freeze is not None:
        freeze()
    try:
        f = power_cut_sim.run(seed, CUTS)
    finally:
        if freeze is not None:
            gc.unfreeze()
    rerun = "power-cut seed %d (rerun: POWER_CUT_SEED=%d, or python -m tools.power_cut_campaign" \
        " --cuts %d --seed %d): %s" % (seed, seed, CUTS, seed, f["failures"])
    assert f["cuts"] == CUTS, rerun
    assert f["corrupt_reads"] == 0, rerun
    assert f["backwards"] == 0, rerun
    assert f["over_quantum"] == 0 and f["max_loss_wh"] < f["quantum_wh"] + f["max_reading_wh"], rerun
    assert f["bad_boots"] == 0, rerun
    assert f["ok"], rerun
    # The campaign did what it says: cuts of every kind, both slots and both outcomes seen.
    kinds = f["kinds"]
    assert kinds["energy"] > 500 and kinds["boot"] > 10, (rerun, kinds)
    for kind in ("save", "cbor", "modbus", "first"):
        assert kinds[kind] > 5, (rerun, kinds)
    rec = f["recovered"]
    assert rec["a"] > 100 and rec["b"] > 100 and rec["previous"] > 100, (rerun, rec)
    booted = f["booted"]
    assert booted["old"] > 20 and booted["new"] > 5, (rerun, booted)
    for mode in f["energy_cut_modes"].values():
        assert mode > 50, (rerun, f["energy_cut_modes"])
    for step in f["config_cut_at"].values():
        assert step > 0, (rerun, f["config_cut_at"])
    assert f["register_wh"] > 1000, rerun  # the register kept going up between the cuts
