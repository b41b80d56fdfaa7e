"""A site-local mosquitto bridged to the control room, both started from the shipped templates
(deploy/mosquitto/site/ and control-room/): the real gateway north side (Outbox + Publisher)
publishes to the site broker with its local password, the bridge carries the site's topics to
the control room over TLS with the site's certificate, and a DNO client there reads them and
sends signed commands back. The WAN between them is a TCP link the test can cut.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.north import payloads, topics
from gateway.north.auth import KeyStore, sign_command
from gateway.north.payloads import encode, utc_ms
from tests.gateway.api_brokers import (
    CuttableLink,
    RevocablePki,
    TemplateBroker,
    control_room_broker,
    gateway_user,
    site_broker,
)
from tests.gateway.api_gateway import GatewayNorth, mqtt_settings
from tests.gateway.api_mqtt import Peer, Tls, wait_until

SITE = "site-a"
DNO = "dno-ops"
KEY_ID, KEY = "dno-1", bytes(range(100, 132))
LOCAL_PASSWORD = "local-secret-for-the-test"
BRIDGE_STATE = f"evedge/v1/{SITE}/bridge/state"
REPLY_TO = f"{topics.ack(SITE)}/ops-1"
NO_SUBSCRIBERS = 0x10


@dataclass
class Rig:
    pki: RevocablePki
    room: TemplateBroker
    link: CuttableLink
    site: TemplateBroker
    gateway: GatewayNorth

    @property
    def room_port(self) -> int:
        return self.room.port("template")

    def dno(self, **kwargs: object) -> Peer:
        cert = self.pki.clients[DNO]
        return Peer.connect(self.room_port, tls=Tls(self.pki.cafile, cert.certfile, cert.keyfile),
                            **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    pki = RevocablePki(tmp_path / "pki")
    pki.issue(gateway_user(SITE))
    pki.issue(DNO)
    room = control_room_broker(tmp_path / "control-room", pki, sites=[SITE], dno_users=[DNO])
    link = CuttableLink(room.port("template"))
    site = site_broker(tmp_path / "site", pki, site_id=SITE, control_room=f"127.0.0.1:{link.port}",
                       gateway_password=LOCAL_PASSWORD)
    settings = mqtt_settings(tmp_path / "gateway", port=site.port("template"), client_id="evedge-gw",
                             username=gateway_user(SITE), password=LOCAL_PASSWORD)
    gateway = GatewayNorth(settings, site_id=SITE, keys=KeyStore({KEY_ID: KEY}))
    try:
        room.start()
        link.start()
        site.start()
        gateway.start()
        wait_until(lambda: gateway.connected, what="the gateway on the site broker")
        yield Rig(pki, room, link, site, gateway)
    finally:
        gateway.stop()
        site.cleanup()
        link.close()
        room.cleanup()


def _telemetry(n: int) -> dict[str, object]:
    return payloads.site_telemetry(ts_ms=utc_ms(), power_w=1000.0 * n, current_a=[n, n, n], limit_a=63.0,
                                   limit_source="connection", limit_valid_until_ms=None, active_sessions=n)


def _command(cmd_id: str, limit_a: float = 40.0) -> bytes:
    topic = topics.cmd_site_limit(SITE)
    body = {"id": cmd_id, "issued_ms": utc_ms(), "validity_s": 600, "limit_a": limit_a}
    return encode(sign_command(body, topic, KEY_ID, KEY))


def _seqs(peer: Peer, topic: str) -> list[int]:
    """Sequence numbers as a consumer keeps them: duplicates dropped (QoS 1 is at least once:
    a message whose PUBACK was lost in the cut is sent again)."""
    seen: list[int] = []
    for message in peer.on(topic):
        seq = json.loads(message.payload)["seq"]
        if seq not in seen:
            seen.append(seq)
    return seen


def _bridge_up(peer: Peer) -> bool:
    states = peer.on(BRIDGE_STATE)
    return bool(states) and states[-1].payload == b"1"


def test_site_topics_reach_the_control_room_and_commands_come_back(rig: Rig) -> None:
    dno = rig.dno()
    try:
        dno.subscribe(["evedge/v1/+/#"])
        # Retained state crossed the bridge: the gateway's birth and the bridge's own "1".
        dno.wait_for(lambda m: m.topic == topics.gateway_state(SITE) and m.retain, what="retained birth")
        assert json.loads(dno.on(topics.gateway_state(SITE))[-1].payload)["state"] == "online"
        dno.wait_for(lambda m: m.topic == BRIDGE_STATE and m.retain and m.payload == b"1")

        status = payloads.column_status(ts_ms=utc_ms(), column_id="c01", status="Charging", state="C")
        seqs = [rig.gateway.publish(topics.site_telemetry(SITE), _telemetry(n)) for n in range(1, 6)]
        seqs.append(rig.gateway.publish(topics.column_status(SITE, "c01"), status))
        dno.wait_for(lambda m: m.topic == topics.column_status(SITE, "c01"), what="column status")
        assert _seqs(dno, topics.site_telemetry(SITE)) == seqs[:5]

        # A signed command with an MQTT 5 response topic: the properties cross the bridge both ways.
        assert dno.publish(topics.cmd_site_limit(SITE), _command("bridge-1"), response_topic=REPLY_TO,
                           correlation_data=b"corr-1") == 0
        (ack,) = dno.wait_for(lambda m: m.topic == REPLY_TO, what="the ack on the response topic")
        assert ack.correlation_data == b"corr-1"
        body = json.loads(ack.payload)
        assert (body["id"], body["result"], body["reason"], body["applied_limit_a"]) == \
               ("bridge-1", "accepted", "ok", 40.0)
    finally:
        dno.close()


def test_a_cut_bridge_queues_at_the_site_and_delivers_everything_after(rig: Rig) -> None:
    dno = rig.dno()
    try:
        # Filters that do not cover cmd/: with `evedge/v1/+/#` the DNO's own subscription would
        # match its commands (the ACL stops delivery, not the match) and hide the 0x10 below.
        dno.subscribe([topics.site_telemetry(SITE), BRIDGE_STATE, topics.ack(SITE)])
        wait_until(lambda: _bridge_up(dno), what="bridge up")
        first = rig.gateway.publish(topics.site_telemetry(SITE), _telemetry(0))
        dno.wait_for(lambda m: m.topic == topics.site_telemetry(SITE))

        rig.link.cut()
        # The control room publishes the bridge's will: the site is unreachable.
        dno.wait_for(lambda m: m.topic == BRIDGE_STATE and m.payload == b"0", what="bridge state 0")
        seqs = [rig.gateway.publish(topics.site_telemetry(SITE), _telemetry(n)) for n in range(1, 21)]
        # The site broker acknowledged them: the gateway's outbox is empty, the site broker holds them.
        assert rig.gateway.drained(5)
        # A command sent during the cut is not queued for the site (just as for a directly
        # connected gateway that is offline): the broker says so in the PUBACK (0x10, no
        # matching subscribers) and no ack will come.
        assert dno.publish(topics.cmd_site_limit(SITE), _command("during-cut", 32.0)) == NO_SUBSCRIBERS
        time.sleep(0.3)
        assert _seqs(dno, topics.site_telemetry(SITE)) == [first]

        rig.link.restore()
        wait_until(lambda: _seqs(dno, topics.site_telemetry(SITE))[-1:] == seqs[-1:], timeout_s=15,
                   what="the queued telemetry")
        assert _seqs(dno, topics.site_telemetry(SITE)) == [first, *seqs]
        wait_until(lambda: _bridge_up(dno), what="bridge state 1")
        assert dno.publish(topics.cmd_site_limit(SITE), _command("after-cut", 32.0)) == 0
        dno.wait_for(lambda m: m.topic == topics.ack(SITE), what="the ack of the command after the cut")
        assert [d.command_id for d in rig.gateway.decisions] == ["after-cut"]
        assert json.loads(dno.on(topics.ack(SITE))[-1].payload)["applied_limit_a"] == 32.0
    finally:
        dno.close()


def test_the_site_broker_keeps_its_queue_across_its_own_restart(rig: Rig) -> None:
    dno = rig.dno()
    try:
        dno.subscribe([topics.site_telemetry(SITE)])
        rig.link.cut()
        seqs = [rig.gateway.publish(topics.site_telemetry(SITE), _telemetry(n)) for n in range(1, 11)]
        assert rig.gateway.drained(5)
        rig.site.restart()  # SIGTERM: mosquitto saves its queue; the gateway reconnects by itself
        rig.link.restore()
        wait_until(lambda: _seqs(dno, topics.site_telemetry(SITE)) == seqs, timeout_s=15,
                   what="the telemetry queued before the site broker restarted")
    finally:
        dno.close()


def test_a_control_room_restart_loses_nothing_for_a_persistent_consumer(rig: Rig) -> None:
    # A DNO consumer with a session that outlives its connection (clean start off).
    dno = rig.dno(client_id="dno-ignored", session_expiry_s=3600)
    try:
        dno.subscribe([topics.site_telemetry(SITE)])
        before = rig.gateway.publish(topics.site_telemetry(SITE), _telemetry(0))
        dno.wait_for(lambda m: True)
        rig.room.stop()                      # SIGTERM: the broker saves sessions and retained state
        during = [rig.gateway.publish(topics.site_telemetry(SITE), _telemetry(n)) for n in range(1, 11)]
        assert rig.gateway.drained(5)
        rig.room.start()                     # same port; the bridge and the consumer reconnect
        wait_until(lambda: _seqs(dno, topics.site_telemetry(SITE))[-1:] == during[-1:], timeout_s=15,
                   what="the telemetry published while the control room was down")
        assert _seqs(dno, topics.site_telemetry(SITE)) == [before, *during]
        assert dno.session_present
    finally:
        dno.close()


def test_the_local_listener_refuses_strangers(rig: Rig) -> None:
    port = rig.site.port("template")
    for username, password in ((None, None), (gateway_user(SITE), "wrong"), ("someone", LOCAL_PASSWORD)):
        peer = Peer(port, username=username, password=password)
        try:
            reason = peer.try_connect(timeout_s=3)
            assert reason is not None and reason.is_failure, (username, reason)
        finally:
            peer.close()
    # The gateway's local user cannot forge a command for its own gateway on the site broker.
    gw = Peer.connect(port, username=gateway_user(SITE), password=LOCAL_PASSWORD)
    try:
        assert gw.publish(topics.cmd_site_limit(SITE), _command("local")) == 0x87
        assert gw.publish("evedge/v1/site-b/telemetry", b"{}") == 0x87
    finally:
        gw.close()
