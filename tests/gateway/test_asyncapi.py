"""docs/asyncapi.yaml and docs/mqtt-api.md against the code and against real traffic.

- Every topic kind of topics.py has a channel at the same address, with the same retain
  flag and direction; every payload type of payloads.py has a message and a schema whose
  fields, required fields, vocabularies and ranges are the code's.
- The schemas and payloads.validate / parse_command agree on valid messages and on a table
  of broken ones, so the document is neither looser nor stricter than the gateway.
- Real messages, published through the gateway's Outbox and Publisher to the shipped control
  room broker (TLS, client certificates, ACL) and sent by a DNO client, validate.
- The examples in both documents validate, and the copy-paste examples in mqtt-api.md
  (Python and mosquitto_rr) really send a limit that the gateway accepts and acks.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from firmware.status_names import CP_NAMES, ERROR_NAMES, LIMIT_SOURCE_NAMES, STATUS_NAMES
from gateway.north import payloads, topics
from gateway.north.auth import KeyStore, sign_command
from gateway.north.outbox import MessageKind, Outbox
from gateway.north.payloads import CommandKind, PayloadError, Reason, encode, utc_ms
from gateway.north.settings import TlsSettings
from gateway.north.topics import TopicKind
from tests.gateway.api_asyncapi import AsyncApi, walk_refs
from tests.gateway.api_brokers import RevocablePki, TemplateBroker, control_room_broker, gateway_user
from tests.gateway.api_cost import cost_table, size_line
from tests.gateway.api_gateway import GatewayNorth, mqtt_settings
from tests.gateway.api_mqtt import Peer, Tls, wait_until

REPO = Path(__file__).resolve().parents[2]
MQTT_API = REPO / "docs" / "mqtt-api.md"
DEPLOYMENT = REPO / "docs" / "deployment.md"
TS = 1_767_225_600_000
EXAMPLE_KEY_ID = "dno-1"
EXAMPLE_KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
EXAMPLE_PARAMS = {"siteId": "site-1", "columnId": "c01", "replyId": "ops-1"}
SITE = "site-1"
DNO = "dno-ops"


@pytest.fixture(scope="module")
def api() -> AsyncApi:
    return AsyncApi()


# -- the document and the code -----------------------------------------------------------

def test_every_reference_resolves_and_every_channel_has_an_operation(api: AsyncApi) -> None:
    assert api.doc["asyncapi"] == "3.0.0"
    for ref in set(walk_refs(api.doc)):
        node: Any = api.doc
        for part in ref[2:].split("/"):
            assert isinstance(node, dict) and part in node, f"dangling $ref {ref}"
            node = node[part]
    for name in api.channels:
        assert api.operations_on(name), f"channel {name} has no operation"
    for name, channel in api.channels.items():
        used = set(re.findall(r"\{([A-Za-z]+)\}", channel.address))
        assert used == set(channel.spec.get("parameters", {})), f"{name}: parameters"


def test_every_topic_kind_has_its_channel(api: AsyncApi) -> None:
    kinds = {c.spec["x-topic-kind"]: c for c in api.channels.values() if "x-topic-kind" in c.spec}
    assert set(kinds) == {str(k) for k in TopicKind}
    for kind in TopicKind:
        channel = kinds[str(kind)]
        column = "c01" if "{columnId}" in channel.address else None
        topic = channel.fill(siteId=SITE, columnId="c01")
        assert topic == topics.build(kind, SITE, column)
        assert topics.parse(topic).kind is kind
        (operation,) = api.operations_on(channel.name)
        receives = kind in topics.COMMAND_KINDS
        assert operation["action"] == ("receive" if receives else "send"), channel.name
        binding = operation["bindings"]["mqtt"]
        assert (binding["qos"], binding["retain"]) == (1, kind in topics.RETAINED), channel.name
    # The channels not in topics.py: the response-topic convention and the bridge's notification.
    others = {c.name for c in api.channels.values() if "x-topic-kind" not in c.spec}
    assert others == {"ackReply", "bridgeState"}
    reply = api.channels["ackReply"].fill(**EXAMPLE_PARAMS)
    assert topics.valid_response_topic(reply) and reply.startswith(topics.ack(SITE) + "/")


def test_every_payload_type_has_a_message(api: AsyncApi) -> None:
    types = {m["x-message-type"] for m in api.doc["components"]["messages"].values() if "x-message-type" in m}
    assert types == set(payloads.SPECS) | {"event"}
    kinds = {m["x-command-kind"] for m in api.doc["components"]["messages"].values() if "x-command-kind" in m}
    assert kinds == {str(k) for k in CommandKind}
    for topic_kind, command_kind in topics.COMMAND_KINDS.items():
        channel = next(c for c in api.channels.values() if c.spec.get("x-topic-kind") == str(topic_kind))
        assert [m.get("x-command-kind") for m in channel.messages.values()] == [str(command_kind)]
    for name in ("siteEvents", "columnEvents"):
        assert [m["x-message-type"] for m in api.channels[name].messages.values()] == ["event"]


def _schema_of(api: AsyncApi, key: str, value: str) -> dict[str, Any]:
    ref = api.payload_ref(api.message_by(key, value))
    return api.schema(ref.rsplit("/", 1)[1])


def test_field_tables_are_the_codes(api: AsyncApi) -> None:
    for message_type, spec in payloads.SPECS.items():
        schema = _schema_of(api, "x-message-type", message_type)
        assert set(schema["properties"]) == set(spec), message_type
        assert set(schema["required"]) == {n for n, f in spec.items() if f.required}, message_type
        assert schema["additionalProperties"] is False, message_type
    event = _schema_of(api, "x-message-type", "event")
    assert set(event["properties"]) == set(payloads.EVENT_BASE)
    assert set(event["required"]) == {n for n, f in payloads.EVENT_BASE.items() if f.required}
    allowed = payloads._ALLOWED  # the command field table (private: the schema mirrors it)
    for kind in CommandKind:
        schema = _schema_of(api, "x-command-kind", str(kind))
        assert set(schema["properties"]) == set(allowed[kind]), kind
        assert schema["additionalProperties"] is False
    config = _schema_of(api, "x-command-kind", "config")["properties"]["config"]["properties"]
    assert {k: (v["minimum"], v["maximum"]) for k, v in config.items()} == payloads.CONFIG_FIELDS
    duration = _schema_of(api, "x-command-kind", "site_failsafe")["properties"]["duration_s"]
    assert (duration["minimum"], duration["maximum"]) == payloads.FAILSAFE_DURATION_S
    assert api.schema("ValiditySeconds")["maximum"] == payloads.MAX_VALIDITY_S
    for name in ("Ident", "CommandId", "KeyId"):
        assert api.schema(name)["pattern"] == f"^{payloads.ID_PATTERN.pattern}$"


@pytest.mark.parametrize(("schema", "vocabulary"), [
    ("CpState", CP_NAMES), ("ColumnStatusName", STATUS_NAMES), ("ErrorCode", ERROR_NAMES),
    ("ColumnLimitSource", LIMIT_SOURCE_NAMES), ("SiteLimitSource", payloads.SITE_LIMIT_SOURCES),
    ("GatewayStateName", payloads.GATEWAY_STATES), ("EventName", payloads.EVENT_NAMES),
    ("AckResult", payloads.ACK_RESULTS), ("Reason", payloads.REASONS),
])
def test_vocabularies_are_the_codes(api: AsyncApi, schema: str, vocabulary: tuple[str, ...]) -> None:
    assert api.schema(schema)["enum"] == list(vocabulary)


# -- examples ------------------------------------------------------------------------------

def _check_command_example(api: AsyncApi, channel_name: str, payload: dict[str, Any]) -> None:
    """Valid for the schema, parsed by the gateway, and signed with the documented example key."""
    channel = api.channels[channel_name]
    topic = channel.fill(**EXAMPLE_PARAMS)
    api.validate_message(topic, payload)
    kind = topics.parse(topic).command_kind
    assert kind is not None
    payloads.parse_command(payload, kind)
    assert sign_command(payload, topic, payload["key_id"], EXAMPLE_KEY)["sig"] == payload["sig"], topic


def test_asyncapi_examples_validate(api: AsyncApi) -> None:
    checked = 0
    for channel in api.channels.values():
        for message in channel.messages.values():
            for example in message.get("examples", []):
                payload = example["payload"]
                topic = channel.fill(**EXAMPLE_PARAMS)
                if "x-command-kind" in message:
                    _check_command_example(api, channel.name, payload)
                else:
                    api.validate_message(topic, payload)
                    if "x-message-type" in message:
                        payloads.validate(message["x-message-type"], payload)
                checked += 1
    assert checked >= 12


def _doc_blocks(path: Path, marker: str) -> list[tuple[str, str]]:
    """(marker value, code) for every fenced block right after `<!-- marker: value -->`."""
    pattern = re.compile(r"<!-- %s: ([^ ]+) -->\n```[a-z]*\n(.*?)\n```" % marker, re.S)
    return pattern.findall(path.read_text())


def test_mqtt_api_examples_validate(api: AsyncApi) -> None:
    messages = _doc_blocks(MQTT_API, "message")
    commands = _doc_blocks(MQTT_API, "command")
    assert len(messages) >= 9 and len(commands) == len(CommandKind)
    for channel_name, block in messages:
        channel = api.channels[channel_name]
        payload = json.loads(block)
        api.validate_message(channel.fill(**EXAMPLE_PARAMS), payload)
        message_type = next(iter(channel.messages.values())).get("x-message-type")
        if message_type:
            payloads.validate(message_type, payload)
    assert {c for c, _ in commands} == {"cmdSiteLimit", "cmdSiteFailsafe", "cmdColumnLimit", "cmdConfig"}
    for channel_name, block in commands:
        _check_command_example(api, channel_name, json.loads(block))


def test_mqtt_api_explains_every_reason_and_event() -> None:
    text = MQTT_API.read_text()
    for reason in Reason:
        assert re.search(rf"^\| `{reason.value}` \|", text, re.M), f"reason {reason.value} not in the table"
    for name in payloads.EVENT_NAMES:
        assert f"`{name}`" in text, f"event {name} not described"
    # The worked signing example is the real canonical message and signature.
    cmd = json.loads(_doc_blocks(MQTT_API, "command")[0][1])
    from gateway.north.auth import canonical_message
    canonical = canonical_message(topics.cmd_site_limit("site-1"), cmd).decode()
    assert canonical in text
    assert cmd["sig"] in text


def test_deployment_quotes_the_cost_of_the_topic_tree() -> None:
    text = DEPLOYMENT.read_text()
    hint = "update it from: python -m tests.gateway.api_cost"
    assert f"<!-- cost-table -->\n{cost_table()}\n<!-- /cost-table -->" in text, hint
    assert f"<!-- cost-size -->\n{size_line()}\n<!-- /cost-size -->" in text, hint


def test_the_docs_name_tests_and_files_that_exist() -> None:
    sources = "".join(p.read_text() for p in (REPO / "tests" / "gateway").glob("test_*.py"))
    for doc in (MQTT_API, DEPLOYMENT):
        text = doc.read_text()
        for name in set(re.findall(r"`(test_[a-z0-9_]+)`", text)):
            assert f"def {name}(" in sources, f"{doc.name} names a test that does not exist: {name}"
        # files (with an extension) and folders (trailing /); `gateway/state` is a topic
        paths = re.findall(r"`((?:deploy|docs|gateway|tests)/[A-Za-z0-9_./-]*(?:\.[a-z]+|/))`", text)
        for path in set(paths):
            assert (REPO / path.rstrip("/")).exists(), f"{doc.name} names a missing path: {path}"


# -- the schema is exactly as strict as the gateway ---------------------------------------

def _messages() -> list[tuple[str, str, dict[str, Any]]]:
    """(channel, message type, a stamped message built with the payloads.py builders)."""
    def stamped(obj: dict[str, Any], seq: int = 7) -> dict[str, Any]:
        return {**obj, "seq": seq}
    return [
        ("gatewayState", "gateway_state", payloads.gateway_state("online", ts_ms=TS)),
        ("gatewayState", "gateway_state", payloads.gateway_state("offline", ts_ms=TS, cause="will")),
        ("columnStatus", "column_status", stamped(payloads.column_status(
            ts_ms=TS, column_id="c01", status="SuspendedEV", state="B", error="PowerMeterFailure",
            online=False))),
        ("columnTelemetry", "column_telemetry", stamped(payloads.column_telemetry(
            ts_ms=TS, column_id="c01", current_a=[6.1, 0, 0], voltage_v=[230, 0, 0], power_w=1403.0,
            energy_wh=12.5, offered_a=6.0, applied_limit_a=None, limit_source="failsafe", state="C",
            status="Charging"))),
        ("siteTelemetry", "site_telemetry", stamped(payloads.site_telemetry(
            ts_ms=TS, power_w=-150.0, current_a=[1.0, 2.0, 3.0], limit_a=100.0, limit_source="connection",
            limit_valid_until_ms=None, active_sessions=0))),
        ("siteEvents", "event", stamped(payloads.event("gateway_started", ts_ms=TS, data={"columns": 6}))),
        ("columnEvents", "event", stamped(payloads.event(
            "limit_violation", ts_ms=TS, column_id="c01",
            data={"kind": "column_overdraw", "phase": "L1", "measured_a": 18.2, "allowed_a": 16.0,
                  "since_ms": TS - 12_000, "acknowledged": False, "note": None}))),
        ("ack", "ack", stamped(payloads.ack(command_id="c-1", reason=Reason.OK, applied_limit_a=32.0,
                                            ts_ms=TS))),
        ("ackReply", "ack", stamped(payloads.ack(command_id=None, reason=Reason.BAD_JSON,
                                                 applied_limit_a=None, ts_ms=TS, detail="not JSON"))),
    ]


_BAD_VALUES: list[Any] = ["x", True, None, -1, 1.5, 0, [1, 2, 3], [1, 2], {}, "Charging", "online",
                          "bad id!", "y" * 32, "y" * 33, "y" * 64, "y" * 65, "y" * 256, "y" * 257]


def _verdict_code(message_type: str, obj: dict[str, Any]) -> bool:
    try:
        payloads.validate(message_type, obj)
    except PayloadError:
        return False
    return True


def test_schema_and_validate_agree_on_broken_messages(api: AsyncApi) -> None:
    compared = 0
    for channel_name, message_type, good in _messages():
        topic = api.channels[channel_name].fill(**EXAMPLE_PARAMS)
        ref = api.payload_ref(next(iter(api.channels[channel_name].messages.values())))
        assert not api.errors(ref, good), f"{topic}: a builder's message does not validate: {good}"
        assert _verdict_code(message_type, good)
        variants: list[tuple[str, dict[str, Any]]] = []
        for field in good:
            dropped = {k: v for k, v in good.items() if k != field}
            variants.append((f"without {field}", dropped))
            for value in _BAD_VALUES:
                if (message_type, field) == ("ack", "result"):
                    continue  # the schema also ties result to reason (the builder does): checked below
                variants.append((f"{field}={value!r}"[:60], {**good, field: value}))
        variants += [("extra scalar", {**good, "extra_wh": 1.0}), ("extra list", {**good, "extra_a": [1]})]
        for label, variant in variants:
            schema_ok = not api.errors(ref, variant)
            assert schema_ok == _verdict_code(message_type, variant), \
                f"{topic} {label}: schema says {schema_ok}"
            compared += 1
    assert compared > 500
    ack = _messages()[7][2]
    assert api.errors("#/components/schemas/Ack", {**ack, "result": "rejected"})
    assert not api.errors("#/components/schemas/Ack", {**ack, "reason": "stale", "result": "rejected"})


def _commands() -> list[tuple[str, CommandKind, dict[str, Any]]]:
    def signed(topic: str, body: dict[str, Any]) -> dict[str, Any]:
        return sign_command(body, topic, EXAMPLE_KEY_ID, EXAMPLE_KEY)
    base = {"id": "c-1", "issued_ms": TS}
    return [
        ("cmdSiteLimit", CommandKind.SITE_LIMIT,
         signed(topics.cmd_site_limit(SITE), {**base, "validity_s": 900, "limit_a": 40})),
        ("cmdColumnLimit", CommandKind.COLUMN_LIMIT,
         signed(topics.cmd_column_limit(SITE, "c01"),
                {**base, "valid_until_ms": TS + 60_000, "limit_kw": 7.4})),
        ("cmdSiteFailsafe", CommandKind.SITE_FAILSAFE,
         signed(topics.cmd_site_failsafe(SITE), {**base, "validity_s": 3600.5, "limit_a": 25.5,
                                                 "duration_s": 7200})),
        ("cmdConfig", CommandKind.CONFIG,
         signed(topics.cmd_config(SITE), {**base, "validity_s": 60,
                                          "config": {"failsafe_duration_s": 600}})),
    ]


_COMMAND_EDITS: list[tuple[str, Any]] = [
    ("extra", 1), ("limit_a", -1), ("limit_a", "40"), ("limit_a", True), ("limit_a", None),
    ("limit_kw", 11), ("limit_kw", -0.5), ("valid_until_ms", TS + 1000), ("validity_s", 0),
    ("validity_s", 86_401), ("validity_s", "900"), ("id", "has space"), ("id", ""), ("id", "x" * 65),
    ("issued_ms", 0), ("issued_ms", 1.5), ("issued_ms", "now"), ("key_id", 7), ("key_id", "bad key"),
    ("sig", 7), ("sig", "abc"), ("duration_s", 59), ("duration_s", 86_401), ("duration_s", 7200.5),
    ("config", {}), ("config", {"random_delay_max_s": 1801}), ("config", {"bogus": 1}), ("config", [1]),
    ("config", {"telemetry_interval_s": 0}), ("config", {"telemetry_interval_s": 1.5}),
    ("config", {"random_delay_max_s": 0, "telemetry_interval_s": 3600}),
]


def _gateway_could_accept(kind: CommandKind, obj: dict[str, Any]) -> bool:
    """parse_command's verdict plus the shape auth.py needs of key_id (a known key id is an
    id) and sig (64 hex digits): whether any gateway could accept this body."""
    try:
        payloads.parse_command(obj, kind)
    except PayloadError:
        return False
    return (payloads.ID_PATTERN.fullmatch(obj["key_id"]) is not None
            and re.fullmatch(r"[0-9A-Fa-f]{64}", obj["sig"]) is not None)


def test_schema_and_the_command_parser_agree(api: AsyncApi) -> None:
    compared = 0
    for channel_name, kind, good in _commands():
        ref = api.payload_ref(next(iter(api.channels[channel_name].messages.values())))
        assert not api.errors(ref, good) and _gateway_could_accept(kind, good)
        variants = [{k: v for k, v in good.items() if k != field} for field in good]
        variants += [{**good, field: value} for field, value in _COMMAND_EDITS]
        for variant in variants:
            schema_ok = not api.errors(ref, variant)
            assert schema_ok == _gateway_could_accept(kind, variant), \
                f"{kind}: {variant}: schema says {schema_ok}"
            compared += 1
    assert compared > 100


# -- real traffic ---------------------------------------------------------------------------

@dataclass
class Direct:
    """The shipped control room broker, a gateway connected to it directly with its site
    certificate (the real Outbox + Publisher), and a DNO client."""

    room: TemplateBroker
    pki: RevocablePki
    gateway: GatewayNorth
    hmac_key: bytes

    @property
    def port(self) -> int:
        return self.room.port("template")

    def tls(self, name: str) -> Tls:
        cert = self.pki.clients[name]
        return Tls(self.pki.cafile, cert.certfile, cert.keyfile)


@pytest.fixture
def direct(tmp_path: Path) -> Iterator[Direct]:
    pki = RevocablePki(tmp_path / "pki")
    for name in (gateway_user(SITE), DNO):
        pki.issue(name)
    hmac_key = os.urandom(32)
    with control_room_broker(tmp_path / "room", pki, sites=[SITE], dno_users=[DNO]) as room:
        cert = pki.clients[gateway_user(SITE)]
        settings = mqtt_settings(tmp_path / "gateway", port=room.port("template"),
                                 client_id=gateway_user(SITE),
                                 tls=TlsSettings(pki.cafile, cert.certfile, cert.keyfile))
        gateway = GatewayNorth(settings, site_id=SITE, keys=KeyStore({EXAMPLE_KEY_ID: hmac_key}))
        with gateway:
            wait_until(lambda: gateway.connected, what="the gateway on the control room broker")
            yield Direct(room, pki, gateway, hmac_key)


def _send_command(api: AsyncApi, dno: Peer, topic: str, body: dict[str, Any] | bytes, *,
                  key: bytes, reply: bool) -> bool:
    """Sign (when body is a dict) and publish; returns whether the schema accepts the payload."""
    if isinstance(body, dict):
        body = sign_command(body, topic, EXAMPLE_KEY_ID, key)
        raw = encode(body)
    else:
        raw = body
    try:
        api.validate_message(topic, raw)
        schema_ok = True
    except (AssertionError, ValueError):
        schema_ok = False
    kwargs: dict[str, Any] = {}
    if reply:
        kwargs = {"response_topic": f"{topics.ack(SITE)}/{DNO}", "correlation_data": topic.encode()[-16:]}
    assert dno.publish(topic, raw, **kwargs) == 0
    return schema_ok


def test_real_messages_validate_against_the_document(api: AsyncApi, direct: Direct) -> None:
    gw = direct.gateway
    dno = Peer.connect(direct.port, tls=direct.tls(DNO))
    try:
        dno.subscribe(["evedge/v1/+/#"])
        dno.wait_for(lambda m: m.topic == topics.gateway_state(SITE), what="the birth")
        published = [
            gw.publish(topics.site_telemetry(SITE), payloads.site_telemetry(
                ts_ms=utc_ms(), power_w=22_080.0, current_a=[32.0, 32.0, 32.0], limit_a=63.0,
                limit_source="connection", limit_valid_until_ms=None, active_sessions=2)),
            gw.publish(topics.column_telemetry(SITE, "c01"), payloads.column_telemetry(
                ts_ms=utc_ms(), column_id="c01", current_a=[15.9, 16.0, 15.8],
                voltage_v=[230.0, 229.5, 231.2], power_w=11_000.0, energy_wh=4521.5, offered_a=16.0,
                applied_limit_a=16.0, limit_source="gateway", state="C", status="Charging")),
            gw.publish(topics.column_status(SITE, "c01"), payloads.column_status(
                ts_ms=utc_ms(), column_id="c01", status="Charging", state="C")),
            gw.publish(topics.site_events(SITE), payloads.event("gateway_started", ts_ms=utc_ms(),
                                                               data={"columns": 2})),
            gw.publish(topics.column_events(SITE, "c01"), payloads.event(
                "session_started", ts_ms=utc_ms(), column_id="c01",
                data={"session_id": 3, "meter_start_wh": 4500.0, "resumed": False})),
        ]
        now = utc_ms()
        sent: list[tuple[str, bool]] = []
        for reply in (True, False):
            tag = "r" if reply else "n"
            good = [
                (topics.cmd_site_limit(SITE), {"id": f"s-{tag}", "issued_ms": now, "validity_s": 600,
                                               "limit_a": 40}),
                (topics.cmd_column_limit(SITE, "c01"), {"id": f"c-{tag}", "issued_ms": now,
                                                        "valid_until_ms": now + 60_000, "limit_kw": 7.4}),
                (topics.cmd_site_failsafe(SITE), {"id": f"f-{tag}", "issued_ms": now, "validity_s": 3600,
                                                  "limit_a": 25, "duration_s": 7200}),
                (topics.cmd_config(SITE), {"id": f"g-{tag}", "issued_ms": now, "validity_s": 60,
                                           "config": {"telemetry_interval_s": 5}}),
            ]
            for topic, body in good:
                assert _send_command(api, dno, topic, body, key=direct.hmac_key, reply=reply)
                sent.append((topic, True))
        bad: list[tuple[str, dict[str, Any] | bytes]] = [
            (topics.cmd_site_limit(SITE), {"id": "b-1", "issued_ms": now, "validity_s": 60, "limit_a": 40,
                                           "extra": 1}),
            (topics.cmd_site_limit(SITE), {"id": "b-2", "issued_ms": now, "validity_s": 60}),
            (topics.cmd_site_limit(SITE), b'{"id": "b-3", "limit_a": NaN}'),
            (topics.cmd_site_limit(SITE), b"not json"),
            (topics.cmd_site_limit(SITE), {"id": "b-5", "issued_ms": now, "validity_s": 60, "limit_a": 40,
                                           "limit_kw": 9}),
        ]
        for topic, body in bad:
            assert not _send_command(api, dno, topic, body, key=direct.hmac_key, reply=False)
        # Valid shape, but wrong key, and a misspelt command topic: rejected by the gateway.
        assert _send_command(api, dno, topics.cmd_site_limit(SITE), {"id": "b-6", "issued_ms": now,
                             "validity_s": 60, "limit_a": 40}, key=os.urandom(32), reply=False)
        assert dno.publish(f"evedge/v1/{SITE}/cmd/site/limits", b"{}") == 0
        total = len(sent) + len(bad) + 2
        wait_until(lambda: len(gw.decisions) == total, what="every command decided")
        dno.wait_for(lambda m: m.topic.startswith(topics.ack(SITE)), count=total, what="every ack")
        reasons = {d.command_id or d.topic: d.reason for d in gw.decisions}
        assert [reasons[f"{k}-{t}"] for t in "rn" for k in "scfg"] == [Reason.OK] * 8
        assert [reasons[f"b-{n}"] for n in (1, 2, 5, 6)] == [Reason.UNKNOWN_FIELD, Reason.MISSING_FIELD,
                                                               Reason.BAD_FIELD, Reason.BAD_SIGNATURE]
        gw.publish(topics.site_telemetry(SITE), payloads.site_telemetry(
            ts_ms=utc_ms(), power_w=0.0, current_a=[0, 0, 0], limit_a=40.0, limit_source="dno",
            limit_valid_until_ms=now + 600_000, active_sessions=0))
        wait_until(lambda: len(dno.on(topics.site_telemetry(SITE))) == 2, what="the last telemetry")
    finally:
        dno.close()
    direct.gateway.stop()  # clean stop: gateway/state offline, cause shutdown

    for message in dno.received:
        api.validate_message(message.topic, message.payload)
    seen_channels = {api.channel_for(m.topic).name for m in dno.received}
    assert seen_channels == {"gatewayState", "siteTelemetry", "columnTelemetry", "columnStatus", "siteEvents",
                             "columnEvents", "ack", "ackReply"}
    received_seqs = {json.loads(m.payload).get("seq") for m in dno.received}
    assert set(published) <= received_seqs
    replies = dno.matching(lambda m: m.topic == f"{topics.ack(SITE)}/{DNO}")
    assert len(replies) == 4 and all(m.correlation_data for m in replies)
    for m in replies:
        assert json.loads(m.payload)["result"] == "accepted"
        assert m.correlation_data in {t.encode()[-16:] for t, _ in sent}

    # Retained: exactly the channels whose operation says retain (a late subscriber's view).
    late = Peer.connect(direct.port, tls=direct.tls(DNO))
    try:
        late.subscribe(["evedge/v1/+/#"])
        late.wait_for(lambda m: True, count=2, what="the retained messages")
        wait_until(lambda: len(late.received) >= 2)
        retained = {api.channel_for(m.topic).name: json.loads(m.payload) for m in late.received if m.retain}
        assert set(retained) == {"gatewayState", "columnStatus"}
        assert retained["gatewayState"] == {"state": "offline", "ts_ms": retained["gatewayState"]["ts_ms"],
                                            "cause": "shutdown"}
    finally:
        late.close()


def test_the_will_validates(api: AsyncApi, direct: Direct) -> None:
    dno = Peer.connect(direct.port, tls=direct.tls(DNO))
    try:
        dno.subscribe([topics.gateway_state(SITE)])
        dno.wait_for(lambda m: json.loads(m.payload)["state"] == "online", what="the birth")
        # Another connection with the site's certificate takes the session over: the broker
        # drops the gateway's connection without a goodbye and publishes its will.
        intruder = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="x", protocol=mqtt.MQTTv5)
        cert = direct.pki.clients[gateway_user(SITE)]
        intruder.tls_set(ca_certs=str(direct.pki.cafile), certfile=str(cert.certfile),
                         keyfile=str(cert.keyfile))
        intruder.connect("127.0.0.1", direct.port)
        intruder.loop(timeout=1.0)
        intruder.disconnect()
        (will,) = dno.wait_for(lambda m: json.loads(m.payload).get("cause") == "will", what="the will")
        api.validate_message(will.topic, will.payload)
        payloads.validate("gateway_state", json.loads(will.payload))
        # ... and the gateway comes back by itself with a new birth.
        dno.wait_for(lambda m: json.loads(m.payload)["state"] == "online", count=2, what="the rebirth")
    finally:
        dno.close()


def test_the_outboxs_drop_report_validates(api: AsyncApi, tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.sqlite3", max_rows=10, durability="normal") as outbox:
        body = payloads.site_telemetry(ts_ms=TS, power_w=0.0, current_a=[0, 0, 0], limit_a=10.0,
                                       limit_source="connection", limit_valid_until_ms=None,
                                       active_sessions=0)
        for _ in range(15):
            outbox.enqueue(topics.site_telemetry(SITE), body, kind=MessageKind.TELEMETRY)
        seq = outbox.enqueue_drop_report(topics.site_events(SITE), ts_ms=TS)
        (row,) = [r for r in outbox.peek(0, 100) if r.seq == seq]
    report = json.loads(row.payload)
    assert report["event"] == "outbox_dropped" and report["dropped_telemetry"] >= 5
    api.validate_message(row.topic, row.payload)
    # The schema insists on the report's fields.
    assert api.errors("#/components/schemas/Event", {k: v for k, v in report.items() if k != "first_seq"})


# -- the copy-paste examples of mqtt-api.md ---------------------------------------------------

def _example_env(direct: Direct) -> dict[str, str]:
    cert = direct.pki.clients[DNO]
    return {**os.environ, "PYTHONPATH": str(REPO), "EVEDGE_BROKER": "127.0.0.1",
            "EVEDGE_PORT": str(direct.port), "EVEDGE_CA": str(direct.pki.cafile),
            "EVEDGE_CERT": str(cert.certfile),
            "EVEDGE_CERT_KEY": str(cert.keyfile), "EVEDGE_CLIENT": DNO, "EVEDGE_KEY_ID": EXAMPLE_KEY_ID,
            "EVEDGE_HMAC_KEY": direct.hmac_key.hex(), "EVEDGE_SITE": SITE, "EVEDGE_LIMIT_A": "32"}


def _check_example_ack(api: AsyncApi, direct: Direct, stdout: str) -> None:
    ack = json.loads(stdout.strip().splitlines()[-1])
    api.validate_message(f"{topics.ack(SITE)}/{DNO}", ack)
    assert (ack["result"], ack["reason"], ack["applied_limit_a"]) == ("accepted", "ok", 32.0)
    (decision,) = direct.gateway.decisions
    assert decision.accepted and decision.topic == topics.cmd_site_limit(SITE)


def test_the_python_example_sends_a_limit_that_is_accepted(api: AsyncApi, direct: Direct,
                                                           tmp_path: Path) -> None:
    (code,) = [c for name, c in _doc_blocks(MQTT_API, "example") if name == "send_limit.py"]
    script = tmp_path / "send_limit.py"
    script.write_text(code + "\n")
    done = subprocess.run([sys.executable, str(script)], check=False, env=_example_env(direct),
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    _check_example_ack(api, direct, done.stdout)


def test_the_mosquitto_rr_example_sends_a_limit_that_is_accepted(api: AsyncApi, direct: Direct,
                                                                 tmp_path: Path) -> None:
    missing = [t for t in ("mosquitto_rr", "openssl", "bash") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (Debian: mosquitto-clients, openssl)")
    (code,) = [c for name, c in _doc_blocks(MQTT_API, "example") if name == "send_limit.sh"]
    script = tmp_path / "send_limit.sh"
    script.write_text(code + "\n")
    done = subprocess.run(["bash", str(script)], check=False, env=_example_env(direct), capture_output=True,
                          text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    _check_example_ack(api, direct, done.stdout)


def test_a_command_copied_into_another_topic_is_refused(direct: Direct) -> None:
    """The signature covers the topic: the python example's command replayed on a column
    topic is a bad signature, not a column limit."""
    body = sign_command({"id": "t-1", "issued_ms": utc_ms(), "validity_s": 60, "limit_a": 10},
                        topics.cmd_site_limit(SITE), EXAMPLE_KEY_ID, direct.hmac_key)
    dno = Peer.connect(direct.port, tls=direct.tls(DNO))
    try:
        dno.subscribe([topics.ack(SITE)])
        assert dno.publish(topics.cmd_column_limit(SITE, "c01"), encode(body)) == 0
        (ack,) = dno.wait_for(lambda m: True, what="the ack")
        assert json.loads(ack.payload)["reason"] == "bad_signature"
    finally:
        dno.close()

