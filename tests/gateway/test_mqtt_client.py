"""The gateway's own MQTT client against real mosquitto (both protocol versions) and against
scripted brokers on loopback (silent, hostile, stingy with Receive Maximum, QoS 2 senders)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import trustme

from gateway.north import mqtt_client
from gateway.north import mqtt_packets as mp
from gateway.north.mqtt_client import ClientListener, ConnectOptions, ConnectRefused, MqttConnection
from gateway.north.outbox import Outbox
from gateway.north.publisher import Publisher
from gateway.north.settings import parse_mqtt
from hil.rig.broker import Broker, Listener, TlsFiles

BOTH = pytest.mark.parametrize("protocol", [mp.MQTT311, mp.MQTT5])


class Recorder(ClientListener):
    """Everything a connection reports, plus any exception that reached the event loop."""

    def __init__(self) -> None:
        self.pubacks: list[tuple[int, int]] = []
        self.messages: list[mp.Publish] = []
        self.subacks: list[tuple[int, list[int]]] = []
        self.lost: list[tuple[str, mp.ProtocolError | None]] = []
        self.writable = 0
        self.changed = asyncio.Event()

    def on_puback(self, packet_id: int, reason_code: int) -> None:
        self.pubacks.append((packet_id, reason_code))
        self.changed.set()

    def on_message(self, message: mp.Publish) -> None:
        self.messages.append(message)
        self.changed.set()

    def on_suback(self, packet_id: int, reason_codes: list[int]) -> None:
        self.subacks.append((packet_id, reason_codes))
        self.changed.set()

    def on_writable(self) -> None:
        self.writable += 1

    def on_lost(self, reason: str, error: mp.ProtocolError | None) -> None:
        self.lost.append((reason, error))
        self.changed.set()

    async def until(self, pred: Callable[[], bool], timeout_s: float = 5.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not pred():
                self.changed.clear()
                await self.changed.wait()


def run(main: Callable[[], Awaitable[Any]]) -> Any:
    """asyncio.run, failing the test if any exception reached the loop's exception handler."""
    errors: list[dict[str, Any]] = []

    async def wrapper() -> Any:
        asyncio.get_running_loop().set_exception_handler(lambda _l, ctx: errors.append(ctx))
        return await main()

    result = asyncio.run(wrapper())
    assert not errors, errors
    return result


class Sub:
    """A paho subscriber (the DNO side)."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda _c, _u, m: self._add(m)
        self.client.on_subscribe = lambda *_: ready.set()
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, 1)
        self.client.loop_start()
        assert ready.wait(5)

    def _add(self, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(msg)

    def wait(self, n: int, timeout_s: float = 5.0) -> list[mqtt.MQTTMessage]:
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            assert time.monotonic() < deadline, f"{len(self.messages)} of {n} messages"
            time.sleep(0.01)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def opts(port: int, protocol: int = mp.MQTT5, **kw: Any) -> ConnectOptions:
    return ConnectOptions("127.0.0.1", port, kw.pop("client_id", f"t-{protocol}-{time.monotonic_ns()}"),
                          protocol=protocol, connect_timeout_s=kw.pop("connect_timeout_s", 5), **kw)


# -- against mosquitto ---------------------------------------------------------------------

@BOTH
def test_publish_qos0_and_qos1_reach_a_subscriber(mqtt_broker: Broker, protocol: int) -> None:
    sub = Sub(mqtt_broker.port(), "t/#")

    async def main() -> None:
        rec = Recorder()
        conn = await mqtt_client.connect(opts(mqtt_broker.port(), protocol), rec)
        assert conn.is_open and conn.tcp_nodelay() is True
        assert conn.publish("t/0", b"zero", 0) == 0
        ids = [conn.publish(f"t/{n}", b"x" * n, 1, correlation_data=b"\x01c", response_topic="r/1")
               for n in range(1, 200)]
        assert len(set(ids)) == len(ids) and all(1 <= i <= 65535 for i in ids)
        await rec.until(lambda: len(rec.pubacks) == len(ids))
        assert sorted(i for i, _ in rec.pubacks) == sorted(ids)
        assert all(code < 0x80 for _, code in rec.pubacks) and conn.inflight == 0
        await conn.disconnect()
        assert not conn.is_open and rec.lost and rec.lost[0][1] is None

    run(main)
    got = sub.wait(200)
    assert (got[0].topic, got[0].payload, got[0].qos) == ("t/0", b"zero", 0)
    assert [m.payload for m in got[1:]] == [b"x" * n for n in range(1, 200)]
    props = getattr(got[1], "properties", None)
    if protocol == mp.MQTT5:
        assert (props.CorrelationData, props.ResponseTopic) == (b"\x01c", "r/1")
    else:
        assert not hasattr(props, "CorrelationData")
    sub.close()


@BOTH
def test_subscribe_and_receive_qos1_with_v5_reply_details(mqtt_broker: Broker, protocol: int) -> None:
    async def main() -> None:
        rec = Recorder()
        conn = await mqtt_client.connect(opts(mqtt_broker.port(), protocol), rec)
        pid = conn.subscribe([("cmd/#", 1), ("other", 0)])
        await rec.until(lambda: len(rec.subacks) == 1)
        assert rec.subacks == [(pid, [1, 0])]
        peer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        peer.connect("127.0.0.1", mqtt_broker.port())
        peer.loop_start()
        props = mqtt.Properties(mqtt.PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = "dno/replies/1", b"corr"
        peer.publish("cmd/limit", b'{"a":1}', qos=1, properties=props).wait_for_publish(5)
        peer.publish("cmd/two", b"2", qos=2).wait_for_publish(5)   # downgraded to our max QoS 1
        await rec.until(lambda: len(rec.messages) == 2)
        first, second = rec.messages
        assert (first.topic, first.payload, first.qos) == ("cmd/limit", b'{"a":1}', 1)
        if protocol == mp.MQTT5:
            assert (first.response_topic, first.correlation_data) == ("dno/replies/1", b"corr")
        assert (second.topic, second.qos) == ("cmd/two", 1)
        peer.disconnect()
        peer.loop_stop()
        await asyncio.sleep(0.2)
        assert conn.is_open   # our PUBACKs were fine for the broker
        await conn.disconnect()

    run(main)


def test_puback_reason_codes_from_an_acl(tmp_path: Path) -> None:
    acl = "user gw\ntopic write allowed/#\n"
    with Broker([Listener("auth", users={"gw": "pw"}, acl=acl)], workdir=tmp_path / "b") as b:
        async def main() -> None:
            rec = Recorder()
            conn = await mqtt_client.connect(opts(b.port("auth"), username="gw", password=b"pw"), rec)
            ok = conn.publish("allowed/x", b"1", 1)
            denied = conn.publish("denied/x", b"2", 1)
            await rec.until(lambda: len(rec.pubacks) == 2)
            codes = dict(rec.pubacks)
            assert codes[ok] in {0x00, 0x10} and codes[denied] == 0x87
            assert conn.is_open
            await conn.disconnect()
            with pytest.raises(ConnectRefused) as err:
                await mqtt_client.connect(opts(b.port("auth"), username="gw", password=b"bad"))
            assert err.value.reason_code in {0x86, 0x87}   # mosquitto 2.0 says "not authorized"
            with pytest.raises(ConnectRefused) as err:
                await mqtt_client.connect(opts(b.port("auth"), mp.MQTT311, username="gw", password=b"bad"))
            assert err.value.reason_code in {4, 5}

        run(main)


@BOTH
def test_will_is_delivered_when_the_connection_is_killed(mqtt_broker: Broker, protocol: int) -> None:
    sub = Sub(mqtt_broker.port(), "state/#")

    async def main() -> None:
        will = mp.Will("state/killed", b"offline", 1, True)
        killed = await mqtt_client.connect(opts(mqtt_broker.port(), protocol, will=will))
        clean = await mqtt_client.connect(opts(mqtt_broker.port(), protocol,
                                               will=mp.Will("state/clean", b"offline", 1, True)))
        killed.abort("test: the gateway dies")   # no DISCONNECT: the broker must send the will
        await clean.disconnect()                   # DISCONNECT: no will
        await asyncio.to_thread(sub.wait, 1)
        await asyncio.sleep(0.3)

    run(main)
    assert [(m.topic, m.payload, m.retain) for m in sub.messages] == [("state/killed", b"offline", False)]
    sub.close()


def test_a_session_taken_over_ends_the_old_connection(mqtt_broker: Broker) -> None:
    async def main() -> None:
        rec = Recorder()
        first = await mqtt_client.connect(opts(mqtt_broker.port(), client_id="same"), rec)
        second = await mqtt_client.connect(opts(mqtt_broker.port(), client_id="same"))
        await rec.until(lambda: bool(rec.lost))
        assert rec.lost[0][1] is None   # mosquitto 2.0 closes it without a DISCONNECT packet
        assert not first.is_open and second.is_open
        with pytest.raises(ConnectionError):
            first.publish("t", b"", 1)
        await second.disconnect()

    run(main)


class StingyBroker(Broker):
    """mosquitto letting each client have only 2 QoS 1 messages in flight."""

    def _config_text(self) -> str:
        return super()._config_text() + "max_inflight_messages 2\n"


def test_receive_maximum_from_mosquitto_is_honoured(tmp_path: Path) -> None:
    with StingyBroker([Listener("plain")], workdir=tmp_path / "b") as b:
        async def main() -> None:
            rec = Recorder()
            conn = await mqtt_client.connect(opts(b.port()), rec)
            assert conn.receive_maximum == 2
            ids = [conn.publish("t", b"%d" % n, 1) for n in range(300)]
            assert conn.held == 298 and conn.inflight == 300
            await rec.until(lambda: len(rec.pubacks) == 300, 20)
            assert [i for i, _ in rec.pubacks] == ids and conn.is_open and conn.held == 0
            await conn.disconnect()

        run(main)


def test_keepalive_pings_keep_a_quiet_connection_up(mqtt_broker: Broker) -> None:
    async def main() -> None:
        rec = Recorder()
        conn = await mqtt_client.connect(opts(mqtt_broker.port(), keepalive_s=1), rec)
        await asyncio.sleep(3.5)   # PINGREQ/PINGRESP three times; the broker would drop us at 1.5 s
        assert conn.is_open and not rec.lost
        await conn.disconnect()

    run(main)


def test_tls_with_a_ca_and_a_client_certificate(pki: dict[str, Path], tmp_path: Path) -> None:
    import ssl

    tls = TlsFiles(pki["ca"], pki["server_cert"], pki["server_key"])
    with Broker([Listener("tls", tls=tls)], workdir=tmp_path / "b") as b:
        async def main() -> None:
            ctx = ssl.create_default_context(cafile=str(pki["ca"]))
            ctx.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
            rec = Recorder()
            conn = await mqtt_client.connect(opts(b.port("tls"), ssl=ctx), rec)
            assert conn.tcp_nodelay() is True
            ids = [conn.publish("t", b"x" * 5000, 1) for _ in range(50)]
            await rec.until(lambda: len(rec.pubacks) == 50)
            assert sorted(i for i, _ in rec.pubacks) == sorted(ids)
            await conn.disconnect()
            untrusted = ssl.create_default_context(cafile=str(pki["ca"]))   # no client certificate
            with pytest.raises((OSError, ConnectionError)):
                await mqtt_client.connect(opts(b.port("tls"), ssl=untrusted))
            other = tmp_path / "other.pem"
            trustme.CA().cert_pem.write_to_path(str(other))
            wrong_ca = ssl.create_default_context(cafile=str(other))
            wrong_ca.load_cert_chain(str(pki["client_cert"]), str(pki["client_key"]))
            with pytest.raises(ssl.SSLCertVerificationError):
                await mqtt_client.connect(opts(b.port("tls"), ssl=wrong_ca))

        run(main)


# -- scripted brokers ------------------------------------------------------------------------

class Scripted(asyncio.Protocol):
    """A broker on loopback that does what a test tells it: CONNACK (or not), then records
    every packet and answers only as `on_packet` says."""

    def __init__(self, connack: bytes | None, on_packet: Callable[[Scripted, Any], None] | None = None,
                 protocol: int = mp.MQTT5) -> None:
        self.connack, self.on_packet = connack, on_packet
        self.decoder = mp.StreamDecoder(protocol)
        self.packets: list[Any] = []
        self.transport: asyncio.Transport | None = None
        self.closed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for packet in self.decoder.feed(data):
            self.packets.append(packet)
            if isinstance(packet, mp.Connect) and self.connack is not None:
                self.send(self.connack)
            elif self.on_packet is not None:
                self.on_packet(self, packet)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed.set()

    def of(self, cls: type) -> list[Any]:
        return [p for p in self.packets if isinstance(p, cls)]


async def scripted(make: Callable[[], Scripted]) -> tuple[asyncio.Server, list[Scripted]]:
    made: list[Scripted] = []

    def factory() -> Scripted:
        made.append(make())
        return made[-1]

    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    return server, made


def port_of(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


CONNACK_OK = mp.encode_connack(mp.ConnAck())


def test_keepalive_ends_a_connection_to_a_broker_that_stops_answering() -> None:
    async def main() -> None:
        server, made = await scripted(lambda: Scripted(CONNACK_OK))   # CONNACK, then silence
        rec = Recorder()
        conn = await mqtt_client.connect(opts(port_of(server), keepalive_s=1), rec)
        started = time.monotonic()
        await rec.until(lambda: bool(rec.lost), 5)
        elapsed = time.monotonic() - started
        assert 1.0 <= elapsed <= 1.5 + 1.0, elapsed   # PINGREQ at 1 s, given up at 1.5 s (+ load)
        assert "PINGRESP" in rec.lost[0][0] and not conn.is_open
        assert len(made[0].of(mp.PingReq)) == 1
        server.close()

    run(main)


def test_a_broker_disconnect_reason_is_reported() -> None:
    async def main() -> None:
        def bye(broker: Scripted, packet: Any) -> None:
            if isinstance(packet, mp.PingReq):
                broker.send(mp.encode(mp.Disconnect(0x8E, {mp.P_REASON_STRING: "another gateway"})))

        server, _ = await scripted(lambda: Scripted(CONNACK_OK, bye))
        rec = Recorder()
        conn = await mqtt_client.connect(opts(port_of(server), keepalive_s=1), rec)
        await rec.until(lambda: bool(rec.lost), 5)
        reason, error = rec.lost[0]
        assert reason == "broker disconnected: Session taken over (0x8E) (another gateway)"
        assert error is None and not conn.is_open
        server.close()

    run(main)


def test_connect_gives_up_on_a_broker_that_never_sends_connack() -> None:
    async def main() -> None:
        server, _ = await scripted(lambda: Scripted(None))
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await mqtt_client.connect(opts(port_of(server), connect_timeout_s=0.5))
        assert time.monotonic() - started < 2.0
        server.close()

    run(main)


def test_receive_maximum_holds_publishes_until_pubacks_make_room() -> None:
    async def main() -> None:
        connack = mp.encode_connack(mp.ConnAck(0, False, {mp.P_RECEIVE_MAXIMUM: 3}))
        server, made = await scripted(lambda: Scripted(connack))
        rec = Recorder()
        conn = await mqtt_client.connect(opts(port_of(server)), rec)
        ids = [conn.publish("t", b"%d" % n, 1) for n in range(10)]
        await asyncio.sleep(0.2)
        broker = made[0]
        assert [p.packet_id for p in broker.of(mp.Publish)] == ids[:3] and conn.held == 7
        broker.send(mp.encode_puback(ids[1]) + mp.encode_puback(ids[0]))
        await rec.until(lambda: len(rec.pubacks) == 2)
        await asyncio.sleep(0.2)
        assert [p.packet_id for p in broker.of(mp.Publish)] == ids[:5]   # two acks, two more out
        broker.send(b"".join(mp.encode_puback(i) for i in ids[2:]))
        await rec.until(lambda: len(rec.pubacks) == 10)
        await asyncio.sleep(0.1)
        assert [p.packet_id for p in broker.of(mp.Publish)] == ids and conn.held == 0
        await conn.disconnect()
        server.close()

    run(main)


def test_packet_ids_wrap_and_skip_ids_in_flight() -> None:
    async def main() -> None:
        server, made = await scripted(lambda: Scripted(CONNACK_OK))
        rec = Recorder()
        conn = await mqtt_client.connect(opts(port_of(server)), rec)
        ids = [conn.publish("t", b"", 1) for _ in range(65535)]
        assert ids == list(range(1, 65536))
        with pytest.raises(RuntimeError):
            conn.publish("t", b"", 1)   # every id is in flight
        await asyncio.sleep(0.3)
        made[0].send(mp.encode_puback(7) + mp.encode_puback(3) + mp.encode_puback(999_9))
        await rec.until(lambda: len(rec.pubacks) == 3)
        assert [conn.publish("t", b"", 1) for _ in range(3)] == [3, 7, 9999]
        made[0].send(mp.encode_puback(3) + mp.encode_puback(3))   # a duplicate PUBACK is ignored
        await rec.until(lambda: len(rec.pubacks) == 4)
        await asyncio.sleep(0.1)
        assert len(rec.pubacks) == 4 and conn.is_open
        await conn.disconnect()
        server.close()

    run(main)


def test_inbound_qos1_and_qos2_are_answered_and_delivered_once() -> None:
    async def main() -> None:
        server, made = await scripted(lambda: Scripted(CONNACK_OK))
        rec = Recorder()
        conn = await mqtt_client.connect(opts(port_of(server)), rec)
        broker = made[0]
        q2 = mp.Publish("cmd/q2", b"two", 2, packet_id=5)
        broker.send(mp.encode(mp.Publish("cmd/q1", b"one", 1, packet_id=4)) + mp.encode(q2))
        q2.dup = True
        broker.send(mp.encode(q2))   # a re-send before PUBREL: not delivered again
        await asyncio.sleep(0.2)
        broker.send(mp.encode(mp.PubRel(5)))
        await asyncio.sleep(0.2)
        assert [(m.topic, m.qos) for m in rec.messages] == [("cmd/q1", 1), ("cmd/q2", 2)]
        assert [p.packet_id for p in broker.of(mp.PubAck) if type(p) is mp.PubAck] == [4]
        assert [p.packet_id for p in broker.of(mp.PubRec)] == [5, 5]
        assert [p.packet_id for p in broker.of(mp.PubComp)] == [5]
        assert conn.is_open
        await conn.disconnect()
        server.close()

    run(main)


def test_back_pressure_pauses_and_resumes_writing() -> None:
    async def main() -> None:
        server, made = await scripted(lambda: Scripted(CONNACK_OK))
        rec = Recorder()
        conn = await mqtt_client.connect(opts(port_of(server), write_high_water=64 * 1024), rec)
        broker = made[0]
        assert broker.transport is not None
        broker.transport.pause_reading()   # a broker that cannot keep up
        sent = 0
        while not conn.writing_paused:
            conn.publish("t", b"x" * 60_000, 0)
            sent += 1
            await asyncio.sleep(0)
            assert sent < 2000, "the transport never said its buffer is full"
        assert rec.writable == 0
        broker.transport.resume_reading()
        async with asyncio.timeout(5):
            while conn.writing_paused:
                await asyncio.sleep(0.01)
        assert rec.writable == 1 and conn.is_open
        await conn.disconnect()
        server.close()

    run(main)


HOSTILE = [
    ("garbage instead of CONNACK", b"\x00\x01\x02\x03"),
    ("a PUBLISH before CONNACK", mp.encode(mp.Publish("t", b"", 0))),
    ("garbage after CONNACK", CONNACK_OK + b"\xff\xff\xff\xff\xff"),
    ("a bad remaining length after CONNACK", CONNACK_OK + b"\x30\xff\xff\xff\xff\x7f"),
    ("a topic that is not UTF-8", CONNACK_OK + b"\x30\x05\x00\x02\xc3\x28\x00"),
    ("a second CONNACK", CONNACK_OK + CONNACK_OK),
]


@pytest.mark.parametrize(("what", "data"), HOSTILE)
def test_a_hostile_broker_is_disconnected_with_a_protocol_error(what: str, data: bytes) -> None:
    async def main() -> None:
        server, made = await scripted(lambda: Scripted(data))
        rec = Recorder()
        try:
            conn: MqttConnection | None = await mqtt_client.connect(opts(port_of(server)), rec)
        except ConnectionError:
            conn = None   # refused before CONNACK counts as a failed connect
        await rec.until(lambda: bool(rec.lost))
        reason, error = rec.lost[0]
        assert isinstance(error, mp.ProtocolError) and "protocol error" in reason, (reason, error)
        assert conn is None or not conn.is_open
        await asyncio.wait_for(made[0].closed.wait(), 2)   # the socket is closed
        server.close()

    run(main)


def test_the_publisher_counts_protocol_errors_and_keeps_reconnecting(tmp_path: Path) -> None:
    async def main() -> None:
        def garbage(broker: Scripted, packet: Any) -> None:
            if isinstance(packet, mp.Publish):   # the birth message: answered with a bad PUBREL
                broker.send(b"\x60\x02\x00\x01")

        server, made = await scripted(lambda: Scripted(CONNACK_OK, garbage))
        settings = parse_mqtt({"host": "127.0.0.1", "port": port_of(server), "client_id": "gw",
                               "reconnect_min_s": 0.05, "reconnect_max_s": 0.1,
                               "outbox": {"path": str(tmp_path / "o.db")}})
        with Outbox(settings.outbox.path) as ob:
            async with Publisher(settings, ob, site_id="site-1") as pub:
                async with asyncio.timeout(5):
                    while pub.stats.protocol_errors < 3:
                        await asyncio.sleep(0.01)
            assert pub.stats.connects >= 3 and pub.stats.disconnects >= 3 and len(made) >= 3
            assert all(b.of(mp.Connect) for b in made[:3])
            # each one closed by the gateway (the broker's side sees it a loop pass later)
            await asyncio.wait_for(asyncio.gather(*(b.closed.wait() for b in made[:3])), 2)
        server.close()

    run(main)
