# The CBOR message contract as nested, named tables: for the gateway, the HIL and the
# generated docs/firmware-contract.md. The contract itself is firmware/messages.py (the one
# definition, whose flat _SPECS tuples this only reshapes); a board never imports this
# module, so its tables cost no device RAM.
from . import messages as _m

# Field kinds, by the names ACTIONS gives them (messages._KINDS, index = kind code).
INT, NUM, STR, ENUM, LIST, MAP, ANY = _m._KINDS


def _fields(spec, lo, hi):
    # A kind code is the kind's index in _KINDS, plus 8 (messages._OPT) for an optional field.
    return tuple([(spec[j], _m._KINDS[spec[j + 1] & 7], spec[j + 1] < 8, spec[j + 2])
                  for j in range(lo, hi, 3)])


def _actions():
    out = []
    specs = _m._SPECS
    for i in range(0, len(specs), 2):
        spec = specs[i + 1]
        r = spec.index(_m._RES)
        out.append((specs[i], spec[0], _fields(spec, 1, r), _fields(spec, r + 1, len(spec))))
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
