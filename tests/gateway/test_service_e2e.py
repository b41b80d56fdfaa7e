"""The whole gateway end to end: `python -m gateway run` as a process, a real mosquitto, and
virtual columns running the real firmware app on every link the gateway speaks:

    rtu-1, rtu-2   Modbus RTU, both on ONE RS-485 bus (pty lines joined by a fan-out relay)
    tcp-1          Modbus TCP, the firmware in the MicroPython unix port (from the .mpy bundle)
    cbor-1         CBOR message link over TCP
    cbor-2         CBOR message link over a serial line, single phase on L2

The site: 100 A per phase, DNO failsafe 40 A; every column has a car charging at 5 A. A DNO
client signs and sends a site limit, and bad, replayed and expired commands. The tests run
in file order on one site (one gateway process); the last one stops the gateway.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from firmware import regmap
from gateway.config import load_config
from gateway.core.failsafe import plan_failsafe
from gateway.core.limits import SOURCE_DNO_FAILSAFE
from gateway.north import payloads, topics
from gateway.service import GatewayService
from hil.models.sdm_meter import SdmMeterModel, ThreadedSdmMeter
from hil.rig.broker import Broker, Listener
from hil.rig.ports import free_port
from hil.rig.serial_pair import SerialPair
from hil.rig.vcolumn import VirtualColumn
from tests.gateway.south_columns import FirmwareColumn, TcpColumnServer
from tests.gateway.svc_rig import (
    BusRelay,
    DnoClient,
    GatewayProcess,
    new_key,
    offered_da,
    on,
    toml_text,
    wait_until,
    write_secrets,
)
from tools.firmware_build import build

SITE = "e2e-site"
LOCAL = "127.0.0.1"
CAPACITY_A = 100
DNO_FAILSAFE_A = 40
HEARTBEAT_TIMEOUT_S = 10      # the columns' (the firmware's minimum)
COLUMN_BASE: dict[str, Any] = {
    "phases": 3, "hardware_rating_a": 32, "installation_rating_a": 32, "failsafe_a": 6,
    "meter": {"type": "sdm630", "address": 1, "baud": 9600},
    "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S, "min_pause_s": 0, "pwm_min_change_interval_s": 0,
}
# Initial allocation at 100 A: L2 carries all five sessions; cbor-2 stops at its 16 A rating,
# the four 3-phase columns share the rest: (100 - 16) / 4 = 21 A.
INITIAL_DA = {"rtu-1": 210, "rtu-2": 210, "tcp-1": 210, "cbor-1": 210, "cbor-2": 160}


@dataclass
class Rig:
    gateway: GatewayProcess
    dno: DnoClient
    columns: list[VirtualColumn]
    config_path: Path
    audit_path: Path
    failsafe_da: dict[str, int]


def _column(cid: str, address: int, link: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**COLUMN_BASE, "column_id": cid, "bus_address": address, "link": link, **extra}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("e2e")
    bundle = build(out=tmp / "bundle").root
    tcp_port, cbor_port = free_port(), free_port()
    specs = [
        ("cpython", _column("rtu-1", 1, {"mode": "modbus-rtu", "baud": 19200})),
        ("cpython", _column("rtu-2", 2, {"mode": "modbus-rtu", "baud": 19200})),
        ("micropython", _column("tcp-1", 5, {"mode": "modbus-tcp", "tcp_port": tcp_port, "host": LOCAL})),
        ("cpython", _column("cbor-1", 6, {"mode": "cbor-tcp", "tcp_port": cbor_port, "host": LOCAL})),
        ("cpython", _column("cbor-2", 7, {"mode": "cbor-serial", "baud": 115200}, phases=1,
                            installation_rating_a=16, meter={"type": "sdm120", "address": 1, "baud": 9600})),
    ]
    with ExitStack() as stack:
        broker = stack.enter_context(Broker([Listener("plain")]))
        cols = [stack.enter_context(VirtualColumn(interp, tmp / cfg["column_id"], cfg, bundle=bundle))
                for interp, cfg in specs]
        for col in cols:
            col.meter.set_load([0.0] * (1 if col.config["phases"] == 1 else 3))
        bus = stack.enter_context(BusRelay([cols[0].link_path or "", cols[1].link_path or ""]))
        key = new_key()
        write_secrets(tmp, key)
        doc: dict[str, Any] = {
            "site": {"id": SITE, "capacity_a": CAPACITY_A, "dno_failsafe_a": DNO_FAILSAFE_A},
            "buses": {"bus-a": {"device": bus.path, "baud": 19200}},
            "allocation": {"increase_delay_max_s": 0, "min_pause_s": 0, "rotation_s": 3600,
                           "reclaim_settle_s": 3600},
            "columns": [
                {"id": "rtu-1", "hardware_a": 32, "link": "modbus-rtu", "bus": "bus-a", "address": 1},
                {"id": "rtu-2", "hardware_a": 32, "rotation": "L2L3L1", "link": "modbus-rtu", "bus": "bus-a",
                 "address": 2},
                {"id": "tcp-1", "hardware_a": 32, "link": "modbus-tcp", "host": LOCAL, "port": tcp_port,
                 "unit": 5},
                {"id": "cbor-1", "hardware_a": 32, "link": "cbor-tcp", "host": LOCAL, "port": cbor_port},
                {"id": "cbor-2", "hardware_a": 32, "installation_a": 16, "phases": 1, "rotation": "L2",
                 "link": "cbor-serial", "device": cols[4].link_path or "", "baud": 115200},
            ],
            "mqtt": {"host": broker.host, "port": broker.port("plain"), "protocol": "5",
                     "outbox": {"path": str(tmp / "outbox.sqlite3")}},
            "dno": {"keys_file": "secrets/dno-keys", "audit_path": str(tmp / "audit.jsonl")},
            "gateway": {"control_interval_s": 0.5, "telemetry_interval_s": 1, "poll_period_s": 0.5,
                        "heartbeat_period_s": 2, "limit_validity_s": 60},
        }
        config_path = tmp / "site.toml"
        config_path.write_text(toml_text(doc))
        config = load_config(config_path)   # the test's own check: the file is valid
        failsafe_da = {cid: round(a * 10) for cid, a in plan_failsafe(config.site).limits_a.items()}
        dno = DnoClient(broker.host, broker.port("plain"), SITE, key)
        stack.callback(dno.close)
        # Cars plug in (B) and ask for current (C) before the gateway starts: the columns offer
        # their own failsafe (6 A) until the gateway takes over.
        for col in cols:
            col.board(cp_mv=9000, diode=1, pp_ohms=220)
        time.sleep(0.3)
        for col in cols:
            col.board(cp_mv=6000)
            col.meter.set_load([5.0] * (1 if col.config["phases"] == 1 else 3))
        gateway = GatewayProcess(config_path, tmp / "gateway.log")
        stack.callback(gateway.close)
        # Ready for commands once subscribed: its first telemetry leaves after the SUBSCRIBE on
        # the same connection (a command published before that reaches nobody, as MQTT says).
        dno.wait_for("the gateway's first site telemetry", on(topics.site_telemetry(SITE)), timeout_s=30)
        rig = Rig(gateway, dno, cols, config_path, tmp / "audit.jsonl", failsafe_da)
        try:
            yield rig
        finally:
            for line in gateway.log_path.read_text(errors="replace").splitlines()[-40:]:
                print(line)


# -- in-process: the DNO link, the site failsafe, and the outbox across a broker outage ------

def test_dno_link_loss_falls_back_to_the_site_failsafe(tmp_path: Path) -> None:
    """A DNO limit that expires while the broker is away gives way to the site failsafe (not to
    the capacity); the telemetry of the outage reaches the DNO afterwards from the outbox; a
    site failsafe command re-plans the columns' failsafes."""
    column = FirmwareColumn(1)                       # the firmware's Modbus slave, charging
    port = free_port()
    key = new_key()
    write_secrets(tmp_path, key)
    with Broker([Listener("plain")]) as broker, TcpColumnServer(column, port):
        doc = {
            "site": {"id": "s-link", "capacity_a": 100, "dno_failsafe_a": 12},
            "allocation": {"increase_delay_max_s": 0, "min_pause_s": 0},
            "columns": [{"id": "c1", "hardware_a": 32, "link": "modbus-tcp", "host": "127.0.0.1",
                         "port": port, "unit": 1}],
            "mqtt": {"host": broker.host, "port": broker.port("plain"), "reconnect_max_s": 0.5,
                     "outbox": {"path": str(tmp_path / "outbox.sqlite3")}},
            "dno": {"keys_file": "secrets/dno-keys", "audit_path": str(tmp_path / "audit.jsonl")},
            "gateway": {"control_interval_s": 0.2, "telemetry_interval_s": 1, "poll_period_s": 0.2,
                        "heartbeat_period_s": 2, "limit_validity_s": 30},
        }
        (tmp_path / "site.toml").write_text(toml_text(doc))
        config = load_config(tmp_path / "site.toml")
        dno = DnoClient(broker.host, broker.port("plain"), "s-link", key)

        def limits_written() -> list[int]:
            return [values[0] for start, values in column.writes if start == regmap.HR_ASSIGNED_LIMIT]

        async def scenario() -> None:
            service = GatewayService(config)
            task = asyncio.create_task(service.run())
            try:
                await asyncio.wait_for(service.ready.wait(), 5)
                await _until("the column charging at 32 A", lambda: 320 in limits_written())
                assert service.plan.limits_a == {"c1": 12.0}
                topic, cmd = dno.site_limit(20, validity_s=3)
                dno.publish(topic, cmd)
                await _until("20 A written", lambda: limits_written()[-1] == 200)
                dno.subscribed.clear()
                broker.kill()
                await _until("DNO link down", lambda: not service.book.dno_link_up)
                await _until("the DNO limit expired into the failsafe", lambda: service.book.effective(
                    payloads.utc_ms()).source == SOURCE_DNO_FAILSAFE, 6)
                await _until("12 A written", lambda: limits_written()[-1] == 120)
                assert service.allocation is not None and service.allocation.site_limit_a == (12, 12, 12)
                await asyncio.sleep(1.2)               # a telemetry round while the broker is away
                broker.start()
                dno.wait_resubscribed()   # blocks the loop: the gateway cannot reconnect first
                await _until("DNO link up again", lambda: service.book.dno_link_up, 10)
                await _until("back to 32 A", lambda: limits_written()[-1] == 320)
                await _until("site telemetry at the capacity again", lambda: any(
                    m.topic == topics.site_telemetry("s-link") and m.payload["limit_source"] == "connection"
                    and m.payload["limit_a"] == 100 for m in dno.snapshot()), 5)
                # The DNO moves the site failsafe down to 8 A: the column's failsafe follows.
                topic = topics.cmd_site_failsafe("s-link")
                dno.publish(topic, dno.command(topic, {"id": "fs-1", "issued_ms": payloads.utc_ms(),
                                                      "validity_s": 600, "limit_a": 8, "duration_s": 3600}),
                            reply_to="dno/replies/fs", correlation=b"fs")
                await _until("failsafe 8 A in the plan", lambda: service.plan.limits_a == {"c1": 8.0})
                await _until("failsafe 8 A written", lambda: any(
                    start == regmap.HR_ASSIGNED_LIMIT and len(v) == 3 and v[2] == 80
                    for start, v in column.writes))
                assert (service.site.dno_failsafe_a, service.site.dno_failsafe_duration_s) == (8, 3600)
                # Remote settings: the random delay and the telemetry period, while valid.
                topic = topics.cmd_config("s-link")
                dno.publish(topic, dno.command(topic, {
                    "id": "cfg-1", "issued_ms": payloads.utc_ms(), "validity_s": 600,
                    "config": {"random_delay_max_s": 900, "telemetry_interval_s": 2}}),
                    reply_to="dno/replies/cfg")
                await _until("settings applied", lambda: service.telemetry_interval_s == 2
                             and service.site.allocation.increase_delay_max_s == 900)
            finally:
                service.request_stop()
                await asyncio.wait_for(task, 15)

        try:
            asyncio.run(scenario())
            ack = dno.wait_for("failsafe ack", on("dno/replies/fs"))
            assert ack.payload["result"] == "accepted" and ack.payload["applied_limit_a"] == 8
            ack = dno.wait_for("config ack", on("dno/replies/cfg"))
            assert ack.payload["result"] == "accepted" and ack.payload["applied_limit_a"] is None
            sources = [m.payload["limit_source"] for m in dno.snapshot()
                       if m.topic == topics.site_telemetry("s-link")]
            assert "failsafe" in sources, sources    # sent during the outage, delivered after it
            assert sources.index("dno") < sources.index("failsafe") < len(sources) - 1 - \
                sources[::-1].index("connection")   # in the order they were measured
        finally:
            dno.close()


def test_the_site_meter_load_counts_against_the_capacity(tmp_path: Path) -> None:
    """A connection-point meter on its own RS-485 line: the non-EV load it shows (meter minus
    columns) is taken off the capacity, its readings are the site telemetry, and a site load
    above the limit is reported."""
    column = FirmwareColumn(1)                       # draws 15.8 / 15.7 / 15.6 A
    port = free_port()
    write_secrets(tmp_path, new_key())
    meter = SdmMeterModel()
    with Broker([Listener("plain")]) as broker, TcpColumnServer(column, port), SerialPair() as line, \
            ThreadedSdmMeter(meter, line.b_path):
        meter.set_load(90.0)
        doc = {
            "site": {"id": "s-meter", "capacity_a": 100},
            "buses": {"meter-line": {"device": line.a_path, "baud": 9600}},
            "meter": {"kind": "sdm630", "link": "modbus-rtu", "bus": "meter-line", "address": 1,
                      "stale_s": 5},
            "allocation": {"increase_delay_max_s": 0, "min_pause_s": 0, "overdraw_grace_s": 1},
            "columns": [{"id": "c1", "hardware_a": 32, "link": "modbus-tcp", "host": LOCAL, "port": port}],
            "mqtt": {"host": broker.host, "port": broker.port("plain"),
                     "outbox": {"path": str(tmp_path / "outbox.sqlite3")}},
            "dno": {"keys_file": "secrets/dno-keys", "audit_path": str(tmp_path / "audit.jsonl")},
            "gateway": {"control_interval_s": 0.2, "telemetry_interval_s": 1, "poll_period_s": 0.2},
        }
        (tmp_path / "site.toml").write_text(toml_text(doc))
        config = load_config(tmp_path / "site.toml")
        dno = DnoClient(broker.host, broker.port("plain"), "s-meter", new_key())

        def last_limit() -> int:
            return [v[0] for start, v in column.writes if start == regmap.HR_ASSIGNED_LIMIT][-1]

        async def scenario() -> None:
            service = GatewayService(config)
            task = asyncio.create_task(service.run())
            try:
                await asyncio.wait_for(service.ready.wait(), 5)
                # 100 A less (90 - 15.8) A of other load on L1 (74.4 on L3): about 25.6 A left.
                await _until("the column limited by the other load", lambda: column.writes
                             and 250 <= last_limit() <= 260, 8)
                await _until("site telemetry from the meter", lambda: any(
                    m.topic == topics.site_telemetry("s-meter") and m.payload["current_a"] == [90, 90, 90]
                    and m.payload["power_w"] == 3 * 230 * 90 for m in dno.snapshot()), 3)
                meter.set_load(120.0)
                await _until("the column paused", lambda: last_limit() == 0)
                await _until("the site over its limit reported", lambda: any(
                    m.topic == topics.site_events("s-meter") and m.payload["event"] == "limit_violation"
                    for m in dno.snapshot()), 5)
            finally:
                service.request_stop()
                await asyncio.wait_for(task, 15)

        try:
            asyncio.run(scenario())
            event = dno.wait_for("site over its limit", on(topics.site_events("s-meter"),
                                                           event="limit_violation"))
            assert (event.payload["kind"], event.payload["measured_a"]) == ("site_over_limit", 120)
        finally:
            dno.close()


async def _until(what: str, pred: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# -- the site with virtual columns -----------------------------------------------------------

def _telemetry(rig: Rig, cid: str, since: float) -> dict[str, Any] | None:
    got = rig.dno.latest(topics.column_telemetry(SITE, cid), since)
    return got.payload if got is not None else None


def test_gateway_takes_over_and_shares_the_site(rig: Rig) -> None:
    state = rig.dno.wait_for("birth", on(topics.gateway_state(SITE), state="online"), timeout_s=15)
    assert state.retain
    wait_until("initial allocation on every column", lambda: offered_da(rig.columns) == INITIAL_DA, 20)
    for cid in INITIAL_DA:
        rig.dno.wait_for(f"{cid} online", on(topics.column_events(SITE, cid), event="column_online"))
    for cid in INITIAL_DA:
        status = rig.dno.wait_for(f"{cid} status", on(topics.column_status(SITE, cid), status="Charging"))
        assert status.retain and status.payload["online"] is True
        payloads.validate("column_status", status.payload)
        # The cars were plugged in before the gateway started: their sessions are reported once.
        # CBOR columns hold the StartTransaction until their boot is accepted, so it carries the
        # session's own id and meter start; Modbus ones are read from the registers.
        started = rig.dno.wait_for(f"{cid} session", on(topics.column_events(SITE, cid),
                                                        event="session_started"))
        payloads.validate("event", started.payload)
        assert started.payload["session_id"] >= 1 and started.payload["meter_start_wh"] >= 0
        if cid.startswith("cbor"):
            assert started.payload["resumed"] is False
    time.sleep(1.0)
    for cid in INITIAL_DA:
        starts = [m for m in rig.dno.snapshot() if m.topic == topics.column_events(SITE, cid)
                  and m.payload.get("event") == "session_started"]
        assert len(starts) == 1, (cid, [m.payload for m in starts])


def test_a_signed_site_limit_is_acked_applied_and_shown_in_telemetry(rig: Rig) -> None:
    t0 = time.monotonic()
    topic, cmd = rig.dno.site_limit(50, validity_s=600)
    rig.dno.publish(topic, cmd, reply_to="dno/replies/e2e", correlation=b"corr-17")
    ack = rig.dno.wait_for("ack", on("dno/replies/e2e"), since=t0)
    assert ack.correlation == b"corr-17"
    payloads.validate("ack", ack.payload)
    assert ack.payload["id"] == cmd["id"]
    assert ack.payload["result"] == "accepted" and ack.payload["reason"] == "ok"
    assert ack.payload["applied_limit_a"] == 50
    # 50 A on L2 for five sessions: 10 A each, a decrease, so at once (well inside 3 s of the ack).
    expected = dict.fromkeys(INITIAL_DA, 100)
    wait_until("every column at 10 A", lambda: offered_da(rig.columns) == expected, 3)
    assert time.monotonic() - ack.at < 3
    site = rig.dno.wait_for("site telemetry under the DNO limit", on(topics.site_telemetry(SITE),
                                                                     limit_source="dno"), since=ack.at)
    payloads.validate("site_telemetry", site.payload)
    assert site.payload["limit_a"] == 50
    assert site.payload["limit_valid_until_ms"] == cmd["issued_ms"] + 600_000
    assert site.payload["active_sessions"] == 5
    for cid in INITIAL_DA:
        tele = rig.dno.wait_for(f"{cid} telemetry at 10 A",
                                on(topics.column_telemetry(SITE, cid), offered_a=10), since=ack.at)
        payloads.validate("column_telemetry", tele.payload)
        assert tele.payload["applied_limit_a"] == 10
        assert tele.payload["limit_source"] == "gateway"
        assert tele.payload["status"] == "Charging"
        assert tele.payload["current_a"][0] == 5, (cid, tele.payload)
    event = rig.dno.wait_for("limit_changed", on(topics.site_events(SITE), event="limit_changed"), since=t0)
    assert event.payload["limit_a"] == 50 and event.payload["limit_source"] == "dno"


def test_bad_replayed_and_expired_commands_are_rejected_and_change_nothing(rig: Rig) -> None:
    before = offered_da(rig.columns)
    dno = rig.dno
    t0 = time.monotonic()
    # Bad signature: signed for 60 A, sent with 5 A.
    topic, cmd = dno.site_limit(60)
    dno.publish(topic, {**cmd, "limit_a": 5}, reply_to="dno/replies/bad", correlation=b"bad")
    # Replay of a command that was accepted once.
    topic2, cmd2 = dno.site_limit(50)
    dno.publish(topic2, cmd2, reply_to="dno/replies/first", correlation=b"1")
    first = dno.wait_for("first ack", on("dno/replies/first"), since=t0)
    assert first.payload["result"] == "accepted"
    dno.publish(topic2, cmd2, reply_to="dno/replies/replay", correlation=b"2")
    # Expired: issued 2 s ago (after the gateway started: older ones are stale), valid for 1 s.
    # No response topic: the ack topic answers.
    topic3, cmd3 = dno.site_limit(5, validity_s=1, issued_ms=payloads.utc_ms() - 2_000)
    dno.publish(topic3, cmd3)
    # Unsigned.
    dno.publish(topic, {k: v for k, v in cmd.items() if k not in ("sig", "key_id")} | {"id": "unsigned-1"},
                reply_to="dno/replies/unsigned")
    expect = {"dno/replies/bad": "bad_signature", "dno/replies/replay": "replayed",
              topics.ack(SITE): "expired", "dno/replies/unsigned": "unauthenticated"}
    for where, reason in expect.items():
        ack = dno.wait_for(f"{reason} ack", on(where), since=t0)
        payloads.validate("ack", ack.payload)
        assert (ack.payload["result"], ack.payload["reason"]) == ("rejected", reason), ack.payload
        assert ack.payload["applied_limit_a"] is None
    assert dno.latest("dno/replies/bad", t0).correlation == b"bad"  # type: ignore[union-attr]
    time.sleep(1.5)   # two control steps and a telemetry round
    assert offered_da(rig.columns) == before
    site = dno.latest(topics.site_telemetry(SITE), t0)
    assert site is not None and site.payload["limit_a"] == 50 and site.payload["limit_source"] == "dno"
    audit = [payloads.decode(line) for line in rig.audit_path.read_text().splitlines()]
    reasons = [(a["decision"], a["reason"]) for a in audit]
    for reason in ("bad_signature", "replayed", "expired", "unauthenticated"):
        assert ("rejected", reason) in reasons
    assert reasons.count(("accepted", "ok")) == 2
    assert all("sig" not in a for a in audit)


def test_a_car_leaving_ends_its_session_and_frees_its_share(rig: Rig) -> None:
    t0 = time.monotonic()
    leaving = [c for c in rig.columns if c.config["column_id"] in ("rtu-1", "cbor-1")]
    # First rtu-1's residual current device trips: a fault, and its share goes to the others.
    leaving[0].board(rcd=1)
    fault = rig.dno.wait_for("rtu-1 fault", on(topics.column_events(SITE, "rtu-1"), event="fault"), since=t0)
    assert fault.payload["error"] == "GroundFailure"
    rig.dno.wait_for("rtu-1 faulted status", on(topics.column_status(SITE, "rtu-1"), status="Faulted",
                                                error="GroundFailure"), since=t0)
    shares = {"rtu-1": 0, "cbor-1": 125, "rtu-2": 125, "tcp-1": 125, "cbor-2": 125}
    wait_until("four sessions share 50 A", lambda: offered_da(rig.columns) == shares, 5)
    for col in leaving:
        col.meter.set_load([0.0, 0.0, 0.0])
        col.board(cp_mv=12000, rcd=0)
    rig.dno.wait_for("rtu-1 fault cleared", on(topics.column_events(SITE, "rtu-1"), event="fault_cleared"),
                     since=t0)
    for cid in ("rtu-1", "cbor-1"):
        stop = rig.dno.wait_for(f"{cid} session stop", on(topics.column_events(SITE, cid),
                                                          event="session_stopped"), since=t0)
        payloads.validate("event", stop.payload)
        assert stop.payload["reason"] == "EVDisconnected" and stop.payload["meter_stop_wh"] >= 0
    # 50 A on L2 for three sessions: cbor-2 stops at its 16 A, the other two get 17 A.
    shares = {"rtu-1": 0, "cbor-1": 0, "rtu-2": 170, "tcp-1": 170, "cbor-2": 160}
    wait_until("the freed current shared out", lambda: offered_da(rig.columns) == shares, 5)
    for col in leaving:
        col.board(cp_mv=9000, diode=1, pp_ohms=220)
    time.sleep(0.3)
    for col in leaving:
        col.board(cp_mv=6000)
        col.meter.set_load([5.0, 5.0, 5.0])
    back = dict.fromkeys(INITIAL_DA, 100)
    wait_until("five sessions at 10 A again", lambda: offered_da(rig.columns) == back, 5)
    again = rig.dno.wait_for("a new rtu-1 session", on(topics.column_events(SITE, "rtu-1"),
                                                        event="session_started"), since=t0)
    assert again.payload["resumed"] is False


def test_a_column_limit_caps_one_column_and_the_others_share_the_rest(rig: Rig) -> None:
    t0 = time.monotonic()
    dno = rig.dno
    topic = topics.cmd_column_limit(SITE, "tcp-1")
    body = {"id": "col-1", "issued_ms": payloads.utc_ms(), "validity_s": 600, "limit_kw": 5.52}
    dno.publish(topic, dno.command(topic, body), reply_to="dno/replies/col", correlation=b"c")
    ack = dno.wait_for("column limit ack", on("dno/replies/col"), since=t0)
    # 5.52 kW on a 3-phase column at 230 V: 8 A. The rest of L2's 50 A: (50 - 8) / 4 = 10.5 A.
    assert (ack.payload["result"], ack.payload["applied_limit_a"]) == ("accepted", 8)
    shares = {"tcp-1": 80, "rtu-1": 105, "rtu-2": 105, "cbor-1": 105, "cbor-2": 105}
    wait_until("tcp-1 capped at 8 A", lambda: offered_da(rig.columns) == shares, 3)
    refused = [("nope", 8, "unknown_column"), ("tcp-1", 40, "out_of_range"), ("tcp-1", -1, "out_of_range")]
    for n, (cid, amps, _reason) in enumerate(refused):
        topic = topics.cmd_column_limit(SITE, cid)
        cmd = dno.command(topic, {"id": f"col-bad-{n}", "issued_ms": payloads.utc_ms(), "validity_s": 60,
                                  "limit_a": amps})
        dno.publish(topic, cmd, reply_to=f"dno/replies/col-bad-{n}")
    for n, (_cid, _amps, reason) in enumerate(refused):
        bad = dno.wait_for(reason, on(f"dno/replies/col-bad-{n}"), since=t0)
        assert (bad.payload["result"], bad.payload["reason"]) == ("rejected", reason)
    time.sleep(1)
    assert offered_da(rig.columns) == shares


def test_sigterm_leaves_every_column_on_its_failsafe_within_capacity(rig: Rig) -> None:
    t0 = time.monotonic()
    assert rig.gateway.terminate(timeout_s=20) == 0
    stopped = time.monotonic()
    bye = rig.dno.wait_for("offline state", on(topics.gateway_state(SITE), state="offline"), since=t0)
    assert bye.payload.get("cause") == "shutdown"
    rig.dno.wait_for("gateway_stopping", on(topics.site_events(SITE), event="gateway_stopping"), since=t0)
    logs = rig.gateway.logs()
    assert logs and not [line for line in logs if "raw" in line], "every log line is a JSON object"
    assert not [line for line in logs if line.get("level") == "error"], logs
    assert any(line["msg"].startswith("hand-over: failsafe confirmed on ['cbor-1', 'cbor-2', 'rtu-1', "
                                      "'rtu-2', 'tcp-1']") for line in logs), logs
    [bus] = [line["counters"] for line in logs if line.get("adapter") == "rtu:bus-a"]
    assert bus["broadcast_frames"] > 0 and bus["unicast_writes"] > 0   # limits, and failsafes
    assert bus["heartbeats"] > 0 and bus["internal_errors"] == 0
    # The pre-assigned failsafes: 40 A budget on L2 shared by five columns.
    assert rig.failsafe_da == dict.fromkeys(INITIAL_DA, 80)
    for phase in range(3):
        load = sum(rig.failsafe_da[c["id"]] for c in _site_columns(rig) if phase in c["phases"]) / 10
        assert load <= DNO_FAILSAFE_A <= CAPACITY_A
    # The columns hold the last limit (10 A) until their heartbeat timeout, then the failsafe.
    wait_until("every column on its failsafe", lambda: offered_da(rig.columns) == rig.failsafe_da,
               HEARTBEAT_TIMEOUT_S + 5)
    assert time.monotonic() - stopped >= HEARTBEAT_TIMEOUT_S - 3


def _site_columns(rig: Rig) -> list[dict[str, Any]]:
    site = load_config(rig.config_path).site
    return [{"id": c.id, "phases": set(c.rotation)} for c in site.columns]
