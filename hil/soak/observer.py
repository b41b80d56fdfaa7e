"""The control room's consumer during a soak: everything the site publishes, nothing lost on our side.

It follows docs/mqtt-api.md's consumer checklist: MQTT 5, QoS 1, a persistent session
(clean start off, a session expiry of an hour, a fresh client id per run: mosquitto 2.0
does not restore across its restart a session that began with clean start on), so that
the broker queues
what arrives while this client is reconnecting after a broker restart; with the soak's
broker saving its state at every clean stop, nothing the broker acknowledged to the
gateway is lost between them. Any gap in the site's `seq` is then the gateway's.

Messages are kept raw with their arrival time (monotonic) and decoded when asked for;
paho's network thread appends, the run reads snapshots.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.north import topics

SESSION_EXPIRY_S = 3600


@dataclass(frozen=True)
class Seen:
    topic: str
    payload: bytes
    retain: bool
    at: float  # time.monotonic() on arrival

    def body(self) -> dict[str, Any]:
        try:
            value = json.loads(self.payload)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


class Observer:
    """Connects and subscribes on start(); reconnects by itself (paho) until close()."""

    def __init__(self, host: str, port: int, site_id: str, client_id: str) -> None:
        self.host, self.port, self.site_id = host, port, site_id
        self._lock = threading.Lock()
        self._seen: list[Seen] = []
        self.connects = 0
        self.sessions_lost = 0  # reconnects where the broker had forgotten our session
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.max_inflight_messages_set(100)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._on_message

    def start(self, timeout_s: float = 10.0) -> None:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        self.client.connect(self.host, self.port, keepalive=10, clean_start=False, properties=props)
        self.client.loop_start()
        if not self.subscribed.wait(timeout_s):
            self.close()
            raise TimeoutError(
                "broker %s:%d did not confirm the observer's subscription" % (self.host, self.port)
            )

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        if getattr(reason, "is_failure", False):
            return
        self.connects += 1
        if not getattr(flags, "session_present", False):
            if self.connects > 1:
                self.sessions_lost += 1
            base = "%s/%s/#" % (topics.PREFIX, self.site_id)
            client.subscribe([(base, SubscribeOptions(qos=1, retainAsPublished=True))])

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        seen = Seen(msg.topic, bytes(msg.payload), bool(msg.retain), time.monotonic())
        with self._lock:
            self._seen.append(seen)

    def snapshot(self, start: int = 0) -> list[Seen]:
        with self._lock:
            return self._seen[start:]

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def quiet_for(self, seconds: float) -> bool:
        """Nothing arrived in the last `seconds`."""
        with self._lock:
            last = self._seen[-1].at if self._seen else 0.0
        return time.monotonic() - last >= seconds

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
