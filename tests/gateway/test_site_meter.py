"""The site meter reader against the HIL's simulated SDM630/SDM120 (pymodbus servers built
on the firmware's own register map), over RTU, over TCP and on the columns' bus."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import pytest
from pymodbus.server import ModbusTcpServer

from firmware import sdm
from firmware.crc import crc16
from gateway.south.modbus_bus import ModbusRtuBus, RtuBusConfig, RtuColumn
from gateway.south.site_meter import ClientReader, MeterReading, MeterState, SiteMeter
from hil.models.sdm_meter import SdmMeterModel, ThreadedSdmMeter
from hil.rig.ports import free_port
from hil.rig.serial_pair import SerialPair

Event = MeterReading | MeterState


def with_crc(frame: bytes) -> bytes:
    crc = crc16(frame)
    return frame + bytes((crc & 0xFF, crc >> 8))


def loaded_sdm630() -> SdmMeterModel:
    model = SdmMeterModel(sdm.SDM630, address=1, import_kwh=1234.567, export_kwh=1.5)
    model.set_phase(0, voltage_v=230.2, current_a=10.0)
    model.set_phase(1, voltage_v=229.8, current_a=12.5)
    model.set_phase(2, voltage_v=231.0, current_a=8.0, power_factor=0.5)
    return model


async def wait_event(meter: SiteMeter, pred: Callable[[Event], bool], timeout_s: float = 3.0) -> Event:
    async with asyncio.timeout(timeout_s):
        while True:
            event = await meter.events.get()
            if pred(event):
                return event


def state(fresh: bool) -> Callable[[Event], bool]:
    return lambda e: isinstance(e, MeterState) and e.fresh is fresh


def test_reads_an_sdm630_over_rtu_with_the_firmware_map() -> None:
    requests: list[bytes] = []

    def tap(direction: str, chunk: bytes) -> bytes:
        if direction == "ab":
            requests.append(chunk)
        return chunk

    with SerialPair(manipulator=tap) as pair, ThreadedSdmMeter(loaded_sdm630(), pair.b_path):
        async def main() -> MeterReading:
            meter = SiteMeter(ClientReader.rtu(pair.a_path), kind=sdm.SDM630, unit=1)
            try:
                return await meter.read_once()
            finally:
                await meter.stop()

        r = asyncio.run(main())
    assert r.voltage_v == (230.2, 229.8, 231.0)
    assert r.current_a == (10.0, 12.5, 8.0)
    assert r.power_w == (2302, 2873, 924)          # V x I x pf: 2872.5 W rounds half away from zero
    assert r.total_power_w == 6099                 # the meter's own total, 6098.5 W
    assert r.frequency_hz == 50.0
    assert (r.import_wh, r.export_wh) == (1_234_567, 1500)
    # One FC04 read of the 76 registers 0x0000..0x004B, as the firmware's map says.
    assert b"".join(requests) == with_crc(bytes.fromhex("01 04 00 00 00 4c"))


@pytest.mark.parametrize(("fault", "reason"), [("no_reply", "timeout"), ("bad_crc", "crc"),
                                               ("exception", "exception")])
def test_a_failing_meter_goes_stale_and_recovers(fault: str, reason: str) -> None:
    model = loaded_sdm630()
    with SerialPair() as pair, ThreadedSdmMeter(model, pair.b_path):
        async def main() -> None:
            meter = SiteMeter(ClientReader.rtu(pair.a_path), period_s=0.05, stale_s=0.3, timeout_s=0.1)
            async with meter:
                await wait_event(meter, state(True))
                assert meter.latest() is not None
                model.set_fault(fault)
                down = await wait_event(meter, state(False))
                assert isinstance(down, MeterState) and down.reason == "stale" and down.last_ok_ms is not None
                assert reason in down.detail
                assert meter.latest() is None and meter.is_stale()
                assert meter.failures[reason] >= 2
                model.set_fault(None)
                await wait_event(meter, state(True))
                reading = meter.latest()
                assert reading is not None and reading.current_a[0] == 10.0
                assert meter.stats.stale_events == 1

        asyncio.run(main())


def test_values_that_do_not_decode_are_not_taken_as_a_reading() -> None:
    model = loaded_sdm630()
    model.set_phase(1, current_a=math.nan, power_w=0.0)
    with SerialPair() as pair, ThreadedSdmMeter(model, pair.b_path):
        async def main() -> None:
            meter = SiteMeter(ClientReader.rtu(pair.a_path), period_s=0.05, stale_s=0.2, timeout_s=0.2)
            async with meter:
                down = await wait_event(meter, state(False))
                assert isinstance(down, MeterState) and down.reason == "no_reading"
                assert meter.stats.invalid >= 1 and meter.latest() is None

        asyncio.run(main())


def test_reads_an_sdm120_over_tcp() -> None:
    model = SdmMeterModel(sdm.SDM120, address=3, import_kwh=12.0)
    model.set_phase(0, voltage_v=231.5, current_a=6.2)
    port = free_port()

    async def main() -> MeterReading:
        server = ModbusTcpServer([model.sim_device()], address=("127.0.0.1", port))
        await server.serve_forever(background=True)
        meter = SiteMeter(ClientReader.tcp("127.0.0.1", port), kind=sdm.SDM120, unit=3, timeout_s=1.0)
        try:
            return await meter.read_once()
        finally:
            await meter.stop()
            await server.shutdown()

    r = asyncio.run(main())
    assert r.voltage_v == (231.5, None, None)
    assert r.current_a == (6.2, None, None)
    assert r.power_w == (1435, None, None) and r.total_power_w == 1435
    assert r.import_wh == 12000


def test_a_meter_that_is_not_there_reports_no_reading() -> None:
    async def main() -> None:
        meter = SiteMeter(ClientReader.tcp("127.0.0.1", free_port(), reconnect_base_s=0.01), period_s=0.05,
                          stale_s=0.2)
        async with meter:
            down = await wait_event(meter, state(False))
            assert isinstance(down, MeterState) and (down.reason, down.last_ok_ms) == ("no_reading", None)
            assert meter.failures["disconnected"] >= 1

    asyncio.run(main())


def test_a_meter_on_the_columns_bus_is_read_between_polls() -> None:
    with SerialPair() as pair, ThreadedSdmMeter(loaded_sdm630(), pair.b_path):
        async def main() -> None:
            # Column 2 is configured but absent; the meter (address 1) shares the line.
            config = RtuBusConfig(pair.a_path, baud=115200, heartbeat_period_s=None, offline_after=1)
            async with ModbusRtuBus(config, [RtuColumn("c2", 2, poll_period_s=0.05, timeout_s=0.05)]) as bus:
                meter = SiteMeter(bus, period_s=0.05, stale_s=1.0)
                async with meter:
                    reading = await wait_event(meter, lambda e: isinstance(e, MeterReading))
                    assert isinstance(reading, MeterReading) and reading.current_a == (10.0, 12.5, 8.0)
                assert bus.stats.reads_for_others >= 1
                assert not bus.link("c2").online

        asyncio.run(main())
