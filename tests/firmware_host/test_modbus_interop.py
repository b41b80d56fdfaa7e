"""pymodbus 3.16 as the gateway talks to the firmware's Modbus slave, RTU and TCP.

The firmware side runs in a separate process under each interpreter (CPython and the
MicroPython unix port) via tests/firmware_host/modbus_peer.py: over a serial line pair
for RTU (one column, or three sharing a bus), over a loopback TCP port for Modbus TCP.
"""

from __future__ import annotations

import asyncio
import select
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient, ModbusSerialClient
from pymodbus.framer import FramerType

from firmware import regmap, status
from hil.rig.firmware_proc import INTERPRETERS, start_firmware, stop_process
from hil.rig.ports import free_port
from hil.rig.serial_pair import SerialPair

PEER = Path(__file__).with_name("modbus_peer.py")
PEER_RUN_S = "60"     # the peer exits by itself after this, even if a test dies
READY_TIMEOUT_S = 15.0


@contextmanager
def peer(interp: str, args: list[str], cwd: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start the firmware side, wait for READY, and always stop it afterwards."""
    proc = start_firmware(interp, PEER, [*args, PEER_RUN_S], cwd=cwd)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], READY_TIMEOUT_S)
        line = proc.stdout.readline() if ready else b""
        if line.strip() != b"READY":
            out = stop_process(proc)
            pytest.fail(f"{interp} peer did not start: {(line + out).decode(errors='replace')}")
        yield proc
    finally:
        out = stop_process(proc)
        if proc.returncode not in (0, -15):   # -15: our SIGTERM
            pytest.fail(f"{interp} peer failed ({proc.returncode}): {out.decode(errors='replace')}")


def serial_client(path: str, timeout: float = 2.0, retries: int = 0) -> ModbusSerialClient:
    client = ModbusSerialClient(path, framer=FramerType.RTU, baudrate=115200, timeout=timeout,
                                retries=retries)
    assert client.connect()
    return client


def check_exception(result: object, code: int) -> None:
    assert result.isError(), result  # type: ignore[attr-defined]
    assert result.exception_code == code, result  # type: ignore[attr-defined]


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_rtu_read_write_and_exceptions(interp: str, tmp_path: Path) -> None:
    with SerialPair() as pair, peer(interp, ["rtu", pair.b_path, "7"], tmp_path):
        client = serial_client(pair.a_path)
        try:
            rr = client.read_input_registers(0, count=regmap.INPUT_COUNT, device_id=7)
            assert not rr.isError(), rr
            regs = rr.registers
            assert regs[regmap.IR_STATUS] == status.ST_CHARGING
            assert regs[regmap.IR_CP_STATE] == status.CP_C
            assert regs[regmap.IR_CURRENT_L1:regmap.IR_CURRENT_L3 + 1] == [100, 101, 102]
            assert regs[regmap.IR_VOLTAGE_L1] == 2302
            u32 = client.DATATYPE.UINT32
            power = regs[regmap.IR_POWER:regmap.IR_POWER + 2]
            energy = regs[regmap.IR_ENERGY:regmap.IR_ENERGY + 2]
            # pymodbus' default word order (big: high word first) reads our 32-bit values.
            assert client.convert_from_registers(power, data_type=u32) == 70007
            assert client.convert_from_registers(energy, data_type=u32) == 123456789
            assert regs[regmap.IR_FW_VERSION] == 0x0102 and regs[regmap.IR_BUS_ADDRESS] == 7

            rr = client.read_holding_registers(0, count=regmap.HOLDING_COUNT, device_id=7)
            assert rr.registers == [0, 0, 60, 0, 1, 0, 0, 0, 0]

            # The gateway assigns 16 A for 120 s: stored, and the column's logic saw it.
            assert not client.write_registers(regmap.HR_ASSIGNED_LIMIT, [160, 120], device_id=7).isError()
            rr = client.read_input_registers(0, count=regmap.INPUT_COUNT, device_id=7)
            assert rr.registers[regmap.IR_OFFERED_CURRENT] == 160
            assert rr.registers[regmap.IR_LIMIT_SOURCE] == status.SRC_GATEWAY
            assert rr.registers[regmap.IR_ASSIGNED_REMAINING] == 120
            assert not client.write_register(regmap.HR_FAILSAFE_LIMIT, 80, device_id=7).isError()
            assert not client.write_register(regmap.HR_HEARTBEAT, 0xBEEF, device_id=7).isError()

            check_exception(client.read_input_registers(regmap.INPUT_COUNT - 2, count=3, device_id=7), 2)
            check_exception(client.write_register(regmap.HR_ASSIGNED_LIMIT, 801, device_id=7), 3)
            check_exception(client.write_register(regmap.HR_RESET, 1, device_id=7), 3)
            check_exception(client.write_register(regmap.HOLDING_COUNT, 1, device_id=7), 2)
            check_exception(client.write_registers(0, [100, 60, 900], device_id=7), 3)
            check_exception(client.read_coils(0, count=1, device_id=7), 1)
            # FC17 has a length rule too; FC43 has none: the line's silence delimits it.
            check_exception(client.report_device_id(device_id=7), 1)
            check_exception(client.read_device_information(device_id=7), 1)

            rr = client.read_holding_registers(0, count=regmap.HOLDING_COUNT, device_id=7)
            assert rr.registers == [160, 120, 80, 0xBEEF, 1, 0, 0, 0, 0]   # refused writes changed nothing
            rr = client.read_input_registers(regmap.IR_BAD_FRAMES, count=1, device_id=7)
            assert rr.registers == [0]
        finally:
            client.close()


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_rtu_damaged_request_is_dropped_counted_and_retried(interp: str, tmp_path: Path) -> None:
    damaged: list[bytes] = []

    def corrupt_first_request(direction: str, chunk: bytes) -> bytes:
        if direction == "ab" and not damaged:
            damaged.append(chunk)
            return chunk[:-1] + bytes([chunk[-1] ^ 0x40])   # break the CRC
        return chunk

    with SerialPair(manipulator=corrupt_first_request) as pair, \
            peer(interp, ["rtu", pair.b_path, "1"], tmp_path):
        client = serial_client(pair.a_path, timeout=0.5, retries=1)
        try:
            rr = client.read_input_registers(regmap.IR_BAD_FRAMES, count=1, device_id=1)
            assert not rr.isError(), rr
            assert rr.retries == 1          # the damaged first try got no reply
            assert damaged
            rr = client.read_input_registers(regmap.IR_BAD_FRAMES, count=1, device_id=1)
            assert rr.registers == [1]      # and was counted as a bad frame
        finally:
            client.close()


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_rtu_broadcast_limit_table_reaches_each_column(interp: str, tmp_path: Path) -> None:
    async def scenario(port: str) -> dict[int, list[int]]:
        client = AsyncModbusSerialClient(port, framer=FramerType.RTU, baudrate=115200, timeout=2,
                                         retries=0)
        assert await client.connect()
        try:
            # Validity 300 s; address 1: 10 A, address 2: no change, address 3: 20 A.
            table = [300, 100, regmap.NO_CHANGE, 200]
            none = await client.write_registers(regmap.BROADCAST_TABLE, table, device_id=0,
                                                no_response_expected=True)
            assert none is None
            await asyncio.sleep(0.1)   # RTU turnaround after a broadcast
            result = {}
            for unit in (1, 2, 3):
                rr = await client.read_holding_registers(0, count=2, device_id=unit)
                assert not rr.isError(), rr
                result[unit] = rr.registers
                rr = await client.read_input_registers(regmap.IR_BAD_FRAMES, count=1, device_id=unit)
                # Each column heard the others' replies: foreign frames, not errors.
                assert rr.registers == [0], unit
            return result
        finally:
            client.close()

    with SerialPair() as pair, peer(interp, ["rtu", pair.b_path, "1,2,3"], tmp_path):
        got = asyncio.run(asyncio.wait_for(scenario(pair.a_path), 30))
    assert got == {1: [100, 300], 2: [0, 0], 3: [200, 300]}


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_tcp_read_write_exceptions_and_broadcast(interp: str, tmp_path: Path) -> None:
    port = free_port()

    async def scenario() -> None:
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2, retries=0)
        assert await client.connect()
        try:
            rr = await client.read_input_registers(0, count=regmap.INPUT_COUNT, device_id=5)
            assert not rr.isError(), rr
            assert rr.registers[regmap.IR_BUS_ADDRESS] == 5
            assert rr.registers[regmap.IR_STATUS] == status.ST_CHARGING
            assert not (await client.write_register(0, 250, device_id=5)).isError()
            assert not (await client.write_register(1, 30, device_id=5)).isError()
            rr = await client.read_input_registers(regmap.IR_OFFERED_CURRENT, count=1, device_id=5)
            assert rr.registers == [250]
            check_exception(await client.read_input_registers(regmap.INPUT_COUNT, count=1, device_id=5), 2)
            check_exception(await client.write_register(4, 2, device_id=5), 3)
            check_exception(await client.read_coils(0, count=1, device_id=5), 1)
            # Unit 0xFF addresses the column on TCP; a different unit gets no answer.
            rr = await client.read_holding_registers(0, count=2, device_id=0xFF)
            assert rr.registers == [250, 30]
            # Unit 0 is a broadcast here too: no reply, the table entry for address 5 applies.
            table = [600, 101, 102, 103, 104, 64]
            await client.write_registers(regmap.BROADCAST_TABLE, table, device_id=0,
                                         no_response_expected=True)
            await asyncio.sleep(0.05)
            rr = await client.read_holding_registers(0, count=2, device_id=5)
            assert rr.registers == [64, 600]
        finally:
            client.close()

    with peer(interp, ["tcp", str(port), "5"], tmp_path):
        asyncio.run(asyncio.wait_for(scenario(), 30))
