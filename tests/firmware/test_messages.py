# firmware.messages: the message-set contract, its validation and its frame builders.
from fwtest import hexbytes, raises

from firmware import cbor, messages, messages_tables
from firmware.messages import MessageError

VALID = {
    "BootNotification": (
        {"columnId": "col-1", "firmwareVersion": "0.1.0", "model": "EVC-22", "phases": 3,
         "hardwareRatingA": 32, "busAddress": 5},
        {"status": "Accepted", "heartbeatIntervalS": 60, "currentTimeMs": 1700000000000}),
    "Heartbeat": ({}, {"currentTimeMs": 0}),
    "StatusNotification": (
        {"status": "Charging", "errorCode": "NoError", "cpState": "C", "offeredA": 16.0,
         "limitSource": "gateway"}, {}),
    "MeterValues": (
        {"energyWh": 123456, "sessionEnergyWh": 789, "powerW": 7360.5, "currentA": [10.1, 10, 9.9],
         "voltageV": [230.2, 231, 229.8], "offeredA": 16, "seq": 42}, {}),
    "StartTransaction": ({"sessionId": 7, "meterStartWh": 123000}, {}),
    "StopTransaction": ({"sessionId": 7, "meterStopWh": 125000, "reason": "EVDisconnected"}, {}),
    "SetChargingLimit": ({"limitA": 13.5, "validityS": 900, "failsafeA": 6},
                         {"status": "Accepted", "appliedA": 13.5}),
    "GetConfiguration": ({"keys": ["phases", "nope"]},
                         {"configuration": {"phases": 3}, "unknownKeys": ["nope"]}),
    "ChangeConfiguration": ({"key": "failsafeA", "value": 6}, {"status": "RebootRequired"}),
    "Reset": ({"type": "Soft"}, {"status": "Accepted"}),
    "TriggerMessage": ({"requestedMessage": "MeterValues"}, {"status": "Accepted"}),
}

F = messages.FORMATION_VIOLATION
T = messages.TYPE_CONSTRAINT_VIOLATION
P = messages.PROPERTY_CONSTRAINT_VIOLATION
OCC = messages.OCCURRENCE_CONSTRAINT_VIOLATION
NAN = float("nan")
INF = float("inf")


def test_the_contract_names_every_action_once_with_its_direction():
    names = [spec[0] for spec in messages_tables.ACTIONS]
    assert names == ["BootNotification", "Heartbeat", "StatusNotification", "MeterValues",
                     "StartTransaction", "StopTransaction", "SetChargingLimit", "GetConfiguration",
                     "ChangeConfiguration", "Reset", "TriggerMessage"]
    for spec in messages_tables.ACTIONS:
        expected = messages.FROM_COLUMN if names.index(spec[0]) < 6 else messages.FROM_GATEWAY
        assert spec[1] == expected and messages.direction(spec[0]) == expected
        for field in spec[2] + spec[3]:
            assert len(field) == 4 and field[1] in ("int", "num", "str", "enum", "list", "map", "any")
    assert messages.direction("Nope") is None and messages_tables.action_spec("Nope") is None
    assert sorted(VALID) == sorted(names)


def test_names_inside_the_contract_table_are_no_actions():
    # The contract is one flat table of action names, senders, field names and markers: only
    # an action's own name finds it.
    for name in ("/", "column", "gateway", "status", "columnId", "currentTimeMs", 2):
        assert messages.direction(name) is None, name
        exc = raises(MessageError, messages.validate_payload, name, {})
        assert exc.code == messages.NOT_IMPLEMENTED, name


def test_error_codes_are_the_ocpp_set():
    assert messages.ERROR_CODES == (
        "NotImplemented", "NotSupported", "InternalError", "ProtocolError", "SecurityError",
        "FormationViolation", "PropertyConstraintViolation", "OccurrenceConstraintViolation",
        "TypeConstraintViolation", "GenericError")
    assert (messages.CALL, messages.RESULT, messages.ERROR, messages.MAX_ID) == (2, 3, 4, 2 ** 31 - 1)


def test_valid_examples_pass_both_ways():
    for action, (request, response) in VALID.items():
        messages.validate_payload(action, request)
        messages.validate_payload(action, response, True)
        assert messages.parse([2, 9, action, request]) == [2, 9, action, request]


def test_optional_fields_may_be_left_out():
    messages.validate_payload("SetChargingLimit", {"limitA": 0, "validityS": 0})
    messages.validate_payload("GetConfiguration", {})
    boot = dict(VALID["BootNotification"][0])
    boot["configError"] = "phases: must be 1 or 3"
    messages.validate_payload("BootNotification", boot)


def expect(code, words, action, payload, is_result=False):
    exc = raises(MessageError, messages.validate_payload, action, payload, is_result)
    assert exc.code == code, (action, payload, exc.code, exc.description)
    assert words in exc.description, (words, exc.description)
    assert isinstance(exc, ValueError)


def with_(action, key, value, index=0):
    payload = dict(VALID[action][index])
    if value is None:
        del payload[key]
    else:
        payload[key] = value
    return payload


def test_payload_errors_carry_the_ocpp_code():
    expect(messages.NOT_IMPLEMENTED, "unknown action", "Fly", {})
    expect(F, "payload must be a map", "Heartbeat", [])
    expect(F, "has no field 'extra'", "Heartbeat", {"extra": 1})
    expect(F, "has no field 1", "Heartbeat", {1: 1})
    expect(OCC, "needs field limitA", "SetChargingLimit", with_("SetChargingLimit", "limitA", None))
    expect(OCC, "needs field currentTimeMs", "Heartbeat", {}, True)
    expect(T, "limitA must be num 0..80", "SetChargingLimit", with_("SetChargingLimit", "limitA", "16"))
    expect(P, "limitA must be num 0..80", "SetChargingLimit", with_("SetChargingLimit", "limitA", 80.5))
    expect(P, "limitA must be num 0..80", "SetChargingLimit", with_("SetChargingLimit", "limitA", -1))
    expect(P, "validityS must be int 0..86400", "SetChargingLimit",
           with_("SetChargingLimit", "validityS", 86401))
    expect(T, "validityS must be int", "SetChargingLimit", with_("SetChargingLimit", "validityS", 900.0))
    expect(T, "columnId must be a string", "BootNotification", with_("BootNotification", "columnId", 5))
    expect(P, "columnId must be str (at most 64", "BootNotification",
           with_("BootNotification", "columnId", "x" * 65))
    expect(P, "type must be one of Soft, Hard", "Reset", {"type": "Warm"})
    expect(T, "type must be one of", "Reset", {"type": 1})
    expect(P, "status must be one of Accepted, Rejected", "Reset", {"status": "Maybe"}, True)
    expect(P, "cpState must be one of A, B, C, D, E, F", "StatusNotification",
           with_("StatusNotification", "cpState", "G"))
    expect(P, "limitSource must be one of", "StatusNotification",
           with_("StatusNotification", "limitSource", "dno"))
    expect(P, "reason must be one of Local, Remote, EVDisconnected, PowerLoss, Reboot, EmergencyStop, Other",
           "StopTransaction", with_("StopTransaction", "reason", "Crash"))
    expect(OCC, "currentA must be list of 3 num", "MeterValues", with_("MeterValues", "currentA", [1, 2]))
    expect(T, "currentA must be a list", "MeterValues", with_("MeterValues", "currentA", 5))
    expect(T, "voltageV must be num", "MeterValues", with_("MeterValues", "voltageV", [230, "x", 230]))
    expect(P, "seq must be int 0..2147483647", "MeterValues", with_("MeterValues", "seq", 2 ** 31))
    expect(P, "energyWh must be int >= 0", "MeterValues", with_("MeterValues", "energyWh", -1))
    expect(T, "keys must be a string", "GetConfiguration", {"keys": ["a", 1]})
    expect(T, "configuration must be a map", "GetConfiguration",
           {"configuration": [], "unknownKeys": []}, True)
    expect(T, "configuration keys must be strings", "GetConfiguration",
           {"configuration": {1: 2}, "unknownKeys": []}, True)
    expect(P, "requestedMessage must be one of BootNotification, Heartbeat, StatusNotification, "
           "MeterValues", "TriggerMessage", {"requestedMessage": "Reset"})


def test_nan_inf_and_bools_are_not_numbers():
    for bad in (NAN, INF, -INF):
        expect(P, "limitA must be finite", "SetChargingLimit", with_("SetChargingLimit", "limitA", bad))
        expect(P, "powerW must be finite", "MeterValues", with_("MeterValues", "powerW", bad))
        expect(P, "currentA must be finite", "MeterValues", with_("MeterValues", "currentA", [1, bad, 1]))
    expect(T, "limitA must be num", "SetChargingLimit", with_("SetChargingLimit", "limitA", True))
    expect(T, "validityS must be int", "SetChargingLimit", with_("SetChargingLimit", "validityS", False))
    expect(T, "phases must be one of 1, 3", "BootNotification", with_("BootNotification", "phases", True))
    expect(T, "phases must be one of 1, 3", "BootNotification", with_("BootNotification", "phases", 3.0))
    expect(P, "phases must be one of 1, 3", "BootNotification", with_("BootNotification", "phases", 2))


def test_any_value_is_accepted_where_the_contract_says_any():
    for value in (None, True, 1.5, "x", [1, 2], {"a": 1}):
        messages.validate_payload("ChangeConfiguration", {"key": "k", "value": value})


def test_builders_make_ocpp_shaped_frames():
    assert messages.call(7, "Heartbeat", {}) == [2, 7, "Heartbeat", {}]
    assert messages.result(7, {"currentTimeMs": 5}) == [3, 7, {"currentTimeMs": 5}]
    assert messages.error(7, "NotSupported", "no") == [4, 7, "NotSupported", "no", {}]
    assert messages.error(0, "GenericError", "x", {"k": 1}) == [4, 0, "GenericError", "x", {"k": 1}]
    raises(MessageError, messages.call, 7, "Heartbeat", {"x": 1})
    raises(MessageError, messages.call, -1, "Heartbeat", {})
    raises(MessageError, messages.call, 2 ** 31, "Heartbeat", {})
    raises(MessageError, messages.result, 1, [])
    raises(MessageError, messages.error, 1, "Oops", "x")


def test_wire_bytes_of_a_call_and_its_result():
    call = messages.call(1, "Heartbeat", {})
    assert cbor.dumps(call) == hexbytes("84 02 01 69 48 65 61 72 74 62 65 61 74 a0")
    res = messages.result(1, {"currentTimeMs": 1000})
    assert cbor.dumps(res) == hexbytes("83 03 01 a1 6d") + b"currentTimeMs" + hexbytes("19 03 e8")
    limit = messages.call(0x1234, "SetChargingLimit", {"validityS": 60, "limitA": 16})
    assert cbor.dumps(limit) == (hexbytes("84 02 19 12 34 70") + b"SetChargingLimit" + hexbytes("a2 66")
                                 + b"limitA" + hexbytes("10 69") + b"validityS" + hexbytes("18 3c"))
    err = messages.error(3, "NotImplemented", "")
    assert cbor.dumps(err) == hexbytes("85 04 03 6e") + b"NotImplemented" + hexbytes("60 a0")


def shape_error(obj, words, msg_id=None, frame_type=None, code=F):
    exc = raises(MessageError, messages.parse, obj)
    assert exc.code == code, (obj, exc.code)
    assert words in exc.description, (words, exc.description)
    assert exc.msg_id == msg_id and exc.frame_type == frame_type, (obj, exc.msg_id, exc.frame_type)


def test_parse_rejects_every_bad_shape():
    shape_error({}, "frame must be an array")
    shape_error("abc", "frame must be an array")
    shape_error([2, 1], "frame must be an array")
    shape_error([5, 1, {}], "unknown frame type 5")
    shape_error([True, 1, {}], "unknown frame type True")
    shape_error([3.0, 1, {}], "unknown frame type")
    for bad_id in (-1, 2 ** 31, 1.0, True, "1", None):
        shape_error([3, bad_id, {}], "id must be an int 0..2147483647")
    shape_error([2, 5, "Heartbeat"], "call must be", 5, 2)
    shape_error([2, 5, "Heartbeat", {}, 1], "call must be", 5, 2)
    shape_error([2, 5, 7, {}], "call must be", 5, 2)
    shape_error([2, 5, "Fly", {}], "unknown action 'Fly'", 5, 2, messages.NOT_IMPLEMENTED)
    shape_error([2, 6, "Reset", {"type": "Warm"}], "type must be", 6, 2, P)
    shape_error([3, 5, []], "result must be", 5, 3)
    shape_error([3, 5, {}, 1], "result must be", 5, 3)
    shape_error([4, 5, "GenericError", "x"], "error must be", 5, 4)
    shape_error([4, 5, "Oops", "x", {}], "error must be", 5, 4)
    shape_error([4, 5, "GenericError", 1, {}], "error must be", 5, 4)
    shape_error([4, 5, "GenericError", "x", None], "error must be", 5, 4)


def test_parse_returns_valid_frames_unchanged():
    for frame in ([3, 0, {}], [3, 2 ** 31 - 1, {"anything": 1}], [4, 1, "GenericError", "", {}],
                  (2, 1, "Heartbeat", {})):
        assert messages.parse(frame) is frame


def test_describe_renders_types_for_the_docs():
    d = messages.describe
    assert d("num", (0, 80)) == "num 0..80"
    assert d("int", (0, None)) == "int >= 0"
    assert d("str", 64) == "str (at most 64 chars)"
    assert d("enum", (1, 3)) == "one of 1, 3"
    assert d("list", ("num", 3, 3, None)) == "list of 3 num"
    assert d("list", ("str", 0, 32, 64)) == "list of 0..32 str"
    assert d("map", None) == "map" and d("any", None) == "any"
