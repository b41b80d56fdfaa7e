"""A paho MQTT 5 test client that records what the broker answers: CONNACK, SUBACK and PUBACK
reason codes and every message received (with retain flag and MQTT 5 properties)."""

from __future__ import annotations

import ssl
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hil.rig.ports import LOOPBACK


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    response_topic: str | None
    correlation_data: bytes | None
    user_properties: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Tls:
    cafile: Path
    certfile: Path | None = None
    keyfile: Path | None = None


class ConnectFailed(AssertionError):
    pass


def wait_until(pred: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.01)


class Peer:
    """One MQTT 5 connection. `Peer.connect(...)` raises ConnectFailed when refused."""

    def __init__(self, port: int, *, tls: Tls | None = None, username: str | None = None,
                 password: str | None = None, client_id: str | None = None,
                 session_expiry_s: int = 0) -> None:
        self.port = port
        self.client_id = client_id or f"t-{uuid.uuid4().hex[:10]}"
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self.received: list[Received] = []
        self.pubacks: dict[int, mqtt.ReasonCode] = {}
        self.subacks: dict[int, list[mqtt.ReasonCode]] = {}
        self.connack: mqtt.ReasonCode | None = None
        self.session_present: bool | None = None
        self.disconnected = threading.Event()
        self.session_expiry_s = session_expiry_s
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5)
        if tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.cafile))
            if tls.certfile is not None:
                ctx.load_cert_chain(str(tls.certfile), str(tls.keyfile))
            client.tls_set_context(ctx)
        if username is not None:
            client.username_pw_set(username, password)
        client.reconnect_delay_set(0.05, 0.2)  # loop_stop() after a refusal returns quickly
        client.on_connect = self._on_connect
        client.on_disconnect = lambda *_a: self.disconnected.set()
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        self.client = client

    # -- callbacks (paho's thread) ----------------------------------------------------------
    def _on_connect(self, _c: Any, _u: Any, flags: Any, rc: mqtt.ReasonCode, _p: Any) -> None:
        with self._cond:
            self.connack = rc
            self.session_present = bool(flags.session_present)
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        got = Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos,
                       getattr(props, "ResponseTopic", None), getattr(props, "CorrelationData", None),
                       tuple(getattr(props, "UserProperty", ()) or ()))
        with self._cond:
            self.received.append(got)
            self._cond.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: mqtt.ReasonCode, _p: Any) -> None:
        with self._cond:
            self.pubacks[mid] = rc
            self._cond.notify_all()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, rcs: list[mqtt.ReasonCode], _p: Any) -> None:
        with self._cond:
            self.subacks[mid] = list(rcs)
            self._cond.notify_all()

    # -- use ------------------------------------------------------------------------------
    @classmethod
    def connect(cls, port: int, **kwargs: Any) -> Peer:
        peer = cls(port, **kwargs)
        reason = peer.try_connect()
        if reason is None or reason.is_failure:
            peer.close()
            raise ConnectFailed(f"{peer.client_id}: connection refused: {reason}")
        return peer

    def try_connect(self, timeout_s: float = 5.0) -> mqtt.ReasonCode | None:
        """The CONNACK reason code, or None when the TLS/TCP connection itself failed."""
        props = None
        if self.session_expiry_s:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
        try:
            self.client.connect(LOOPBACK, self.port, keepalive=10, clean_start=not self.session_expiry_s,
                                properties=props)
        except (OSError, ssl.SSLError):
            return None
        self.client.loop_start()
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.connack is None and not self.disconnected.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(min(remaining, 0.05))
            return self.connack

    def subscribe(self, filters: Sequence[str], qos: int = 1,
                  timeout_s: float = 5.0) -> list[mqtt.ReasonCode]:
        rc, mid = self.client.subscribe([(f, qos) for f in filters])
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe failed: {rc}"
        self._wait(lambda: mid in self.subacks, timeout_s, "SUBACK")
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False,
                response_topic: str | None = None, correlation_data: bytes | None = None,
                timeout_s: float = 5.0) -> mqtt.ReasonCode | None:
        """Publish; for QoS 1 wait for the PUBACK and return its reason code."""
        props = None
        if response_topic is not None or correlation_data is not None:
            props = Properties(PacketTypes.PUBLISH)
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
        info = self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, f"publish failed: {info.rc}"
        if qos == 0:
            return None
        self._wait(lambda: info.mid in self.pubacks, timeout_s, f"PUBACK for {topic}")
        return self.pubacks[info.mid]

    def on(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.received if m.topic == topic]

    def matching(self, pred: Callable[[Received], bool]) -> list[Received]:
        with self._lock:
            return [m for m in self.received if pred(m)]

    def wait_for(self, pred: Callable[[Received], bool], timeout_s: float = 5.0, count: int = 1,
                 what: str = "a message") -> list[Received]:
        self._wait(lambda: len([m for m in self.received if pred(m)]) >= count, timeout_s, what)
        return self.matching(pred)

    def _wait(self, pred: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not pred():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{self.client_id}: timed out after {timeout_s} s "
                                         f"waiting for {what}")
                self._cond.wait(min(remaining, 0.05))

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
