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

_AMPS = (0, 80)
_UINT = (0, None)
_U31 = (0, MAX_ID)
_PHASE_NUMS = (NUM, 3, 3, None)
_ACCEPTED = ("Accepted", "Rejected")
_TRIGGERABLE = ("BootNotification", "Heartbeat", "StatusNotification", "MeterValues")
STOP_REASONS = ("Local", "Remote", "EVDisconnected", "PowerLoss", "Reboot", "EmergencyStop", "Other")

# (action, direction, request fields, result fields), in documentation order.
ACTIONS = (
    ("BootNotification", FROM_COLUMN, (
        ("columnId", STR, True, 64),
        ("firmwareVersion", STR, True, 32),
        ("model", STR, True, 64),
        ("phases", ENUM, True, (1, 3)),
        ("hardwareRatingA", NUM, True, _AMPS),
        ("busAddress", INT, True, (0, 247)),
        ("configError", STR, False, 200),
    ), (
        ("status", ENUM, True, _ACCEPTED),
        ("heartbeatIntervalS", INT, True, (1, 86400)),
        ("currentTimeMs", INT, True, _UINT),
    )),
    ("Heartbeat", FROM_COLUMN, (), (
        ("currentTimeMs", INT, True, _UINT),
    )),
    ("StatusNotification", FROM_COLUMN, (
        ("status", ENUM, True, STATUS_NAMES),
        ("errorCode", ENUM, True, ERROR_NAMES),
        ("cpState", ENUM, True, CP_NAMES),
        ("offeredA", NUM, True, _AMPS),
        ("limitSource", ENUM, True, LIMIT_SOURCE_NAMES),
    ), ()),
    ("MeterValues", FROM_COLUMN, (
        ("energyWh", INT, True, _UINT),
        ("sessionEnergyWh", INT, True, _UINT),
        ("powerW", NUM, True, (-1000000, 1000000)),
        ("currentA", LIST, True, _PHASE_NUMS),
        ("voltageV", LIST, True, _PHASE_NUMS),
        ("offeredA", NUM, True, _AMPS),
        ("seq", INT, True, _U31),
    ), ()),
    ("StartTransaction", FROM_COLUMN, (
        ("sessionId", INT, True, _U31),
        ("meterStartWh", INT, True, _UINT),
    ), ()),
    ("StopTransaction", FROM_COLUMN, (
        ("sessionId", INT, True, _U31),
        ("meterStopWh", INT, True, _UINT),
        ("reason", ENUM, True, STOP_REASONS),
    ), ()),
    ("SetChargingLimit", FROM_GATEWAY, (
        ("limitA", NUM, True, _AMPS),
        ("validityS", INT, True, (0, 86400)),
        ("failsafeA", NUM, False, _AMPS),
    ), (
        ("status", ENUM, True, _ACCEPTED),
        ("appliedA", NUM, True, _AMPS),
    )),
    ("GetConfiguration", FROM_GATEWAY, (
        ("keys", LIST, False, (STR, 0, 32, 64)),
    ), (
        ("configuration", MAP, True, None),
        ("unknownKeys", LIST, True, (STR, 0, 32, 64)),
    )),
    ("ChangeConfiguration", FROM_GATEWAY, (
        ("key", STR, True, 64),
        ("value", ANY, True, None),
    ), (
        ("status", ENUM, True, ("Accepted", "Rejected", "RebootRequired", "NotSupported")),
    )),
    ("Reset", FROM_GATEWAY, (
        ("type", ENUM, True, ("Soft", "Hard")),
    ), (
        ("status", ENUM, True, _ACCEPTED),
    )),
    ("TriggerMessage", FROM_GATEWAY, (
        ("requestedMessage", ENUM, True, _TRIGGERABLE),
    ), (
        ("status", ENUM, True, ("Accepted", "Rejected", "NotImplemented")),
    )),
)


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


def action_spec(action):
    """(action, direction, request fields, result fields), or None for an unknown action."""
    for spec in ACTIONS:
        if spec[0] == action:
            return spec
    return None


def direction(action):
    spec = action_spec(action)
    return spec[1] if spec else None


def validate_payload(action, payload, is_result=False):
    """Raise MessageError unless payload is a valid request (or result) of action."""
    spec = action_spec(action)
    if spec is None:
        raise MessageError(NOT_IMPLEMENTED, "unknown action %r" % (action,))
    fields = spec[3] if is_result else spec[2]
    if not isinstance(payload, dict):
        raise MessageError(FORMATION_VIOLATION, "%s payload must be a map" % action)
    for key in payload:
        for field in fields:
            if field[0] == key:
                break
        else:
            raise MessageError(FORMATION_VIOLATION, "%s has no field %r" % (action, key))
    for field in fields:
        name = field[0]
        if name in payload:
            _check(field[1], field[3], payload[name], name)
        elif field[2]:
            raise MessageError(OCCURRENCE_CONSTRAINT_VIOLATION, "%s needs field %s" % (action, name))


def _is_number(v):
    return type(v) is int or type(v) is float  # bool excluded: type(True) is bool


def _check(kind, arg, v, name):
    if kind in (INT, NUM):
        if not (type(v) is int if kind == INT else _is_number(v)):
            raise MessageError(TYPE_CONSTRAINT_VIOLATION, "%s must be %s" % (name, describe(kind, arg)))
        if v - v != 0:  # NaN and infinities (inf - inf is NaN, NaN != 0)
            raise MessageError(PROPERTY_CONSTRAINT_VIOLATION, "%s must be finite" % name)
        if arg is not None and ((arg[0] is not None and v < arg[0]) or (arg[1] is not None and v > arg[1])):
            raise MessageError(PROPERTY_CONSTRAINT_VIOLATION, "%s must be %s" % (name, describe(kind, arg)))
    elif kind == STR:
        if type(v) is not str:
            raise MessageError(TYPE_CONSTRAINT_VIOLATION, "%s must be a string" % name)
        if len(v) > arg:
            raise MessageError(PROPERTY_CONSTRAINT_VIOLATION, "%s must be %s" % (name, describe(kind, arg)))
    elif kind == ENUM:
        if type(v) is not type(arg[0]):
            raise MessageError(TYPE_CONSTRAINT_VIOLATION, "%s must be %s" % (name, describe(kind, arg)))
        if v not in arg:
            raise MessageError(PROPERTY_CONSTRAINT_VIOLATION, "%s must be %s" % (name, describe(kind, arg)))
    elif kind == LIST:
        if not isinstance(v, (list, tuple)):
            raise MessageError(TYPE_CONSTRAINT_VIOLATION, "%s must be a list" % name)
        if not arg[1] <= len(v) <= arg[2]:
            raise MessageError(OCCURRENCE_CONSTRAINT_VIOLATION, "%s must be %s" % (name, describe(kind, arg)))
        for item in v:
            _check(arg[0], arg[3], item, name)
    elif kind == MAP:
        if not isinstance(v, dict):
            raise MessageError(TYPE_CONSTRAINT_VIOLATION, "%s must be a map" % name)
        for key in v:
            if type(key) is not str:
                raise MessageError(TYPE_CONSTRAINT_VIOLATION, "%s keys must be strings" % name)


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
