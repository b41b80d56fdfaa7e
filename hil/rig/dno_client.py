"""A control-room client on the broker: watches one site's topics and sends signed commands.

Used by the gateway tests and the site demo in the DNO's place. MQTT 5; it subscribes to
the site's whole topic tree and to ``dno/replies/#`` (where it asks the gateway to
answer, with a response topic and correlation data) on every connect, and keeps every
message it receives, decoded, with the monotonic time it arrived.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.north import payloads, topics
from gateway.north.auth import sign_command
from hil.rig.site_files import KEY_ID

REPLIES = "dno/replies"


@dataclass
class Received:
    topic: str
    payload: dict[str, Any]
    retain: bool
    correlation: bytes | None
    at: float          # time.monotonic() on arrival


@dataclass
class DnoClient:
    """An MQTT 5 client in the control room's place: watches a site, sends signed commands.
    Connects and subscribes on construction (TimeoutError if the broker does not confirm
    the subscription in time; OSError if it cannot be reached)."""

    host: str
    port: int
    site_id: str
    key: bytes
    key_id: str = KEY_ID
    messages: list[Received] = field(default_factory=list)
    connect_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dno-" + secrets.token_hex(4),
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        if not self.subscribed.wait(self.connect_timeout_s):
            self.close()
            raise TimeoutError(f"broker {self.host}:{self.port} did not acknowledge the subscription")

    def _on_connect(self, *_args: Any) -> None:
        # Subscribe on every connect: a restarted broker without persistence forgot us.
        base = f"{topics.PREFIX}/{self.site_id}"
        # retainAsPublished: the retain flag of what the gateway publishes shows through.
        opts = SubscribeOptions(qos=1, retainAsPublished=True)
        self.client.subscribe([(base + "/#", opts), (REPLIES + "/#", opts)])

    def wait_resubscribed(self, timeout_s: float = 10.0) -> None:
        """After a broker restart: block until we are subscribed again."""
        assert self.subscribed.wait(timeout_s), "DNO client did not resubscribe"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = payloads.decode(bytes(msg.payload))
        except ValueError:
            body = {"_raw": bytes(msg.payload).decode(errors="replace")}
        props = getattr(msg, "properties", None)
        with self._lock:
            self.messages.append(Received(msg.topic, body, bool(msg.retain),
                                          getattr(props, "CorrelationData", None), time.monotonic()))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    # -- commands --------------------------------------------------------------------------
    def command(self, topic: str, body: Mapping[str, Any], *, sign: bool = True) -> dict[str, Any]:
        return sign_command(body, topic, self.key_id, self.key) if sign else dict(body)

    def site_limit(self, limit_a: float, *, validity_s: float = 600, issued_ms: int | None = None,
                   cmd_id: str | None = None) -> tuple[str, dict[str, Any]]:
        """(topic, signed body) of a site limit command; send it with `publish`."""
        self._n += 1
        topic = topics.cmd_site_limit(self.site_id)
        body = payloads.limit_command(cmd_id or f"cmd-{self._n}-{secrets.token_hex(3)}", limit_a,
                                      validity_s=validity_s, issued_ms=issued_ms)
        return topic, self.command(topic, body)

    def publish(self, topic: str, body: Mapping[str, Any] | bytes, *, reply_to: str | None = None,
                correlation: bytes | None = None) -> None:
        props = None
        if reply_to is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = reply_to
            if correlation is not None:
                props.CorrelationData = correlation
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.client.publish(topic, data, qos=1, properties=props).wait_for_publish(5)

    # -- what came back --------------------------------------------------------------------
    def snapshot(self, start: int = 0) -> list[Received]:
        """The messages received so far (from index `start`)."""
        with self._lock:
            return self.messages[start:]

    def wait_for(self, what: str, pred: Callable[[Received], bool], timeout_s: float = 10.0,
                 since: float = 0.0) -> Received:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for m in self.snapshot():
                if m.at >= since and pred(m):
                    return m
            time.sleep(0.02)
        tail = [(m.topic, m.payload) for m in self.snapshot()[-8:]]
        raise AssertionError(f"timed out waiting for {what}; last messages: {tail}")

    def latest(self, topic: str, since: float = 0.0) -> Received | None:
        found = [m for m in self.snapshot() if m.topic == topic and m.at >= since]
        return found[-1] if found else None


def on(topic: str, **fields: Any) -> Callable[[Received], bool]:
    """A predicate: a message on `topic` whose payload has these field values."""
    def match(m: Received) -> bool:
        return m.topic == topic and all(m.payload.get(k) == v for k, v in fields.items())
    return match
