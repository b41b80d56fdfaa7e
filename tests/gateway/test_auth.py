"""DNO command authentication, the key store, the audit log, and that no secret leaks."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest

from gateway.north import topics
from gateway.north.audit import AuditLog
from gateway.north.auth import (
    CommandAuthenticator,
    Decision,
    KeyStore,
    KeyTableError,
    canonical_message,
    sign_command,
)
from gateway.north.payloads import LimitContext, Reason, encode
from gateway.north.settings import SettingsError, parse_dno

KEY = bytes.fromhex("8f3a5c0e1d2b4a69788796a5b4c3d2e1f00112233445566778899aabbccddeef")
OTHER_KEY = bytes(range(32))
NOW = 1_767_225_600_000
SITE = "site-1"
SITE_LIMIT = topics.cmd_site_limit(SITE)


def _context(target: topics.Topic) -> LimitContext | None:
    if target.column_id is None:
        return LimitContext(capacity_a=63.0)
    return LimitContext(capacity_a=32.0) if target.column_id in ("c1", "c2") else None


def _auth(**kwargs: Any) -> CommandAuthenticator:
    clock = kwargs.pop("clock", lambda: NOW)
    return CommandAuthenticator(KeyStore({"dno-1": KEY, "dno-2": OTHER_KEY}), site_id=SITE,
                                context=_context, clock_ms=clock, **kwargs)


def _command(**changes: Any) -> dict[str, Any]:
    cmd: dict[str, Any] = {"id": "c-1", "limit_a": 16.0, "validity_s": 900, "issued_ms": NOW - 2000}
    cmd.update(changes)
    return cmd


def _signed(topic: str = SITE_LIMIT, key_id: str = "dno-1", key: bytes = KEY, **changes: Any) -> bytes:
    return encode(sign_command(_command(**changes), topic, key_id, key))


def test_canonical_message_is_the_documented_form() -> None:
    cmd = {"validity_s": 900, "limit_a": 16.0, "id": "c-1", "issued_ms": NOW, "key_id": "dno-1",
           "sig": "ignored"}
    expected = (b'evedge/v1/site-1/cmd/site/limit\n{"id":"c-1","issued_ms":1767225600000,'
                b'"key_id":"dno-1","limit_a":16,"validity_s":900}')
    assert canonical_message(SITE_LIMIT, cmd) == expected
    # what a DNO client in any language computes from that text
    signed = sign_command(cmd, SITE_LIMIT, "dno-1", KEY)
    assert signed["sig"] == hmac.new(KEY, expected, hashlib.sha256).hexdigest()
    half = canonical_message(SITE_LIMIT, {**cmd, "limit_a": 16.5})
    assert half.endswith(b'"limit_a":16.5,"validity_s":900}')


def test_a_signed_command_is_accepted() -> None:
    decision = _auth().check(SITE_LIMIT, _signed())
    assert decision.reason is Reason.OK and decision.accepted
    assert decision.command is not None
    assert (decision.command.limit_a, decision.command.valid_until_ms) == (16.0, NOW - 2000 + 900_000)
    assert (decision.command_id, decision.key_id, decision.topic) == ("c-1", "dno-1", SITE_LIMIT)
    assert decision.target == topics.parse(SITE_LIMIT)


def test_integral_floats_sign_the_same_either_way() -> None:
    # a JavaScript client signs {"limit_a":16}; Python sends 16.0: both are one command
    body = sign_command(_command(limit_a=16), SITE_LIMIT, "dno-1", KEY)
    wire = json.dumps({**body, "limit_a": 16.0}).encode()
    assert b"16.0" in wire
    assert _auth().check(SITE_LIMIT, wire).reason is Reason.OK


def _tamper(data: bytes, old: bytes, new: bytes) -> bytes:
    assert old in data
    return data.replace(old, new)


def _flip_sig(data: bytes) -> bytes:
    obj = json.loads(data)
    obj["sig"] = ("0" if obj["sig"][0] != "0" else "1") + obj["sig"][1:]
    return encode(obj)


def _without(data: bytes, *names: str) -> bytes:
    obj = json.loads(data)
    for name in names:
        obj.pop(name)
    return encode(obj)


COLUMN_C1 = topics.cmd_column_limit(SITE, "c1")
REJECTIONS: list[tuple[str, str, bytes, Reason]] = [
    ("unsigned", SITE_LIMIT, _without(_signed(), "sig", "key_id"), Reason.UNAUTHENTICATED),
    ("signature missing", SITE_LIMIT, _without(_signed(), "sig"), Reason.UNAUTHENTICATED),
    ("badly signed", SITE_LIMIT, _flip_sig(_signed()), Reason.BAD_SIGNATURE),
    ("signed with another key", SITE_LIMIT, _signed(key=OTHER_KEY), Reason.BAD_SIGNATURE),
    ("limit changed after signing", SITE_LIMIT, _tamper(_signed(), b'"limit_a":16.0', b'"limit_a":60.0'),
     Reason.BAD_SIGNATURE),
    ("moved to another column", topics.cmd_column_limit(SITE, "c2"), _signed(COLUMN_C1),
     Reason.BAD_SIGNATURE),
    ("unknown key", SITE_LIMIT, _signed(key_id="dno-9"), Reason.UNKNOWN_KEY),
    ("expired", SITE_LIMIT, _signed(issued_ms=NOW - 60_000, validity_s=30), Reason.EXPIRED),
    ("far future", SITE_LIMIT, _signed(issued_ms=NOW + 3_600_000), Reason.FUTURE),
    ("stale", SITE_LIMIT, _signed(issued_ms=NOW - 3_600_000, validity_s=86_400), Reason.STALE),
    ("above capacity", SITE_LIMIT, _signed(limit_a=64.0), Reason.OUT_OF_RANGE),
    ("negative", SITE_LIMIT, _signed(limit_a=-1.0), Reason.OUT_OF_RANGE),
    ("bool as number", SITE_LIMIT, _signed(limit_a=True), Reason.BAD_TYPE),
    ("unknown field", SITE_LIMIT, _signed(note="hi"), Reason.UNKNOWN_FIELD),
    ("no id", SITE_LIMIT, encode(sign_command({k: v for k, v in _command().items() if k != "id"},
                                              SITE_LIMIT, "dno-1", KEY)), Reason.MISSING_FIELD),
    ("id removed after signing", SITE_LIMIT, _without(_signed(), "id"), Reason.BAD_SIGNATURE),
    ("NaN", SITE_LIMIT, _tamper(_signed(), b'"limit_a":16.0', b'"limit_a":NaN'), Reason.NOT_FINITE),
    ("not JSON", SITE_LIMIT, b"limit=16", Reason.BAD_JSON),
    ("unknown column", topics.cmd_column_limit(SITE, "c9"), _signed(topics.cmd_column_limit(SITE, "c9")),
     Reason.UNKNOWN_COLUMN),
    ("other site", topics.cmd_site_limit("site-2"), _signed(topics.cmd_site_limit("site-2")),
     Reason.WRONG_SITE),
    ("not a command topic", topics.site_telemetry(SITE), _signed(topics.site_telemetry(SITE)),
     Reason.UNKNOWN_TOPIC),
    ("misspelt command topic", "evedge/v1/site-1/cmd/site/limits", _signed(), Reason.UNKNOWN_TOPIC),
    ("two ids", SITE_LIMIT, _tamper(_signed(), b'"id":"c-1"', b'"id":"c-1","id":"c-2"'), Reason.BAD_JSON),
]


@pytest.mark.parametrize(("topic", "payload", "reason"), [r[1:] for r in REJECTIONS],
                         ids=[r[0] for r in REJECTIONS])
def test_rejections_carry_their_reason(topic: str, payload: bytes, reason: Reason) -> None:
    decision = _auth().check(topic, payload)
    assert decision.reason is reason, decision.detail
    assert not decision.accepted and decision.command is None


def test_the_security_rejections_are_distinct() -> None:
    security = ["unsigned", "badly signed", "unknown key", "expired", "far future", "stale"]
    reasons = {name: reason for name, _, _, reason in REJECTIONS}
    assert len({reasons[n] for n in security}) == len(security)


def test_a_replay_is_rejected() -> None:
    auth = _auth()
    payload = _signed()
    assert auth.check(SITE_LIMIT, payload).reason is Reason.OK
    assert auth.check(SITE_LIMIT, payload).reason is Reason.REPLAYED
    # the id is per key: the same id under another key is another command
    assert auth.check(SITE_LIMIT, _signed(key_id="dno-2", key=OTHER_KEY)).reason is Reason.OK
    assert auth.check(SITE_LIMIT, _signed(id="c-2")).reason is Reason.OK


def test_a_rejected_command_does_not_burn_its_id() -> None:
    auth = _auth()
    assert auth.check(SITE_LIMIT, _flip_sig(_signed())).reason is Reason.BAD_SIGNATURE
    assert auth.check(SITE_LIMIT, _signed(limit_a=99.0)).reason is Reason.OUT_OF_RANGE
    assert auth.check(SITE_LIMIT, _signed()).reason is Reason.OK


def test_replay_memory_is_bounded_and_forgets_after_the_window() -> None:
    now = [NOW]
    auth = _auth(replay_capacity=3, window_s=60, clock=lambda: now[0])
    for n in range(3):
        assert auth.check(SITE_LIMIT, _signed(id=f"c-{n}", issued_ms=now[0])).reason is Reason.OK
    assert auth.check(SITE_LIMIT, _signed(id="c-3", issued_ms=now[0])).reason is Reason.BUSY
    replay = _signed(id="c-0", issued_ms=now[0])
    now[0] += 60_000  # at the window's edge the command is still timely, so still remembered
    assert auth.check(SITE_LIMIT, replay).reason is Reason.REPLAYED
    now[0] += 1  # past it: forgotten, and the timestamp check takes over
    assert auth.check(SITE_LIMIT, replay).reason is Reason.STALE
    assert auth.check(SITE_LIMIT, _signed(id="c-3", issued_ms=now[0])).reason is Reason.OK


def test_not_before_closes_the_replay_gap_across_a_restart() -> None:
    payload = _signed(issued_ms=NOW - 5000)
    assert _auth().check(SITE_LIMIT, payload).reason is Reason.OK
    restarted = _auth(not_before_ms=NOW - 1000)
    assert restarted.check(SITE_LIMIT, payload).reason is Reason.STALE


def test_signature_case_and_garbage() -> None:
    obj = json.loads(_signed())
    assert _auth().check(SITE_LIMIT, encode({**obj, "sig": obj["sig"].upper()})).reason is Reason.OK
    for sig in ("", "zz" * 32, obj["sig"][:-2], "é" * 64, obj["sig"] + "00"):
        assert _auth().check(SITE_LIMIT, encode({**obj, "sig": sig})).reason is Reason.BAD_SIGNATURE
    assert _auth().check(SITE_LIMIT, encode({**obj, "sig": 5})).reason is Reason.UNAUTHENTICATED


def test_failsafe_and_config_commands() -> None:
    failsafe = topics.cmd_site_failsafe(SITE)
    d = _auth().check(failsafe, _signed(failsafe, limit_a=10.0, duration_s=7200))
    assert d.reason is Reason.OK and d.command is not None and d.command.duration_s == 7200
    config = topics.cmd_config(SITE)
    body = {"id": "cfg-1", "config": {"random_delay_max_s": 300}, "validity_s": 60, "issued_ms": NOW}
    d = _auth().check(config, encode(sign_command(body, config, "dno-1", KEY)))
    assert d.reason is Reason.OK and d.command is not None
    assert d.command.config == {"random_delay_max_s": 300}


# -- the key store -----------------------------------------------------------------------

def test_key_store_formats_and_redaction() -> None:
    store = KeyStore.parse(f"# DNO keys\ndno-1:{KEY.hex()}\n\n dno-2 : {OTHER_KEY.hex()} , dno-3:{'ab' * 16}")
    assert store.key_ids == ("dno-1", "dno-2", "dno-3")
    assert store.get("dno-1") == KEY and "dno-2" in store and len(store) == 3
    for text in (repr(store), str(store), f"{store}", repr(_auth())):
        assert KEY.hex() not in text and "redacted" in text
    with pytest.raises(TypeError):
        pickle.dumps(store)


@pytest.mark.parametrize("text", [
    "", "# nothing\n", f"{KEY.hex()}", f"dno-1:{KEY.hex()}zz", f"dno 1:{KEY.hex()}", "dno-1:abcd",
    f"dno-1:{KEY.hex()}\ndno-1:{KEY.hex()}",
])
def test_bad_key_tables_fail_without_showing_the_key(text: str) -> None:
    with pytest.raises(KeyTableError) as err:
        KeyStore.parse(text)
    assert KEY.hex() not in str(err.value)
    assert KEY.hex()[:16] not in str(err.value)


def test_key_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"dno-1:{KEY.hex()}\n")
    path.chmod(0o644)
    with pytest.raises(KeyTableError, match="chmod 600"):
        KeyStore.from_file(path)
    path.chmod(0o600)
    assert KeyStore.from_file(path).get("dno-1") == KEY


def test_dno_settings_load_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"dno-1:{KEY.hex()}\n")
    keys.chmod(0o600)
    settings = parse_dno({"keys_file": "keys", "audit_path": "audit.jsonl", "window_s": 120},
                         base_dir=tmp_path)
    assert settings.audit_path == tmp_path / "audit.jsonl" and settings.window_s == 120
    assert settings.load_keys().get("dno-1") == KEY
    assert KEY.hex() not in repr(settings)
    from_env = parse_dno({"keys_env": "DNO_KEYS", "audit_path": "/a"})
    assert from_env.load_keys({"DNO_KEYS": f"dno-1:{KEY.hex()}"}).key_ids == ("dno-1",)
    with pytest.raises(SettingsError) as err:
        from_env.load_keys({})
    assert err.value.key == "dno.keys_env"


@pytest.mark.parametrize(("table", "key"), [
    ({"audit_path": "a"}, "dno.keys_file"),
    ({"keys_env": "X", "keys_file": "keys", "audit_path": "a"}, "dno.keys_file"),
    ({"keys_env": "X"}, "dno.audit_path"),
    ({"keys_env": "X", "audit_path": "a", "window_s": 0}, "dno.window_s"),
    ({"keys_env": "X", "audit_path": "a", "window_s": True}, "dno.window_s"),
    ({"keys_env": "X", "audit_path": "a", "keys": "secret"}, "dno.keys"),
    ({"keys_env": "X", "audit_path": "a", "windw_s": 5}, "dno.windw_s"),
    ({"keys_file": "missing", "audit_path": "a"}, "dno.keys_file"),
])
def test_dno_settings_errors_name_the_key(tmp_path: Path, table: dict[str, Any], key: str) -> None:
    (tmp_path / "keys").write_text("x")
    with pytest.raises(SettingsError) as err:
        parse_dno(table, base_dir=tmp_path)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ")


def test_unknown_settings_keys_get_a_suggestion() -> None:
    with pytest.raises(SettingsError, match="did you mean 'window_s'"):
        parse_dno({"keys_env": "X", "audit_path": "a", "windw_s": 5})


# -- the audit log -----------------------------------------------------------------------

def test_audit_lines(tmp_path: Path) -> None:
    auth = _auth()
    with AuditLog(tmp_path / "audit.jsonl", clock_ms=lambda: NOW) as audit:
        ok = auth.check(SITE_LIMIT, _signed())
        audit.record(ok, applied_limit_a=12.0)
        audit.record(auth.check(SITE_LIMIT, _flip_sig(_signed(id="c-2"))))
    lines = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert lines[0] == {"ts_ms": NOW, "decision": "accepted", "reason": "ok", "id": "c-1",
                        "topic": SITE_LIMIT, "key_id": "dno-1", "kind": "site_limit",
                        "issued_ms": NOW - 2000, "valid_until_ms": NOW - 2000 + 900_000,
                        "limit_a": 16.0, "applied_limit_a": 12.0}
    assert lines[1] == {"ts_ms": NOW, "decision": "rejected", "reason": "bad_signature", "id": "c-2",
                        "topic": SITE_LIMIT, "key_id": "dno-1", "detail": "signature does not match"}
    assert (tmp_path / "audit.jsonl").stat().st_mode & 0o077 == 0


def test_audit_survives_a_hostile_topic(tmp_path: Path) -> None:
    decision = _auth().check("evedge/v1/site-1/cmd/\n{\"decision\":\"accepted\"}", b"{}")
    with AuditLog(tmp_path / "audit.jsonl") as audit:
        audit.record(decision)
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["decision"] == "rejected"


def test_audit_rotates_by_size(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    decision = Decision(Reason.BAD_JSON, SITE_LIMIT, detail="x" * 100)
    with AuditLog(path, max_bytes=1024, backups=2, fsync=False) as audit:
        for n in range(40):
            audit.record(decision, ts_ms=n)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    stamps: list[int] = []
    for name in ("audit.jsonl.2", "audit.jsonl.1", "audit.jsonl"):
        text = (tmp_path / name).read_text()
        assert len(text) <= 1024
        stamps += [json.loads(line)["ts_ms"] for line in text.splitlines()]
    assert stamps == list(range(40 - len(stamps), 40))  # newest kept, in order, oldest rotated away
    with AuditLog(path, max_bytes=1024, backups=2, fsync=False) as audit:  # reopen appends
        audit.record(decision, ts_ms=40)
    assert json.loads(path.read_text().splitlines()[-1])["ts_ms"] == 40


def test_no_key_or_signature_in_logs_or_audit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    auth = _auth()
    sent = [_signed(), _signed(), _flip_sig(_signed(id="c-2")), _signed(key=OTHER_KEY, id="c-3"),
            _signed(limit_a=99.0, id="c-4"), _signed(key_id="dno-9", id="c-5"),
            _signed(issued_ms=NOW + 3_600_000, id="c-6")]
    with AuditLog(tmp_path / "audit.jsonl") as audit:
        for payload in sent:
            audit.record(auth.check(SITE_LIMIT, payload))
    audit_text = (tmp_path / "audit.jsonl").read_text()
    assert len(audit_text.splitlines()) == len(sent)
    assert "dno command" in caplog.text  # the decisions were logged...
    for secret in (KEY.hex(), OTHER_KEY.hex(), KEY.hex().upper()):
        assert secret not in caplog.text and secret not in audit_text
    for payload in sent:  # ...and no signature, which would let anyone replay a command
        sig = json.loads(payload)["sig"]
        assert sig not in caplog.text and sig not in audit_text
