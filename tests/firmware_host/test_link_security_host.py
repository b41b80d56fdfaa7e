"""Who may change a column, proven on the wire against the whole firmware app (a virtual
column on CPython and on the MicroPython unix port): docs/firmware.md, "Who may change
what". The test plays the gateway with raw frames, so nothing in between can be kinder
than the column itself.

- CBOR link (TCP): ChangeConfiguration and Reset are refused with SecurityError until
  the gateway has accepted the BootNotification the column sent on this connection, and
  again on every new connection; once trusted, only the four run-time keys change, within
  the ratings; the config on flash changes only then; Reset reboots the column.
- Modbus RTU: a reset needs the magic value in a frame addressed to this unit; a
  broadcast never resets, moves or configures a column; a bus-address move needs its
  confirm; the magic value reboots the column.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware import cbor, regmap
from firmware.crc import crc16
from firmware.frames import FrameReader, encode_frame
from hil.rig.fd_relay import open_raw
from hil.rig.firmware_proc import INTERPRETERS
from hil.rig.ports import free_port
from hil.rig.vcolumn import VirtualColumn
from tools.firmware_build import build

UNIT = 6
CONFIG: dict[str, Any] = {
    "column_id": "sec-host-1", "bus_address": UNIT, "phases": 3,
    "hardware_rating_a": 32, "installation_rating_a": 25, "failsafe_a": 10,
    "meter": {"type": "sdm630", "address": 1, "baud": 9600},
}
BOOT_ACCEPTED = {"status": "Accepted", "heartbeatIntervalS": 60, "currentTimeMs": 0}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(out=tmp_path_factory.mktemp("bundle")).root


def _saved(vcol: VirtualColumn) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((vcol.workdir / "column.json").read_text())
    return loaded


def _wait_exit(vcol: VirtualColumn, timeout_s: float = 10.0) -> None:
    """The column rebooted: the virtual board's machine.reset() ends its process."""
    assert vcol.proc is not None
    deadline = time.monotonic() + timeout_s
    while vcol.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert vcol.proc.poll() is not None, "the column did not reset"


# -- CBOR -------------------------------------------------------------------------------------
class RawGateway:
    """One TCP connection to the column, frames in and out by hand."""

    def __init__(self, port: int) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port), timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self.reader = FrameReader()
        self.frames: list[list[Any]] = []
        self.next_id = 900

    def close(self) -> None:
        self.sock.close()

    def send(self, msg: list[Any]) -> None:
        self.sock.sendall(encode_frame(cbor.dumps(msg)))

    def wait(self, match: Any, timeout_s: float = 15.0) -> list[Any]:
        """The first frame from the column that `match` accepts (frames are kept)."""
        deadline = time.monotonic() + timeout_s
        while True:
            for frame in self.frames:
                if match(frame):
                    self.frames.remove(frame)
                    return frame
            left = deadline - time.monotonic()
            assert left > 0, f"no matching frame; seen {self.frames[-6:]}"
            if select.select([self.sock], [], [], min(left, 0.2))[0]:
                data = self.sock.recv(4096)
                assert data, "the column closed the connection"
                self.reader.feed(data)
                while (frame := self.reader.next_frame()) is not None:
                    self.frames.append(cbor.loads(bytes(frame)))

    def boot(self) -> list[Any]:
        return self.wait(lambda f: f[0] == 2 and f[2] == "BootNotification")

    def call(self, action: str, payload: dict[str, Any]) -> list[Any]:
        self.next_id += 1
        msg_id = self.next_id
        self.send([2, msg_id, action, payload])
        return self.wait(lambda f: f[0] in (3, 4) and f[1] == msg_id)


@pytest.fixture(params=INTERPRETERS)
def cbor_column(request: pytest.FixtureRequest, tmp_path: Path,
                bundle: Path) -> Iterator[tuple[VirtualColumn, int]]:
    port = free_port()
    config = dict(CONFIG, link={"mode": "cbor-tcp", "tcp_port": port, "host": "127.0.0.1"})
    with VirtualColumn(request.param, tmp_path / "col", config, bundle=bundle) as vcol:
        yield vcol, port
    print(vcol.output.decode(errors="replace")[-3000:])


def test_cbor_config_writes_and_resets_only_from_the_gateway_that_accepted_the_boot(
        cbor_column: tuple[VirtualColumn, int]) -> None:
    vcol, port = cbor_column
    gw = RawGateway(port)
    try:
        boot = gw.boot()   # ... and left unanswered
        for action, payload in (("ChangeConfiguration", {"key": "failsafe_a", "value": 8}),
                                ("Reset", {"type": "Hard"})):
            answer = gw.call(action, payload)
            assert answer[0] == 4 and answer[2] == "SecurityError", answer
        assert _saved(vcol)["failsafe_a"] == 10
        gw.send([3, boot[1], BOOT_ACCEPTED])
        # Trusted now: what is not a run-time key is refused before anything is loaded.
        for key, value in (("installation_rating_a", 32), ("hardware_rating_a", 80), ("bus_address", 9)):
            answer = gw.call("ChangeConfiguration", {"key": key, "value": value})
            assert answer[2] == {"status": "NotSupported"}, (key, value, answer)
        assert _saved(vcol) == vcol.config
    finally:
        gw.close()
    # A new connection is a new peer: no trust until its own boot is accepted.
    gw = RawGateway(port)
    try:
        boot = gw.boot()
        assert gw.call("Reset", {"type": "Soft"})[2] == "SecurityError"
        assert vcol.proc is not None and vcol.proc.poll() is None
        gw.send([3, boot[1], BOOT_ACCEPTED])
        assert gw.call("Reset", {"type": "Soft"})[2] == {"status": "Accepted"}
        _wait_exit(vcol)
    finally:
        gw.close()


def test_cbor_a_trusted_gateway_changes_run_time_keys_within_the_ratings_only(
        cbor_column: tuple[VirtualColumn, int]) -> None:
    vcol, port = cbor_column
    gw = RawGateway(port)
    try:
        boot = gw.boot()
        gw.send([3, boot[1], BOOT_ACCEPTED])
        answer = gw.call("ChangeConfiguration", {"key": "failsafe_a", "value": 8})
        assert answer[:3] == [3, answer[1], {"status": "Accepted"}], answer
        assert _saved(vcol)["failsafe_a"] == 8
        answer = gw.call("ChangeConfiguration", {"key": "heartbeat_timeout_s", "value": 120})
        assert answer[2] == {"status": "RebootRequired"}, answer
        for value in (26, 4, 80):   # above the installation rating; 0 or 6..25 only
            answer = gw.call("ChangeConfiguration", {"key": "failsafe_a", "value": value})
            assert answer[2] == {"status": "Rejected"}, (value, answer)
        saved = _saved(vcol)
        assert saved["failsafe_a"] == 8 and saved["heartbeat_timeout_s"] == 120
        assert (saved["installation_rating_a"], saved["hardware_rating_a"]) == (25, 32)
    finally:
        gw.close()


# -- Modbus RTU -------------------------------------------------------------------------------
def _rtu(unit: int, fc: int, *words: int) -> bytes:
    body = bytearray([unit, fc])
    for i, w in enumerate(words):
        body += w.to_bytes(2, "big")
        if fc == 16 and i == 1:
            body.append(2 * w)
    crc = crc16(bytes(body))
    return bytes(body) + bytes([crc & 0xFF, crc >> 8])


class Bus:
    """The gateway's end of the RS-485 line, raw: a request out, the reply bytes back."""

    def __init__(self, path: str) -> None:
        self.fd = open_raw(path)

    def close(self) -> None:
        os.close(self.fd)

    def ask(self, frame: bytes, expect: int, timeout_s: float = 3.0) -> bytes:
        """Send and collect `expect` reply bytes (fewer if the column stays silent)."""
        while select.select([self.fd], [], [], 0)[0]:
            os.read(self.fd, 4096)
        os.write(self.fd, frame)
        got = b""
        deadline = time.monotonic() + timeout_s
        while len(got) < expect and time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.05)[0]:
                got += os.read(self.fd, 4096)
        return got


def _exception(fc: int, code: int) -> bytes:
    body = bytes([UNIT, fc | 0x80, code])
    crc = crc16(body)
    return body + bytes([crc & 0xFF, crc >> 8])


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_modbus_reset_and_moves_only_addressed_and_confirmed(interp: str, tmp_path: Path,
                                                             bundle: Path) -> None:
    config = dict(CONFIG, link={"mode": "modbus-rtu", "baud": 19200})
    with VirtualColumn(interp, tmp_path / "col", config, bundle=bundle) as vcol:
        assert vcol.link_path is not None
        bus = Bus(vcol.link_path)
        try:
            read_address = _rtu(UNIT, 4, regmap.IR_BUS_ADDRESS, 1)
            assert bus.ask(read_address, 7, timeout_s=20)[:5] == bytes([UNIT, 4, 2, 0, UNIT])
            # Broadcasts: a reset, a move and a config write, alone and in one frame.
            for frame in (_rtu(0, 6, regmap.HR_RESET, regmap.RESET_MAGIC),
                          _rtu(0, 16, regmap.HR_NEW_ADDRESS, 2, 9, regmap.address_confirm(UNIT, 9)),
                          _rtu(0, 16, regmap.HR_ASSIGNED_LIMIT, 9, 100, 60, 60, 1, 1,
                               regmap.RESET_MAGIC, 0, 9, regmap.address_confirm(UNIT, 9))):
                assert bus.ask(frame, 1, timeout_s=0.5) == b""
            # Another unit's reset; wrong reset values; an unconfirmed move.
            assert bus.ask(_rtu(UNIT + 1, 6, regmap.HR_RESET, regmap.RESET_MAGIC), 1, 0.5) == b""
            for value in (0, 0xA5A4, 0xFFFF):
                assert bus.ask(_rtu(UNIT, 6, regmap.HR_RESET, value), 5) == _exception(6, 3)
            wrong = regmap.address_confirm(UNIT, 9) ^ 1
            assert bus.ask(_rtu(UNIT, 16, regmap.HR_NEW_ADDRESS, 2, 9, wrong), 5) == _exception(16, 3)
            # Still there, on its own address, its config untouched.
            assert bus.ask(read_address, 7)[:5] == bytes([UNIT, 4, 2, 0, UNIT])
            assert _saved(vcol)["bus_address"] == UNIT
            assert vcol.proc is not None and vcol.proc.poll() is None
            reset = _rtu(UNIT, 6, regmap.HR_RESET, regmap.RESET_MAGIC)
            assert bus.ask(reset, len(reset)) == reset   # the echo, then the reboot
            _wait_exit(vcol)
        finally:
            bus.close()
