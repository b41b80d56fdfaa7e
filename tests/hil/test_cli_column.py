"""`python -m hil column`: starts a virtual column, says where to connect, answers a
gateway's Modbus request there, and stops everything it started on SIGTERM / SIGINT."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pymodbus.client import ModbusSerialClient, ModbusTcpClient

from firmware import regmap, status
from hil.__main__ import main
from hil.rig.firmware_proc import REPO, firmware_env


def _start(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "hil", "column", *args], cwd=REPO,
                            env=firmware_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _read_until(proc: subprocess.Popen[bytes], pattern: str, timeout_s: float) -> tuple[re.Match[str], str]:
    assert proc.stdout is not None
    text = ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, text)
        if found:
            return found, text
        if select.select([proc.stdout], [], [], 0.1)[0]:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            text += chunk.decode(errors="replace")
    raise AssertionError("no %r in the output within %.0f s:\n%s" % (pattern, timeout_s, text))


def _stop(proc: subprocess.Popen[bytes], sig: int) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    rest = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
    return code, rest


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _poll(read: Callable[[], list[int] | None], ok: Callable[[list[int]], bool],
          timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    regs = None
    while time.monotonic() < deadline:
        regs = read()
        if regs is not None and ok(regs):
            return regs
        time.sleep(0.1)
    raise AssertionError("registers never as expected: %s" % (regs,))


@pytest.mark.parametrize(("interp", "sig"), [("micropython", signal.SIGTERM), ("cpython", signal.SIGINT)])
def test_a_modbus_rtu_column_answers_where_it_says(interp: str, sig: int, tmp_path: Path) -> None:
    link = tmp_path / "ttyCOLUMN"
    proc = _start("--interp", interp, "--link", "modbus-rtu", "--symlink", str(link))
    try:
        found, text = _read_until(proc, r"connect to: (\S+) \(modbus-rtu, unit 1, 19200 baud", 30)
        assert found.group(1) == str(link) and os.readlink(link).startswith("/dev/pts/")
        pid = int(re.search(r"\(pid (\d+)\)", text).group(1))  # type: ignore[union-attr]
        client = ModbusSerialClient(found.group(1), baudrate=19200, timeout=1, retries=2)
        try:
            assert client.connect()

            def read() -> list[int] | None:
                reply = client.read_input_registers(0, count=regmap.INPUT_COUNT, device_id=1)
                return None if reply.isError() else list(reply.registers)

            # The simulated car is plugged in with a 32 A cable and is offered current.
            regs = _poll(read, lambda r: r[regmap.IR_STATUS] in (status.ST_PREPARING, status.ST_CHARGING), 10)
            assert regs[regmap.IR_BUS_ADDRESS] == 1
            assert regs[regmap.IR_CABLE_RATING] == 320
            assert regs[regmap.IR_OFFERED_CURRENT] == 60   # the default failsafe, 6 A: no gateway yet
        finally:
            client.close()
    finally:
        code, rest = _stop(proc, sig)
    assert code == 0, rest
    assert "stopping virtual column vcol-1" in rest
    assert _gone(pid)  # the firmware process went with it
    assert not link.is_symlink()
    assert "Traceback" not in text + rest


def test_a_modbus_tcp_column_on_the_port_asked(free_port: Callable[[], int], tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "col.json"
    config.write_text('{"column_id": "tcp-7", "bus_address": 7, "phases": 1, "hardware_rating_a": 16,'
                      ' "installation_rating_a": 16, "failsafe_a": 0, "meter": {"type": "sdm120"},'
                      ' "link": {"mode": "modbus-rtu", "baud": 9600}}')
    proc = _start("--interp", "cpython", "--link", "modbus-tcp", "--port", str(port), "--config", str(config),
                  "--ev", "none")
    try:
        _read_until(proc, r"connect to: 127\.0\.0\.1:%d \(modbus-tcp, unit 7\)" % port, 30)
        client = ModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=1)
        try:
            assert client.connect()
            reply = client.read_input_registers(0, count=regmap.INPUT_COUNT, device_id=7)
            assert not reply.isError(), reply
            assert reply.registers[regmap.IR_BUS_ADDRESS] == 7 and reply.registers[regmap.IR_PHASES] == 1
            assert reply.registers[regmap.IR_STATUS] == status.ST_AVAILABLE  # no car
        finally:
            client.close()
    finally:
        code, rest = _stop(proc, signal.SIGTERM)
    assert code == 0, rest


@pytest.mark.parametrize(("argv", "message"), [
    (["--link", "modbus-rtu", "--port", "5020"], "--port applies to the TCP links"),
    (["--config", "/nonexistent/col.json"], "cannot read config /nonexistent/col.json"),
    (["--ev", "tesla"], "unknown car 'tesla'"),
    (["--soc", "1.5"], "--soc 1.5 is not in 0..1"),
])
def test_user_mistakes_are_one_line_errors(argv: list[str], message: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["column", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_config_that_is_not_json_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "col.json"
    bad.write_text("{column_id: 1")
    assert main(["column", "--config", str(bad)]) == 2
    assert "config %s is not valid JSON" % bad in capsys.readouterr().err
