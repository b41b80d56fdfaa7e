"""The mosquitto fixtures are real: messages flow on each listener, strangers are refused."""

from __future__ import annotations

import ssl
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest

from hil.rig.broker import Broker, Listener


def _client(**tls: object) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    if tls:
        client.tls_set(**tls)  # type: ignore[arg-type]
    return client


def _connect(client: mqtt.Client, port: int) -> mqtt.ReasonCode | None:
    """Connect and return the CONNACK reason code (None if the socket itself failed)."""
    result: dict[str, object] = {}
    done = threading.Event()

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: mqtt.ReasonCode, _p: object) -> None:
        result["reason"] = reason
        done.set()

    def on_disconnect(*_args: object) -> None:
        done.set()

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    try:
        client.connect("127.0.0.1", port, keepalive=10)
    except (OSError, ssl.SSLError):
        return None
    client.loop_start()
    done.wait(5)
    return result.get("reason")  # type: ignore[return-value]


def _round_trip(port: int, **kwargs: object) -> bytes:
    topic = f"evedge/v1/site1/test/{uuid.uuid4().hex[:6]}"
    creds = kwargs.pop("credentials", None)
    sub, pub = _client(**kwargs), _client(**kwargs)
    if creds:
        sub.username_pw_set(*creds[0])  # type: ignore[index]
        pub.username_pw_set(*creds[1])  # type: ignore[index]
    got: list[bytes] = []
    arrived = threading.Event()
    subscribed = threading.Event()
    sub.on_message = lambda _c, _u, msg: (got.append(msg.payload), arrived.set())
    sub.on_subscribe = lambda *_a: subscribed.set()
    try:
        assert _connect(sub, port) == 0
        sub.subscribe(topic, qos=1)
        assert subscribed.wait(5)
        assert _connect(pub, port) == 0
        pub.publish(topic, b"hello", qos=1).wait_for_publish(5)
        assert arrived.wait(5), "message did not arrive"
        return got[0]
    finally:
        for client in (sub, pub):
            client.disconnect()
            client.loop_stop()


def test_plain_listener_round_trip(mqtt_broker: Broker) -> None:
    assert _round_trip(mqtt_broker.port("plain")) == b"hello"


def test_tls_listener_with_client_certificates(secure_broker) -> None:  # type: ignore[no-untyped-def]
    pki = secure_broker.pki
    gw = pki.clients["gateway-site1"]
    payload = _round_trip(secure_broker.broker.port("tls"), ca_certs=str(pki.cafile),
                          certfile=str(gw.certfile), keyfile=str(gw.keyfile))
    assert payload == b"hello"


def test_tls_listener_refuses_a_client_without_certificate(secure_broker) -> None:  # type: ignore[no-untyped-def]
    client = _client(ca_certs=str(secure_broker.pki.cafile))
    try:
        assert _connect(client, secure_broker.broker.port("tls")) != 0
    finally:
        client.loop_stop()


def test_password_listener_round_trip_with_acl(secure_broker) -> None:  # type: ignore[no-untyped-def]
    users = secure_broker.users
    creds = (("dno", users["dno"]), ("gateway-site1", users["gateway-site1"]))
    assert _round_trip(secure_broker.broker.port("auth"), credentials=creds) == b"hello"


@pytest.mark.parametrize("user,password", [("dno", "wrong"), ("nobody", "x"), (None, None)])
def test_password_listener_refuses_bad_credentials(secure_broker, user, password) -> None:  # type: ignore[no-untyped-def]
    client = _client()
    if user:
        client.username_pw_set(user, password)
    try:
        reason = _connect(client, secure_broker.broker.port("auth"))
        assert reason is not None and reason != 0, f"connected with {user!r}/{password!r}"
    finally:
        client.loop_stop()


def test_broker_is_stopped_by_pid(tmp_path) -> None:  # type: ignore[no-untyped-def]
    broker = Broker([Listener("plain")], workdir=tmp_path).start()
    proc = broker.proc
    assert proc is not None and proc.poll() is None
    broker.stop()
    assert proc.poll() is not None
