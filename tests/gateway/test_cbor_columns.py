"""The CBOR link adapter against real columns.

Peer tests run tests/gateway/cbor_col_peer.py (firmware.cbor_link.Link on the column side)
under CPython and MicroPython, over a serial line pair and over loopback TCP. Wire tests
drive the far end of a serial pair byte by byte from the test (frames built with cbor2,
an encoder independent of the firmware's) and assert the exact bytes the gateway sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import cbor2
import pytest

from firmware.frames import FrameReader, encode_frame
from gateway.south.cbor_columns import (
    REASON_REJECTED,
    CborCallError,
    CborColumn,
    CborColumns,
    CborConfig,
    CborEvent,
    CborSerialColumn,
    CborTcpColumn,
    ColumnBooted,
    ColumnSession,
)
from gateway.south.types import ColumnLink, ColumnReading, LimitCommand, LimitResult
from hil.rig.firmware_proc import INTERPRETERS, start_firmware, stop_process
from hil.rig.ports import free_port
from hil.rig.serial_pair import SerialPair

PEER = Path(__file__).with_name("cbor_col_peer.py")
FAST = CborConfig(heartbeat_interval_s=1, offline_after_s=1.8, call_timeout_s=0.5, tick_s=0.02,
                  connect_timeout_s=0.5, reconnect_base_s=0.05, reconnect_max_s=0.2)
WIRE = replace(FAST, heartbeat_interval_s=30)
NOW_MS = 1_700_000_000_000
BOOT = {"columnId": "col-1", "firmwareVersion": "1.2.3", "model": "raw", "phases": 3,
        "hardwareRatingA": 32, "busAddress": 0}
STATUS = {"status": "Charging", "errorCode": "NoError", "cpState": "C", "offeredA": 16,
          "limitSource": "hardware"}
METER = {"energyWh": 5000, "sessionEnergyWh": 120, "powerW": 3680.5, "currentA": [16, 0, 0],
         "voltageV": [230, 0, 0], "offeredA": 16, "seq": 1}


# -- helpers ------------------------------------------------------------------------------------

@contextlib.contextmanager
def peer(interp: str, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_firmware(interp, PEER, list(args))
    try:
        yield proc
    finally:
        print(stop_process(proc).decode(errors="replace"))   # shown when the test fails


async def next_event(cb: CborColumns, pred: Callable[[CborEvent], bool], timeout_s: float = 3.0) -> Any:
    async with asyncio.timeout(timeout_s):
        while True:
            event = await cb.events.get()
            if pred(event):
                return event


async def until(cond: Callable[[], bool], timeout_s: float = 3.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.01)


def online(flag: bool) -> Callable[[CborEvent], bool]:
    return lambda e: isinstance(e, ColumnLink) and e.online is flag


def booted(e: CborEvent) -> bool:
    return isinstance(e, ColumnBooted)


def reading(pred: Callable[[ColumnReading], bool] = lambda r: True) -> Callable[[CborEvent], bool]:
    return lambda e: isinstance(e, ColumnReading) and pred(e)


def session(started: bool) -> Callable[[CborEvent], bool]:
    return lambda e: isinstance(e, ColumnSession) and e.started is started


class RawColumn:
    """The column end of a serial pair, driven by the test."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        self.reader = FrameReader()

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def send(self, obj: Any) -> None:
        self.write(encode_frame(cbor2.dumps(obj)))

    async def frame(self, timeout_s: float = 2.0) -> bytes:
        """The next whole frame the gateway sent, as wire bytes."""
        async with asyncio.timeout(timeout_s):
            while True:
                payload = self.reader.next_frame()
                if payload is not None:
                    return encode_frame(bytes(payload))
                try:
                    self.reader.feed(os.read(self.fd, 4096))
                except BlockingIOError:
                    await asyncio.sleep(0.005)

    async def recv(self, timeout_s: float = 2.0) -> Any:
        return cbor2.loads((await self.frame(timeout_s))[3:-2])

    def close(self) -> None:
        os.close(self.fd)


@contextlib.contextmanager
def raw_line(config: CborConfig = FAST) -> Iterator[tuple[CborColumns, RawColumn]]:
    with SerialPair() as pair:
        col = RawColumn(pair.b_path)
        try:
            yield CborColumns([CborSerialColumn("col-1", pair.a_path)], config, now_ms=lambda: NOW_MS), col
        finally:
            col.close()


def wire_setup(kind: str, pair: SerialPair | None) -> tuple[CborColumn, list[str]]:
    if kind == "serial":
        assert pair is not None
        return CborSerialColumn("col-1", pair.a_path), ["serial", pair.b_path]
    port = free_port()
    return CborTcpColumn("col-1", "127.0.0.1", port), ["tcp", str(port)]


# -- against the peer, both interpreters --------------------------------------------------------

@pytest.mark.parametrize("interp", INTERPRETERS)
def test_boot_status_meter_and_session_over_serial(interp: str) -> None:
    async def main(pair: SerialPair) -> None:
        async with CborColumns([CborSerialColumn("col-1", pair.a_path)], FAST) as cb:
            with peer(interp, "serial", pair.b_path, "--meter-ms", "100"):
                assert (await next_event(cb, online(True))).reason == "ok"
                boot = await next_event(cb, booted)
                assert (boot.reported_id, boot.firmware, boot.model, boot.phases, boot.hardware_a) == \
                    ("col-1", "1.2.3", "peer", 3, 16.0)
                assert boot.accepted and boot.config_error == "" and boot.boots == 1
                start = await next_event(cb, session(True))
                assert (start.session_id, start.meter_wh) == (7, 1000)
                r = await next_event(cb, reading(lambda r: r.energy_wh > 1000))
                assert (r.status, r.error, r.cp_state, r.limit_source) == \
                    ("Charging", "NoError", "C", "hardware")
                assert r.offered_a == 16.0 and r.power_w == 10950 and r.session_id == 7
                assert r.current_a == pytest.approx((15.8, 15.7, 15.6))
                assert r.voltage_v == pytest.approx((230.1, 229.9, 230.5))
                assert r.session_energy_wh == r.energy_wh - 1000
                assert (r.phases, r.hardware_a, r.fw_version, r.boots, r.bad_frames) == \
                    (3, 16.0, "1.2.3", 1, 0)
                assert await cb.change_configuration("col-1", "peer.stopSession", True) == "Accepted"
                stop = await next_event(cb, session(False))
                assert (stop.session_id, stop.reason) == (7, "Local")
                assert stop.session_energy_wh == stop.meter_wh - 1000 > 0
                await until(lambda: cb.stats.heartbeats >= 1)   # at the 1 s the boot answer asked for
                assert cb.link("col-1").online
                assert cb.link_stats("col-1")["errors_sent"] == 0

    with SerialPair() as pair:
        asyncio.run(main(pair))


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_limits_and_configuration_over_tcp(interp: str) -> None:
    port = free_port()

    async def main() -> None:
        async with CborColumns([CborTcpColumn("col-1", "127.0.0.1", port)], FAST) as cb:
            with peer(interp, "tcp", str(port), "--meter-ms", "0"):
                await next_event(cb, booted)
                assert await cb.set_limits([LimitCommand("col-1", 10.05, 60, 6.0)]) == \
                    [LimitResult("col-1", True, "unicast", "ok", 100, 60)]
                r = await next_event(cb, reading(lambda r: r.offered_a == 10.0))
                assert (r.limit_source, r.failsafe_a) == ("gateway", 6.0)
                assert 59 <= r.assigned_remaining_s <= 60
                # The column caps the limit at its own rating and says so.
                assert await cb.set_limits([LimitCommand("col-1", 32, 60)]) == \
                    [LimitResult("col-1", True, "unicast", "ok", 160, 60)]
                assert await cb.change_configuration("col-1", "peer.rejectLimits", True) == "Accepted"
                assert await cb.set_limits([LimitCommand("col-1", 8, 60)]) == \
                    [LimitResult("col-1", False, "unicast", REASON_REJECTED, 160, 60)]
                assert cb.stats.limits_rejected == 1
                assert await cb.get_configuration("col-1", ["columnId", "nope"]) == ({"columnId": "col-1"},
                                                                                      ["nope"])
                assert await cb.change_configuration("col-1", "nope", 1) == "NotSupported"
                assert await cb.trigger_message("col-1", "MeterValues") == "Accepted"
                await next_event(cb, reading(lambda r: r.energy_wh == 1001))
                assert await cb.reset("col-1") == "Accepted"
                assert (await next_event(cb, booted)).boots == 2
                assert cb.connects("col-1") == 1

    asyncio.run(main())


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_silent_column_times_out_and_goes_offline(interp: str) -> None:
    async def main(pair: SerialPair) -> None:
        async with CborColumns([CborSerialColumn("col-1", pair.a_path)], FAST) as cb:
            with peer(interp, "serial", pair.b_path):
                await next_event(cb, booted)
                assert await cb.change_configuration("col-1", "peer.mute", True) == "Accepted"
                t0 = time.monotonic()
                assert await cb.set_limits([LimitCommand("col-1", 10, 60)]) == \
                    [LimitResult("col-1", False, "unicast", "timeout", 100, 60)]
                assert 0.45 <= time.monotonic() - t0 < 1.5   # call_timeout_s, not the 1.8 s silence
                with pytest.raises(CborCallError) as err:
                    await cb.get_configuration("col-1")
                assert err.value.reason == "timeout"
                down = await next_event(cb, online(False))
                assert down.reason == "timeout" and not cb.link("col-1").online
                assert cb.link_stats("col-1")["timeouts"] == 2

    with SerialPair() as pair:
        asyncio.run(main(pair))


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_garbage_and_invalid_calls_get_error_frames(interp: str) -> None:
    async def main(pair: SerialPair) -> None:
        async with CborColumns([CborSerialColumn("col-1", pair.a_path)], FAST) as cb:
            with peer(interp, "serial", pair.b_path):
                await next_event(cb, booted)
                assert await cb.change_configuration("col-1", "peer.garbage", True) == "Accepted"
                await until(lambda: cb.link_stats("col-1")["unmatched"] == 1)
                stats = cb.link_stats("col-1")
                assert {k: stats[k] for k in ("bad_crc", "bad_cbor", "bad_messages", "unknown_actions",
                                              "unsupported", "errors_sent", "bad_frames")} == \
                    {"bad_crc": 1, "bad_cbor": 1, "bad_messages": 1, "unknown_actions": 1, "unsupported": 1,
                     "errors_sent": 4, "bad_frames": 5}
                assert stats["garbage_bytes"] >= 9 and stats["internal_errors"] == 0
                config, _unknown = await cb.get_configuration("col-1", ["peer.errors"])
                assert config["peer.errors"] == {
                    "901": "FormationViolation", "902": "PropertyConstraintViolation",
                    "903": "NotImplemented", "904": "NotSupported"}
                # The link lives on: still online, limits still answered.
                assert cb.link("col-1").online
                assert (await cb.set_limits([LimitCommand("col-1", 12, 30)]))[0].ok

    with SerialPair() as pair:
        asyncio.run(main(pair))


@pytest.mark.parametrize("kind", ["serial", "tcp"])
@pytest.mark.parametrize("interp", INTERPRETERS)
def test_column_back_after_peer_restart(interp: str, kind: str) -> None:
    async def main(pair: SerialPair | None) -> None:
        column, args = wire_setup(kind, pair)
        async with CborColumns([column], FAST) as cb:
            with peer(interp, *args, "--meter-ms", "0"):
                await next_event(cb, booted)
            down = await next_event(cb, online(False))   # TCP: at once; serial: after the silence
            assert down.reason == ("disconnected" if kind == "tcp" else "timeout")
            with peer(interp, *args, "--meter-ms", "0"):
                await next_event(cb, online(True), timeout_s=5.0)
                assert (await next_event(cb, booted)).boots == 2
                assert cb.connects("col-1") == (2 if kind == "tcp" else 1)

    if kind == "serial":
        with SerialPair() as pair:
            asyncio.run(main(pair))
    else:
        asyncio.run(main(None))


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_restarted_gateway_asks_a_running_column_to_boot(interp: str) -> None:
    port = free_port()

    async def main() -> None:
        columns = [CborTcpColumn("col-1", "127.0.0.1", port)]
        with peer(interp, "tcp", str(port), "--meter-ms", "100"):
            async with CborColumns(columns, FAST) as first:
                await next_event(first, reading(lambda r: r.energy_wh > 1000))
            async with CborColumns(columns, FAST) as second:
                # The column is mid-session and does not reboot: the gateway triggers its boot
                # and status, and holds meter values until the status is known.
                boot = await next_event(second, booted)
                assert boot.boots == 1 and boot.firmware == "1.2.3"
                r = await next_event(second, reading())
                assert (r.status, r.session_id) == ("Charging", 0)   # the session began before us

    asyncio.run(main())


# -- on the wire, byte by byte ------------------------------------------------------------------

def hexs(frame: bytes) -> str:
    return frame.hex(" ")


BOOT_ACCEPTED = ("c5 00 40 83 03 01 a3 66 73 74 61 74 75 73 68 41 63 63 65 70 74 65 64 6d 63 75 72 72 65 6e"
                 " 74 54 69 6d 65 4d 73 1b 00 00 01 8b cf e5 68 00 72 68 65 61 72 74 62 65 61 74 49 6e 74"
                 " 65 72 76 61 6c 53 18 1e 4f 1e")
BOOT_REJECTED = ("c5 00 40 83 03 01 a3 66 73 74 61 74 75 73 68 52 65 6a 65 63 74 65 64 6d 63 75 72 72 65 6e"
                 " 74 54 69 6d 65 4d 73 1b 00 00 01 8b cf e5 68 00 72 68 65 61 72 74 62 65 61 74 49 6e 74"
                 " 65 72 76 61 6c 53 18 1e 3e 53")


def test_boot_answer_bytes_and_a_config_error_faults_the_column() -> None:
    async def main() -> None:
        with raw_line(WIRE) as (cb, col):
            async with cb:
                await until(lambda: cb.connects("col-1") == 1)   # pyserial flushes input at open
                col.send([2, 1, "BootNotification", {**BOOT, "configError": "phases: must be 1 or 3"}])
                answer = await col.frame()
                assert hexs(answer) == BOOT_ACCEPTED
                assert cbor2.loads(answer[3:-2]) == [3, 1, {"status": "Accepted", "heartbeatIntervalS": 30,
                                                            "currentTimeMs": NOW_MS}]
                boot = await next_event(cb, booted)
                assert boot.config_error == boot.fault == "phases: must be 1 or 3" and boot.accepted
                assert (boot.hardware_a, boot.bus_address, boot.model) == (32.0, 0, "raw")
                r = await next_event(cb, reading())
                assert (r.status, r.error, r.cp_state, r.limit_source) == \
                    ("Faulted", "ConfigError", "F", "safety")
                # Whatever its status says later, a column with a broken config stays faulted.
                col.send([2, 2, "StatusNotification", STATUS])
                assert await col.recv() == [3, 2, {}]
                r = await next_event(cb, reading())
                assert (r.status, r.error, r.offered_a) == ("Faulted", "ConfigError", 16.0)
                # A clean boot clears the fault.
                col.send([2, 3, "BootNotification", BOOT])
                assert (await col.recv())[:2] == [3, 3]
                assert (await next_event(cb, booted)).fault == ""
                col.send([2, 4, "StatusNotification", STATUS])
                assert await col.recv() == [3, 4, {}]
                assert (await next_event(cb, reading())).status == "Charging"

    asyncio.run(main())


def test_a_column_with_another_id_is_rejected() -> None:
    async def main() -> None:
        with raw_line(WIRE) as (cb, col):
            async with cb:
                await until(lambda: cb.connects("col-1") == 1)   # pyserial flushes input at open
                col.send([2, 1, "BootNotification", {**BOOT, "columnId": "col-9"}])
                assert hexs(await col.frame()) == BOOT_REJECTED
                boot = await next_event(cb, booted)
                assert not boot.accepted and boot.fault == "columnId 'col-9' is not the configured 'col-1'"
                assert (await next_event(cb, reading())).status == "Faulted"
                assert cb.stats.id_mismatches == 1

    asyncio.run(main())


def test_bad_calls_get_exact_error_frames_and_garbage_is_no_sign_of_life() -> None:
    async def main() -> None:
        with raw_line(WIRE) as (cb, col):
            async with cb:
                await until(lambda: cb.connects("col-1") == 1)   # pyserial flushes input at open
                col.send([2, 5, "StatusNotification", {**STATUS, "offeredA": 81}])
                assert hexs(await col.frame()) == (
                    "c5 00 3d 85 04 05 78 1b 50 72 6f 70 65 72 74 79 43 6f 6e 73 74 72 61 69 6e 74 56 69 6f"
                    " 6c 61 74 69 6f 6e 78 1a 6f 66 66 65 72 65 64 41 20 6d 75 73 74 20 62 65 20 6e 75 6d"
                    " 20 30 2e 2e 38 30 a0 63 bd")
                # that is [4, 5, "PropertyConstraintViolation", "offeredA must be num 0..80", {}]
                col.send([2, 6, "SetChargingLimit", {"limitA": 6, "validityS": 10}])
                assert (await col.recv())[:3] == [4, 6, "NotSupported"]
                bad = bytearray(encode_frame(cbor2.dumps([2, 7, "Heartbeat", {}])))
                bad[-1] ^= 0x55
                for _ in range(4):   # a column that sends only garbage is not alive
                    col.write(b"\x00\x13\x37" + bytes(bad))
                    await asyncio.sleep(0.3)
                down = await next_event(cb, online(False))
                assert down.reason == "garbled"
                stats = cb.link_stats("col-1")
                assert (stats["bad_messages"], stats["unsupported"], stats["bad_crc"],
                        stats["errors_sent"]) == (1, 1, 4, 2)
                assert cb.stats.status_notifications == 0

    asyncio.run(main())


def test_meter_values_wait_for_a_status_and_an_unknown_column_is_asked_to_boot() -> None:
    async def main() -> None:
        with raw_line(WIRE) as (cb, col):
            async with cb:
                await until(lambda: cb.connects("col-1") == 1)   # pyserial flushes input at open
                col.send([2, 1, "MeterValues", METER])     # the gateway restarted, the column did not
                assert await col.recv() == [3, 1, {}]
                assert hexs(await col.frame()) == (
                    "c5 00 35 84 02 01 6e 54 72 69 67 67 65 72 4d 65 73 73 61 67 65 a1 70 72 65 71 75 65"
                    " 73 74 65 64 4d 65 73 73 61 67 65 70 42 6f 6f 74 4e 6f 74 69 66 69 63 61 74 69 6f 6e"
                    " 3e 20")   # [2, 1, "TriggerMessage", {"requestedMessage": "BootNotification"}]
                col.send([3, 1, {"status": "Accepted"}])
                assert await col.recv() == [2, 2, "TriggerMessage",
                                            {"requestedMessage": "StatusNotification"}]
                col.send([3, 2, {"status": "Accepted"}])
                col.send([2, 2, "MeterValues", METER])     # a repeat (our result was lost): no new reading
                assert await col.recv() == [3, 2, {}]
                col.send([2, 3, "StatusNotification", STATUS])
                assert await col.recv() == [3, 3, {}]
                first = await next_event(cb, lambda e: not isinstance(e, ColumnLink))
                assert isinstance(first, ColumnReading)   # nothing was emitted before the status
                assert (first.status, first.energy_wh, first.session_energy_wh, first.power_w) == \
                    ("Charging", 5000, 120, 3680)
                assert (first.current_a, first.voltage_v, first.phases, first.fw_version) == \
                    ((16.0, 0.0, 0.0), (230.0, 0.0, 0.0), 0, "")
                assert cb.stats.duplicates == 1 and cb.stats.meter_values == 1

    asyncio.run(main())


def test_limit_call_bytes_and_every_way_it_can_fail() -> None:
    async def main() -> None:
        nobody = CborTcpColumn("gone", "127.0.0.1", free_port())
        with SerialPair() as pair:
            col = RawColumn(pair.b_path)
            cb = CborColumns([CborSerialColumn("col-1", pair.a_path), nobody], WIRE, now_ms=lambda: NOW_MS)
            try:
                async with cb:
                    await until(lambda: cb.connects("col-1") == 1)
                    col.send([2, 1, "BootNotification", BOOT])
                    await col.recv()
                    pending = asyncio.create_task(cb.set_limits([LimitCommand("col-1", 10, 60, 6.5)]))
                    call = await col.frame()
                    assert hexs(call) == (
                        "c5 00 36 84 02 01 70 53 65 74 43 68 61 72 67 69 6e 67 4c 69 6d 69 74 a3 66 6c 69 6d"
                        " 69 74 41 0a 69 66 61 69 6c 73 61 66 65 41 f9 46 80 69 76 61 6c 69 64 69 74 79 53 18"
                        " 3c d7 86")   # limitA 10 (an int), failsafeA 6.5 (a half float), validityS 60
                    col.send([4, 1, "InternalError", "meter busy", {}])
                    assert await pending == [LimitResult("col-1", False, "unicast", "exception", 100, 60)]
                    pending = asyncio.create_task(cb.set_limits([LimitCommand("col-1", 10, 60)]))
                    assert (await col.recv())[:3] == [2, 2, "SetChargingLimit"]
                    col.send([3, 2, {"status": "Accepted"}])      # appliedA missing
                    assert await pending == [LimitResult("col-1", False, "unicast", "garbled", 100, 60)]
                    with pytest.raises(CborCallError) as err:
                        await cb.call("col-1", "Reset", {"type": "Warm"})
                    assert err.value.reason == "bad_request"   # refused here, nothing sent
                    assert await cb.set_limits([
                        LimitCommand("gone", 10, 60),
                        LimitCommand("col-1", float("nan"), 60),
                        LimitCommand("nope", 10, 60),
                        LimitCommand("col-1", 10, -1),   # the last command for a column wins (and its place)
                    ]) == [LimitResult("gone", False, "unicast", "disconnected", 100, 60),
                           LimitResult("nope", False, "none", "unknown_column"),
                           LimitResult("col-1", False, "none", "bad_validity")]
                    assert (await cb.set_limits([LimitCommand("col-1", 81, 60)]))[0].reason == "bad_limit"
                    result = await cb.set_limits([LimitCommand("col-1", 8, 60, -2)])
                    assert result == [LimitResult("col-1", False, "none", "bad_failsafe")]
                    assert cb.link("gone").reason == "disconnected" and not cb.link("gone").online
            finally:
                col.close()

    asyncio.run(main())
