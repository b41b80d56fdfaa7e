"""Outbox + publisher through failures, against a real mosquitto: a broker killed mid-stream,
a gateway process SIGKILLed mid-stream, and a full queue while the broker is away.

The consumer's view is the oracle: after dropping duplicates by `seq`, every sequence
number arrives exactly once and in order (or is accounted for by an outbox_dropped event).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from gateway.north import payloads, topics
from gateway.north.outbox import MessageKind, Outbox, Outgoing
from gateway.north.publisher import Publisher
from gateway.north.settings import MqttSettings, parse_mqtt
from hil.rig.broker import Broker, Listener
from hil.rig.ports import free_port

REPO = Path(__file__).resolve().parents[2]
SITE = "site-1"
TEL = topics.site_telemetry(SITE)
EVENTS = topics.site_events(SITE)
STATE = topics.gateway_state(SITE)


class Consumer:
    """A DNO consumer that reconnects by itself and subscribes again on every connection."""

    def __init__(self, port: int, filters: list[str]) -> None:
        self.messages: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self.subscriptions = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.client.reconnect_delay_set(0.02, 0.1)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe([(f, 1) for f in filters])
        self.client.on_subscribe = lambda *_: self._subscribed()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.wait(lambda c: c.subscriptions == 1)

    def _subscribed(self) -> None:
        with self._lock:
            self.subscriptions += 1

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, json.loads(msg.payload)))

    def on(self, topic: str) -> list[dict[str, Any]]:
        with self._lock:
            return [p for t, p in self.messages if t == topic]

    def seqs(self, topic: str = TEL) -> list[int]:
        return [int(p["seq"]) for p in self.on(topic)]

    def wait(self, pred: Callable[[Consumer], bool], timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not pred(self):
            assert time.monotonic() < deadline, f"timed out with {len(self.messages)} messages"
            time.sleep(0.01)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def first_occurrences(seqs: list[int]) -> list[int]:
    """Dedup by seq, keeping the order of first arrival."""
    seen: set[int] = set()
    out = []
    for s in seqs:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _settings(port: int, db: Path, **extra: Any) -> MqttSettings:
    table: dict[str, Any] = {"host": "127.0.0.1", "port": port, "client_id": "gw-site-1",
                             "reconnect_min_s": 0.05, "reconnect_max_s": 0.2, "inflight_max": 32,
                             "outbox": {"path": str(db)}}
    table.update(extra)
    return parse_mqtt(table)


def test_broker_killed_mid_stream_loses_nothing(tmp_path: Path) -> None:
    burst, total = 40, 300 + 40
    with Broker([Listener("plain")]) as broker:
        consumer = Consumer(broker.port(), [TEL])
        settings = _settings(broker.port(), tmp_path / "o.db")

        async def crash_under_a_burst(pub: Publisher, ob: Outbox) -> None:
            # mosquitto PUBACKs a message before it forwards it, so a crash in between loses
            # it inside the broker, out of any publisher's reach. Let the stream settle first,
            # then freeze the broker: the burst is then certainly in flight and unacknowledged
            # when it dies, and must be sent again.
            assert await pub.drained(5)
            await asyncio.to_thread(consumer.wait, lambda c: len(set(c.seqs())) == ob.next_seq - 1)
            assert broker.proc is not None
            broker.proc.send_signal(signal.SIGSTOP)
            sent, acked = pub.stats.published, pub.stats.acked
            ob.enqueue_many([Outgoing(TEL, {"ts_ms": 0, "burst": b}, MessageKind.TELEMETRY)
                             for b in range(burst)])
            while pub.stats.published < sent + settings.inflight_max:
                await asyncio.sleep(0.001)
            assert pub.stats.acked == acked
            await asyncio.to_thread(broker.kill)  # SIGKILL: no will, no goodbye, nothing saved

        async def main() -> Publisher:
            with Outbox(settings.outbox.path, durability="normal") as ob:
                async with Publisher(settings, ob, site_id=SITE) as pub:
                    for n in range(300):
                        ob.enqueue(TEL, {"ts_ms": n, "n": n}, kind=MessageKind.TELEMETRY)
                        await asyncio.sleep(0.003)
                        if n == 80:
                            await crash_under_a_burst(pub, ob)
                        if n == 160:
                            assert not pub.connected and len(ob) > 50  # queued while away
                            # Same port. The broker kept no sessions, so the consumer must be
                            # subscribed again before the backlog goes out: blocking the event
                            # loop here holds the publisher back until then (a consumer with a
                            # persistent session on a persistent broker needs no such help).
                            broker.start()
                            consumer.wait(lambda c: c.subscriptions == 2)
                    assert await pub.drained(10)
                return pub

        pub = asyncio.run(main())
        consumer.wait(lambda c: set(c.seqs()) >= set(range(1, total + 1)))
        seqs = consumer.seqs()
        assert first_occurrences(seqs) == list(range(1, total + 1))
        assert [p.get("n") for p in consumer.on(TEL)][:81] == list(range(81))
        assert pub.stats.disconnects == 1 and pub.stats.connects == 2
        assert pub.stats.published >= total + settings.inflight_max  # the burst went out twice
        consumer.close()


GATEWAY = """
import asyncio, sys
from gateway.north.outbox import MessageKind, Outbox, Outgoing
from gateway.north.publisher import Publisher
from gateway.north.settings import parse_mqtt

port, db, start, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
TEL = "evedge/v1/site-1/telemetry"

async def main():
    s = parse_mqtt({"host": "127.0.0.1", "port": port, "client_id": "gw-site-1", "inflight_max": 32,
                    "reconnect_min_s": 0.05, "reconnect_max_s": 0.2, "outbox": {"path": db}})
    with Outbox(s.outbox.path) as ob:
        async with Publisher(s, ob, site_id="site-1") as pub:
            for n in range(start, start + count):
                ob.enqueue(TEL, {"ts_ms": n, "n": n}, kind=MessageKind.TELEMETRY)
                await asyncio.sleep(0.002)
            assert await pub.drained(20)

asyncio.run(main())
"""


def _gateway(script: Path, port: int, db: Path, start: int, count: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(script), str(port), str(db), str(start), str(count)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_gateway_killed_mid_stream_loses_nothing(tmp_path: Path) -> None:
    script = tmp_path / "gw_process.py"  # not gateway.py: it would shadow the package
    script.write_text(GATEWAY)
    db = tmp_path / "outbox.sqlite3"
    with Broker([Listener("plain")]) as broker:
        consumer = Consumer(broker.port(), [TEL, STATE])
        first = _gateway(script, broker.port(), db, 0, 400)
        try:
            consumer.wait(lambda c: len(c.on(TEL)) >= 100 or first.poll() is not None)
        finally:
            first.send_signal(signal.SIGKILL)  # a crash: no clean shutdown, no flush
            _, err = first.communicate(timeout=10)
        assert first.returncode == -signal.SIGKILL, err.decode()[-2000:]
        consumer.wait(lambda c: any(p.get("cause") == "will" for p in c.on(STATE)))  # the will fired
        with Outbox(db) as ob:
            committed = ob.next_seq - 1
            backlog = len(ob)
        assert committed < 400 and backlog > 0  # killed mid-stream with messages still queued

        second = _gateway(script, broker.port(), db, 1000, 50)
        _, err = second.communicate(timeout=30)
        assert second.returncode == 0, err.decode()[-2000:]
        consumer.wait(lambda c: set(c.seqs()) >= set(range(1, committed + 51)))

        assert first_occurrences(consumer.seqs()) == list(range(1, committed + 51))
        by_seq = {p["seq"]: p["n"] for p in consumer.on(TEL)}
        # every message the first run committed, then every message of the second run
        assert [by_seq[s] for s in range(1, committed + 51)] == [*range(committed), *range(1000, 1050)]
        with Outbox(db) as ob:
            assert len(ob) == 0 and ob.next_seq == committed + 51
        states = [p["state"] for p in consumer.on(STATE)]
        assert states == ["online", "offline", "online", "offline"]
        consumer.close()


def test_a_full_queue_drops_by_policy_and_says_so(tmp_path: Path) -> None:
    port = free_port()
    settings = _settings(port, tmp_path / "o.db")

    async def main() -> None:
        with Outbox(settings.outbox.path, max_rows=40, durability="normal") as ob:
            async with Publisher(settings, ob, site_id=SITE):
                for n in range(100):  # broker away: the queue overflows
                    ob.enqueue(TEL, {"ts_ms": n, "n": n}, kind=MessageKind.TELEMETRY)
                    if n % 10 == 0:
                        ob.enqueue(EVENTS, payloads.event("fault", ts_ms=n, column_id="c1"),
                                   kind=MessageKind.EVENT)
                assert ob.drop_report() is not None  # reported by the publisher once connected
                with Broker([Listener("plain", port=port)]):
                    consumer = Consumer(port, [TEL, EVENTS])
                    await asyncio.to_thread(consumer.wait, lambda c: any(
                        p["event"] == "outbox_dropped" for p in c.on(EVENTS)))
                    await asyncio.sleep(0.2)
                    consumer.close()
        events = [p for p in consumer.on(EVENTS) if p["event"] == "fault"]
        (report,) = [p for p in consumer.on(EVENTS) if p["event"] == "outbox_dropped"]
        assert len(events) == 10  # events are never dropped while telemetry is queued
        seen = set(consumer.seqs(TEL)) | {p["seq"] for p in consumer.on(EVENTS)}
        missing = set(range(1, report["seq"])) - seen
        assert len(missing) == report["dropped_telemetry"] > 0
        assert report["dropped_event"] == report["dropped_status"] == report["dropped_ack"] == 0
        assert min(missing) == report["first_seq"] and max(missing) == report["last_seq"]
        assert consumer.seqs(TEL) == sorted(consumer.seqs(TEL))  # the newest telemetry, in order

    asyncio.run(main())
