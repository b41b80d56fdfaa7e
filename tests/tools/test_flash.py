"""`python -m tools.flash` end to end: the real mpremote against a virtual device whose
flash is a folder, run as a technician runs it (a subprocess, its exit status and what
it prints)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pymodbus.client import ModbusSerialClient
from pymodbus.exceptions import ModbusException

from firmware import regmap
from hil.rig.serial_pair import SerialPair
from hil.vdevice import VirtualDevice
from tools.firmware_build import build
from tools.flash import FlashError, bundle_files, check_mpy_compat

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
CONFIG = {
    "column_id": "P1-north-03", "bus_address": 3, "phases": 3,
    "hardware_rating_a": 32, "installation_rating_a": 25, "failsafe_a": 10,
    "meter": {"type": "sdm630", "address": 1, "baud": 9600},
    "link": {"mode": "modbus-rtu", "baud": 19200},
}


def flash(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.flash", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s, check=False)


def write_config(path: Path, cfg: dict[str, object]) -> Path:
    path.write_text(json.dumps(cfg))
    return path


def tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def assert_one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    err = done.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("flash: ")
    for word in words:
        assert word in err, err


def wait_for_hard_reset(dev: VirtualDevice, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while "hard" not in dev.boots:
        assert time.monotonic() < deadline, f"no hard reset; boots {dev.boots}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The firmware compiled once for the module; most tests flash it with --bundle."""
    return build(out=tmp_path_factory.mktemp("bundle") / "firmware").root


@pytest.fixture(scope="module")
def rtu_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a board with CONFIG's link mode (modbus-rtu) carries."""
    return build(out=tmp_path_factory.mktemp("rtu") / "firmware", link="modbus-rtu").root


@pytest.fixture
def device(tmp_path: Path) -> Iterator[VirtualDevice]:
    with VirtualDevice(tmp_path / "flash") as dev:
        yield dev


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "column.json", CONFIG)


def test_flash_compiles_copies_verifies_and_resets(device: VirtualDevice, config: Path,
                                                   rtu_bundle: Path) -> None:
    # A device flashed before: a module the new firmware no longer has, and the energy
    # register, which a reflash must never touch.
    (device.flash_dir / "firmware").mkdir()
    (device.flash_dir / "firmware" / "old_module.py").write_text("print('stale')\n")
    (device.flash_dir / "energy_a.bin").write_bytes(b"\x01" * 38)
    done = flash(device.port, "--config", str(config))  # compiles with mpy-cross itself
    assert done.returncode == 0, done.stderr
    expected = tree_hashes(rtu_bundle)
    assert f"verified: sha256 of {len(expected) + 1} files" in done.stdout   # and column.json
    on_device = tree_hashes(device.flash_dir)
    assert on_device.pop("energy_a.bin") == hashlib.sha256(b"\x01" * 38).hexdigest()
    assert json.loads((device.flash_dir / "column.json").read_text()) == CONFIG
    on_device.pop("column.json")
    # Every module a modbus-rtu column imports, byte for byte, and nothing else: no CBOR
    # link, no host-only table; the stale module gone.
    assert on_device == expected
    assert "firmware/gw_modbus.mpy" in on_device and "firmware/gw_cbor.mpy" not in on_device
    wait_for_hard_reset(device)  # reset at the end, as `mpremote reset` does


def test_a_new_link_mode_gets_its_modules_and_loses_the_old_ones(device: VirtualDevice, config: Path,
                                                                  bundle: Path, tmp_path: Path) -> None:
    assert flash(device.port, "--config", str(config), "--bundle", str(bundle)).returncode == 0
    assert (device.flash_dir / "firmware" / "gw_modbus.mpy").exists()
    cbor = write_config(tmp_path / "cbor.json", dict(CONFIG, link={"mode": "cbor-tcp", "tcp_port": 5020}))
    done = flash(device.port, "--config", str(cbor), "--bundle", str(bundle))
    assert done.returncode == 0, done.stderr
    on_device = tree_hashes(device.flash_dir)
    on_device.pop("column.json")
    assert on_device == {f.remote: f.sha256 for f in bundle_files(bundle, "cbor-tcp")}
    assert "firmware/gw_cbor.mpy" in on_device and "firmware/gw_modbus.mpy" not in on_device


def test_keep_config_flashes_the_modules_of_the_kept_configs_link_mode(device: VirtualDevice, config: Path,
                                                                         bundle: Path) -> None:
    theirs = json.dumps(dict(CONFIG, link={"mode": "cbor-serial", "baud": 115200}))
    (device.flash_dir / "column.json").write_text(theirs)
    done = flash(device.port, "--keep-config", "--config", str(config), "--bundle", str(bundle))
    assert done.returncode == 0, done.stderr
    assert "for link mode cbor-serial" in done.stdout
    on_device = tree_hashes(device.flash_dir)
    assert on_device.pop("column.json") == hashlib.sha256(theirs.encode()).hexdigest()
    assert on_device == {f.remote: f.sha256 for f in bundle_files(bundle, "cbor-serial")}


def test_a_bundle_built_for_another_link_mode_is_refused(device: VirtualDevice, tmp_path: Path,
                                                         rtu_bundle: Path) -> None:
    cbor = write_config(tmp_path / "cbor.json", dict(CONFIG, link={"mode": "cbor-serial", "baud": 115200}))
    done = flash(device.port, "--config", str(cbor), "--bundle", str(rtu_bundle))
    assert_one_line_error(done, "lacks firmware/", "gw_cbor.mpy", "--link cbor-serial")
    assert device.bytes_to_device == 0


def test_a_second_flash_only_writes_what_changed(device: VirtualDevice, config: Path, bundle: Path) -> None:
    assert flash(device.port, "--config", str(config), "--bundle", str(bundle)).returncode == 0
    write_config(config, dict(CONFIG, bus_address=4))
    done = flash(device.port, "--config", str(config), "--bundle", str(bundle))
    assert done.returncode == 0, done.stderr
    files = len(bundle_files(bundle, "modbus-rtu"))
    assert f"written: 1, already up to date: {files}" in done.stdout   # only column.json changed
    assert json.loads((device.flash_dir / "column.json").read_text())["bus_address"] == 4


def test_a_bad_config_is_refused_naming_each_key_before_any_device_io(device: VirtualDevice,
                                                                       tmp_path: Path) -> None:
    bad = dict(CONFIG, phase=3, meter={"type": "sdm630", "address": 300})
    done = flash(device.port, "--config", str(write_config(tmp_path / "bad.json", bad)))
    assert done.returncode == 2
    assert "meter.address: 300 is out of range 1..247" in done.stderr
    assert "phase: unknown key" in done.stderr
    assert "Traceback" not in done.stderr
    assert device.bytes_to_device == 0
    assert list(device.flash_dir.iterdir()) == []


def test_a_config_that_is_not_json_is_refused_with_its_line(device: VirtualDevice, tmp_path: Path) -> None:
    path = tmp_path / "column.json"
    path.write_text('{\n  "column_id": "c1",\n  "bus_address": 3,,\n}\n')
    done = flash(device.port, "--config", str(path))
    assert_one_line_error(done, "not valid JSON", "line 3")
    assert device.bytes_to_device == 0


def test_a_file_corrupted_on_the_device_is_detected_and_the_device_not_reset(
        tmp_path: Path, config: Path, bundle: Path) -> None:
    with VirtualDevice(tmp_path / "flash", corrupt_writes=["firmware/app.mpy"]) as dev:
        done = flash(dev.port, "--config", str(config), "--bundle", str(bundle))
        assert done.returncode == 1, done.stdout
        assert "verification failed: firmware/app.mpy differs on the device" in done.stderr
        assert "firmware/controller.mpy" not in done.stderr  # only the bad file is named
        assert "the device was not reset" in done.stderr
        assert "hard" not in dev.boots


def test_keep_config_leaves_the_devices_config(device: VirtualDevice, config: Path, bundle: Path) -> None:
    theirs = dict(CONFIG, column_id="already-there", bus_address=7)
    original = json.dumps(theirs)
    (device.flash_dir / "column.json").write_text(original)
    done = flash(device.port, "--keep-config", "--config", str(config), "--bundle", str(bundle))
    assert done.returncode == 0, done.stderr
    assert "keeping the device's column.json (column already-there" in done.stdout
    assert (device.flash_dir / "column.json").read_text() == original
    assert (device.flash_dir / "firmware" / "app.mpy").exists()


def test_keep_config_refuses_a_device_config_that_does_not_validate(device: VirtualDevice,
                                                                     bundle: Path) -> None:
    (device.flash_dir / "column.json").write_text(json.dumps(dict(CONFIG, failsafe_a=3)))
    done = flash(device.port, "--keep-config", "--bundle", str(bundle))
    assert_one_line_error(done, "does not validate", "failsafe_a")
    assert not (device.flash_dir / "firmware").exists()  # refused before copying


def test_keep_config_without_a_config_on_the_device_needs_one(device: VirtualDevice, bundle: Path) -> None:
    done = flash(device.port, "--keep-config", "--bundle", str(bundle))
    assert_one_line_error(done, "no column.json", "--config")


def test_no_config_at_all_is_refused() -> None:
    assert_one_line_error(flash("/dev/ttyUSB0"), "--config")


def test_a_missing_port_is_one_line(config: Path, bundle: Path) -> None:
    done = flash("/dev/ttyUSB-not-here", "--config", str(config), "--bundle", str(bundle))
    assert_one_line_error(done, "/dev/ttyUSB-not-here not found")


def test_a_busy_port_is_one_line(device: VirtualDevice, config: Path, bundle: Path) -> None:
    with open(device.port, "rb") as holder:  # another program holds the port, as mpremote would
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        done = flash(device.port, "--config", str(config), "--bundle", str(bundle))
    assert_one_line_error(done, "busy", device.port)
    assert device.bytes_to_device == 0


def test_a_device_that_does_not_answer_is_one_line(config: Path, bundle: Path) -> None:
    with SerialPair() as silent:  # a port with nothing behind it
        start = time.monotonic()
        done = flash(silent.b_path, "--config", str(config), "--bundle", str(bundle), "--timeout", "1")
        elapsed = time.monotonic() - start
    assert_one_line_error(done, "does not answer", "within 1 s")
    assert elapsed < 15


def test_dry_run_sends_nothing(device: VirtualDevice, config: Path, bundle: Path) -> None:
    done = flash(device.port, "--config", str(config), "--bundle", str(bundle), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "would copy firmware/app.mpy" in done.stdout
    assert "would write column.json" in done.stdout
    assert device.bytes_to_device == 0
    assert list(device.flash_dir.iterdir()) == []


def test_help_names_every_option() -> None:
    done = flash("--help")
    assert done.returncode == 0
    for option in ("port", "--config", "--keep-config", "--dry-run", "--march", "--bundle", "--timeout"):
        assert option in done.stdout


def test_firmware_the_board_cannot_load_is_refused(bundle: Path) -> None:
    files = bundle_files(bundle)
    check_mpy_compat(files, 0x0B06)   # the unix port 1.29: .mpy 6.3 on x64
    check_mpy_compat(files, 0x2B06)   # an ESP32 (xtensawin): bytecode loads on any arch
    with pytest.raises(FlashError, match=r"loads \.mpy version 5"):
        check_mpy_compat(files, 0x0005)


def test_a_flashed_column_boots_its_app_and_answers_on_its_bus(tmp_path: Path, config: Path,
                                                               bundle: Path) -> None:
    """With main.py enabled the device runs the column app after the flash's reset: the
    firmware loaded from its own flash answers Modbus on the RS-485 line; a second flash
    interrupts the running app (Ctrl-C), and the column comes back with its new address."""
    with SerialPair() as bus, VirtualDevice(tmp_path / "flash", run_main=True,
                                            uart_paths={1: "/dev/null", 2: bus.a_path}) as dev:
        client = ModbusSerialClient(bus.b_path, baudrate=19200, timeout=0.5, retries=1)
        assert client.connect()
        try:
            for address in (3, 4):
                write_config(config, dict(CONFIG, bus_address=address))
                done = flash(dev.port, "--config", str(config), "--bundle", str(bundle))
                assert done.returncode == 0, (done.stdout, done.stderr, dev.log())
                dev.wait_busy(True)  # main.py runs the app
                regs = None
                deadline = time.monotonic() + 15
                while regs is None and time.monotonic() < deadline:
                    try:
                        reply = client.read_input_registers(0, count=regmap.INPUT_COUNT, device_id=address)
                    except ModbusException:
                        continue  # the column is still booting
                    regs = None if reply.isError() else reply.registers
                assert regs is not None, dev.log()
                assert regs[regmap.IR_BUS_ADDRESS] == address
                assert regs[regmap.IR_HARDWARE_RATING] == 320
        finally:
            client.close()
