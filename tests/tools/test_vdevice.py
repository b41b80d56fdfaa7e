"""The virtual device behaves as a MicroPython board on a serial port: the real mpremote
works against it, and its REPL protocol holds byte for byte."""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import serial

from hil.vdevice import VirtualDevice

pytestmark = pytest.mark.timeout(120)


def mpremote(port: str, *args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mpremote", "connect", port, *args],
                          capture_output=True, text=True, timeout=timeout_s, check=False)


def read_until(line: serial.Serial, marker: bytes, timeout_s: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout_s
    got = b""
    while marker not in got:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {marker!r} within {timeout_s} s; got {got!r}")
        got += line.read(256)
    return got


def open_console(device: VirtualDevice) -> serial.Serial:
    line = serial.Serial(device.port, 115200, timeout=0.05)
    read_until(line, b">>> ")  # what the board printed at power-on, waiting in the line
    return line


@pytest.fixture
def device(tmp_path: Path) -> Iterator[VirtualDevice]:
    with VirtualDevice(tmp_path / "flash") as dev:
        yield dev


@pytest.fixture
def console(device: VirtualDevice) -> Iterator[serial.Serial]:
    """The host's end of the line, opened like a terminal, after the power-on banner."""
    line = open_console(device)
    try:
        yield line
    finally:
        line.close()


def test_mpremote_exec_runs_code_on_the_device(device: VirtualDevice) -> None:
    done = mpremote(device.port, "exec", "import sys; print(sys.implementation.name, 6 * 7)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["micropython", "42"]


def test_mpremote_fs_ls_lists_the_flash_folder(device: VirtualDevice) -> None:
    (device.flash_dir / "column.json").write_text("{}\n")
    (device.flash_dir / "firmware").mkdir()
    (device.flash_dir / "firmware" / "app.mpy").write_bytes(b"M" * 300)
    done = mpremote(device.port, "fs", "ls")
    assert done.returncode == 0, done.stderr
    listing = [ln.split() for ln in done.stdout.splitlines()[1:]]
    assert sorted(listing) == [["0", "firmware/"], ["3", "column.json"]]
    done = mpremote(device.port, "fs", "ls", ":firmware")
    assert done.stdout.splitlines()[1].split() == ["300", "app.mpy"]


def test_mpremote_cp_writes_the_flash_folder_and_sha256sum_matches(device: VirtualDevice,
                                                                    tmp_path: Path) -> None:
    data = bytes(range(256)) * 20  # every byte value, across several 256-byte chunks
    local = tmp_path / "blob.bin"
    local.write_bytes(data)
    done = mpremote(device.port, "fs", "cp", str(local), ":blob.bin", "+", "fs", "sha256sum", ":blob.bin")
    assert done.returncode == 0, done.stderr
    assert (device.flash_dir / "blob.bin").read_bytes() == data
    assert hashlib.sha256(data).hexdigest() in done.stdout


def test_an_exception_comes_back_as_error_output(device: VirtualDevice) -> None:
    done = mpremote(device.port, "exec", "print('before')\n1/0")
    assert done.returncode == 1
    assert done.stdout.startswith("before\n")  # text mode reads the board's \\r\\n as \\n
    assert "ZeroDivisionError: divide by zero" in done.stdout
    assert "vdevice_repl" not in done.stdout  # the device's own frames stay out of tracebacks


def test_globals_last_for_a_session_and_a_soft_reset_clears_them(device: VirtualDevice) -> None:
    done = mpremote(device.port, "exec", "x = 5", "+", "exec", "print(x + 1)")
    assert done.stdout.strip() == "6"
    boots = len(device.boots)
    done = mpremote(device.port, "exec", "print('x' in globals())")  # mpremote soft-resets first
    assert done.stdout.strip() == "False"
    assert device.boots[boots:] == ["soft"]


def test_raw_repl_bytes_on_the_wire(console: serial.Serial) -> None:
    console.write(b"\x01")
    assert read_until(console, b">") == b"\r\nraw REPL; CTRL-B to exit\r\n>"
    console.write(b"print(1)\x04")
    assert read_until(console, b"\x04>") == b"OK1\r\n\x04\x04>"
    console.write(b"1/0\x04")
    assert read_until(console, b"\x04>") == (b"OK\x04Traceback (most recent call last):\r\n"
                                              b'  File "<stdin>", line 1, in <module>\r\n'
                                              b"ZeroDivisionError: divide by zero\r\n\x04>")
    console.write(b"\x02")
    assert read_until(console, b">>> ").startswith(b"\r\nMicroPython v1.")


def test_raw_paste_mode_bytes_on_the_wire(console: serial.Serial) -> None:
    console.write(b"\x01")
    read_until(console, b">")
    console.write(b"\x05A\x01")
    assert read_until(console, b"\x01") == b"R\x01\x00\x01\x01"  # window 256, and a second one
    console.write(b"print(2)\x04")
    assert read_until(console, b"\x04>") == b"\x042\r\n\x04\x04>"


def test_without_raw_paste_the_device_answers_r00_and_mpremote_falls_back(tmp_path: Path) -> None:
    with VirtualDevice(tmp_path / "flash", raw_paste=False) as dev:
        line = open_console(dev)
        line.write(b"\x01")
        read_until(line, b">")
        line.write(b"\x05A\x01")
        assert read_until(line, b"R") + line.read(1) == b"R\x00"
        line.write(b"print(3)\x04")
        assert read_until(line, b"\x04>") == b"OK3\r\n\x04\x04>"
        line.write(b"\x02")
        line.close()
        code = "total = sum([%s])\nprint(total)" % ",".join(str(i) for i in range(1000))  # > 256 bytes
        done = mpremote(dev.port, "exec", code)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(sum(range(1000)))


def test_ctrl_c_interrupts_running_code(device: VirtualDevice, console: serial.Serial) -> None:
    console.write(b"\x01")
    read_until(console, b">")
    console.write(b"while True:\n    pass\n\x04")
    read_until(console, b"OK")
    device.wait_busy(True)
    boots = len(device.boots)
    console.write(b"\x03")
    got = read_until(console, b"\x04>")
    assert b"KeyboardInterrupt" in got
    assert len(device.boots) == boots  # interrupted, not reset
    console.write(b"print('alive')\x04")
    assert read_until(console, b"\x04>") == b"OKalive\r\n\x04\x04>"


def test_friendly_prompt_evaluates_lines(console: serial.Serial) -> None:
    console.write(b"\x02")
    read_until(console, b">>> ")
    console.write(b"y = 6\r")
    read_until(console, b">>> ")
    console.write(b"y * 7\r")
    assert read_until(console, b">>> ") == b"y * 7\r\n42\r\n>>> "
    console.write(b"for i in range(2):\rprint(i)\r\r")  # auto-indented like a board's REPL
    assert read_until(console, b"1\r\n>>> ").endswith(b"0\r\n1\r\n>>> ")


def test_ctrl_d_soft_resets_and_runs_main_only_when_enabled(tmp_path: Path) -> None:
    flash = tmp_path / "flash"
    flash.mkdir()
    (flash / "boot.py").write_text("print('boot ran')\n")
    (flash / "main.py").write_text("print('main ran')\n")
    for run_main, expect in ((False, b"boot ran\r\n"), (True, b"boot ran\r\nmain ran\r\n")):
        with VirtualDevice(flash, run_main=run_main) as dev:
            line = open_console(dev)
            line.write(b"x = 1\r")
            read_until(line, b">>> ")
            line.write(b"\x04")
            got = read_until(line, b">>> ")
            assert got.startswith(b"\r\nMPY: soft reboot\r\n" + expect + b"MicroPython v1.")
            line.write(b"'x' in globals()\r")
            read_until(line, b"False\r\n>>> ")  # a fresh interpreter
            line.close()
            assert dev.boots == ["power", "soft"]


def test_mpremote_reset_is_a_hard_reset(device: VirtualDevice) -> None:
    done = mpremote(device.port, "reset")
    assert done.returncode == 0, done.stderr
    device.wait_boots(3)  # power-on, mpremote's soft reset, then machine.reset()
    assert device.boots == ["power", "soft", "hard"]


def test_corrupt_writes_flip_a_bit_in_the_named_file(tmp_path: Path) -> None:
    data = b"0123456789" * 100
    local = tmp_path / "blob.bin"
    local.write_bytes(data)
    with VirtualDevice(tmp_path / "flash", corrupt_writes=["bad.bin"]) as dev:
        done = mpremote(dev.port, "fs", "cp", str(local), ":bad.bin", "+",
                        "fs", "cp", str(local), ":good.bin")
        assert done.returncode == 0, done.stderr
        bad = (dev.flash_dir / "bad.bin").read_bytes()
        assert (dev.flash_dir / "good.bin").read_bytes() == data
        assert len(bad) == len(data)
        assert sum(bin(a ^ b).count("1") for a, b in zip(bad, data, strict=True)) == 1


def test_stop_ends_the_micropython_process(tmp_path: Path) -> None:
    dev = VirtualDevice(tmp_path / "flash").start()
    assert dev.alive
    dev.stop()
    assert not dev.alive


def test_the_command_line_device_serves_mpremote_until_interrupted(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "hil.vdevice", str(tmp_path / "flash")],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("virtual device on /dev/pts/"), first
        port = first.split()[3].rstrip(",")
        (tmp_path / "flash" / "hello.txt").write_text("hi")
        done = mpremote(port, "fs", "cat", ":hello.txt")
        assert done.stdout.splitlines()[-1] == "hi"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
