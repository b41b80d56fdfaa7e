# The watchdog is fed only while every task of the app is alive: a task that dies or
# hangs stops the feeding, so the board's WDT resets it. Runs the real App on the
# virtual board under CPython and MicroPython.
import asyncio
import json

import machine

from firmware import app as firmware_app
from firmware import hal

MPY_TIMEOUT_S = 40
CONFIG = {
    "column_id": "wdt-test", "bus_address": 4, "phases": 3,
    "hardware_rating_a": 32, "installation_rating_a": 32, "failsafe_a": 6,
    "meter": {"type": "sdm630", "address": 1, "baud": 9600},
    "link": {"mode": "modbus-rtu", "baud": 19200},
}


def _app():
    machine.board.clear()
    # Lines nobody answers on: the meter goes stale, the link hears nothing. Both tasks
    # still run, which is all the watchdog asks of them.
    machine.board.uart_paths[hal.PINS["meter_uart"]] = "/dev/null"
    machine.board.uart_paths[hal.PINS["link_uart"]] = "/dev/null"
    with open("column.json", "w") as f:
        f.write(json.dumps(CONFIG))
    return firmware_app.App(machine, "column.json", log=lambda *a: None)


async def _scenario(kill):
    column = _app()
    runner = asyncio.create_task(column.run())
    # Boot (loading the link's modules) takes longer on a busy machine: count from the first
    # feed, which proves every task is running.
    wdt = machine.board.wdt
    for _ in range(300):
        if wdt.feeds:
            break
        await asyncio.sleep(0.05)
    first = wdt.feeds
    await asyncio.sleep(2.5)
    fed_while_healthy = wdt.feeds - first
    if kill:
        column.tasks[kill].cancel()
    # One more feed may use the check-ins made before the kill; after that, none.
    await asyncio.sleep(1.2)
    after_kill = wdt.feeds
    await asyncio.sleep(2.2)
    fed_later = wdt.feeds - after_kill
    for task in column.tasks.values():
        task.cancel()
    runner.cancel()
    await asyncio.sleep(0.05)
    return fed_while_healthy, fed_later


def test_watchdog_is_fed_while_every_task_runs():
    healthy, later = asyncio.run(_scenario(None))
    assert healthy >= 2, healthy
    assert later >= 2, later


def test_a_dead_meter_task_stops_the_feeding():
    healthy, later = asyncio.run(_scenario("meter"))
    assert healthy >= 2, healthy
    assert later == 0, later


def test_a_dead_link_task_stops_the_feeding():
    healthy, later = asyncio.run(_scenario("link"))
    assert healthy >= 2, healthy
    assert later == 0, later


def test_a_dead_control_task_stops_the_feeding():
    # The control task feeds the WDT itself: once it is gone, nothing feeds.
    healthy, later = asyncio.run(_scenario("control"))
    assert healthy >= 2, healthy
    assert later == 0, later


def test_a_config_without_a_link_boots_safe_without_crashing():
    machine.board.clear()
    with open("column.json", "w") as f:
        f.write(json.dumps({"column_id": "no-link", "phases": 3}))
    column = firmware_app.App(machine, "column.json", log=lambda *a: None)
    assert column.config_errors

    async def run_briefly():
        runner = asyncio.create_task(column.run())
        await asyncio.sleep(0.3)
        for task in column.tasks.values():
            task.cancel()
        runner.cancel()
        await asyncio.sleep(0.05)

    asyncio.run(run_briefly())
    assert column.link is None
    assert column.ctl.offered_da == 0 and not column.ctl.contactor_on
    assert machine.board.pwm[hal.PINS["cp_pwm"]].duty_u16() == 0  # state F: not available
