"""limit_latency_tcp: a DNO site limit published to the broker until every Modbus-TCP virtual
column has applied it in its pilot (the firmware's own timestamp), p50/p99 over at least 50
limits (bench/latency_rig.py has the method and how many columns the machine runs).

The site: 100 columns, each the real firmware app (MicroPython unix port, .mpy bundle) serving
Modbus TCP on its own loopback port, all hosted in one column-farm process
(hil/rig/column_farm.py), a car charging on each; the gateway polls every column at 1 Hz. Baselines in
the same run, on the same loaded machine: one MQTT publish->receive round trip at QoS 1 (paho,
TCP_NODELAY) and one Modbus write to a column (pymodbus, FC06 to the heartbeat register). Then
the same series again with only 5 of the columns (the others stopped, a fresh gateway), to tell
what the number of columns costs from what the machine costs.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pymodbus.client import AsyncModbusTcpClient

from bench import latency_rig as rig
from bench.stats import median, summary
from bench.suite import Context
from firmware import regmap
from hil.rig.broker import Broker, Listener
from hil.rig.column_farm import FarmColumn, tcp_ports
from tools.firmware_build import build

TARGET_COLUMNS = 100
SMALL_SITE = 5   # the reference run: the same series with this many columns
GOAL_P99_MS = 100.0


async def modbus_writes(port: int, n: int) -> list[float]:
    """ms per FC06 write (and its echo) to one column, n times."""
    client = AsyncModbusTcpClient(rig.LOCAL, port=port, timeout=2, retries=0)
    await client.connect()
    out = []
    try:
        for i in range(n):
            t0 = time.perf_counter()
            rr = await client.write_register(regmap.HR_HEARTBEAT, i, device_id=1)
            if not rr.isError():
                out.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.01)
    finally:
        client.close()
    return out


def run(ctx: Context) -> dict[str, Any]:
    target = 5 if ctx.quick else TARGET_COLUMNS
    n_limits = 10 if ctx.quick else 60
    bundle = build(out=ctx.work / "bundle", link="modbus-tcp")

    ports = tcp_ports(target)

    def make_config(i: int) -> dict[str, Any]:
        link = {"mode": "modbus-tcp", "tcp_port": ports[i], "host": rig.LOCAL}
        return {**rig.COLUMN_BASE, "column_id": "tcp-%03d" % i, "bus_address": 1, "link": link}

    with ExitStack() as stack:
        broker = stack.enter_context(Broker([Listener("plain")], workdir=ctx.work / "broker"))
        port = broker.port("plain")
        cols, sizing = rig.start_columns(stack, [make_config(i) for i in range(target)], bundle.root,
                                         ctx.work / "columns", log=ctx.log)
        n = len(cols)
        rig.plug_in(cols)
        ctx.log(f"limit_latency_tcp: baselines with {n} columns running")
        rtt = rig.mqtt_round_trips(port, 60)
        writes = asyncio.run(modbus_writes(cols[0].config["link"]["tcp_port"], 60))
        main = rig.series(cols, site_doc(cols, port, ctx.work / "site"), ctx.work / "site", broker, n_limits,
                          log=ctx.log)
        reference = None
        if not ctx.quick and n > SMALL_SITE:
            for c in cols[SMALL_SITE:]:
                c.close()
            small = cols[:SMALL_SITE]
            ref = rig.series(small, site_doc(small, port, ctx.work / "small"), ctx.work / "small", broker, 30,
                             log=ctx.log)
            reference = (SMALL_SITE, *ref)
    limits, cpu = main
    floor = median(rtt) + median(writes)
    p50 = median(limits.latencies_ms) if limits.latencies_ms else None
    baseline = {
        "name": "one MQTT publish->receive round trip (QoS 1, paho, TCP_NODELAY) + one Modbus TCP write to a "
                "column (pymodbus FC06), same machine, same run, columns running",
        "mqtt_round_trip_ms": summary(rtt, 2),
        "modbus_write_ms": summary(writes, 2),
        "sum_p50_ms": round(floor, 2),
        "ratio_p50_to_baseline": round(p50 / floor, 1) if p50 and floor > 0 else None,
        "summary": f"MQTT round trip p50 {median(rtt):.2f} ms + Modbus write p50 {median(writes):.2f} ms "
                   f"= {floor:.2f} ms",
    }
    method = __doc__.split("\n\n", 1)[1].strip() if __doc__ else ""
    return rig.figure(limits, sizing, baseline=baseline, goal_ms=GOAL_P99_MS,
                      goal="p99 ≤ 100 ms (100 columns)", cpu=cpu, method=method, quick=ctx.quick,
                      notes=[],
                      reference=reference)


def site_doc(cols: list[FarmColumn], port: int, work: Path) -> dict[str, Any]:
    columns = [{"id": c.config["column_id"], "hardware_a": 32, "link": "modbus-tcp", "host": rig.LOCAL,
                "port": c.config["link"]["tcp_port"], "unit": 1} for c in cols]
    return rig.site_doc(len(cols), columns, port, work)
