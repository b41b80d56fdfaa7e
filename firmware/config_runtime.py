# What a running column needs of its config's rules: the keys a gateway may change at run
# time (CBOR ChangeConfiguration) with their bounds, and the config file's atomic write.
# firmware/config.py (the full validator, about 8 KB of RAM, unloaded after boot) takes
# its entries for these keys from RUN_TIME and checks failsafe_a with failsafe_rule(), so
# a change at run time meets the very bounds a boot does and can never raise a current
# above the ratings; the ratings themselves are not in RUN_TIME.
import json
import os

MAX_HARDWARE_A = 80  # IEC 61851 PWM cannot signal more
# (key, kind, lo, hi), kind 0: an int, 1: an int or a float (firmware/config.py's _INT and
# _NUM: its schema takes these entries). failsafe_a is also 0 or 6..installation_rating_a.
RUN_TIME = (
    ("failsafe_a", 1, 0, MAX_HARDWARE_A),
    ("heartbeat_timeout_s", 0, 10, 3600),
    ("min_pause_s", 0, 0, 3600),
    ("meter_stale_s", 0, 2, 120),
)


def failsafe_rule(fs, inst, hw):
    """0 when failsafe_a = fs fits the installation and hardware ratings (None: unknown,
    not checked), else the rule it breaks: 1 between 0 and 6 A (no pilot offers that),
    2 above installation_rating_a, 3 above hardware_rating_a."""
    if 0 < fs < 6:
        return 1
    if inst is not None and fs > inst:
        return 2
    if hw is not None and fs > hw:
        return 3
    return 0


def change(path, cfg, key, value):
    """Set key = value in the config file at path, cfg being the valid config the column
    runs with. Returns the new config once written; None when key may not change at run
    time; False when value breaks its bounds or the file cannot be written (nothing is
    changed). Checking the one key is enough: the others are as the validator passed them."""
    for name, kind, lo, hi in RUN_TIME:
        if name == key:
            # bool is not an int here, NaN fails the range: as in firmware/config.py
            if (type(value) is not int and (kind == 0 or type(value) is not float)) or not lo <= value <= hi:
                return False
            if key == "failsafe_a" and failsafe_rule(value, cfg["installation_rating_a"],
                                                     cfg["hardware_rating_a"]):
                return False
            new = dict(cfg)
            new[key] = value
            if write_config(path, new):
                return False
            return new
    return None


def write_config(path, cfg):
    """Write cfg to path atomically (temp file, synced, then renamed over path): a power
    cut leaves the old file or the new one, never a torn one (firmware.config.load_config
    handles FAT's rename). Validates nothing: save_config() and change() do. Returns
    errors ([] = written)."""
    tmp = path + ".tmp"
    try:
        f = open(tmp, "w")
        try:
            f.write(json.dumps(cfg))
            f.flush()
            if hasattr(os, "fsync"):  # CPython
                os.fsync(f.fileno())
        finally:
            f.close()
        if not hasattr(os, "fsync") and hasattr(os, "sync"):  # MicroPython boards
            os.sync()
        os.rename(tmp, path)  # replaces path on unix, littlefs and MicroPython's FAT
    except Exception as exc:
        try:
            os.remove(tmp)
        except Exception:
            pass
        return ["config: cannot write %s (%s)" % (path, exc)]
    return []
