# The CBOR message contract as nested, named tables: for the gateway, the HIL and the
# generated docs/firmware-contract.md. The contract itself is firmware/messages.py (the one
# definition, whose flat _SPECS tuples this only reshapes); a board never imports this
# module, so its tables cost no device RAM.
from . import messages as _m

# Field kinds, by the names ACTIONS gives them (messages._KINDS, index = kind code).
INT, NUM, STR, ENUM, LIST, MAP, ANY = _m._KINDS


def _fields(spec, lo, hi):
    # Two slots a field (messages._SPECS): its name and its code, the kind's index in _KINDS
    # (+ 8, messages._OPT, for an optional field) + 16 * the index of its arguments in
    # messages._ARGS (int and num: lo, hi; other kinds one slot).
    out = []
    for j in range(lo, hi, 2):
        code = spec[j + 1]
        kind = code & 7
        a = code >> 4
        arg = (_m._ARGS[a], _m._ARGS[a + 1]) if kind < 2 else _m._ARGS[a]
        out.append((spec[j], _m._KINDS[kind], code & 8 == 0, arg))
    return tuple(out)


def _actions():
    # messages._SPECS is flat: per action its name and sender (a string where a field has its
    # code), its request fields, _RES, its result fields.
    out = []
    specs = _m._SPECS
    i = 0
    while i < len(specs):
        r = specs.index(_m._RES, i)
        end = r + 1
        while end + 1 < len(specs) and type(specs[end + 1]) is int:
            end += 2
        out.append((specs[i], specs[i + 1], _fields(specs, i + 2, r), _fields(specs, r + 1, end)))
        i = end
    return tuple(out)


# (action, direction, request fields, result fields) per action, in documentation order;
# a field is (name, kind, required, arg), kind and arg as described in firmware/messages.py.
ACTIONS = _actions()


def action_spec(action):
    """(action, direction, request fields, result fields), or None for an unknown action."""
    for spec in ACTIONS:
        if spec[0] == action:
            return spec
    return None
