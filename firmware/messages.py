# The CBOR message set between column and gateway: the contract, defined once here and
# imported by the gateway, the HIL and the docs generator. Frames are shaped like OCPP-J:
#     [2, id, action, payload]                      call
#     [3, id, payload]                              result
#     [4, id, errorCode, description, details]      error
# ids are ints 0..2**31-1. Payload keys are camelCase with the unit as suffix.
from .status_names import CP_NAMES, ERROR_NAMES, LIMIT_SOURCE_NAMES, STATUS_NAMES

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

CALL = const(2)
RESULT = const(3)
ERROR = const(4)
MAX_ID = const(0x7FFFFFFF)

if 0:  # never runs. mpy-cross keeps a string literal longer than 10 characters as a heap
    # string object unless its text was seen as a name earlier in the file: naming them here
    # makes the long error codes, action, field and enum names below interned qstrs (shared
    # with gw_cbor's keyword arguments), about 50 B of a board's RAM each.
    InternalError = ProtocolError = SecurityError = FormationViolation = TypeConstraintViolation = 0
    PropertyConstraintViolation = OccurrenceConstraintViolation = GenericError = NotSupported = 0
    BootNotification = StatusNotification = MeterValues = StartTransaction = StopTransaction = 0
    SetChargingLimit = GetConfiguration = ChangeConfiguration = TriggerMessage = 0
    firmwareVersion = hardwareRatingA = configError = heartbeatIntervalS = currentTimeMs = 0
    limitSource = sessionEnergyWh = meterStartWh = meterStopWh = configuration = unknownKeys = 0
    requestedMessage = RebootRequired = EVDisconnected = EmergencyStop = NotImplemented = 0

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

# Field kinds. The host's view of the contract (firmware/messages_tables.py: ACTIONS, with
# each field as (name, kind, required, arg)) names them:
#   int, num  arg = (lo, hi) inclusive, None for an open end (num: int or finite float)
#   str       arg = maximum length in characters
#   enum      arg = tuple of allowed values (the value's type must match, so 1.0 is not 1)
#   list      arg = (item kind, min items, max items, item arg)
#   map       arg = None (str keys, any values);  any: arg = None (any CBOR value)
_KINDS = tuple(["int", "num", "str", "enum", "list", "map", "any"])  # index = a kind code (_I.._A)
_I = const(0)
_N = const(1)
_S = const(2)
_E = const(3)
_L = const(4)
_M = const(5)
_A = const(6)
_OPT = const(8)  # added to a kind code: the field may be left out

# Built from a list: a constant tuple would hold its long names as heap strings.
STOP_REASONS = tuple(["Local", "Remote", "EVDisconnected", "PowerLoss", "Reboot", "EmergencyStop",
                      "Other"])

_RES = "/"  # in a spec: the result fields follow

# The field types of the contract: a field's code is its kind (+ _OPT when it may be left
# out) + 16 * the index of its arguments in _ARGS, which holds, flat: for int and num lo, hi
# (None: an open end); for str the maximum length; for enum the values; for list (item kind,
# min items, max items, item arg); None for map and any. Two slots a field instead of a
# tuple of arguments each: the contract is about half the RAM.
_NUM_0_80 = const(_N + 16 * 0)
_INT_GE0 = const(_I + 16 * 2)
_INT_ID = const(_I + 16 * 4)
_INT_BUS = const(_I + 16 * 6)
_INT_HEARTBEAT = const(_I + 16 * 8)
_INT_VALIDITY = const(_I + 16 * 10)
_NUM_POWER = const(_N + 16 * 12)
_STR_64 = const(_S + 16 * 14)
_STR_32 = const(_S + 16 * 15)
_STR_200 = const(_S + 16 * 16)
_ENUM_PHASES = const(_E + 16 * 17)
_ENUM_ACCEPTED = const(_E + 16 * 18)
_ENUM_STATUS = const(_E + 16 * 19)
_ENUM_ERROR = const(_E + 16 * 20)
_ENUM_CP = const(_E + 16 * 21)
_ENUM_SOURCE = const(_E + 16 * 22)
_ENUM_STOP = const(_E + 16 * 23)
_ENUM_CHANGE = const(_E + 16 * 24)
_ENUM_RESET = const(_E + 16 * 25)
_ENUM_MESSAGE = const(_E + 16 * 26)
_ENUM_TRIGGERED = const(_E + 16 * 27)
_LIST_3_NUM = const(_L + 16 * 28)
_LIST_KEYS = const(_L + 16 * 29)
_MAP = const(_M + 16 * 30)
_ANY = const(_A + 16 * 30)
# Every tuple is built from a list: a constant tuple would load each of its strings as a heap
# string object (about 60 B each on a board), a list holds them as interned names.
_ARGS = tuple([
    0, 80,                      # 0
    0, None,                    # 2
    0, MAX_ID,                  # 4
    0, 247,                     # 6
    1, 86400,                   # 8
    0, 86400,                   # 10
    -1000000, 1000000,          # 12
    64,                         # 14
    32,                         # 15
    200,                        # 16
    tuple([1, 3]),              # 17
    tuple(["Accepted", "Rejected"]),  # 18
    STATUS_NAMES,               # 19
    ERROR_NAMES,                # 20
    CP_NAMES,                   # 21
    LIMIT_SOURCE_NAMES,         # 22
    STOP_REASONS,               # 23
    tuple(["Accepted", "Rejected", "RebootRequired", "NotSupported"]),  # 24
    tuple(["Soft", "Hard"]),    # 25
    tuple(["BootNotification", "Heartbeat", "StatusNotification", "MeterValues"]),  # 26
    tuple(["Accepted", "Rejected", "NotImplemented"]),  # 27
    tuple(["num", 3, 3, None]),  # 28
    tuple(["str", 0, 32, 64]),  # 29
    None,                       # 30
])

# The contract, in one flat tuple (a tuple per action would cost a board its header each):
# per action its name and who sends the call, its request fields, _RES, its result fields;
# two slots a field, its name and its code (an int, where an action has its sender, a
# string). In documentation order.
_SPECS = tuple([
    "BootNotification", FROM_COLUMN,
    "columnId", _STR_64,
    "firmwareVersion", _STR_32,
    "model", _STR_64,
    "phases", _ENUM_PHASES,
    "hardwareRatingA", _NUM_0_80,
    "busAddress", _INT_BUS,
    "configError", _STR_200 + _OPT,
    _RES,
    "status", _ENUM_ACCEPTED,
    "heartbeatIntervalS", _INT_HEARTBEAT,
    "currentTimeMs", _INT_GE0,

    "Heartbeat", FROM_COLUMN,
    _RES,
    "currentTimeMs", _INT_GE0,

    "StatusNotification", FROM_COLUMN,
    "status", _ENUM_STATUS,
    "errorCode", _ENUM_ERROR,
    "cpState", _ENUM_CP,
    "offeredA", _NUM_0_80,
    "limitSource", _ENUM_SOURCE,
    _RES,

    "MeterValues", FROM_COLUMN,
    "energyWh", _INT_GE0,
    "sessionEnergyWh", _INT_GE0,
    "powerW", _NUM_POWER,
    "currentA", _LIST_3_NUM,
    "voltageV", _LIST_3_NUM,
    "offeredA", _NUM_0_80,
    "seq", _INT_ID,
    _RES,

    "StartTransaction", FROM_COLUMN,
    "sessionId", _INT_ID,
    "meterStartWh", _INT_GE0,
    _RES,

    "StopTransaction", FROM_COLUMN,
    "sessionId", _INT_ID,
    "meterStopWh", _INT_GE0,
    "reason", _ENUM_STOP,
    _RES,

    "SetChargingLimit", FROM_GATEWAY,
    "limitA", _NUM_0_80,
    "validityS", _INT_VALIDITY,
    "failsafeA", _NUM_0_80 + _OPT,
    _RES,
    "status", _ENUM_ACCEPTED,
    "appliedA", _NUM_0_80,

    "GetConfiguration", FROM_GATEWAY,
    "keys", _LIST_KEYS + _OPT,
    _RES,
    "configuration", _MAP,
    "unknownKeys", _LIST_KEYS,

    "ChangeConfiguration", FROM_GATEWAY,
    "key", _STR_64,
    "value", _ANY,
    _RES,
    "status", _ENUM_CHANGE,

    "Reset", FROM_GATEWAY,
    "type", _ENUM_RESET,
    _RES,
    "status", _ENUM_ACCEPTED,

    "TriggerMessage", FROM_GATEWAY,
    "requestedMessage", _ENUM_MESSAGE,
    _RES,
    "status", _ENUM_TRIGGERED,
])
del CP_NAMES, ERROR_NAMES, LIMIT_SOURCE_NAMES, STATUS_NAMES  # read once: no module slots for them


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


# The descriptions, in one string (a string object each would cost a board ~40 B more),
# picked by index (_T_...) only when a message is refused or described.
_TEXTS = (
    "unknown action %r|%s payload must be a map|%s has no field %r|%s needs field %s|"
    "%s keys must be strings|%s must be %s|str (at most %d chars)|list of %s %s|"
    "id must be an int 0..%d|frame must be an array [type, id, ...]|unknown frame type %r|"
    "call must be [2, id, action, payload]|result must be [3, id, payload]|"
    "error must be [4, id, errorCode, description, details]|result payload must be a map|"
    "unknown error code %r"
)
_T_ACTION = const(0)
_T_NOT_MAP = const(1)
_T_NO_FIELD = const(2)
_T_NEEDS = const(3)
_T_KEYS = const(4)
_T_MUST = const(5)
_T_STR = const(6)
_T_LIST = const(7)
_T_ID = const(8)
_T_FRAME = const(9)
_T_TYPE = const(10)
_T_CALL = const(11)
_T_RESULT = const(12)
_T_ERROR = const(13)
_T_RESULT_MAP = const(14)
_T_CODE = const(15)


def _fail(code, i, args=()):
    """The MessageError `code` with description i (a _T_ index) formatted with args."""
    return MessageError(code, _TEXTS.split("|")[i] % args)


def _header(action):
    """The index of action's name in _SPECS, or -1 for an action outside the contract."""
    if type(action) is str and action in _SPECS:
        a = _SPECS.index(action)
        if a + 1 < len(_SPECS) and (_SPECS[a + 1] == FROM_COLUMN or _SPECS[a + 1] == FROM_GATEWAY):
            return a
    return -1


def direction(action):
    """Who sends the action's call; None for an action outside the contract."""
    a = _header(action)
    return _SPECS[a + 1] if a >= 0 else None


def validate_payload(action, payload, is_result=False):
    """Raise MessageError unless payload is a valid request (or result) of action."""
    a = _header(action)
    if a < 0:
        raise _fail(NOT_IMPLEMENTED, _T_ACTION, (action,))
    if not isinstance(payload, dict):
        raise _fail(FORMATION_VIOLATION, _T_NOT_MAP, (action,))
    spec = _SPECS
    lo = hi = spec.index(_RES, a) + 1 if is_result else a + 2
    while hi + 1 < len(spec) and type(spec[hi + 1]) is int:  # a field: (name, code)
        hi += 2
    for key in payload:
        for j in range(lo, hi, 2):
            if spec[j] == key:
                break
        else:
            raise _fail(FORMATION_VIOLATION, _T_NO_FIELD, (action, key))
    for j in range(lo, hi, 2):
        name = spec[j]
        code = spec[j + 1]
        if name in payload:
            a = code >> 4
            _check(code & 7, _ARGS[a], _ARGS[a + 1] if code & 7 <= _N else None, payload[name], name)
        elif not code & _OPT:
            raise _fail(OCCURRENCE_CONSTRAINT_VIOLATION, _T_NEEDS, (action, name))


def _check(kind, arg, hi, v, name):
    """kind: a code (_I.._A) or, for list items, a kind name; arg: the field's _ARGS entry
    (int, num: lo, and hi the next one)."""
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
        elif (arg is None or v >= arg) and (hi is None or v <= hi):
            return
        arg = None if arg is None and hi is None else (arg, hi)
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
                _check(arg[0], arg[3], None, item, name)
            return
    elif kind == _M:
        if not isinstance(v, dict):
            code = TYPE_CONSTRAINT_VIOLATION
            what = "a map"
        else:
            for key in v:
                if type(key) is not str:
                    raise _fail(TYPE_CONSTRAINT_VIOLATION, _T_KEYS, (name,))
            return
    else:
        return
    raise _fail(code, _T_MUST, (name, what or describe(_KINDS[kind], arg)))


def describe(kind, arg):
    """Human text of a field's type and range, e.g. 'num 0..80' (used by the docs too)."""
    if kind == "int" or kind == "num":
        if arg is None or (arg[0] is None and arg[1] is None):
            return kind
        if arg[1] is None:
            return "%s >= %s" % (kind, arg[0])
        return "%s %s..%s" % (kind, arg[0], arg[1])
    if kind == "str":
        return _TEXTS.split("|")[_T_STR] % arg
    if kind == "enum":
        return "one of " + ", ".join(map(str, arg))
    if kind == "list":
        count = str(arg[1]) if arg[1] == arg[2] else "%d..%d" % (arg[1], arg[2])
        return _TEXTS.split("|")[_T_LIST] % (count, arg[0])
    return kind


def _check_id(msg_id):
    if type(msg_id) is not int or not 0 <= msg_id <= MAX_ID:
        raise _fail(FORMATION_VIOLATION, _T_ID, (MAX_ID,))


def parse(obj):
    """Check a decoded frame's shape (and a call's payload); return it unchanged.

    A result's payload is checked by whoever knows which action it answers
    (validate_payload(action, payload, is_result=True))."""
    if not isinstance(obj, (list, tuple)) or len(obj) < 3:
        raise _fail(FORMATION_VIOLATION, _T_FRAME)
    frame_type = obj[0]
    if type(frame_type) is not int or frame_type not in (CALL, RESULT, ERROR):
        raise _fail(FORMATION_VIOLATION, _T_TYPE, (frame_type,))
    _check_id(obj[1])
    try:
        if frame_type == CALL:
            if len(obj) != 4 or type(obj[2]) is not str:
                raise _fail(FORMATION_VIOLATION, _T_CALL)
            validate_payload(obj[2], obj[3])
        elif frame_type == RESULT:
            if len(obj) != 3 or not isinstance(obj[2], dict):
                raise _fail(FORMATION_VIOLATION, _T_RESULT)
        elif (len(obj) != 5 or obj[2] not in ERROR_CODES or type(obj[3]) is not str
              or not isinstance(obj[4], dict)):
            raise _fail(FORMATION_VIOLATION, _T_ERROR)
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
        raise _fail(FORMATION_VIOLATION, _T_RESULT_MAP)
    return [RESULT, msg_id, payload]


def error(msg_id, code, description, details=None):
    _check_id(msg_id)
    if code not in ERROR_CODES:
        raise _fail(FORMATION_VIOLATION, _T_CODE, (code,))
    return [ERROR, msg_id, code, description, {} if details is None else details]
