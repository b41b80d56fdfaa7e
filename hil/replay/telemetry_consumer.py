"""An MQTT consumer in the control room's place that keeps the sequence numbers it receives.

It feeds the telemetry check of a replay with the gateway in the loop (hil.replay.site_target):
every message a gateway publishes carries `seq` (gateway.north.payloads, stamped by its
outbox), so a consumer that sees every number once has lost nothing and got nothing twice.

It subscribes to what a DNO consumer subscribes to (gateway.north.topics.consumer_subscriptions)
at QoS 1 with a persistent session: across a broker restart that keeps its sessions
(mosquitto with persistence, stopped cleanly) the broker queues what the gateway publishes
while this consumer reconnects, as a real consumer would set it up. It subscribes again only
when the broker has lost the session. The session is an MQTT 3.1.1 one (clean_session
false): mosquitto 2.0.11 (Debian 12) forgets the MQTT 5 session of a client that is
connected when it shuts down (tested: session_present false after the restart, and what was
published before the reconnect never arrives), while it keeps a 3.1.1 one. Nothing the
consumer reads (topic, payload, retain flag) differs between the two.

A retained message the broker replays on a (re)subscription is the broker's copy of a state,
not a new delivery: its `seq` is recorded if it was never seen and skipped otherwise
(`retained_replays`). Everything else is recorded as it arrives, in arrival order, per
publisher (the site id of the topic), duplicates included: the check counts them and drops
them by seq, as docs/mqtt-api.md tells a consumer to (delivery is at least once). What it
must not see is one seq with two different payloads: a digest of each seq's first payload
is kept, and a later arrival of that seq with other bytes is counted in `conflicts()`.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import Counter
from typing import Any

import paho.mqtt.client as mqtt

from gateway.north import payloads, topics

__all__ = ["TelemetryConsumer"]


class TelemetryConsumer:
    """Start with `start()` (TimeoutError if the broker does not take the subscription in
    time), stop with `close()`. `sequences()` is what the telemetry check judges."""

    def __init__(self, host: str, port: int, site_id: str, *, connect_timeout_s: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.site_id = site_id
        self.connect_timeout_s = connect_timeout_s
        self.received = 0
        self.retained_replays = 0
        self.without_seq = 0            # birth/will (gateway/state) carry none; anything else is odd
        self.undecodable = 0
        self.acks: Counter[str] = Counter()   # "accepted" / "rejected:<reason>"
        self.online: dict[str, bool] = {}     # column id -> online, from the retained status
        self.gateway_state: str | None = None
        self.connects = 0
        self._seqs: dict[str, list[int]] = {}
        self._seen: dict[str, dict[int, bytes]] = {}   # publisher -> seq -> payload digest
        self._conflicts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311,
                                  client_id="hil-consumer-" + secrets.token_hex(4), clean_session=False)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.on_message = self._on_message

    def start(self) -> TelemetryConsumer:
        self.client.connect(self.host, self.port, keepalive=10)
        self.client.loop_start()
        if not self.subscribed.wait(self.connect_timeout_s):
            self.close()
            raise TimeoutError("broker %s:%d did not take the consumer's subscription"
                               % (self.host, self.port))
        return self

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    # -- MQTT callbacks (paho's thread) ----------------------------------------------------
    def _on_connect(self, client: mqtt.Client, _u: Any, flags: mqtt.ConnectFlags, reason: Any,
                    _p: Any) -> None:
        if reason.is_failure:
            return
        self.connects += 1
        if not flags.session_present:
            filters = topics.consumer_subscriptions(self.site_id)
            client.subscribe([(f, 1) for f in filters])

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        raw = bytes(msg.payload)
        try:
            body = payloads.decode(raw)
            topic = topics.parse(msg.topic)
        except ValueError:
            with self._lock:
                self.undecodable += 1
            return
        with self._lock:
            self._note(topic, body)
            seq = body.get("seq")
            if not isinstance(seq, int) or isinstance(seq, bool):
                self.without_seq += 1
                return
            seen = self._seen.setdefault(topic.site_id, {})
            if msg.retain and seq in seen:
                self.retained_replays += 1
                return
            self.received += 1
            digest = hashlib.blake2b(raw, digest_size=16).digest()
            if seen.setdefault(seq, digest) != digest:
                self._conflicts[topic.site_id] += 1
            self._seqs.setdefault(topic.site_id, []).append(seq)

    def _note(self, topic: topics.Topic, body: dict[str, Any]) -> None:
        if topic.kind is topics.TopicKind.GATEWAY_STATE:
            self.gateway_state = str(body.get("state"))
        elif topic.kind is topics.TopicKind.COLUMN_STATUS and topic.column_id is not None:
            self.online[topic.column_id] = bool(body.get("online"))
        elif topic.kind is topics.TopicKind.ACK:
            result = str(body.get("result"))
            self.acks[result if result == "accepted" else "%s:%s" % (result, body.get("reason"))] += 1

    # -- results ----------------------------------------------------------------------------
    def sequences(self) -> dict[str, list[int]]:
        """The sequence numbers received so far, per publisher, in arrival order."""
        with self._lock:
            return {pub: list(seqs) for pub, seqs in self._seqs.items()}

    def conflicts(self) -> dict[str, int]:
        """Per publisher: arrivals whose seq had come before with a different payload."""
        with self._lock:
            return dict(self._conflicts)

    def wait(self, what: str, pred: Any, timeout_s: float) -> None:
        """Until pred() holds (checked every 50 ms); TimeoutError naming `what` otherwise."""
        deadline = time.monotonic() + timeout_s
        while not pred():
            if time.monotonic() > deadline:
                raise TimeoutError("%s within %.0f s" % (what, timeout_s))
            time.sleep(0.05)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"received": self.received, "retained_replays": self.retained_replays,
                    "without_seq": self.without_seq, "undecodable": self.undecodable,
                    "connects": self.connects, "acks": dict(self.acks)}
