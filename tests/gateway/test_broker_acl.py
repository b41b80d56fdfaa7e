"""The shipped control room broker config (deploy/mosquitto/control-room/) enforces who may do
what: TLS with client certificates only, the certificate's CN as username and client id, and
an ACL that lets a gateway publish only its own site's telemetry and read only its own site's
commands, and lets a DNO application command and read but never publish telemetry.

mosquitto 2.0 answers a refused QoS 1 publish with PUBACK reason 0x87 (not authorized); it
grants subscriptions and filters each message on delivery, so "cannot read" is proven by a
message that does not arrive while a message sent after it to an allowed reader does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from gateway.north import payloads, topics
from gateway.north.auth import sign_command
from gateway.north.payloads import encode
from tests.gateway.api_brokers import (
    ACL_DNO,
    ACL_SITE,
    CONTROL_ROOM_CONF,
    SITE_ACL,
    SITE_CONF,
    RevocablePki,
    TemplateBroker,
    control_room_broker,
    gateway_user,
    refresh_crl,
    render,
)
from tests.gateway.api_mqtt import Peer, Tls, wait_until

NOT_AUTHORIZED = 0x87
SITE_A, SITE_B = "site-a", "site-b"
DNO, DNO_2 = "dno-ops", "dno-monitor"
TS = 1_767_225_600_000
KEY = bytes(range(32))


@dataclass
class ControlRoom:
    broker: TemplateBroker
    pki: RevocablePki

    @property
    def port(self) -> int:
        return self.broker.port("template")

    def tls(self, name: str) -> Tls:
        cert = self.pki.clients[name]
        return Tls(self.pki.cafile, cert.certfile, cert.keyfile)

    def peer(self, name: str, **kwargs: object) -> Peer:
        return Peer.connect(self.port, tls=self.tls(name), **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def room(tmp_path: Path) -> Iterator[ControlRoom]:
    pki = RevocablePki(tmp_path / "pki")
    for name in (gateway_user(SITE_A), gateway_user(SITE_B), DNO, DNO_2, "intruder"):
        pki.issue(name)
    broker = control_room_broker(tmp_path / "control-room", pki, sites=[SITE_A, SITE_B],
                                 dno_users=[DNO, DNO_2])
    with broker:
        yield ControlRoom(broker, pki)


@pytest.fixture
def peers(room: ControlRoom) -> Iterator[dict[str, Peer]]:
    made: dict[str, Peer] = {}
    for name in (gateway_user(SITE_A), gateway_user(SITE_B), DNO, DNO_2):
        made[name] = room.peer(name)
    yield made
    for peer in made.values():
        peer.close()


def _column_telemetry() -> bytes:
    return encode({**payloads.column_telemetry(
        ts_ms=TS, column_id="c01", current_a=[16.0, 16.0, 16.0], voltage_v=[230.0, 231.0, 229.0],
        power_w=11_040.0, energy_wh=1234.0, offered_a=16.0, applied_limit_a=16.0,
        limit_source="gateway", state="C", status="Charging"), "seq": 1})


def _signed_limit(site: str, cmd_id: str) -> bytes:
    topic = topics.cmd_site_limit(site)
    return encode(sign_command({"id": cmd_id, "issued_ms": TS, "validity_s": 60, "limit_a": 40},
                               topic, "dno-1", KEY))


def _every_command_topic(site: str) -> list[str]:
    return [topics.cmd_site_limit(site), topics.cmd_site_failsafe(site),
            topics.cmd_column_limit(site, "c01"), topics.cmd_config(site),
            f"evedge/v1/{site}/cmd/anything/else"]


def _telemetry_topics(site: str) -> list[str]:
    return [topics.gateway_state(site), topics.site_telemetry(site), topics.site_events(site),
            topics.column_status(site, "c01"), topics.column_telemetry(site, "c01"),
            topics.column_events(site, "c01"), topics.ack(site), f"{topics.ack(site)}/ops-1",
            f"evedge/v1/{site}/bridge/state"]


def test_a_gateway_publishes_its_own_sites_topics_and_the_dno_reads_them(peers: dict[str, Peer]) -> None:
    gw, dno = peers[gateway_user(SITE_A)], peers[DNO]
    dno.subscribe(["evedge/v1/+/#"])
    for topic in _telemetry_topics(SITE_A):
        assert gw.publish(topic, _column_telemetry()) == 0, topic
    dno.wait_for(lambda m: m.topic == _telemetry_topics(SITE_A)[-1])
    assert {m.topic for m in dno.received} == set(_telemetry_topics(SITE_A))


def test_a_gateway_cannot_publish_any_sites_commands(peers: dict[str, Peer]) -> None:
    gw_a, gw_b, dno = peers[gateway_user(SITE_A)], peers[gateway_user(SITE_B)], peers[DNO]
    gw_b.subscribe([f"evedge/v1/{SITE_B}/cmd/#"])
    gw_a.subscribe([f"evedge/v1/{SITE_A}/cmd/#"])
    for site in (SITE_B, SITE_A):   # another site's commands, and forging its own
        for topic in _every_command_topic(site):
            assert gw_a.publish(topic, _signed_limit(site, "forged")) == NOT_AUTHORIZED, topic
    # The same publish from the DNO goes through; sent last, it proves nothing is in flight.
    assert dno.publish(topics.cmd_site_limit(SITE_B), _signed_limit(SITE_B, "real")) == 0
    got = gw_b.wait_for(lambda m: True, what="the DNO's command")
    assert [m.payload for m in got] == [_signed_limit(SITE_B, "real")]
    assert gw_a.received == []


def test_a_gateway_cannot_read_another_sites_commands(peers: dict[str, Peer]) -> None:
    gw_a, gw_b, dno = peers[gateway_user(SITE_A)], peers[gateway_user(SITE_B)], peers[DNO]
    codes = gw_a.subscribe([f"evedge/v1/{SITE_B}/cmd/#", "evedge/v1/+/cmd/#", "#"])
    # mosquitto 2.0 grants these (QoS 1) or refuses them (0x87); either way nothing may arrive.
    assert all(rc.value in (1, NOT_AUTHORIZED) for rc in codes), codes
    gw_b.subscribe([f"evedge/v1/{SITE_B}/cmd/#"])
    assert dno.publish(topics.cmd_site_limit(SITE_B), _signed_limit(SITE_B, "for-b")) == 0
    assert dno.publish(topics.cmd_site_limit(SITE_A), _signed_limit(SITE_A, "for-a")) == 0
    gw_b.wait_for(lambda m: True, what="site B's command")
    gw_a.wait_for(lambda m: True, what="site A's own command")
    # (two of its filters match its own command, so it may get that one twice)
    assert {m.topic for m in gw_a.received} == {topics.cmd_site_limit(SITE_A)}
    assert [m.topic for m in gw_b.received] == [topics.cmd_site_limit(SITE_B)]


def test_a_gateway_cannot_impersonate_another_site(peers: dict[str, Peer]) -> None:
    gw_a, dno = peers[gateway_user(SITE_A)], peers[DNO]
    dno.subscribe(["evedge/v1/+/#"])
    for topic in _telemetry_topics(SITE_B):
        assert gw_a.publish(topic, _column_telemetry()) == NOT_AUTHORIZED, topic
    assert gw_a.publish(topics.site_telemetry(SITE_A), _column_telemetry()) == 0
    dno.wait_for(lambda m: True)
    assert [m.topic for m in dno.received] == [topics.site_telemetry(SITE_A)]


def test_a_gateway_cannot_take_over_another_sites_session(room: ControlRoom) -> None:
    dno = room.peer(DNO)
    # Site B's gateway (or bridge) with its usual client id and a persistent session.
    gw_b = room.peer(gateway_user(SITE_B), client_id=gateway_user(SITE_B), session_expiry_s=600)
    # Site A claims that client id: the broker uses the certificate's CN instead, so site B
    # is neither kicked off nor robbed of its session.
    thief = room.peer(gateway_user(SITE_A), client_id=gateway_user(SITE_B), session_expiry_s=600)
    try:
        gw_b.subscribe([f"evedge/v1/{SITE_B}/cmd/#"])
        thief.subscribe(["#"])
        assert dno.publish(topics.cmd_site_limit(SITE_B), _signed_limit(SITE_B, "x")) == 0
        gw_b.wait_for(lambda m: True, what="site B's command")
        assert not gw_b.disconnected.is_set()
        assert thief.received == []
    finally:
        for peer in (thief, gw_b, dno):
            peer.close()


def test_a_dno_client_can_command_but_not_publish_telemetry(peers: dict[str, Peer]) -> None:
    gw_a, dno, monitor = peers[gateway_user(SITE_A)], peers[DNO], peers[DNO_2]
    gw_a.subscribe([f"evedge/v1/{SITE_A}/cmd/#"])
    monitor.subscribe(["evedge/v1/+/#"])
    for topic in _telemetry_topics(SITE_A):
        assert dno.publish(topic, _column_telemetry(), retain=True) == NOT_AUTHORIZED, topic
    for topic in _every_command_topic(SITE_A):
        assert dno.publish(topic, _signed_limit(SITE_A, "c")) == 0, topic
    gw_a.wait_for(lambda m: True, count=len(_every_command_topic(SITE_A)), what="every command")
    assert gw_a.publish(topics.site_telemetry(SITE_A), _column_telemetry()) == 0
    monitor.wait_for(lambda m: True, what="the gateway's telemetry")
    # Neither the refused telemetry nor the commands (a DNO user cannot read cmd/) reached it.
    assert [m.topic for m in monitor.received] == [topics.site_telemetry(SITE_A)]


def test_dno_consumers_share_the_load_with_shared_subscriptions(peers: dict[str, Peer]) -> None:
    gw_a = peers[gateway_user(SITE_A)]
    consumers = [peers[DNO], peers[DNO_2]]
    for consumer in consumers:
        assert [rc.value for rc in consumer.subscribe(
            ["$share/ingest/evedge/v1/+/columns/+/telemetry"])] == [1]
    for _ in range(40):
        assert gw_a.publish(topics.column_telemetry(SITE_A, "c01"), _column_telemetry()) == 0
    wait_until(lambda: sum(len(c.received) for c in consumers) >= 40, what="all 40 across the group")
    # Each message went to exactly one member of the group, and both members got some.
    assert sum(len(c.received) for c in consumers) == 40
    assert all(c.received for c in consumers)


@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA", "revoked certificate",
                                 "plain MQTT"])
def test_an_unknown_client_cannot_connect(tmp_path: Path, room: ControlRoom, who: str) -> None:
    good = Peer.connect(room.port, tls=room.tls(DNO))  # the listener works for a known client
    good.close()
    if who == "no certificate":
        tls: Tls | None = Tls(room.pki.cafile)
    elif who == "certificate from another CA":
        cert = room.pki.issue(DNO, ca=trustme.CA())  # same CN, wrong issuer
        tls = Tls(room.pki.cafile, cert.certfile, cert.keyfile)
    elif who == "revoked certificate":
        room.pki.revoke(gateway_user(SITE_B))
        refresh_crl(room.broker, room.pki)
        room.broker.restart()
        tls = room.tls(gateway_user(SITE_B))
    else:
        tls = None
    stranger = Peer(room.port, tls=tls)
    try:
        reason = stranger.try_connect(timeout_s=3)
        assert reason is None or reason.is_failure, f"{who}: connected ({reason})"
    finally:
        stranger.close()
    if who == "revoked certificate":  # only that one: site A still connects after the restart
        Peer.connect(room.port, tls=room.tls(gateway_user(SITE_A))).close()


def test_a_certificate_without_an_acl_entry_can_do_nothing(room: ControlRoom,
                                                           peers: dict[str, Peer]) -> None:
    intruder = room.peer("intruder")
    try:
        intruder.subscribe(["#", "evedge/v1/+/#"])
        assert intruder.publish(topics.cmd_site_limit(SITE_A), _signed_limit(SITE_A, "i")) == NOT_AUTHORIZED
        assert intruder.publish(topics.site_telemetry(SITE_A), _column_telemetry()) == NOT_AUTHORIZED
        dno = peers[DNO]
        dno.subscribe(["evedge/v1/+/#"])
        assert peers[gateway_user(SITE_A)].publish(topics.site_telemetry(SITE_A), _column_telemetry()) == 0
        dno.wait_for(lambda m: True)
        assert intruder.received == []
    finally:
        intruder.close()


@pytest.mark.parametrize(("template", "names"), [
    (CONTROL_ROOM_CONF, ("EVEDGE_MQTT_DIR", "LISTEN_ADDRESS", "LISTEN_PORT", "PERSISTENCE_DIR")),
    (SITE_CONF, ("SITE_ID", "EVEDGE_MQTT_DIR", "LOCAL_PORT", "CONTROL_ROOM_ADDRESS", "PERSISTENCE_DIR")),
    (ACL_SITE, ("SITE_ID",)), (ACL_DNO, ("DNO_USER",)), (SITE_ACL, ("SITE_ID",)),
])
def test_the_templates_render_with_envsubst_as_documented(template: Path, names: tuple[str, ...]) -> None:
    """The tests render the templates the way deployment.md tells an operator to: the same text."""
    if shutil.which("envsubst") is None:
        pytest.skip("envsubst not installed (Debian: gettext-base)")
    values = {name: f"<{name.lower()}>" for name in names}
    shell_format = " ".join(f"${{{name}}}" for name in names)
    done = subprocess.run(["envsubst", shell_format], input=template.read_text(), capture_output=True,
                          text=True, check=True, env={**os.environ, **values})
    assert done.stdout == render(template, values)
    assert "${" not in "\n".join(line for line in done.stdout.splitlines() if not line.startswith("#"))
