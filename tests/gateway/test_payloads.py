"""Payloads: exact JSON of what the gateway publishes, strict parsing of what a DNO sends."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.north import payloads, topics
from gateway.north.auth import sign_command
from gateway.north.payloads import CommandKind, LimitContext, PayloadError, Reason

TS = 1_767_225_600_000


def test_reason_codes_are_the_documented_set() -> None:
    # The wire contract: adding a code is fine, renaming one breaks DNO clients.
    assert [r.value for r in Reason] == [
        "ok", "bad_json", "not_finite", "missing_field", "unknown_field", "bad_type", "bad_field",
        "out_of_range", "unknown_topic", "wrong_site", "unknown_column", "unauthenticated",
        "unknown_key", "bad_signature", "stale", "future", "expired", "replayed", "busy",
        "internal_error"]


# -- decoding ----------------------------------------------------------------------------

@pytest.mark.parametrize(("data", "reason"), [
    (b"\xff\xfe{}", Reason.BAD_JSON),
    (b"{", Reason.BAD_JSON),
    (b"[1, 2]", Reason.BAD_JSON),
    (b'"text"', Reason.BAD_JSON),
    (b"", Reason.BAD_JSON),
    (b'{"a": 1, "a": 2}', Reason.BAD_JSON),
    (b'{"limit_a": NaN}', Reason.NOT_FINITE),
    (b'{"limit_a": Infinity}', Reason.NOT_FINITE),
    (b'{"limit_a": -Infinity}', Reason.NOT_FINITE),
    (b'{"limit_a": 1e999}', Reason.NOT_FINITE),
    (b'{"x": "' + b"a" * 5000 + b'"}', Reason.BAD_JSON),
    (b"[" * 2000 + b"]" * 2000, Reason.BAD_JSON),             # deeper than the parser allows
])
def test_decode_rejects(data: bytes, reason: Reason) -> None:
    with pytest.raises(PayloadError) as err:
        payloads.decode_json(data)
    assert err.value.reason is reason


def test_decode_rejects_absurd_integers() -> None:
    with pytest.raises(PayloadError) as err:
        payloads.decode_json(b'{"n": ' + b"9" * 5000 + b"}", max_bytes=10_000)
    assert err.value.reason is Reason.BAD_JSON


def test_decode_accepts_an_object() -> None:
    assert payloads.decode_json(b'{"limit_a": 16.5, "id": "x"}') == {"limit_a": 16.5, "id": "x"}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_decode_never_raises_anything_but_payload_error(data: bytes) -> None:
    try:
        assert isinstance(payloads.decode_json(data), dict)
    except PayloadError as exc:
        assert exc.reason in (Reason.BAD_JSON, Reason.NOT_FINITE)


# -- commands ----------------------------------------------------------------------------

def _cmd(**changes: Any) -> dict[str, Any]:
    cmd: dict[str, Any] = {"id": "c-1", "limit_a": 16.0, "validity_s": 900, "issued_ms": TS,
                           "key_id": "dno-1", "sig": "00" * 32}
    for name, value in changes.items():
        if value is _DROP:
            cmd.pop(name, None)
        else:
            cmd[name] = value
    return cmd


_DROP = object()
CAP = LimitContext(capacity_a=63.0)


def test_a_valid_site_limit() -> None:
    cmd = payloads.parse_command(_cmd(), CommandKind.SITE_LIMIT, context=CAP)
    assert (cmd.id, cmd.limit_a, cmd.limit_kw, cmd.issued_ms) == ("c-1", 16.0, None, TS)
    assert cmd.valid_until_ms == TS + 900_000
    assert payloads.parse_command(_cmd(validity_s=_DROP, valid_until_ms=TS + 5000),
                                  CommandKind.SITE_LIMIT).valid_until_ms == TS + 5000
    assert payloads.parse_command(_cmd(limit_a=0), CommandKind.SITE_LIMIT).limit_a == 0.0


def test_limit_in_kw_becomes_amps_per_phase() -> None:
    cmd = payloads.parse_command(_cmd(limit_a=_DROP, limit_kw=11.04), CommandKind.SITE_LIMIT, context=CAP)
    assert cmd.limit_kw == 11.04
    assert cmd.limit_a == pytest.approx(16.0)  # 11040 W / (230 V x 3)
    one_phase = LimitContext(capacity_a=32.0, phases=1)
    cmd = payloads.parse_command(_cmd(limit_a=_DROP, limit_kw=4.2), CommandKind.COLUMN_LIMIT,
                                 context=one_phase)
    assert cmd.limit_a == pytest.approx(18.26, abs=0.01)
    with pytest.raises(PayloadError) as err:
        payloads.parse_command(_cmd(limit_a=_DROP, limit_kw=50.0), CommandKind.COLUMN_LIMIT,
                               context=one_phase)
    assert err.value.reason is Reason.OUT_OF_RANGE


BAD_COMMANDS = [
    ("negative", _cmd(limit_a=-1), Reason.OUT_OF_RANGE),
    ("above capacity", _cmd(limit_a=63.5), Reason.OUT_OF_RANGE),
    ("nan", _cmd(limit_a=math.nan), Reason.NOT_FINITE),
    ("inf", _cmd(limit_a=math.inf), Reason.NOT_FINITE),
    ("bool as number", _cmd(limit_a=True), Reason.BAD_TYPE),
    ("string as number", _cmd(limit_a="16"), Reason.BAD_TYPE),
    ("null limit", _cmd(limit_a=None), Reason.BAD_TYPE),
    ("unknown field", _cmd(priority=1), Reason.UNKNOWN_FIELD),
    ("failsafe field on a limit", _cmd(duration_s=7200), Reason.UNKNOWN_FIELD),
    ("no id", _cmd(id=_DROP), Reason.MISSING_FIELD),
    ("empty id", _cmd(id=""), Reason.BAD_FIELD),
    ("id with a space", _cmd(id="c 1"), Reason.BAD_FIELD),
    ("overlong id", _cmd(id="c" * 65), Reason.BAD_FIELD),
    ("numeric id", _cmd(id=7), Reason.BAD_TYPE),
    ("no limit", _cmd(limit_a=_DROP), Reason.MISSING_FIELD),
    ("amps and kW", _cmd(limit_kw=11.0), Reason.BAD_FIELD),
    ("no validity", _cmd(validity_s=_DROP), Reason.MISSING_FIELD),
    ("two validities", _cmd(valid_until_ms=TS + 1000), Reason.BAD_FIELD),
    ("zero validity", _cmd(validity_s=0), Reason.OUT_OF_RANGE),
    ("validity too long", _cmd(validity_s=86_401), Reason.OUT_OF_RANGE),
    ("valid_until before issued", _cmd(validity_s=_DROP, valid_until_ms=TS), Reason.OUT_OF_RANGE),
    ("valid_until as float", _cmd(validity_s=_DROP, valid_until_ms=TS + 1000.0), Reason.BAD_TYPE),
    ("issued as bool", _cmd(issued_ms=True), Reason.BAD_TYPE),
    ("issued as float", _cmd(issued_ms=float(TS)), Reason.BAD_TYPE),
    ("issued negative", _cmd(issued_ms=-5), Reason.OUT_OF_RANGE),
    ("no issued", _cmd(issued_ms=_DROP), Reason.MISSING_FIELD),
    ("no signature", _cmd(sig=_DROP), Reason.UNAUTHENTICATED),
    ("no key id", _cmd(key_id=_DROP), Reason.UNAUTHENTICATED),
]


@pytest.mark.parametrize(("cmd", "reason"), [(c, r) for _, c, r in BAD_COMMANDS],
                         ids=[name for name, _, _ in BAD_COMMANDS])
def test_bad_limit_commands(cmd: dict[str, Any], reason: Reason) -> None:
    with pytest.raises(PayloadError) as err:
        payloads.parse_command(cmd, CommandKind.SITE_LIMIT, context=CAP)
    assert err.value.reason is reason


def test_failsafe_command() -> None:
    cmd = payloads.parse_command(_cmd(duration_s=7200), CommandKind.SITE_FAILSAFE, context=CAP)
    assert (cmd.limit_a, cmd.duration_s) == (16.0, 7200)
    for bad in (10, 86_401, 7200.5, False):
        with pytest.raises(PayloadError):
            payloads.parse_command(_cmd(duration_s=bad), CommandKind.SITE_FAILSAFE, context=CAP)


@pytest.mark.parametrize(("config", "reason"), [
    ({"random_delay_max_s": 600, "telemetry_interval_s": 10}, Reason.OK),
    ({"random_delay_max_s": 1801}, Reason.OUT_OF_RANGE),
    ({"random_delay_max_s": True}, Reason.BAD_TYPE),
    ({"random_delay_max_s": 60.5}, Reason.BAD_TYPE),
    ({"site_capacity_a": 100}, Reason.UNKNOWN_FIELD),
    ({}, Reason.BAD_FIELD),
    ([1], Reason.BAD_TYPE),
    (_DROP, Reason.MISSING_FIELD),
])
def test_config_command(config: Any, reason: Reason) -> None:
    cmd = _cmd(limit_a=_DROP, config=config)
    if reason is Reason.OK:
        assert payloads.parse_command(cmd, CommandKind.CONFIG).config == config
        return
    with pytest.raises(PayloadError) as err:
        payloads.parse_command(cmd, CommandKind.CONFIG)
    assert err.value.reason is reason


def test_a_limit_on_a_config_topic_is_an_unknown_field() -> None:
    with pytest.raises(PayloadError) as err:
        payloads.parse_command(_cmd(config={"telemetry_interval_s": 5}), CommandKind.CONFIG)
    assert err.value.reason is Reason.UNKNOWN_FIELD


@pytest.mark.parametrize(("obj", "expected"), [
    ({"id": "c-1"}, "c-1"), ({"id": 5}, None), ({"id": "a b"}, None), ({}, None), ({"id": "x" * 65}, None),
])
def test_the_id_echoed_in_an_ack(obj: dict[str, Any], expected: str | None) -> None:
    assert payloads.command_id_of(obj) == expected


# -- what the gateway publishes ----------------------------------------------------------

def _telemetry(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = dict(ts_ms=TS, column_id="c1", current_a=[15.9, 16.0, 0.0],
                                  voltage_v=[230.1, 229.8, 231.0], power_w=7340.5, energy_wh=12_345,
                                  offered_a=16.0, applied_limit_a=16.0, limit_source="gateway",
                                  state="C", status="Charging")
    fields.update(changes)
    return fields


def test_column_telemetry_exact_json() -> None:
    msg = payloads.column_telemetry(**_telemetry())
    assert payloads.encode(msg) == (
        b'{"ts_ms":1767225600000,"column_id":"c1","current_a":[15.9,16.0,0.0],'
        b'"voltage_v":[230.1,229.8,231.0],"power_w":7340.5,"energy_wh":12345,"offered_a":16.0,'
        b'"applied_limit_a":16.0,"limit_source":"gateway","state":"C","status":"Charging"}')
    payloads.validate("column_telemetry", {**msg, "seq": 1})
    with pytest.raises(PayloadError) as err:
        payloads.validate("column_telemetry", msg)  # not yet stamped by the outbox
    assert err.value.reason is Reason.MISSING_FIELD


@pytest.mark.parametrize("changes", [
    {"current_a": [16.0, math.nan, 0.0]}, {"current_a": [16.0, 16.0]}, {"offered_a": -1.0},
    {"offered_a": True}, {"limit_source": "dno-magic"}, {"state": "G"}, {"status": "charging"},
    {"energy_wh": -1}, {"column_id": "c/1"}, {"power_w": math.inf}, {"voltage_v": [230, 230, -1]},
])
def test_builders_refuse_bad_values(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="column_telemetry"):
        payloads.column_telemetry(**_telemetry(**changes))


@pytest.mark.parametrize("changes", [
    {"current_a": [16.0, math.nan, 0.0]}, {"current_a": [16.0, 16.0]}, {"offered_a": -1.0},
    {"offered_a": True}, {"limit_source": "dno-magic"}, {"state": "G"}, {"status": "charging"},
    {"energy_wh": -1}, {"column_id": "c/1"}, {"power_w": math.inf}, {"voltage_v": [230, 230, -1]},
    # tuples of floats, as readings give them (the template's case), one phase wrong at a time
    *({"current_a": tuple(bad if i == k else 16.0 for i in range(3))}
      for k in range(3) for bad in (math.nan, math.inf, -math.inf, True, None)),
    *({"voltage_v": tuple(bad if i == k else 230.0 for i in range(3))}
      for k in range(3) for bad in (-0.5, math.nan, math.inf, True, None)),
    {"current_a": (16.0, 16.0)}, {"current_a": (16.0, 16.0, 16.0, 16.0)}, {"applied_limit_a": -0.1},
    {"applied_limit_a": math.nan}, {"power_w": "7000"}, {"ts_ms": -1}, {"ts_ms": 1.0e12},
    {"energy_wh": math.nan},
])
def test_the_telemetry_round_refuses_what_the_builder_refuses(changes: dict[str, Any]) -> None:
    fields = _telemetry(current_a=(15.9, 16.0, 0.0), voltage_v=(230.1, 229.8, 231.0))   # as readings give
    fields.update(changes)
    with pytest.raises(ValueError, match="column_telemetry"):
        payloads.column_telemetry_encoded(**fields)


_any_number = (st.floats(allow_nan=True, allow_infinity=True) | st.integers(-2**1100, 2**1100)
               | st.booleans() | st.none() | st.text(max_size=3))
_vocab = st.sampled_from(["gateway", "failsafe", "A", "C", "Charging", "SuspendedEV", "x", ""])
_amps = st.floats(0, 1e9) | st.integers(0, 10**6)


_telemetry_fields = st.fixed_dictionaries({
    "ts_ms": st.integers(-5, 2**70) | st.floats(),
    "column_id": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:/-]{0,70}", fullmatch=True),
    "current_a": st.lists(_any_number, min_size=2, max_size=4).map(tuple) | st.lists(_any_number),
    "voltage_v": st.lists(_any_number, min_size=3, max_size=3).map(tuple),
    "power_w": _any_number, "energy_wh": _any_number, "offered_a": _any_number,
    "applied_limit_a": _any_number, "limit_source": _vocab, "state": _vocab, "status": _vocab})


# What readings give: tuples of floats, floats and ints within the contract (the template's case).
_reading_fields = st.fixed_dictionaries({
    "ts_ms": st.integers(0, 2**62),
    "column_id": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", fullmatch=True),
    "current_a": st.tuples(*[st.floats(-1e6, 1e6)] * 3), "voltage_v": st.tuples(*[st.floats(0, 1e6)] * 3),
    "power_w": _amps | st.floats(-1e9, 0), "energy_wh": _amps, "offered_a": _amps,
    "applied_limit_a": st.none() | _amps,
    "limit_source": st.sampled_from(payloads.LIMIT_SOURCE_NAMES), "state": st.sampled_from(payloads.CP_NAMES),
    "status": st.sampled_from(payloads.STATUS_NAMES)})


_bad = st.sampled_from([math.nan, math.inf, -math.inf, -0.5, -1, True, None, "1", 2**1100, 1e308 * 10])


@st.composite
def _one_bad_field(draw: st.DrawFn) -> dict[str, Any]:
    """A reading's fields with one value (or one phase of a list) swapped for a doubtful one."""
    fields = draw(_reading_fields)
    key = draw(st.sampled_from(sorted(fields)))
    value = draw(_bad | _vocab)
    if key in ("current_a", "voltage_v"):
        phases = list(fields[key])
        phases[draw(st.integers(0, 2))] = value
        fields[key] = tuple(phases)
    else:
        fields[key] = value
    return fields


@settings(max_examples=600, deadline=None)
@given(fields=_telemetry_fields | _reading_fields | _one_bad_field())
def test_the_telemetry_round_builds_what_the_builder_builds(fields: dict[str, Any]) -> None:
    """column_telemetry_encoded (a template for the usual case) gives exactly column_telemetry()
    and encode() of it, or the same error."""
    try:
        expected = payloads.column_telemetry(**fields)
    except ValueError as exc:
        with pytest.raises(ValueError) as err:
            payloads.column_telemetry_encoded(**fields)
        assert str(err.value) == str(exc)
        return
    payload, body = payloads.column_telemetry_encoded(**fields)
    assert payload == expected
    assert body == payloads.encode(expected)


def test_the_telemetry_round_takes_the_template_for_decoded_readings(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reading's values (floats, ints) take the template: the general encode() is not called."""
    fields = _telemetry()
    fields["current_a"] = (15.9, 16.0, 0.0)
    fields["voltage_v"] = (230.1, 229.8, 231.0)
    expected = payloads.encode(payloads.column_telemetry(**fields))
    monkeypatch.setattr(payloads, "encode", None)
    _payload, body = payloads.column_telemetry_encoded(**fields)
    assert body == expected


def test_validate_rejects_unknown_fields_in_fixed_messages() -> None:
    msg = {**payloads.column_telemetry(**_telemetry()), "seq": 3, "extra": 1}
    with pytest.raises(PayloadError) as err:
        payloads.validate("column_telemetry", msg)
    assert err.value.reason is Reason.UNKNOWN_FIELD


def test_status_site_state_and_event() -> None:
    status = payloads.column_status(ts_ms=TS, column_id="c1", status="Faulted", state="E",
                                    error="CPShort", online=True)
    assert status == {"ts_ms": TS, "column_id": "c1", "status": "Faulted", "state": "E",
                      "error": "CPShort", "online": True}
    site = payloads.site_telemetry(ts_ms=TS, power_w=22_000.0, current_a=[32.0, 31.5, 32.0],
                                   limit_a=40.0, limit_source="dno", limit_valid_until_ms=TS + 1,
                                   active_sessions=2)
    payloads.validate("site_telemetry", {**site, "seq": 9})
    assert payloads.encode(payloads.gateway_state("offline", ts_ms=TS, cause="will")) == \
        b'{"state":"offline","ts_ms":1767225600000,"cause":"will"}'
    assert payloads.gateway_state("online", ts_ms=TS) == {"state": "online", "ts_ms": TS}
    with pytest.raises(ValueError):
        payloads.gateway_state("maybe", ts_ms=TS)
    ev = payloads.event("session_stopped", ts_ms=TS, column_id="c1",
                        data={"energy_wh": 5230, "duration_s": 3600, "stop_reason": "EVDisconnected"})
    assert payloads.encode(ev) == (b'{"event":"session_stopped","ts_ms":1767225600000,"column_id":"c1",'
                                   b'"energy_wh":5230,"duration_s":3600,"stop_reason":"EVDisconnected"}')
    with pytest.raises(ValueError):
        payloads.event("session_stopped", ts_ms=TS, data={"energy_wh": {"nested": 1}})
    with pytest.raises(ValueError):
        payloads.event("session_stopped", ts_ms=TS, data={"event": "fault"})
    with pytest.raises(ValueError):
        payloads.event("party", ts_ms=TS)


def test_ack() -> None:
    ok = payloads.ack(command_id="c-1", reason=Reason.OK, applied_limit_a=12.5, ts_ms=TS)
    assert payloads.encode(ok) == (b'{"id":"c-1","result":"accepted","reason":"ok",'
                                   b'"applied_limit_a":12.5,"ts_ms":1767225600000}')
    bad = payloads.ack(command_id=None, reason=Reason.BAD_SIGNATURE, applied_limit_a=None, ts_ms=TS,
                       detail="signature does not match")
    assert bad == {"id": None, "result": "rejected", "reason": "bad_signature", "applied_limit_a": None,
                   "ts_ms": TS, "detail": "signature does not match"}
    payloads.validate("ack", {**bad, "seq": 4})


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        payloads.encode({"x": math.nan})


def test_a_built_limit_command_parses_back_to_what_it_was_built_with() -> None:
    body = payloads.limit_command("cmd-1", 32.5, validity_s=600, issued_ms=TS)
    signed = sign_command(body, topics.cmd_site_limit("s1"), "k1", b"\x01" * 32)
    cmd = payloads.parse_command(signed, CommandKind.SITE_LIMIT, context=CAP)
    assert (cmd.id, cmd.issued_ms, cmd.limit_a, cmd.valid_until_ms) == ("cmd-1", TS, 32.5, TS + 600_000)
