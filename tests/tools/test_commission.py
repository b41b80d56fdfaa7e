"""`python -m tools.commission` end to end, run as a technician runs it (a subprocess, its
exit status and what it prints), against one RS-485 bus of real virtual columns (the
firmware app on CPython and on the MicroPython unix port) and a simulated SDM630 meter.

The bus knows baud rates: each device talks at its own, and the tool's bytes reach a
device only while the tool's port is set to that rate (at another rate a real UART sees
framing errors and drops them), so a scan over several rates finds each device at its own.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import serial

from firmware import regmap
from firmware.app import VERSION
from hil.models.sdm_meter import SdmMeterModel, ThreadedSdmMeter
from hil.rig.bus_relay import raw_mode, write_all
from hil.rig.serial_pair import SerialPair
from hil.rig.vcolumn import VirtualColumn
from tools.commission import DeviceException, RtuMaster, probe
from tools.firmware_build import build

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
LINK_BAUD = 19200
METER_BAUD = 9600
METER_ADDRESS = 10
FIRMWARE = "%d.%d.%d" % VERSION
# (interpreter, column id, bus address, phases, hardware rating)
COLUMNS = (("cpython", "P1-north-03", 3, 3, 32), ("cpython", "P1-north-05", 5, 3, 22),
           ("micropython", "P1-south-07", 7, 1, 16))


def column_config(column_id: str, address: int, phases: int, rating_a: int) -> dict[str, Any]:
    return {"column_id": column_id, "bus_address": address, "phases": phases,
            "hardware_rating_a": rating_a, "installation_rating_a": rating_a, "failsafe_a": 6,
            "meter": {"type": "sdm630" if phases == 3 else "sdm120", "address": 1, "baud": 9600},
            "link": {"mode": "modbus-rtu", "baud": LINK_BAUD}, "min_pause_s": 60}


class BaudBus:
    """One RS-485 bus; the master opens `path`, devices are (line end, baud) pairs."""

    def __init__(self, devices: Sequence[tuple[str, int]]) -> None:
        self._master, self._slave = pty.openpty()
        raw_mode(self._master)
        raw_mode(self._slave)
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self._devices: dict[int, int] = {}   # fd -> termios speed constant
        for p, baud in devices:
            fd = os.open(p, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            raw_mode(fd)
            self._devices[fd] = getattr(termios, f"B{baud}")
        self.from_master = 0
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="baud-bus", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self._master, *self._devices, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            speed = termios.tcgetattr(self._master)[5]  # the master's port setting (shared with its end)
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    continue
                if fd == self._master:
                    self.from_master += len(data)
                    for dev, dev_speed in self._devices.items():
                        if dev_speed == speed:
                            write_all(dev, data)
                elif self._devices[fd] == speed:
                    write_all(self._master, data)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=2)
        for fd in (self._master, self._slave, *self._devices, self._stop_r, self._stop_w):
            os.close(fd)


@dataclass
class Bus:
    path: str
    relay: BaudBus
    columns: dict[int, VirtualColumn]   # by their starting bus address
    meter: SdmMeterModel

    def config_text(self, address: int) -> str:
        return (self.columns[address].workdir / "column.json").read_text()


@pytest.fixture(scope="module")
def bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bus]:
    tmp = tmp_path_factory.mktemp("commission")
    bundle = build(out=tmp / "bundle").root
    with ExitStack() as stack:
        columns = {}
        for interp, cid, address, phases, rating in COLUMNS:
            col = stack.enter_context(VirtualColumn(interp, tmp / cid, column_config(cid, address, phases,
                                                                                   rating), bundle=bundle))
            col.meter.set_load([0.0] * phases)
            columns[address] = col
        meter_line = stack.enter_context(SerialPair())
        meter = SdmMeterModel("sdm630", METER_ADDRESS, voltage_v=231.0, import_kwh=1234.5)
        meter.set_load([5.0, 6.0, 7.0])
        stack.enter_context(ThreadedSdmMeter(meter, meter_line.b_path, baudrate=METER_BAUD))
        relay = BaudBus([*((c.link_path or "", LINK_BAUD) for c in columns.values()),
                         (meter_line.a_path, METER_BAUD)])
        stack.callback(relay.close)
        yield Bus(relay.path, relay, columns, meter)


def commission(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.commission", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s, check=False)


def scan_json(path: str, *args: str) -> dict[str, Any]:
    done = commission("scan", path, "--json", "--timeout", "0.2", *args)
    assert done.returncode == 0, (done.stdout, done.stderr)
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def assert_one_line_error(done: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert done.returncode == code, (done.stdout, done.stderr)
    err = done.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("commission: "), err
    for word in words:
        assert word in err, err


def test_scan_finds_every_column_and_the_meter_each_at_its_baud_rate(bus: Bus) -> None:
    found = scan_json(bus.path, "--bauds", f"{LINK_BAUD},{METER_BAUD}", "--first", "1", "--last", "11")
    assert found["bauds"] == [LINK_BAUD, METER_BAUD] and found["garbled"] == [] and found["others"] == []
    columns = {c["address"]: c for c in found["columns"]}
    assert sorted(columns) == [3, 5, 7]
    for _interp, cid, address, phases, rating in COLUMNS:
        col = columns[address]
        assert (col["column_id"], col["baud"], col["firmware"]) == (cid, LINK_BAUD, FIRMWARE)
        assert (col["phases"], col["hardware_rating_a"]) == (phases, rating)
        assert col["status"] == "Available" and col["error"] == "NoError" and col["cp_state"] == "A"
        # the column's own meter (230 V on its phases) shows in its image
        assert col["voltage_v"][:phases] == [230.0] * phases
    [meter] = found["meters"]
    assert (meter["address"], meter["baud"], meter["type"]) == (METER_ADDRESS, METER_BAUD, "sdm630")
    assert meter["voltage_v"] == [231.0] * 3 and meter["current_a"] == [5.0, 6.0, 7.0]
    assert meter["power_w"] == pytest.approx(231 * 18) and meter["frequency_hz"] == 50.0
    assert meter["import_kwh"] == pytest.approx(1234.5)


def test_scan_prints_a_table(bus: Bus) -> None:
    done = commission("scan", bus.path, "--first", "3", "--last", "10", "--timeout", "0.2")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "COLUMNS" in out and "METERS" in out
    for _interp, cid, address, _phases, _rating in COLUMNS:
        [line] = [ln for ln in out.splitlines() if cid in ln]
        assert line.split()[:4] == [str(address), str(LINK_BAUD), cid, FIRMWARE]
    [line] = [ln for ln in out.splitlines() if "sdm630" in ln]
    assert line.split()[:3] == [str(METER_ADDRESS), str(METER_BAUD), "sdm630"]
    assert "found 3 column(s), 1 meter(s)" in out


def test_set_address_moves_a_micropython_column_and_it_saves_its_config(bus: Bus) -> None:
    before = json.loads(bus.config_text(7))
    done = commission("set-address", bus.path, "--from", "7", "--to", "9", "--baud", str(LINK_BAUD))
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "moved column P1-south-07 from bus address 7 to 9" in done.stdout
    assert json.loads(bus.config_text(7)) == dict(before, bus_address=9)
    found = scan_json(bus.path, "--bauds", str(LINK_BAUD), "--first", "6", "--last", "9")
    assert [(c["address"], c["column_id"]) for c in found["columns"]] == [(9, "P1-south-07")]
    # and back, finding its baud rate by itself
    done = commission("set-address", bus.path, "--from", "9", "--to", "7", "--json")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert json.loads(done.stdout) == {"column_id": "P1-south-07", "old_address": 9, "new_address": 7,
                                       "baud": LINK_BAUD, "firmware": FIRMWARE, "verified": True}
    assert json.loads(bus.config_text(7)) == before


def test_a_wrong_confirm_or_an_address_out_of_range_is_refused_by_the_column(bus: Bus) -> None:
    text = bus.config_text(3)
    with serial.Serial(bus.path, LINK_BAUD, exclusive=True) as ser:
        master = RtuMaster(ser, 0.3)
        for new, confirm in ((9, regmap.address_confirm(3, 9) ^ 1), (9, regmap.address_confirm(5, 9)), (9, 0),
                             (248, regmap.address_confirm(3, 248)), (0, regmap.address_confirm(3, 0))):
            with pytest.raises(DeviceException) as refused:
                master.write(3, regmap.HR_NEW_ADDRESS, [new, confirm])
            assert refused.value.code == 3, (new, confirm)
        found = probe(master, 3)
        assert found is not None and found.kind == "column" and probe(master, 9) is None
        assert master.read(3, 3, regmap.HR_NEW_ADDRESS, 2) == [0, 0]  # nothing stored either
    assert bus.config_text(3) == text


def test_set_address_refuses_before_writing_anything(bus: Bus) -> None:
    texts = {a: bus.config_text(a) for a in bus.columns}
    sent = bus.relay.from_master
    assert_one_line_error(commission("set-address", bus.path, "--from", "3", "--to", "248"), 2,
                          "248 is not a bus address (1..247)")
    assert_one_line_error(commission("set-address", bus.path, "--from", "3", "--to", "3"), 2,
                          "nothing to move")
    assert bus.relay.from_master == sent  # refused before the port was touched
    assert_one_line_error(commission("set-address", bus.path, "--from", "3", "--to", "5"), 2,
                          "bus address 5 is taken by column P1-north-05")
    assert_one_line_error(commission("set-address", bus.path, "--from", str(METER_ADDRESS), "--to", "12",
                                     "--baud", str(METER_BAUD)), 2, "is not a column: an SDM630 meter")
    assert_one_line_error(commission("set-address", bus.path, "--from", "4", "--to", "12",
                                     "--timeout", "0.1"), 2, "no column answers at bus address 4")
    assert {a: bus.config_text(a) for a in bus.columns} == texts


def test_a_column_whose_config_would_not_validate_refuses_the_move(bus: Bus) -> None:
    path = bus.columns[5].workdir / "column.json"
    good = path.read_text()
    bad = json.dumps(dict(json.loads(good), phasez=3))  # edited on the column's flash since it booted
    path.write_text(bad)
    try:
        done = commission("set-address", bus.path, "--from", "5", "--to", "6", "--baud", str(LINK_BAUD))
        assert_one_line_error(done, 1, "P1-north-05 refused the move (exception 03)", "nothing was changed")
        assert path.read_text() == bad
    finally:
        path.write_text(good)
    found = scan_json(bus.path, "--bauds", str(LINK_BAUD), "--first", "5", "--last", "6")
    assert [c["address"] for c in found["columns"]] == [5]


def test_a_missing_port_is_one_line() -> None:
    assert_one_line_error(commission("scan", "/dev/ttyUSB-not-here"), 2,
                          "port /dev/ttyUSB-not-here not found")


def test_a_busy_port_is_one_line(bus: Bus) -> None:
    fd = os.open(bus.path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another program holds the port
        sent = bus.relay.from_master
        assert_one_line_error(commission("scan", bus.path), 2, f"port {bus.path} is busy")
        assert_one_line_error(commission("set-address", bus.path, "--from", "3", "--to", "9"), 2, "busy")
        assert bus.relay.from_master == sent
    finally:
        os.close(fd)


def test_nothing_answering_is_one_line() -> None:
    with SerialPair() as silent:
        assert_one_line_error(commission("scan", silent.b_path, "--first", "1", "--last", "3",
                                         "--timeout", "0.05"), 2, "no device answered", "addresses 1..3")
        assert_one_line_error(commission("set-address", silent.b_path, "--from", "3", "--to", "4",
                                         "--timeout", "0.05"), 2, "no column answers at bus address 3")


def test_help_names_every_command_and_option() -> None:
    done = commission("--help")
    assert done.returncode == 0 and "scan" in done.stdout and "set-address" in done.stdout
    done = commission("scan", "--help")
    for option in ("port", "--bauds", "--first", "--last", "--timeout", "--json"):
        assert option in done.stdout
    done = commission("set-address", "--help")
    for option in ("port", "--from", "--to", "--baud", "--timeout", "--json"):
        assert option in done.stdout
    assert_one_line_error(commission("scan", "/dev/null", "--bauds", "1234"), 2, "baud rates must be among")


def test_two_devices_on_one_address_show_as_garbled(tmp_path: Path) -> None:
    """Two meters left at their factory address 1 (a common commissioning find) next to a
    meter at 2: the scan lists 2 and reports 1 as two devices; a move from 1 is refused."""
    models = [SdmMeterModel("sdm120", 1), SdmMeterModel("sdm120", 1), SdmMeterModel("sdm630", 2)]
    with ExitStack() as stack:
        ends = []
        for model in models:
            line = stack.enter_context(SerialPair())
            stack.enter_context(ThreadedSdmMeter(model, line.b_path, baudrate=METER_BAUD))
            ends.append((line.a_path, METER_BAUD))
        relay = BaudBus(ends)
        stack.callback(relay.close)
        found = scan_json(relay.path, "--bauds", str(METER_BAUD), "--first", "1", "--last", "3")
        assert [(m["address"], m["type"]) for m in found["meters"]] == [(2, "sdm630")]
        assert [g["address"] for g in found["garbled"]] == [1]
        assert "two devices on one address" in found["garbled"][0]["detail"]
        done = commission("set-address", relay.path, "--from", "1", "--to", "5", "--baud", str(METER_BAUD))
        assert_one_line_error(done, 2, "replies at bus address 1 (9600 baud) are garbled", "power one down")
