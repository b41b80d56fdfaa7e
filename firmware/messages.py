# The CBOR message set between column and gateway: the contract, for the gateway, the HIL,
# the tests and the docs generator. It is defined once, in firmware/msg_link.py (which a
# CBOR board loads with the link that enforces it); this module names it for host code,
# with what only host code uses: the error codes by name and the frame builders. A board
# never imports it. Frames are shaped like OCPP-J:
#     [2, id, action, payload]                      call
#     [3, id, payload]                              result
#     [4, id, errorCode, description, details]      error
# ids are ints 0..2**31-1. Payload keys are camelCase with the unit as suffix; the field
# kinds and the flat tables (_SPECS, _ARGS, _KINDS, _RES) are described in msg_link.py, and
# firmware/messages_tables.py reshapes them into nested, named tables.
from .msg_link import (
    _ARGS,
    _KINDS,
    _RES,
    _SPECS,
    CALL,
    ERROR,
    ERROR_CODES,
    FROM_COLUMN,
    FROM_GATEWAY,
    MAX_ID,
    RESULT,
    STOP_REASONS,
    MessageError,
    describe,
    direction,
    parse,
    validate_payload,
)

# The OCPP-J error codes, by name.
(NOT_IMPLEMENTED, NOT_SUPPORTED, INTERNAL_ERROR, PROTOCOL_ERROR, SECURITY_ERROR, FORMATION_VIOLATION,
 PROPERTY_CONSTRAINT_VIOLATION, OCCURRENCE_CONSTRAINT_VIOLATION, TYPE_CONSTRAINT_VIOLATION,
 GENERIC_ERROR) = ERROR_CODES

__all__ = [
    "CALL",
    "ERROR",
    "ERROR_CODES",
    "FORMATION_VIOLATION",
    "FROM_COLUMN",
    "FROM_GATEWAY",
    "GENERIC_ERROR",
    "INTERNAL_ERROR",
    "MAX_ID",
    "NOT_IMPLEMENTED",
    "NOT_SUPPORTED",
    "OCCURRENCE_CONSTRAINT_VIOLATION",
    "PROPERTY_CONSTRAINT_VIOLATION",
    "PROTOCOL_ERROR",
    "RESULT",
    "SECURITY_ERROR",
    "STOP_REASONS",
    "TYPE_CONSTRAINT_VIOLATION",
    "_ARGS",
    "_KINDS",
    "_RES",
    "_SPECS",
    "MessageError",
    "call",
    "describe",
    "direction",
    "error",
    "parse",
    "result",
    "validate_payload",
]


def _check_id(msg_id):
    parse([RESULT, msg_id, {}])  # the contract's own error for an id out of range


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
