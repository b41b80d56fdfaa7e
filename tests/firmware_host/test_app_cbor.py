"""The firmware app speaking the CBOR message link, as a virtual column on CPython and on
the MicroPython unix port, over a serial line pair and over TCP. The test plays the
gateway with the same contract (firmware/messages.py) through a gateway-side Link."""

from __future__ import annotations

import os
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware import cbor, messages, messages_tables
from firmware.cbor_link import Link
from firmware.frames import FrameReader, encode_frame
from hil.rig.fd_relay import open_raw
from hil.rig.firmware_proc import INTERPRETERS
from hil.rig.ports import free_port
from hil.rig.vcolumn import VirtualColumn
from tools.firmware_build import build

# Every leg runs with the heap the other firmware tests use: the whole CBOR-link app,
# harness included, fits the MicroPython unix port's 128 KB (see docs/firmware.md).
HEAP = "128K"

CONFIG: dict[str, Any] = {
    "column_id": "cbor-col-1", "bus_address": 7, "phases": 3,
    "hardware_rating_a": 32, "installation_rating_a": 32, "failsafe_a": 6,
    "meter": {"type": "sdm630", "address": 1, "baud": 9600},
}


class Gateway:
    """The gateway's end: a FROM_GATEWAY Link over a raw fd or a socket."""

    def __init__(self, send: Callable[[bytes], None], recv: Callable[[], bytes]) -> None:
        self._recv = recv
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.frames: list[list[Any]] = []   # every frame the column sent, decoded
        self._sniff = FrameReader()
        self.results: dict[int, Any] = {}

        def record(action: str) -> Callable[[dict[str, Any], int], dict[str, Any]]:
            def handler(payload: dict[str, Any], now_ms: int) -> dict[str, Any]:
                self.calls.append((action, payload))
                if action == "BootNotification":
                    return {"status": "Accepted", "heartbeatIntervalS": 60, "currentTimeMs": now_ms}
                if action == "Heartbeat":
                    return {"currentTimeMs": now_ms}
                return {}
            return handler

        handlers = {a: record(a) for a, side, _q, _r in messages_tables.ACTIONS
                    if side == messages.FROM_COLUMN}
        self.send_raw = send
        self.link = Link(send, handlers, side=messages.FROM_GATEWAY)

    def now(self) -> int:
        return int(time.monotonic() * 1000)

    def pump(self, seconds: float = 0.05) -> None:
        end = time.monotonic() + seconds
        while True:
            data = self._recv()
            if data:
                self._sniff.feed(data)
                while (frame := self._sniff.next_frame()) is not None:
                    self.frames.append(cbor.loads(bytes(frame)))
                self.link.on_bytes(data, self.now())
            self.link.poll(self.now())
            if time.monotonic() >= end:
                return
            time.sleep(0.005)

    def wait_call(self, action: str, where: Callable[[dict[str, Any]], bool] = lambda p: True,
                  timeout_s: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, payload in self.calls:
                if name == action and where(payload):
                    return payload
            self.pump()
        raise AssertionError(f"no {action} matching; calls seen: {self.calls[-8:]}")

    def call(self, action: str, payload: dict[str, Any], timeout_s: float = 5.0) -> Any:
        box: list[Any] = []
        assert self.link.call(action, payload, self.now(), box.append) is not None
        deadline = time.monotonic() + timeout_s
        while not box and time.monotonic() < deadline:
            self.pump()
        assert box, f"{action}: no answer"
        return box[0]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(out=tmp_path_factory.mktemp("bundle")).root


def _serial_gateway(vcol: VirtualColumn) -> Iterator[Gateway]:
    assert vcol.link_path is not None
    fd = open_raw(vcol.link_path)

    def recv() -> bytes:
        if select.select([fd], [], [], 0)[0]:
            try:
                return os.read(fd, 4096)
            except BlockingIOError:
                return b""
        return b""

    try:
        yield Gateway(lambda data: os.write(fd, data) and None, recv)
    finally:
        os.close(fd)


def _tcp_gateway(port: int) -> Iterator[Gateway]:
    deadline = time.monotonic() + 15
    while True:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    sock.setblocking(False)

    def recv() -> bytes:
        try:
            return sock.recv(4096)
        except BlockingIOError:
            return b""

    try:
        yield Gateway(sock.sendall, recv)
    finally:
        sock.close()


@pytest.fixture(params=[(i, m) for i in INTERPRETERS for m in ("cbor-serial", "cbor-tcp")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def column(request: pytest.FixtureRequest, tmp_path: Path,
           bundle: Path) -> Iterator[tuple[VirtualColumn, Gateway]]:
    interp, mode = request.param
    link = {"mode": mode, "baud": 115200} if mode == "cbor-serial" else \
        {"mode": mode, "tcp_port": free_port(), "host": "127.0.0.1"}
    with VirtualColumn(interp, tmp_path / "col", dict(CONFIG, link=link), bundle=bundle, heap=HEAP) as vcol:
        gateways = _serial_gateway(vcol) if mode == "cbor-serial" else _tcp_gateway(link["tcp_port"])
        gw = next(gateways)
        try:
            yield vcol, gw
        finally:
            gateways.close()
    print(vcol.output.decode(errors="replace")[-3000:])


def test_boot_limit_session_and_meter_values(column: tuple[VirtualColumn, Gateway]) -> None:
    vcol, gw = column
    boot = gw.wait_call("BootNotification")
    assert boot["columnId"] == "cbor-col-1" and boot["phases"] == 3 and boot["busAddress"] == 7
    assert "configError" not in boot
    gw.wait_call("StatusNotification", lambda p: p["status"] == "Available")

    answer = gw.call("SetChargingLimit", {"limitA": 16, "validityS": 120, "failsafeA": 8})
    assert answer == {"status": "Accepted", "appliedA": 16}

    vcol.meter.set_load([10.0, 10.0, 10.0])
    vcol.board(cp_mv=9000, diode=1, pp_ohms=220)
    start = gw.wait_call("StartTransaction")
    vcol.board(cp_mv=6000)
    charging = gw.wait_call("StatusNotification", lambda p: p["status"] == "Charging")
    assert charging["offeredA"] == 16 and charging["limitSource"] == "gateway"

    # Ask for meter values until the meter's next poll (1 s) has reached them.
    values = None
    for _ in range(10):
        assert gw.call("TriggerMessage", {"requestedMessage": "MeterValues"}) == {"status": "Accepted"}
        try:
            values = gw.wait_call("MeterValues", lambda p: p["currentA"] == [10, 10, 10], timeout_s=1)
            break
        except AssertionError:
            continue
    assert values is not None, "meter values never showed the car's 10 A"
    assert values["offeredA"] == 16 and values["energyWh"] >= start["meterStartWh"]

    vcol.board(cp_mv=12000)
    stop = gw.wait_call("StopTransaction")
    assert stop["sessionId"] == start["sessionId"] and stop["reason"] == "EVDisconnected"
    assert stop["meterStopWh"] >= start["meterStartWh"]


def test_hostile_calls_get_error_frames_and_change_nothing(column: tuple[VirtualColumn, Gateway]) -> None:
    _vcol, gw = column
    gw.wait_call("BootNotification")
    gw.wait_call("StatusNotification")
    hostile = [
        [2, 901, "SetChargingLimit", {"limitA": 500, "validityS": 60}],           # out of range
        [2, 902, "SetChargingLimit", {"limitA": float("nan"), "validityS": 60}],  # NaN
        [2, 903, "SelfDestruct", {}],                                             # unknown action
        [2, 904, "ChangeConfiguration", {"key": "hardware_rating_a", "value": 80}],  # not changeable
    ]
    for frame in hostile:
        gw.send_raw(encode_frame(cbor.dumps(frame)))
    gw.send_raw(b"\xc5\x00\x05garbage-with-a-bad-crc")
    deadline = time.monotonic() + 10
    answered: dict[int, list[Any]] = {}
    while time.monotonic() < deadline and len(answered) < 4:
        gw.pump()
        answered = {f[1]: f for f in gw.frames if f[0] in (messages.RESULT, messages.ERROR) and f[1] >= 901}
    assert answered[901][0] == messages.ERROR and answered[901][2] == "PropertyConstraintViolation"
    assert answered[902][0] == messages.ERROR
    assert answered[903][0] == messages.ERROR and answered[903][2] == "NotImplemented"
    assert answered[904] == [messages.RESULT, 904, {"status": "NotSupported"}]
    # Nothing changed: the column still offers its failsafe, and answers a valid call.
    answer = gw.call("SetChargingLimit", {"limitA": 10, "validityS": 60})
    assert answer == {"status": "Accepted", "appliedA": 10}
    config = gw.call("GetConfiguration", {"keys": ["hardware_rating_a", "nope"]})
    assert config == {"configuration": {"hardware_rating_a": 32}, "unknownKeys": ["nope"]}


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_a_session_started_before_the_gateway_connects_is_reported_after_boot(
        interp: str, tmp_path: Path, bundle: Path) -> None:
    port = free_port()
    config = dict(CONFIG, link={"mode": "cbor-tcp", "tcp_port": port, "host": "127.0.0.1"})
    with VirtualColumn(interp, tmp_path / "col", config, bundle=bundle) as vcol:
        time.sleep(1.5)  # the column is up, nobody is connected yet
        vcol.board(cp_mv=9000, diode=1, pp_ohms=220)
        time.sleep(0.5)
        vcol.board(cp_mv=12000)  # ... and the car leaves again before the gateway comes
        time.sleep(0.5)
        for gw in _tcp_gateway(port):
            gw.wait_call("BootNotification")
            start = gw.wait_call("StartTransaction")
            stop = gw.wait_call("StopTransaction")
            assert stop["sessionId"] == start["sessionId"] and stop["reason"] == "EVDisconnected"
            # Told after the boot, in order.
            names = [name for name, _ in gw.calls]
            assert names.index("BootNotification") < names.index("StartTransaction") \
                < names.index("StopTransaction")


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_a_serial_column_booted_before_its_gateway_is_fully_reported_once_heard(
        interp: str, tmp_path: Path, bundle: Path) -> None:
    """Boots sent into a line nobody reads must not pile up: once the gateway answers, the
    held session start, the status and the measured values all get through at once."""
    config = dict(CONFIG, phases=1, link={"mode": "cbor-serial", "baud": 115200})
    with VirtualColumn(interp, tmp_path / "col", config, bundle=bundle) as vcol:
        vcol.meter.set_load([5.0, 0.0, 0.0])
        vcol.board(cp_mv=9000, diode=1, pp_ohms=220)
        time.sleep(0.3)
        vcol.board(cp_mv=6000)
        time.sleep(3.0)  # several boots went out unanswered meanwhile
        for gw in _serial_gateway(vcol):
            opened = time.monotonic()
            gw.wait_call("BootNotification", timeout_s=5)
            gw.wait_call("StartTransaction", timeout_s=3)
            gw.wait_call("StatusNotification", lambda p: p["status"] == "Charging", timeout_s=3)
            values = gw.wait_call("MeterValues", lambda p: p["currentA"][0] == 5, timeout_s=3)
            assert values["seq"] >= 1
            assert time.monotonic() - opened < 8


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_a_change_in_the_cars_draw_is_sent_within_seconds_not_at_the_next_10_s_round(
        interp: str, tmp_path: Path, bundle: Path) -> None:
    """The gateway shares the site on measured current and reports it to the DNO each second:
    a 1 A move must not wait for the periodic MeterValues."""
    port = free_port()
    config = dict(CONFIG, link={"mode": "cbor-tcp", "tcp_port": port, "host": "127.0.0.1"})
    with VirtualColumn(interp, tmp_path / "col", config, bundle=bundle) as vcol:
        for gw in _tcp_gateway(port):
            gw.wait_call("BootNotification")
            vcol.board(cp_mv=9000, diode=1, pp_ohms=220)
            gw.wait_call("StartTransaction")
            vcol.board(cp_mv=6000)
            gw.wait_call("MeterValues", timeout_s=3)      # the first reading, at 0 A
            vcol.meter.set_load([7.0, 7.0, 7.0])
            moved = time.monotonic()
            gw.wait_call("MeterValues", lambda p: p["currentA"] == [7, 7, 7], timeout_s=4)
            assert time.monotonic() - moved < 4
            # A small wobble (under 1 A) is not worth a message; the 10 s round covers it.
            vcol.meter.set_load([7.4, 7.4, 7.4])
            seen = len([n for n, _ in gw.calls if n == "MeterValues"])
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                gw.pump()
            assert len([n for n, _ in gw.calls if n == "MeterValues"]) == seen
