"""The HIL telemetry consumer against a real mosquitto: it records what a DNO consumer would
receive, redeliveries included, and catches one seq sent with two different payloads."""

from __future__ import annotations

import paho.mqtt.client as mqtt

from gateway.north import payloads, topics
from hil.replay.oracles import check_telemetry
from hil.replay.telemetry_consumer import TelemetryConsumer
from hil.rig.broker import Broker

SITE = "site-a"


def _telemetry(seq: int, power_w: float) -> bytes:
    body = payloads.site_telemetry(ts_ms=1_700_000_000_000, power_w=power_w, current_a=[10.0, 10.0, 10.0],
                                   limit_a=32.0, limit_source="dno", limit_valid_until_ms=None,
                                   active_sessions=1)
    return payloads.encode({**body, "seq": seq})


def test_redeliveries_are_recorded_and_a_seq_with_two_payloads_is_a_conflict(mqtt_broker: Broker) -> None:
    consumer = TelemetryConsumer(mqtt_broker.host, mqtt_broker.port(), SITE).start()
    gateway = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    gateway.connect(mqtt_broker.host, mqtt_broker.port())
    gateway.loop_start()
    try:
        topic = topics.site_telemetry(SITE)
        # 2 again with the same bytes (a QoS 1 redelivery), 3 again with other bytes (a bug).
        for seq, power in ((1, 1000.0), (2, 2000.0), (2, 2000.0), (3, 3000.0), (3, 3500.0), (4, 4000.0)):
            gateway.publish(topic, _telemetry(seq, power), qos=1).wait_for_publish(5)
        consumer.wait("six messages", lambda: consumer.received == 6, 10)
        seqs, conflicts = consumer.sequences(), consumer.conflicts()
    finally:
        gateway.loop_stop()
        gateway.disconnect()
        consumer.close()
    assert seqs == {SITE: [1, 2, 2, 3, 3, 4]} and conflicts == {SITE: 1}
    judged = check_telemetry(seqs, conflicting=conflicts)
    assert not judged.passed
    assert (judged.figure["lost"], judged.figure["duplicates"], judged.figure["conflicting"]) == (0, 2, 1)
    # The same arrivals without the conflicting payload: what a consumer keeps is complete.
    assert check_telemetry(seqs).passed
