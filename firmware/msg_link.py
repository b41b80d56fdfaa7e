# The message link between column and gateway: the CBOR message set (the contract) and the
# Link that carries calls and their answers over firmware/cbor_wire.py's codec and framing.
# A CBOR board loads it with cbor_wire.py and gw_cbor.py (the column's end); host code names
# its parts through firmware/messages.py (the contract, with the frame builders and the
# error codes by name) and cbor_link.py (the Link, as the gateway uses it).
from .cbor_wire import MAX_ITEMS, MAX_PAYLOAD, CBORError, FrameReader, dumps, encode_frame, loads
from .clock import elapsed_ms
from .status_names import CP_NAMES, ERROR_NAMES, LIMIT_SOURCE_NAMES, STATUS_NAMES

const = int  # MicroPython's compiler folds const() itself; CPython only needs the name

if 0:  # never runs. mpy-cross keeps a string literal longer than 10 characters as a heap
    # string object unless its text was seen as a name earlier in the file: naming them here
    # makes the long error codes, actions, fields, enum values and counters below interned
    # names (shared with every module that spells them), about 50 B of a board's RAM each.
    InternalError = ProtocolError = SecurityError = FormationViolation = TypeConstraintViolation = 0
    PropertyConstraintViolation = OccurrenceConstraintViolation = GenericError = NotSupported = 0
    BootNotification = StatusNotification = MeterValues = StartTransaction = StopTransaction = 0
    SetChargingLimit = GetConfiguration = ChangeConfiguration = TriggerMessage = 0
    firmwareVersion = hardwareRatingA = configError = heartbeatIntervalS = currentTimeMs = 0
    limitSource = sessionEnergyWh = meterStartWh = meterStopWh = configuration = unknownKeys = 0
    requestedMessage = RebootRequired = EVDisconnected = EmergencyStop = NotImplemented = 0
    bad_messages = unknown_actions = unsupported = handler_errors = errors_sent = 0
    tx_failures = calls_refused = callback_errors = internal_errors = 0

# --- the message contract ----------------------------------------------------------
# The CBOR message set between column and gateway, defined once here and named for the
# gateway, the HIL and the docs generator by firmware/messages.py (with the frame builders
# and the error codes by name) and firmware/messages_tables.py (nested, named tables).
# Frames are shaped like OCPP-J:
#     [2, id, action, payload]                      call
#     [3, id, payload]                              result
#     [4, id, errorCode, description, details]      error
# ids are ints 0..2**31-1. Payload keys are camelCase with the unit as suffix.
CALL = const(2)
RESULT = const(3)
ERROR = const(4)
MAX_ID = const(0x7FFFFFFF)

# The OCPP-J error codes (messages.py names each). This module spells the ones it sends.
ERROR_CODES = tuple(["NotImplemented", "NotSupported", "InternalError", "ProtocolError",
                     "SecurityError", "FormationViolation", "PropertyConstraintViolation",
                     "OccurrenceConstraintViolation", "TypeConstraintViolation", "GenericError"])

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


# The descriptions of the contract's and the link's refusals and the column's own answers,
# in one string (a string object each would cost a board ~40 B more), picked by index
# (_T_...) only when a message is refused: _error(_T_..., code, args) for a MessageError,
# _TEXTS.split("|")[_T_...] for a text.
_TEXTS = (
    "unknown action %r|%s payload must be a map|%s has no field %r|%s needs field %s|"
    "%s keys must be strings|%s must be %s|str (at most %d chars)|list of %s %s|"
    "id must be an int 0..%d|frame must be an array [type, id, ...]|unknown frame type %r|"
    "call must be [2, id, action, payload]|result must be [3, id, payload]|"
    "error must be [4, id, errorCode, description, details]|malformed CBOR: %s|"
    "%s is not served here|%s failed: %s|invalid %s result: %s|%s result could not be sent|"
    "BootNotification not accepted on this link|column configuration invalid: "
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
_T_MALFORMED = const(14)  # the link's
_T_NOT_SERVED = const(15)
_T_FAILED = const(16)
_T_INVALID = const(17)
_T_UNSENT = const(18)
_T_NOT_ACCEPTED = const(19)  # the column's (firmware/gw_cbor.py, which names them too: keep last)
_T_CONFIG_INVALID = const(20)


def _error(i, code, args=()):
    """The MessageError `code` with description i (a _T_ index) formatted with args."""
    return MessageError(code, _TEXTS.split("|")[i] % args)


def direction(action):
    """Who sends the action's call; None for an action outside the contract."""
    if type(action) is str and action in _SPECS:
        # (the last slot is a field's code: a name found has a slot after it)
        side = _SPECS[_SPECS.index(action) + 1]
        if side == FROM_COLUMN or side == FROM_GATEWAY:
            return side
    return None


def validate_payload(action, payload, is_result=False):
    """Raise MessageError unless payload is a valid request (or result) of action."""
    if direction(action) is None:
        raise _error(_T_ACTION, "NotImplemented", (action,))
    if not isinstance(payload, dict):
        raise _error(_T_NOT_MAP, "FormationViolation", (action,))
    spec = _SPECS
    a = spec.index(action)
    lo = hi = spec.index(_RES, a) + 1 if is_result else a + 2
    while hi + 1 < len(spec) and type(spec[hi + 1]) is int:  # a field: (name, code)
        hi += 2
    for key in payload:
        for j in range(lo, hi, 2):
            if spec[j] == key:
                break
        else:
            raise _error(_T_NO_FIELD, "FormationViolation", (action, key))
    for j in range(lo, hi, 2):
        name = spec[j]
        code = spec[j + 1]
        if name in payload:
            a = code >> 4
            _check(code & 7, _ARGS[a], _ARGS[a + 1] if code & 7 <= _N else None, payload[name], name)
        elif not code & _OPT:
            raise _error(_T_NEEDS, "OccurrenceConstraintViolation", (action, name))


def _check(kind, arg, hi, v, name):
    """kind: a code (_I.._A) or, for list items, a kind name; arg: the field's _ARGS entry
    (int, num: lo, and hi the next one)."""
    if type(kind) is str:
        kind = _KINDS.index(kind)
    code = "PropertyConstraintViolation"
    what = None  # None: describe the field's type and range
    t = type(v)
    if kind <= _N:
        if not (t is int or (kind == _N and t is float)):  # bool is neither
            code = "TypeConstraintViolation"
        elif v - v != 0:  # NaN and infinities (inf - inf is NaN, NaN != 0)
            what = "finite"
        elif (arg is None or v >= arg) and (hi is None or v <= hi):
            return
        arg = None if arg is None and hi is None else (arg, hi)
    elif kind == _S:
        if t is not str:
            code = "TypeConstraintViolation"
            what = "a string"
        elif len(v) <= arg:
            return
    elif kind == _E:
        if t is not type(arg[0]):
            code = "TypeConstraintViolation"
        elif v in arg:
            return
    elif kind == _L:
        if not isinstance(v, (list, tuple)):
            code = "TypeConstraintViolation"
            what = "a list"
        elif not arg[1] <= len(v) <= arg[2]:
            code = "OccurrenceConstraintViolation"
        else:
            for item in v:
                _check(arg[0], arg[3], None, item, name)
            return
    elif kind == _M:
        if not isinstance(v, dict):
            code = "TypeConstraintViolation"
            what = "a map"
        else:
            for key in v:
                if type(key) is not str:
                    raise _error(_T_KEYS, "TypeConstraintViolation", (name,))
            return
    else:
        return
    raise _error(_T_MUST, code, (name, what or describe(_KINDS[kind], arg)))


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


def parse(obj):
    """Check a decoded frame's shape (and a call's payload); return it unchanged.

    A result's payload is checked by whoever knows which action it answers
    (validate_payload(action, payload, is_result=True))."""
    if not isinstance(obj, (list, tuple)) or len(obj) < 3:
        raise _error(_T_FRAME, "FormationViolation")
    frame_type = obj[0]
    if type(frame_type) is not int or not CALL <= frame_type <= ERROR:
        raise _error(_T_TYPE, "FormationViolation", (frame_type,))
    msg_id = obj[1]
    if type(msg_id) is not int or not 0 <= msg_id <= MAX_ID:
        raise _error(_T_ID, "FormationViolation", (MAX_ID,))
    try:
        if frame_type == CALL:
            if len(obj) != 4 or type(obj[2]) is not str:
                raise _error(_T_CALL, "FormationViolation")
            validate_payload(obj[2], obj[3])
        elif frame_type == RESULT:
            if len(obj) != 3 or not isinstance(obj[2], dict):
                raise _error(_T_RESULT, "FormationViolation")
        elif (len(obj) != 5 or obj[2] not in ERROR_CODES or type(obj[3]) is not str
              or not isinstance(obj[4], dict)):
            raise _error(_T_ERROR, "FormationViolation")
    except MessageError as exc:
        exc.msg_id = msg_id
        exc.frame_type = frame_type
        raise
    return obj


# --- the link -----------------------------------------------------------------------
# One end of the message link (the column's, or the gateway's with side=FROM_GATEWAY).
# Pure: bytes and time come in through on_bytes()/poll(), bytes leave through write().
# Incoming calls go to handlers[action](payload, now_ms), which return the result payload
# (or raise MessageError for an error reply); calls we send are matched to their results
# by id and expire after call_timeout_ms. Bad input never raises: it is counted in
# `counters` and answered with an error frame when the call's id can be read, else dropped.

class Link:
    """write(frame_bytes) sends; handlers maps action -> fn(payload, now_ms) -> result payload.

    A handler that wants to send a call itself (TriggerMessage) should do it after it has
    returned (e.g. from the app's next poll), so that its result goes out first."""

    def __init__(self, write, handlers, call_timeout_ms=10000, max_pending=4,
                 side=FROM_COLUMN, max_payload=MAX_PAYLOAD, frame_gap_ms=500):
        # (side, max_payload and frame_gap_ms are passed by name: keyword-only parameters
        # would cost a board a dict of their defaults.)
        self._write = write
        self.handlers = handlers
        self.call_timeout_ms = call_timeout_ms
        self.frame_gap_ms = frame_gap_ms  # quiet time after which a partial frame is stale
        self.side = side
        self.reader = FrameReader(max_payload)  # its max_payload bounds what we send too
        self._pending = [None] * max_pending  # slots: [id, action, sent_ms, on_result]
        self._next_id = 1
        self._rx_ms = 0
        # The counters, sized once (a dict grown key by key is larger); built from a list,
        # as a constant tuple would load each name as a heap string object.
        self.counters = dict.fromkeys([
            "rx_frames",        # frames with a good CRC (bad ones: reader.bad_crc, .oversize, ...)
            "rx_calls",         # valid calls dispatched to a handler
            "rx_results",       # results matched to a pending call
            "rx_errors",        # error frames matched to a pending call
            "bad_cbor",         # frames whose payload is not one CBOR item
            "bad_messages",     # CBOR that is not a valid frame, or a call with a bad payload
            "unknown_actions",  # calls naming an action outside the contract
            "unsupported",      # calls this side does not serve (no handler, wrong direction)
            "unmatched",        # results/errors for no pending call (late, duplicate, foreign)
            "handler_errors",   # handlers that crashed or returned an invalid result
            "errors_sent",      # error frames we sent
            "tx_frames",        # frames written
            "tx_failures",      # frames we could not encode or write
            "calls_refused",    # call() refused: invalid payload, wrong direction, too many pending
            "timeouts",         # our calls that got no answer in time
            "callback_errors",  # on_result callbacks that raised
            "rx_stale",         # partial frames given up after the line went quiet
            "internal_errors",  # anything unexpected, caught so the link keeps running
        ], 0)

    def stats(self):
        """Link counters plus the frame reader's, in one new dict (for reporting)."""
        out = dict(self.counters)
        r = self.reader
        out["frames"] = r.frames
        out["bad_crc"] = r.bad_crc
        out["oversize"] = r.oversize
        out["garbage_bytes"] = r.garbage_bytes
        out["dropped"] = r.dropped
        return out

    # --- receiving ------------------------------------------------------------------

    def on_bytes(self, chunk, now_ms):
        """Bytes from the transport, in order; dispatches every complete frame. (None: no new
        bytes, only what the reader still holds.)"""
        if chunk is not None:
            self._rx_ms = now_ms
            self.reader.feed(chunk)
        while True:
            frame = self.reader.next_frame()
            if frame is None:
                return
            self.counters["rx_frames"] += 1
            try:
                self._on_frame(frame, now_ms)
            except Exception:  # a bug here must not stop the link
                self.counters["internal_errors"] += 1

    def poll(self, now_ms):
        """Expire calls past their timeout and give up on a partial frame gone quiet."""
        for i in range(len(self._pending)):
            slot = self._pending[i]
            if slot is not None and elapsed_ms(now_ms, slot[2]) >= self.call_timeout_ms:
                self.counters["timeouts"] += 1
                self._resolve(i, None)
        reader = self.reader
        if reader.pending and elapsed_ms(now_ms, self._rx_ms) >= self.frame_gap_ms:
            self.counters["rx_stale"] += 1
            while reader.pending:
                reader.abort()
                self.on_bytes(None, now_ms)

    def _on_frame(self, frame, now_ms):
        counters = self.counters
        try:
            msg = parse(loads(frame))
        except CBORError as exc:
            counters["bad_cbor"] += 1
            # A call whose CBOR breaks only after its id is answered.
            if len(frame) < 3 or frame[0] not in (0x84, 0x9F):  # array(4) or indefinite array
                return
            try:
                kind, pos = loads(frame, MAX_ITEMS, 1)
                msg_id = loads(frame, MAX_ITEMS, pos)[0]
            except CBORError:
                return
            if type(kind) is int and kind == CALL and type(msg_id) is int and 0 <= msg_id <= MAX_ID:
                self._send_error(msg_id, "FormationViolation", _TEXTS.split("|")[_T_MALFORMED] % exc)
            return
        except MessageError as exc:
            counters["unknown_actions" if exc.code == "NotImplemented" else "bad_messages"] += 1
            if exc.frame_type == CALL:
                self._send_error(exc.msg_id, exc.code, exc.description)
            elif exc.frame_type is not None:
                # A malformed answer still ends the call it answers.
                i = self._slot(exc.msg_id)
                if i >= 0:
                    self._resolve(i, exc)
            return
        kind = msg[0]
        msg_id = msg[1]
        if kind == CALL:  # serve it and answer: a result, else an error with a description
            action = msg[2]
            handler = self.handlers.get(action)
            code = "InternalError"
            if handler is None or direction(action) == self.side:
                counters["unsupported"] += 1
                code = "NotSupported"
                text = _TEXTS.split("|")[_T_NOT_SERVED] % action
            else:
                counters["rx_calls"] += 1
                try:
                    res = handler(msg[3], now_ms)
                    if res is None:
                        res = {}
                except MessageError as exc:  # the handler's own error answer
                    code = exc.code
                    text = exc.description
                except Exception as exc:
                    counters["handler_errors"] += 1
                    text = _TEXTS.split("|")[_T_FAILED] % (action, type(exc).__name__)
                else:
                    try:
                        validate_payload(action, res, True)
                    except MessageError as exc:
                        counters["handler_errors"] += 1
                        text = _TEXTS.split("|")[_T_INVALID] % (action, exc.description)
                    else:
                        if self._send([RESULT, msg_id, res]):
                            return
                        text = _TEXTS.split("|")[_T_UNSENT] % action
            self._send_error(msg_id, code, text)
            return
        i = self._slot(msg_id)
        if i < 0:
            counters["unmatched"] += 1
        elif kind == RESULT:
            try:
                validate_payload(self._pending[i][1], msg[2], True)
            except MessageError as exc:
                counters["bad_messages"] += 1
                self._resolve(i, exc)
                return
            counters["rx_results"] += 1
            self._resolve(i, msg[2])
        else:
            counters["rx_errors"] += 1
            exc = MessageError(msg[2], msg[3])
            exc.msg_id = msg_id
            exc.frame_type = kind
            exc.details = msg[4]
            self._resolve(i, exc)

    # --- sending --------------------------------------------------------------------

    def call(self, action, payload, now_ms, on_result=None):
        """Send a call; return its id, or None if refused (counted in calls_refused).

        on_result(answer) runs once: answer is the valid result payload, a MessageError
        (an error frame, or an invalid result), or None when the call timed out."""
        pending = self._pending
        i = pending.index(None) if None in pending else -1
        msg_id = None
        if i >= 0 and direction(action) == self.side:
            msg_id = self._next_id
            while self._slot(msg_id) >= 0:
                msg_id = 0 if msg_id >= MAX_ID else msg_id + 1
            self._next_id = 0 if msg_id >= MAX_ID else msg_id + 1
            try:
                validate_payload(action, payload)
            except MessageError:
                msg_id = None
            else:
                if self._send([CALL, msg_id, action, payload]):
                    pending[i] = [msg_id, action, now_ms, on_result]
                else:
                    msg_id = None
        if msg_id is None:
            self.counters["calls_refused"] += 1
        return msg_id

    def _send(self, msg):
        try:
            payload = bytearray()  # encoded into, not copied out of dumps() as bytes first
            dumps(msg, payload, 0)
            self._write(encode_frame(payload, self.reader.max_payload))
        except Exception:  # unencodable, too long, or the transport failed
            self.counters["tx_failures"] += 1
            return False
        self.counters["tx_frames"] += 1
        return True

    def _send_error(self, msg_id, code, description):
        if code not in ERROR_CODES:  # a handler's own code: not in the contract
            code = "GenericError"
        self.counters["errors_sent"] += 1
        self._send([ERROR, msg_id, code, str(description)[:200], {}])

    # --- pending calls --------------------------------------------------------------

    def _slot(self, msg_id):
        for i in range(len(self._pending)):
            slot = self._pending[i]
            if slot is not None and slot[0] == msg_id:
                return i
        return -1

    def _resolve(self, i, answer):
        callback = self._pending[i][3]
        self._pending[i] = None
        if callback is not None:
            try:
                callback(answer)
            except Exception:
                self.counters["callback_errors"] += 1
