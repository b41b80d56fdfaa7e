# The CBOR message set between column and gateway: the contract, defined once here and
# imported by the gateway, the HIL and the docs generator. Frames are shaped like OCPP-J:
#     [2, id, action, payload]                      call
#     [3, id, payload]                              result
#     [4, id, errorCode, description, details]      error
# ids are ints 0..2**31-1. Payload keys are camelCase with the unit as suffix.
from firmware.status import CP_NAMES, ERROR_NAMES, LIMIT_SOURCE_NAMES, STATUS_NAMES

try:
    from micropython import const
except ImportError:  # CPython
    const = lambda x: x  # noqa: E731

CALL = const(2)
RESULT = const(3)
ERROR = const(4)
MAX_ID = const(0x7FFFFFFF)

# OCPP-J error codes.
NOT_IMPLEMENTED = "NotImplemented"
NOT_SUPPORTED = "NotSupported"
INTERNAL_ERROR = "InternalError"
PROTOCOL_ERROR = "ProtocolError"
SECURITY_ERROR = "SecurityError"
FORMATION_VIOLATION = "FormationViolation"
PROPERTY_CONSTRAINT_VIOLATION = "PropertyConstraintViolation"
OCCURRENCE_CONSTRAINT_VIOLATION = "OccurrenceConstraintViolation"
TYPE_CONSTRAINT_VIOLATION = "TypeConstraintViolation"
GENERIC_ERROR = "GenericError"
ERROR_CODES = (NOT_IMPLEMENTED, NOT_SUPPORTED, INTERNAL_ERROR, PROTOCOL_ERROR, SECURITY_ERROR,
               FORMATION_VIOLATION, PROPERTY_CONSTRAINT_VIOLATION, OCCURRENCE_CONSTRAINT_VIOLATION,
               TYPE_CONSTRAINT_VIOLATION, GENERIC_ERROR)

# Who sends the call.
FROM_COLUMN = "column"
FROM_GATEWAY = "gateway"

# Field kinds. A field is (name, kind, required, arg):
#   INT, NUM  arg = (lo, hi) inclusive, None for an open end (NUM: int or finite float)
#   STR       arg = maximum length in characters
#   ENUM      arg = tuple of allowed values (the value's type must match, so 1.0 is not 1)
#   LIST      arg = (item kind, min items, max items, item arg)
#   MAP       arg = None (str keys, any values);  ANY: arg = None (any CBOR value)
INT = "int"
NUM = "num"
STR = "str"
ENUM = "enum"
LIST = "list"
MAP = "map"
ANY = "any"
_KINDS = (INT, NUM, STR, ENUM, LIST, MAP, ANY)  # index = the kind's code in _SPECS
_I = const(0)
_N = const(1)
_S = const(2)
_E = const(3)
_L = const(4)
_M = const(5)
_A = const(6)
_OPT = const(8)  # added to a kind code: the field may be left out

_AMPS = (0, 80)
_UINT = (0, None)
_U31 = (0, MAX_ID)
_PHASE_NUMS = (NUM, 3, 3, None)
_KEYS = (STR, 0, 32, 64)
_ACCEPTED = ("Accepted", "Rejected")
_TRIGGERABLE = ("BootNotification", "Heartbeat", "StatusNotification", "MeterValues")
STOP_REASONS = ("Local", "Remote", "EVDisconnected", "PowerLoss", "Reboot", "EmergencyStop", "Other")

_RES = "/"  # in a spec: the result fields follow

# The contract. Per action: who sends the call, its request fields, _RES, its result
# fields; three slots a field: name, kind code (+ _OPT), arg. Flat tuples spare a board
# some 60 small ones, and the keyword form makes the action names interned names.
# ACTIONS (below) is the same as nested tuples, in _ORDER, the documentation order.
_SPECS = dict(
    BootNotification=(
        FROM_COLUMN,
        "columnId", _S, 64,
        "firmwareVersion", _S, 32,
        "model", _S, 64,
        "phases", _E, (1, 3),
        "hardwareRatingA", _N, _AMPS,
        "busAddress", _I, (0, 247),
        "configError", _S + _OPT, 200,
        _RES,
        "status", _E, _ACCEPTED,
        "heartbeatIntervalS", _I, (1, 86400),
        "currentTimeMs", _I, _UINT,
    ),
    Heartbeat=(
        FROM_COLUMN,
        _RES,
        "currentTimeMs", _I, _UINT,
    ),
    StatusNotification=(
        FROM_COLUMN,
        "status", _E, STATUS_NAMES,
        "errorCode", _E, ERROR_NAMES,
        "cpState", _E, CP_NAMES,
        "offeredA", _N, _AMPS,
        "limitSource", _E, LIMIT_SOURCE_NAMES,
        _RES,
    ),
    MeterValues=(
        FROM_COLUMN,
        "energyWh", _I, _UINT,
        "sessionEnergyWh", _I, _UINT,
        "powerW", _N, (-1000000, 1000000),
        "currentA", _L, _PHASE_NUMS,
        "voltageV", _L, _PHASE_NUMS,
        "offeredA", _N, _AMPS,
        "seq", _I, _U31,
        _RES,
    ),
    StartTransaction=(
        FROM_COLUMN,
        "sessionId", _I, _U31,
        "meterStartWh", _I, _UINT,
        _RES,
    ),
    StopTransaction=(
        FROM_COLUMN,
        "sessionId", _I, _U31,
        "meterStopWh", _I, _UINT,
        "reason", _E, STOP_REASONS,
        _RES,
    ),
    SetChargingLimit=(
        FROM_GATEWAY,
        "limitA", _N, _AMPS,
        "validityS", _I, (0, 86400),
        "failsafeA", _N + _OPT, _AMPS,
        _RES,
        "status", _E, _ACCEPTED,
        "appliedA", _N, _AMPS,
    ),
    GetConfiguration=(
        FROM_GATEWAY,
        "keys", _L + _OPT, _KEYS,
        _RES,
        "configuration", _M, None,
        "unknownKeys", _L, _KEYS,
    ),
    ChangeConfiguration=(
        FROM_GATEWAY,
        "key", _S, 64,
        "value", _A, None,
        _RES,
        "status", _E, ("Accepted", "Rejected", "RebootRequired", "NotSupported"),
    ),
    Reset=(
        FROM_GATEWAY,
        "type", _E, ("Soft", "Hard"),
        _RES,
        "status", _E, _ACCEPTED,
    ),
    TriggerMessage=(
        FROM_GATEWAY,
        "requestedMessage", _E, _TRIGGERABLE,
        _RES,
        "status", _E, ("Accepted", "Rejected", "NotImplemented"),
    ),
)
_ORDER = ("BootNotification", "Heartbeat", "StatusNotification", "MeterValues", "StartTransaction",
          "StopTransaction", "SetChargingLimit", "GetConfiguration", "ChangeConfiguration", "Reset",
          "TriggerMessage")


def __getattr__(name):
    """ACTIONS: (action, direction, request fields, result fields) per action, fields as
    (name, kind, required, arg), built on first use: the gateway, the HIL and the docs
    read it, a board never does."""
    if name != "ACTIONS":
        raise AttributeError(name)
    global ACTIONS
    out = []
    for action in _ORDER:
        spec = _SPECS[action]
        r = spec.index(_RES)
        sides = []
        for lo, hi in ((1, r), (r + 1, len(spec))):
            sides.append(tuple([(spec[j], _KINDS[spec[j + 1] & 7], not spec[j + 1] & _OPT, spec[j + 2])
                                for j in range(lo, hi, 3)]))
        out.append((action, spec[0], sides[0], sides[1]))
    ACTIONS = tuple(out)
    return ACTIONS


class MessageError(ValueError):
    """A frame or payload breaks the contract. `code` is one of ERROR_CODES; parse() also
    sets `msg_id` and `frame_type` when the frame's id could be read (else None)."""

    msg_id = None
    frame_type = None
    details = None

    def __init__(self, code, description):
        super().__init__("%s: %s" % (code, description))
        self.code = code
        self.description = description


def _spec(action):
    return _SPECS.get(action) if type(action) is str else None


def action_spec(action):
    """(action, direction, request fields, result fields), or None for an unknown action."""
    if _spec(action) is None:
        return None
    return __getattr__("ACTIONS")[_ORDER.index(action)]


def direction(action):
    spec = _spec(action)
    return None if spec is None else spec[0]


def validate_payload(action, payload, is_result=False):
    """Raise MessageError unless payload is a valid request (or result) of action."""
    spec = _spec(action)
    if spec is None:
        raise MessageError(NOT_IMPLEMENTED, "unknown action %r" % (action,))
    if not isinstance(payload, dict):
        raise MessageError(FORMATION_VIOLATION, "%s payload must be a map" % action)
    r = spec.index(_RES)
    lo, hi = (r + 1, len(spec)) if is_result else (1, r)
    for key in payload:
        for j in range(lo, hi, 3):
            if spec[j] == key:
                break
        else:
            raise MessageError(FORMATION_VIOLATION, "%s has no field %r" % (action, key))
    for j in range(lo, hi, 3):
        name = spec[j]
        code = spec[j + 1]
        if name in payload:
            _check(code & 7, spec[j + 2], payload[name], name)
        elif not code & _OPT:
            raise MessageError(OCCURRENCE_CONSTRAINT_VIOLATION, "%s needs field %s" % (action, name))


def _check(kind, arg, v, name):
    """kind: a code (_I.._A) or, for list items, a kind name."""
    if type(kind) is str:
        kind = _KINDS.index(kind)
    code = PROPERTY_CONSTRAINT_VIOLATION
    what = None  # None: describe the field's type and range
    t = type(v)
    if kind <= _N:
        if not (t is int or (kind == _N and t is float)):  # bool is neither
            code = TYPE_CONSTRAINT_VIOLATION
        elif v - v != 0:  # NaN and infinities (inf - inf is NaN, NaN != 0)
            what = "finite"
        elif arg is None or ((arg[0] is None or v >= arg[0]) and (arg[1] is None or v <= arg[1])):
            return
    elif kind == _S:
        if t is not str:
            code = TYPE_CONSTRAINT_VIOLATION
            what = "a string"
        elif len(v) <= arg:
            return
    elif kind == _E:
        if t is not type(arg[0]):
            code = TYPE_CONSTRAINT_VIOLATION
        elif v in arg:
            return
    elif kind == _L:
        if not isinstance(v, (list, tuple)):
            code = TYPE_CONSTRAINT_VIOLATION
            what = "a list"
        elif not arg[1] <= len(v) <= arg[2]:
            code = OCCURRENCE_CONSTRAINT_VIOLATION
        else:
            for item in v:
                _check(arg[0], arg[3], item, name)
            return
    elif kind == _M:
        if not isinstance(v, dict):
            code = TYPE_CONSTRAINT_VIOLATION
            what = "a map"
        else:
            for key in v:
                if type(key) is not str:
                    raise MessageError(TYPE_CONSTRAINT_VIOLATION, "%s keys must be strings" % name)
            return
    else:
        return
    raise MessageError(code, "%s must be %s" % (name, what or describe(_KINDS[kind], arg)))


def describe(kind, arg):
    """Human text of a field's type and range, e.g. 'num 0..80' (used by the docs too)."""
    if kind in (INT, NUM):
        if arg is None or (arg[0] is None and arg[1] is None):
            return kind
        if arg[1] is None:
            return "%s >= %s" % (kind, arg[0])
        return "%s %s..%s" % (kind, arg[0], arg[1])
    if kind == STR:
        return "str (at most %d chars)" % arg
    if kind == ENUM:
        return "one of " + ", ".join([str(a) for a in arg])
    if kind == LIST:
        count = str(arg[1]) if arg[1] == arg[2] else "%d..%d" % (arg[1], arg[2])
        return "list of %s %s" % (count, arg[0])
    return kind


def _check_id(msg_id):
    if type(msg_id) is not int or not 0 <= msg_id <= MAX_ID:
        raise MessageError(FORMATION_VIOLATION, "id must be an int 0..%d" % MAX_ID)


def parse(obj):
    """Check a decoded frame's shape (and a call's payload); return it unchanged.

    A result's payload is checked by whoever knows which action it answers
    (validate_payload(action, payload, is_result=True))."""
    if not isinstance(obj, (list, tuple)) or len(obj) < 3:
        raise MessageError(FORMATION_VIOLATION, "frame must be an array [type, id, ...]")
    frame_type = obj[0]
    if type(frame_type) is not int or frame_type not in (CALL, RESULT, ERROR):
        raise MessageError(FORMATION_VIOLATION, "unknown frame type %r" % (frame_type,))
    _check_id(obj[1])
    try:
        if frame_type == CALL:
            if len(obj) != 4 or type(obj[2]) is not str:
                raise MessageError(FORMATION_VIOLATION, "call must be [2, id, action, payload]")
            validate_payload(obj[2], obj[3])
        elif frame_type == RESULT:
            if len(obj) != 3 or not isinstance(obj[2], dict):
                raise MessageError(FORMATION_VIOLATION, "result must be [3, id, payload]")
        elif (len(obj) != 5 or obj[2] not in ERROR_CODES or type(obj[3]) is not str
              or not isinstance(obj[4], dict)):
            raise MessageError(FORMATION_VIOLATION,
                               "error must be [4, id, errorCode, description, details]")
    except MessageError as exc:
        exc.msg_id = obj[1]
        exc.frame_type = frame_type
        raise
    return obj


def call(msg_id, action, payload):
    _check_id(msg_id)
    validate_payload(action, payload)
    return [CALL, msg_id, action, payload]


def result(msg_id, payload):
    _check_id(msg_id)
    if not isinstance(payload, dict):
        raise MessageError(FORMATION_VIOLATION, "result payload must be a map")
    return [RESULT, msg_id, payload]


def error(msg_id, code, description, details=None):
    _check_id(msg_id)
    if code not in ERROR_CODES:
        raise MessageError(FORMATION_VIOLATION, "unknown error code %r" % (code,))
    return [ERROR, msg_id, code, description, {} if details is None else details]
