# The column's commissioning config: a JSON file written once at commissioning and checked
# at every boot. The schema (keys, types, ranges) lives here, but for the bounds of the keys
# a gateway may change at run time and the file write, which a running column needs after
# this validator is unloaded (firmware/config_runtime.py); the default values live in
# firmware/controller.py as DEFAULTS, next to the code that uses them, and are merged in.
# A key is required unless DEFAULTS gives it a value; the identity and rating keys are
# always required. Unknown keys are errors: a typo must not silently fall back to a default.
# Nothing here raises: errors come back as "key: problem" strings, and a config with
# errors boots the app into a safe, non-charging state that reports them.
import json
import os

from .config_runtime import MAX_HARDWARE_A, RUN_TIME, failsafe_rule, write_config
from .controller import DEFAULTS

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

_INT = const(0)     # int in lo..hi (as config_runtime.RUN_TIME's kinds)
_NUM = const(1)     # int or float in lo..hi
_ID = const(2)      # str of lo..hi chars from A-Z a-z 0-9 _ -
_HOST = const(3)    # str of lo..hi chars from A-Z a-z 0-9 . - : (name, IPv4, IPv6)
_ONE_OF = const(4)  # value in the tuple lo
_SECTION = const(5)  # object with the entries in lo
# Whether a key must be present.
_REQ = const(0)   # always: identity and ratings, never defaulted
_OPT = const(1)   # default from DEFAULTS, else required
_COND = const(2)  # default from DEFAULTS, else required only by another key (checked later)

BAUDS = (2400, 4800, 9600, 19200, 38400, 57600, 115200)
METER_TYPES = ("sdm630", "sdm120")
LINK_MODES = ("modbus-rtu", "modbus-tcp", "cbor-serial", "cbor-tcp")


# (key, type, lo, hi, presence)
_METER = (
    ("type", _ONE_OF, METER_TYPES, None, _REQ),
    ("address", _INT, 1, 247, _OPT),
    ("baud", _ONE_OF, BAUDS, None, _OPT),
)
_LINK = (
    ("mode", _ONE_OF, LINK_MODES, None, _REQ),
    ("baud", _ONE_OF, BAUDS, None, _COND),       # needed by the serial modes
    ("tcp_port", _INT, 1, 65535, _COND),         # needed by the TCP modes
    ("host", _HOST, 1, 253, _COND),              # TCP modes: address to listen on (default all)
)
_TOP = (
    ("column_id", _ID, 1, 32, _REQ),
    ("bus_address", _INT, 1, 247, _REQ),
    ("phases", _ONE_OF, (1, 3), None, _REQ),
    ("hardware_rating_a", _NUM, 6, MAX_HARDWARE_A, _REQ),
    ("installation_rating_a", _NUM, 6, MAX_HARDWARE_A, _REQ),  # and <= hardware_rating_a
    RUN_TIME[0] + (_REQ,),  # failsafe_a: 0 or 6..installation_rating_a (config_runtime)
    ("meter", _SECTION, _METER, None, _REQ),
    ("link", _SECTION, _LINK, None, _REQ),
    RUN_TIME[1] + (_OPT,),  # heartbeat_timeout_s
    RUN_TIME[2] + (_OPT,),  # min_pause_s
    ("overdraw_tolerance_pct", _INT, 0, 50, _OPT),
    ("overdraw_offset_a", _NUM, 0, 5, _OPT),
    ("overdraw_grace_s", _INT, 1, 60, _OPT),
    RUN_TIME[3] + (_OPT,),  # meter_stale_s
    ("energy_quantum_wh", _INT, 1, 1000, _OPT),
    ("energy_quantum_s", _INT, 10, 3600, _OPT),
    ("cp_debounce_ms", _INT, 10, 1000, _OPT),
    ("pwm_min_change_interval_s", _INT, 0, 60, _OPT),
    ("contactor_feedback_ms", _INT, 50, 3000, _OPT),
)
_NO_DEFAULT = object()


def schema_keys():
    """Every config key as a dotted name ("meter.address"), in schema order."""
    out = []
    for key, kind, lo, _hi, _req in _TOP:
        if kind == _SECTION:
            for sub in lo:
                out.append(key + "." + sub[0])
        else:
            out.append(key)
    return out


def _show(v):
    """A short rendering of a bad value for an error message."""
    t = type(v)
    if t is str:
        return repr(v[:32]) + ("..." if len(v) > 32 else "")
    if t is bool:
        return "true" if v else "false"
    if v is None:
        return "null"
    if t is int or t is float:
        return repr(v)
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, (list, tuple)):
        return "a list"
    return "a " + t.__name__


def _check_value(name, v, kind, lo, hi, errors):
    """Append the problem with one scalar value to errors; True if it is fine."""
    n = len(errors)
    if kind == _ONE_OF:
        ok = False
        for choice in lo:  # `in` would call 1 == True a match
            if type(choice) is type(v) and choice == v:
                ok = True
        if not ok:
            errors.append("%s: %s is not one of %s" % (name, _show(v), ", ".join(map(str, lo))))
    elif kind == _INT or kind == _NUM:
        if type(v) is not int and not (kind == _NUM and type(v) is float):
            _expected(errors, name, "an integer" if kind == _INT else "a number", v)
        elif not (lo <= v <= hi):  # NaN fails this too
            errors.append("%s: %s is out of range %s..%s" % (name, _show(v), lo, hi))
    elif type(v) is not str:
        _expected(errors, name, "a string", v)
    elif not (lo <= len(v) <= hi):
        errors.append("%s: length %d is out of range %d..%d" % (name, len(v), lo, hi))
    else:
        extra = "_-" if kind == _ID else ".-:"
        for c in v:
            if not ("a" <= c <= "z" or "A" <= c <= "Z" or "0" <= c <= "9" or c in extra):
                errors.append("%s: %s may only hold A-Z a-z 0-9 %s" % (name, _show(v), " ".join(extra)))
                break
    return len(errors) == n


def _expected(errors, name, what, v):
    errors.append("%s: expected %s, got %s" % (name, what, _show(v)))


def _check_section(prefix, defaults, data, entries, errors):
    """Check one object against its entries and its defaults (a DEFAULTS dict); returns the
    cleaned dict (defaults merged, bad values replaced by their default or left out)."""
    out = {}
    if not isinstance(data, dict):
        # one error for the object; its keys are not reported missing one by one
        _expected(errors, prefix[:-1] or "config", "an object", data)
        data = {}
        errors = []
    for key, kind, lo, hi, presence in entries:
        name = prefix + key
        if kind == _SECTION:
            sub = errors
            if key not in data:
                errors.append(name + ": missing")
                sub = []  # nor are a missing object's keys
            out[key] = _check_section(name + ".", defaults.get(key) or {}, data.get(key, {}), lo, sub)
            continue
        d = _NO_DEFAULT if presence == _REQ else defaults.get(key, _NO_DEFAULT)
        if key in data and _check_value(name, data[key], kind, lo, hi, errors):
            out[key] = data[key]
        elif d is not _NO_DEFAULT:  # missing or bad: its default
            out[key] = d
        elif key not in data and presence != _COND:
            errors.append(name + ": missing")
    unknown = []
    for key in data:
        for e in entries:
            if e[0] == key:
                break
        else:
            unknown.append(key if type(key) is str else repr(key))
    unknown.sort()
    for key in unknown:
        errors.append("%s%s: unknown key" % (prefix, key))
    # The result lives as long as the column (app.cfg): a copy sized to its keys, as a
    # dict grown key by key keeps room for more.
    cfg = dict.fromkeys(out)
    for key, value in out.items():
        cfg[key] = value
    return cfg


def _cross_check(cfg, data, errors):
    """Rules between keys, checked only when each key on its own is fine."""
    hw = cfg.get("hardware_rating_a")
    inst = cfg.get("installation_rating_a")
    fs = cfg.get("failsafe_a")
    above = "%s: %s is above %s %s"
    if hw is not None and inst is not None and inst > hw:
        errors.append(above % ("installation_rating_a", _show(inst), "hardware_rating_a", _show(hw)))
        inst = None
    rule = 0 if fs is None else failsafe_rule(fs, inst, hw)
    if rule == 1:
        errors.append("failsafe_a: %s is out of range (0 or 6..installation_rating_a)" % _show(fs))
    elif rule:
        errors.append(above % ("failsafe_a", _show(fs), "installation_rating_a" if rule == 2
                               else "hardware_rating_a", _show(inst if rule == 2 else hw)))
    link = cfg["link"]  # every section is in cfg, if only with its defaults
    mode = link.get("mode")
    raw = data.get("link") if isinstance(data, dict) else None
    if not isinstance(raw, dict):
        raw = {}
    if mode:  # a TCP mode (modbus-tcp, cbor-tcp) needs a port, a serial one its baud rate
        key = "tcp_port" if mode.endswith("-tcp") else "baud"
        if key not in link and key not in raw:  # a bad value is reported already
            errors.append("link.%s: missing (needed for %s)" % (key, mode))


def check(data):
    """(cfg, errors): cfg holds every value that passed its own check plus the defaults,
    so an app with a broken config can still bring its link up to report the errors."""
    errors = []
    cfg = _check_section("", DEFAULTS, data, _TOP, errors)
    _cross_check(cfg, data, errors)
    return cfg, errors


def validate(data):
    """The list of problems with a config dict, [] when it is valid. Never raises."""
    return check(data)[1]


def _read(path):
    """The file's text, or the exception that stopped the read."""
    try:
        with open(path) as f:
            return f.read()
    except Exception as exc:
        return exc


def load_config(path):
    """(cfg, errors) from the JSON file at path. Never raises.

    A missing file next to a valid path + ".tmp" is a save cut between the old file's
    removal and the rename (FAT renames over a file that way): the temp file was complete
    before the old one went, so it is the new config; it is used and renamed into place."""
    text = _read(path)
    if type(text) is not str:
        spare = _read(path + ".tmp")
        if type(spare) is str:
            try:
                cfg, errors = check(json.loads(spare))
            except Exception:
                errors = True
            if not errors:
                try:
                    os.rename(path + ".tmp", path)
                except Exception:
                    pass
                return cfg, errors
        return check({})[0], ["config: cannot read %s (%s)" % (path, text)]
    try:
        data = json.loads(text)
    except Exception as exc:  # ValueError; MicroPython gives no position
        return check({})[0], ["config: invalid JSON in %s (%s)" % (path, exc)]
    return check(data)


def save_config(path, cfg):
    """Validate cfg and write it atomically (config_runtime.write_config: a power cut leaves
    the old file or the new one, see load_config for FAT's rename). Returns errors ([] =
    written)."""
    return validate(cfg) or write_config(path, cfg)
