"""The firmware's meter reader against the simulated SDM630 / SDM120 over serial line pairs.

The firmware side (tests/firmware_host/meter_reader.py) runs in CPython and in the
MicroPython unix port; the meter is hil.models.sdm_meter on pymodbus 3.16.
"""

from __future__ import annotations

import json
import os
import queue
import select
import struct
import threading
import time
from pathlib import Path

import pytest

from firmware import sdm
from hil.models.sdm_meter import SdmMeterModel, ThreadedSdmMeter, float_registers
from hil.rig.firmware_proc import INTERPRETERS, run_firmware, start_firmware, stop_process
from hil.rig.serial_pair import SerialPair

SCRIPT = Path(__file__).with_name("meter_reader.py")
STD_REQUEST = bytes.fromhex("01 04 00 00 00 02 71 CB")
STD_REPLY = bytes.fromhex("01 04 04 43 66 33 34 1B 38")
# The real meter's 230.2 V is the float32 0x43663334 (one step above the nearest float32
# to 230.2): serve exactly that value to reproduce the recorded reply bit for bit.
V_RECORDED = struct.unpack(">f", bytes.fromhex("43 66 33 34"))[0]


def read_meter(interp: str, path: str, kind: str, tmp_path: Path, **opts: int) -> dict:
    args = [path, kind, *(f"{k}={v}" for k, v in opts.items())]
    done = run_firmware(interp, SCRIPT, args, timeout_s=30, cwd=tmp_path)
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, out + done.stderr.decode(errors="replace")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["impl"] == ("micropython" if interp == "micropython" else "cpython")
    return result


def sdm630_model() -> SdmMeterModel:
    model = SdmMeterModel(sdm.SDM630, frequency_hz=49.98, import_kwh=1234.567, export_kwh=0.5)
    for phase, (volts, amps, watts) in enumerate(((V_RECORDED, 16.0, 3683.0), (231.0, 15.94, 3660.5),
                                                  (229.5, 0.0, -12.25))):
        model.set_phase(phase, voltage_v=volts, current_a=amps, power_w=watts)
    return model


# -- the firmware reading the simulated meter, both interpreters --------------------------------
@pytest.mark.parametrize("interp", INTERPRETERS)
def test_sdm630_read_on_a_paced_9600_baud_line(interp: str, tmp_path: Path) -> None:
    model = sdm630_model()
    with SerialPair(baud=9600) as pair, ThreadedSdmMeter(model, pair.b_path):
        got = read_meter(interp, pair.a_path, sdm.SDM630, tmp_path, cycles=2, interval_ms=300,
                         timeout_ms=1000, run_ms=8000)
        wire_bytes = pair.bytes_ab + pair.bytes_ba
    assert got["cycles"] == 2 and not got["stale"]
    assert got["voltage_dv"] == [2302, 2310, 2295]
    assert got["current_da"] == [160, 159, 0]
    assert got["power_phase_w"] == [3683, 3661, -12]
    assert got["power_w"] == 7331                       # 0x0034: the meter's own total
    assert (got["freq_chz"], got["energy_wh"], got["export_wh"]) == (4998, 1234567, 500)
    assert (got["requests"], got["replies"], got["timeouts"], got["crc_errors"]) == (2, 2, 0, 0)
    assert wire_bytes == 2 * (8 + 157)                  # one 76-register read per cycle


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_sdm120_reproduces_the_recorded_exchange(interp: str, tmp_path: Path) -> None:
    wire: dict[str, bytearray] = {"ab": bytearray(), "ba": bytearray()}

    def record(direction: str, chunk: bytes) -> bytes:
        wire[direction] += chunk
        return chunk

    model = SdmMeterModel(sdm.SDM120, address=7, voltage_v=V_RECORDED, import_kwh=12.5)
    model.set_phase(0, current_a=10.04, power_w=2311.0)
    addr1 = SdmMeterModel(sdm.SDM120, address=1, voltage_v=V_RECORDED)
    with SerialPair(manipulator=record) as pair, ThreadedSdmMeter([addr1, model], pair.b_path):
        got = read_meter(interp, pair.a_path, sdm.SDM120, tmp_path, address=7, cycles=1,
                         timeout_ms=1000)
        first = read_meter(interp, pair.a_path, sdm.SDM120, tmp_path, address=1, cycles=1,
                           timeout_ms=1000)
    assert got["cycles"] == 1 and not got["stale"]
    assert got["voltage_dv"] == [2302, 0, 0] and got["current_da"] == [100, 0, 0]
    assert got["power_phase_w"] == [2311, 0, 0] and got["power_w"] == 2311
    assert (got["freq_chz"], got["energy_wh"], got["export_wh"]) == (5000, 12500, 0)
    assert (got["requests"], got["replies"], got["bad_replies"]) == (4, 4, 0)
    # At address 1 the wire carries the published exchange byte for byte.
    assert first["voltage_dv"][0] == 2302
    ab, ba = bytes(wire["ab"]), bytes(wire["ba"])
    assert STD_REQUEST in ab and STD_REPLY in ba
    assert ab.index(STD_REQUEST) == 4 * 8               # after the four requests to address 7


@pytest.mark.parametrize("interp", INTERPRETERS)
@pytest.mark.parametrize(("fault", "counter"), [("no_reply", "timeouts"), ("bad_crc", "crc_errors"),
                                                ("exception", "exceptions")])
def test_failing_meter_is_reported_stale(interp: str, fault: str, counter: str,
                                         tmp_path: Path) -> None:
    model = sdm630_model()
    model.set_fault(fault)
    with SerialPair() as pair, ThreadedSdmMeter(model, pair.b_path):
        got = read_meter(interp, pair.a_path, sdm.SDM630, tmp_path, timeout_ms=150, retries=1,
                         interval_ms=300, stale_ms=500, run_ms=1300)
    assert got["stale"] and got["cycles"] == 0 and got["replies"] == 0
    assert got["failed_cycles"] >= 2 and got[counter] >= 4
    assert got["voltage_dv"] == [0, 0, 0]               # nothing from a failing meter is used
    assert model.faulted >= 4
    if fault == "exception":
        assert got["last_exception"] == 4


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_meter_that_stops_answering_goes_stale(interp: str, tmp_path: Path) -> None:
    model = sdm630_model()
    with SerialPair() as pair, ThreadedSdmMeter(model, pair.b_path):
        proc = start_firmware(interp, SCRIPT, [pair.a_path, sdm.SDM630, "interval_ms=200",
                                               "timeout_ms=100", "retries=1", "stale_ms=600",
                                               "report_ms=100", "run_ms=8000"], cwd=tmp_path)
        lines: queue.Queue[str] = queue.Queue()
        reader = threading.Thread(target=lambda: [lines.put(x.decode()) for x in proc.stdout],
                                  daemon=True)
        reader.start()
        try:
            fresh = wait_for(lines, lambda r: r["cycles"] >= 1 and not r["stale"], 5.0)
            assert fresh["voltage_dv"][0] == 2302
            model.set_fault("no_reply")
            stale = wait_for(lines, lambda r: r["stale"], 5.0)
            assert stale["timeouts"] >= 2 and stale["voltage_dv"][0] == 2302  # last good values kept
            model.set_fault(None)
            back = wait_for(lines, lambda r: not r["stale"], 5.0)
            assert back["cycles"] > stale["cycles"]
        finally:
            stop_process(proc)
            reader.join(timeout=5)


def wait_for(lines: queue.Queue[str], cond, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("no report matched in time")
        try:
            text = lines.get(timeout=left)
        except queue.Empty:
            continue
        if text.startswith("{"):
            report = json.loads(text)
            if cond(report):
                return report


# -- the simulated meter on its own, raw bytes ---------------------------------------------------
def exchange(fd: int, request: bytes, wait_s: float = 1.0) -> bytes:
    os.write(fd, request)
    out = b""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            out += os.read(fd, 512)
        elif out:
            break
    return out


def test_simulated_meter_wire_behaviour() -> None:
    sdm630 = SdmMeterModel(sdm.SDM630, voltage_v=V_RECORDED)
    sdm120 = SdmMeterModel(sdm.SDM120, address=2, voltage_v=V_RECORDED)
    with SerialPair() as pair, ThreadedSdmMeter([sdm630, sdm120], pair.b_path):
        fd = os.open(pair.a_path, os.O_RDWR | os.O_NONBLOCK | os.O_NOCTTY)
        try:
            assert exchange(fd, STD_REQUEST) == STD_REPLY
            # SDM120: a read spanning its hole at 0x0002 is refused (exception 02) ...
            assert exchange(fd, bytes.fromhex("02 04 00 00 00 04 F1 FA")) == bytes.fromhex("02 84 02 32 C1")
            # ... while a read of 0x0000 alone answers.
            assert exchange(fd, bytes.fromhex("02 04 00 00 00 02 71 F8"))[:7] == bytes.fromhex(
                "02 04 04 43 66 33 34")
            # Nobody at address 9: silence, as on a real bus.
            assert exchange(fd, bytes.fromhex("09 04 00 00 00 02 70 83"), 0.3) == b""
            sdm630.set_fault("exception", 6)
            assert exchange(fd, STD_REQUEST) == bytes.fromhex("01 84 06 C3 02")
            sdm630.set_fault("bad_crc")
            assert exchange(fd, STD_REQUEST) == STD_REPLY[:-1] + bytes([STD_REPLY[-1] ^ 0xFF])
            sdm630.set_fault("no_reply")
            assert exchange(fd, STD_REQUEST, 0.3) == b""
            assert exchange(fd, bytes.fromhex("02 04 00 00 00 02 71 F8"))[:3] == b"\x02\x04\x04"
            sdm630.set_fault(None)
            assert exchange(fd, STD_REQUEST) == STD_REPLY
            assert sdm630.reads >= 4 and sdm630.faulted == 3
        finally:
            os.close(fd)


def test_model_integrates_energy_on_its_clock() -> None:
    now = [0.0]
    model = SdmMeterModel(sdm.SDM630, import_kwh=10.0, integrate=True, clock=lambda: now[0])
    model.set_load(10.0)                                # 3 x 230 V x 10 A = 6.9 kW
    assert model.total_power_w == pytest.approx(6900.0)
    now[0] = 3600.0
    values = model.values()
    assert values[sdm.REG_IMPORT_KWH] == pytest.approx(16.9)
    assert values[sdm.REG_TOTAL_POWER] == pytest.approx(6900.0)
    model.set_load([0.0, 0.0, 0.0])
    model.set_phase(0, power_w=-3600.0)                 # exporting from here on
    now[0] = 7200.0
    assert model.values()[sdm.REG_EXPORT_KWH] == pytest.approx(3.6)
    assert model.import_kwh == pytest.approx(16.9)
    manual = SdmMeterModel(sdm.SDM120)
    manual.set_load(16.0, power_factor=0.5)
    manual.advance(1800.0)
    assert manual.import_kwh == pytest.approx(230.0 * 16.0 * 0.5 / 2 / 1000)
    assert float_registers(230.2) == (0x4366, 0x3333)


def test_model_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="meter type"):
        SdmMeterModel("sdm72")
    with pytest.raises(ValueError, match="phase"):
        SdmMeterModel(sdm.SDM120).set_phase(1, current_a=1.0)
    with pytest.raises(ValueError, match="fault"):
        SdmMeterModel().set_fault("smoke")
    with pytest.raises(ValueError, match="same address"):
        ThreadedSdmMeter([SdmMeterModel(), SdmMeterModel()], "/dev/null")


def test_unusable_port_fails_to_start_cleanly(tmp_path: Path) -> None:
    meter = ThreadedSdmMeter(SdmMeterModel(), str(tmp_path / "no-such-port"), timeout_s=3)
    with pytest.raises(RuntimeError, match="listen"):
        meter.start()
    assert meter._thread is None                        # its loop thread is gone again
