"""The publisher against a real mosquitto: order, birth/will, commands in, acks out with MQTT 5
correlation, reconnects, TLS client certificates, passwords; and the [mqtt] settings."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import trustme
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.north import payloads, topics
from gateway.north.outbox import MessageKind, Outbox
from gateway.north.publisher import Backoff, InboundMessage, Publisher
from gateway.north.settings import MqttSettings, SettingsError, parse_mqtt
from hil.rig.broker import Broker, Listener, TlsFiles
from hil.rig.ports import free_port

SITE = "site-1"
TEL = topics.site_telemetry(SITE)
STATE = topics.gateway_state(SITE)


class Consumer:
    """A DNO-side paho client recording what arrives (topic, payload dict, properties)."""

    def __init__(self, port: int, filters: list[str], *, protocol: int = mqtt.MQTTv5) -> None:
        self.messages: list[tuple[str, dict[str, Any], Any]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=protocol)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(f, 1) for f in filters])
        self.client.loop_start()
        assert self._subscribed.wait(5)

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, json.loads(msg.payload), getattr(msg, "properties", None)))

    def on(self, topic: str) -> list[dict[str, Any]]:
        with self._lock:
            return [p for t, p, _ in self.messages if t == topic]

    def wait(self, pred: Callable[[Consumer], bool], timeout_s: float = 5.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not pred(self):
            assert time.monotonic() < deadline, f"timed out; got {len(self.messages)} messages"
            time.sleep(0.01)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _settings(port: int, tmp_path: Path, **extra: Any) -> MqttSettings:
    table: dict[str, Any] = {"host": "127.0.0.1", "port": port, "client_id": "gw-site-1",
                             "reconnect_min_s": 0.05, "reconnect_max_s": 0.3, "connect_timeout_s": 2,
                             "outbox": {"path": "outbox.sqlite3"}}
    table.update(extra)
    return parse_mqtt(table, base_dir=tmp_path)


def _telemetry(ob: Outbox, n: int) -> None:
    ob.enqueue(TEL, {"ts_ms": n, "n": n}, kind=MessageKind.TELEMETRY)


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_delivers_in_order_with_birth_first_and_offline_last(mqtt_broker: Broker, tmp_path: Path,
                                                             protocol: str) -> None:
    consumer = Consumer(mqtt_broker.port(), [TEL, STATE])
    settings = _settings(mqtt_broker.port(), tmp_path, protocol=protocol, inflight_max=16)

    async def main() -> Publisher:
        with Outbox(settings.outbox.path) as ob:
            for n in range(100):  # a backlog from before the start...
                _telemetry(ob, n)
            async with Publisher(settings, ob, site_id=SITE) as pub:
                for n in range(100, 300):  # ...and messages while connected
                    _telemetry(ob, n)
                    if n % 50 == 0:
                        await asyncio.sleep(0.01)
                assert await pub.drained(10)
                assert pub.connected and pub.tcp_nodelay() is True
            assert len(ob) == 0
            return pub

    pub = asyncio.run(main())
    consumer.wait(lambda c: len(c.on(TEL)) == 300 and len(c.on(STATE)) == 2)
    assert [m["seq"] for m in consumer.on(TEL)] == list(range(1, 301))
    assert [m["n"] for m in consumer.on(TEL)] == list(range(300))
    kinds = [(t, p.get("state")) for t, p, _ in consumer.messages]
    assert kinds[0] == (STATE, "online") and kinds[-1] == (STATE, "offline")
    assert consumer.on(STATE)[-1]["cause"] == "shutdown"
    assert (pub.stats.published, pub.stats.acked, pub.stats.connects) == (300, 300, 1)
    consumer.close()
    late = Consumer(mqtt_broker.port(), [STATE])  # the retained state a newcomer sees
    late.wait(lambda c: len(c.on(STATE)) == 1)
    assert late.on(STATE)[0]["state"] == "offline"
    late.close()


def test_commands_in_and_acks_out_with_correlation(mqtt_broker: Broker, tmp_path: Path) -> None:
    dno = Consumer(mqtt_broker.port(), ["dno/replies/#"])
    settings = _settings(mqtt_broker.port(), tmp_path)
    received: list[InboundMessage] = []

    async def main() -> None:
        with Outbox(settings.outbox.path) as ob:
            def on_command(msg: InboundMessage) -> None:
                received.append(msg)
                if msg.response_topic and topics.valid_response_topic(msg.response_topic):
                    ack = payloads.ack(command_id="c-1", reason=payloads.Reason.OK, applied_limit_a=16.0,
                                       ts_ms=1)
                    ob.enqueue(msg.response_topic, ack, kind=MessageKind.ACK,
                               correlation=msg.correlation_data)
                raise RuntimeError("a handler bug must not break the connection")

            async with Publisher(settings, ob, site_id=SITE, on_message=on_command,
                                 subscriptions=topics.gateway_subscriptions(SITE)) as pub:
                while not pub.connected:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)  # the subscription is in place
                props = Properties(PacketTypes.PUBLISH)
                props.ResponseTopic = "dno/replies/7"
                props.CorrelationData = b"\x01corr-7"
                dno.client.publish(topics.cmd_site_limit(SITE), b'{"id":"c-1"}', qos=1, properties=props)
                dno.client.publish(topics.site_telemetry(SITE), b"{}", qos=1)  # not subscribed
                dno.client.publish("evedge/v1/site-1/cmd/nonsense", b"x", qos=1)
                await asyncio.to_thread(dno.wait, lambda c: len(c.messages) == 1)
                assert pub.connected and pub.stats.inbound == 2

    asyncio.run(main())
    assert [m.topic for m in received] == [topics.cmd_site_limit(SITE), "evedge/v1/site-1/cmd/nonsense"]
    assert (received[0].payload, received[0].qos, received[0].retain) == (b'{"id":"c-1"}', 1, False)
    assert (received[0].response_topic, received[0].correlation_data) == ("dno/replies/7", b"\x01corr-7")
    topic, ack, props = dno.messages[0]
    assert topic == "dno/replies/7" and props.CorrelationData == b"\x01corr-7"
    assert ack == {"id": "c-1", "result": "accepted", "reason": "ok", "applied_limit_a": 16.0, "ts_ms": 1,
                   "seq": 1}
    dno.close()


def test_waits_for_a_broker_that_is_not_there_yet(tmp_path: Path) -> None:
    port = free_port()
    settings = _settings(port, tmp_path)

    async def main() -> None:
        with Outbox(settings.outbox.path) as ob:
            async with Publisher(settings, ob, site_id=SITE, rng=random.Random(1)) as pub:
                for n in range(20):
                    _telemetry(ob, n)
                await asyncio.sleep(0.5)
                assert not pub.connected and pub.stats.connect_failures >= 2
                with Broker([Listener("plain", port=port)]) as b:
                    consumer = Consumer(b.port(), [TEL])
                    assert await pub.drained(5)
                    await asyncio.to_thread(consumer.wait, lambda c: len(c.on(TEL)) == 20)
                    assert [m["seq"] for m in consumer.on(TEL)] == list(range(1, 21))
                    consumer.close()

    asyncio.run(main())


def test_a_broker_that_never_answers_is_given_up_on(tmp_path: Path) -> None:
    with socket.socket() as black_hole:  # accepts TCP (backlog), never says CONNACK
        black_hole.bind(("127.0.0.1", 0))
        black_hole.listen(8)
        settings = _settings(black_hole.getsockname()[1], tmp_path, connect_timeout_s=0.5)

        async def main() -> Publisher:
            with Outbox(settings.outbox.path) as ob:
                async with Publisher(settings, ob, site_id=SITE) as pub:
                    await asyncio.sleep(1.5)
                started = time.monotonic()
            assert time.monotonic() - started < 1.0
            return pub

        pub = asyncio.run(main())
    assert pub.stats.connects == 0 and pub.stats.connect_failures >= 2


def test_rows_the_broker_cannot_take_do_not_block_the_queue(mqtt_broker: Broker, tmp_path: Path) -> None:
    consumer = Consumer(mqtt_broker.port(), [TEL])
    settings = _settings(mqtt_broker.port(), tmp_path)

    async def main() -> Publisher:
        with Outbox(settings.outbox.path) as ob:
            _telemetry(ob, 0)
            ob.enqueue("dno/+/bad", {"n": 1}, kind=MessageKind.ACK)  # e.g. a hostile response topic
            _telemetry(ob, 2)
            async with Publisher(settings, ob, site_id=SITE) as pub:
                assert await pub.drained(5)
            return pub

    pub = asyncio.run(main())
    consumer.wait(lambda c: len(c.on(TEL)) == 2)
    assert [m["seq"] for m in consumer.on(TEL)] == [1, 3]
    assert pub.stats.invalid_rows == 1
    consumer.close()
    with Outbox(settings.outbox.path) as ob:
        assert ob.stats().dropped["ack"] == 1  # counted as a drop, so the drop report covers it


def test_rows_the_broker_refuses_are_dropped_and_reported(tmp_path: Path) -> None:
    events = topics.site_events(SITE)
    acl = f"user gw\ntopic write {TEL}\ntopic write {STATE}\ntopic write {events}\n"
    with Broker([Listener("auth", users={"gw": "pw"}, acl=acl), Listener("plain")]) as b:
        consumer = Consumer(b.port("plain"), [TEL, events])
        (tmp_path / "pw").write_text("pw")
        settings = _settings(b.port("auth"), tmp_path, username="gw", password_file=str(tmp_path / "pw"))

        async def main() -> Publisher:
            with Outbox(settings.outbox.path) as ob:
                _telemetry(ob, 0)
                ob.enqueue(topics.column_telemetry(SITE, "c1"), {"n": 1}, kind=MessageKind.TELEMETRY)
                _telemetry(ob, 2)
                async with Publisher(settings, ob, site_id=SITE) as pub:
                    await asyncio.to_thread(consumer.wait, lambda c: len(c.on(events)) == 1)
                    assert await pub.drained(5)
                return pub

        pub = asyncio.run(main())
    assert [m["seq"] for m in consumer.on(TEL)] == [1, 3]
    assert pub.stats.broker_rejected == 1
    (report,) = consumer.on(events)
    assert (report["event"], report["dropped_telemetry"], report["first_seq"], report["last_seq"]) == \
        ("outbox_dropped", 1, 2, 2)
    consumer.close()


def test_backoff_is_jittered_exponential_and_capped() -> None:
    backoff = Backoff(0.5, 10.0, random.Random(7))
    delays = [backoff.next() for _ in range(12)]
    for n, delay in enumerate(delays):
        assert 0.5 <= delay <= min(10.0, 0.5 * 2 ** (n + 1))
    assert len({round(d, 6) for d in delays}) == len(delays)  # jittered, not a fixed ladder
    assert max(delays[6:]) > 4.0  # it does grow
    backoff.reset()
    assert backoff.next() <= 1.0
    other = Backoff(0.5, 10.0, random.Random(8))
    assert [other.next() for _ in range(3)] != delays[:3]  # two gateways do not march in step


# -- TLS and passwords -------------------------------------------------------------------

async def _try(settings: MqttSettings, seconds: float) -> Publisher:
    with Outbox(settings.outbox.path) as ob:
        _telemetry(ob, 0)
        async with Publisher(settings, ob, site_id=SITE) as pub:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and len(ob):
                await asyncio.sleep(0.02)
        return pub


def test_tls_with_a_client_certificate(pki: dict[str, Path], tmp_path: Path) -> None:
    tls = TlsFiles(pki["ca"], pki["server_cert"], pki["server_key"])
    with Broker([Listener("tls", tls=tls)]) as b:
        good = _settings(b.port("tls"), tmp_path, tls={
            "cafile": str(pki["ca"]), "certfile": str(pki["client_cert"]), "keyfile": str(pki["client_key"])})
        pub = asyncio.run(_try(good, 5))
        assert (pub.stats.connects, pub.stats.acked) == (1, 1)
        (tmp_path / "outbox.sqlite3").unlink()
        no_cert = _settings(b.port("tls"), tmp_path, tls={"cafile": str(pki["ca"])})
        pub = asyncio.run(_try(no_cert, 0.6))
        assert pub.stats.connects == 0 and pub.stats.connect_failures >= 1


def test_tls_refuses_a_broker_it_does_not_trust(pki: dict[str, Path], tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    tls = TlsFiles(pki["ca"], pki["server_cert"], pki["server_key"])
    with Broker([Listener("tls", tls=tls)]) as b:
        settings = _settings(b.port("tls"), tmp_path, tls={
            "cafile": str(other_ca), "certfile": str(pki["client_cert"]), "keyfile": str(pki["client_key"])})
        pub = asyncio.run(_try(settings, 0.6))
    assert pub.stats.connects == 0 and pub.stats.connect_failures >= 1


def test_username_and_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    acl = "user gw\ntopic readwrite evedge/#\n"
    with Broker([Listener("auth", users={"gw": "s3cret-pw"}, acl=acl)]) as b:
        pw = tmp_path / "mqtt-password"
        pw.write_text("s3cret-pw\n")
        good = _settings(b.port("auth"), tmp_path, username="gw", password_file=str(pw))
        pub = asyncio.run(_try(good, 5))
        assert (pub.stats.connects, pub.stats.acked) == (1, 1)
        bad = _settings(b.port("auth"), tmp_path, username="gw", password_env="GW_PW")
        monkeypatch.setenv("GW_PW", "wrong")
        pub = asyncio.run(_try(bad, 0.6))
        assert pub.stats.connects == 0 and pub.stats.connect_failures >= 1


# -- settings ----------------------------------------------------------------------------

def test_settings_defaults_and_paths(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    s = parse_mqtt({"host": "broker", "tls": {"cafile": "ca.pem"}, "outbox": {"path": "ob.db"}},
                   base_dir=tmp_path, default_client_id="evedge-site-1")
    assert (s.port, s.protocol, s.client_id, s.keepalive_s) == (8883, "5", "evedge-site-1", 30)
    assert s.tls is not None and s.tls.cafile == tmp_path / "ca.pem"
    assert s.outbox.path == tmp_path / "ob.db" and s.outbox.durability == "full"
    plain = parse_mqtt({"host": "b", "client_id": "x", "protocol": "3.1.1", "outbox": {"path": "/o"}})
    assert (plain.port, plain.protocol, plain.password()) == (1883, "3.1.1", None)
    as_int = parse_mqtt({"host": "b", "client_id": "x", "protocol": 5, "outbox": {"path": "/o"}})
    assert as_int.protocol == "5"


@pytest.mark.parametrize(("change", "key"), [
    ({"host": ""}, "mqtt.host"),
    ({"host": None}, "mqtt.host"),
    ({"port": 0}, "mqtt.port"),
    ({"port": "1883"}, "mqtt.port"),
    ({"port": True}, "mqtt.port"),
    ({"protocol": "4"}, "mqtt.protocol"),
    ({"password": "hunter2", "username": "u"}, "mqtt.password"),
    ({"password_env": "A", "password_file": "pw", "username": "u"}, "mqtt.password_env"),
    ({"password_env": "A"}, "mqtt.username"),
    ({"tls": {"cafile": "missing.pem"}}, "mqtt.tls.cafile"),
    ({"tls": {"cafile": "pw", "certfile": "pw"}}, "mqtt.tls.keyfile"),
    ({"tls": {"cafile": "pw", "ciphers": "x"}}, "mqtt.tls.ciphers"),
    ({"tls": "yes"}, "mqtt.tls"),
    ({"outbox": None}, "mqtt.outbox"),
    ({"outbox": {"path": "o", "durability": "fast"}}, "mqtt.outbox.durability"),
    ({"outbox": {"path": "o", "max_rows": 0}}, "mqtt.outbox.max_rows"),
    ({"outbox": {"max_rows": 10}}, "mqtt.outbox.path"),
    ({"reconnect_min_s": 5, "reconnect_max_s": 1}, "mqtt.reconnect_max_s"),
    ({"keepalive": 30}, "mqtt.keepalive"),
    ({"client_id": None}, "mqtt.client_id"),
])
def test_settings_errors_name_the_key(tmp_path: Path, change: dict[str, Any], key: str) -> None:
    (tmp_path / "pw").write_text("pw")
    table: dict[str, Any] = {"host": "b", "client_id": "gw", "outbox": {"path": "o"}}
    for name, value in change.items():
        if value is None:
            table.pop(name, None)
        else:
            table[name] = value
    with pytest.raises(SettingsError) as err:
        parse_mqtt(table, base_dir=tmp_path)
    assert err.value.key == key, err.value
    assert "hunter2" not in str(err.value)


def test_unknown_key_suggestion() -> None:
    with pytest.raises(SettingsError, match="did you mean 'keepalive_s'"):
        parse_mqtt({"host": "b", "client_id": "gw", "keepalive": 30, "outbox": {"path": "o"}})
