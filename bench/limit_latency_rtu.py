"""limit_latency_rtu: the same as limit_latency_tcp for columns on ONE RS-485 bus at 115200
baud: a DNO site limit published to the broker until every column's pilot has applied it (the
firmware's own timestamp), p50/p99 over at least 50 limits.

The columns: each the real firmware app, hosted together in one column-farm process
(hil/rig/column_farm.py), each answering to its own bus address on the farm's one line. The
bus is paced to the baud rate (bench/paced_bus.py: one half-duplex wire shared by the gateway
and every column, each frame held for its 11 bits per byte), so it is no faster than a real
line; the gateway polls every column at 1 Hz on it. Baseline in the same run: the wire time
of the frames actually sent for each limit (the limit writes, broadcast table or unicast, and
their echoes, each with the 1.75 ms silence that ends a frame): the time the bus itself needs.
Then the same series again with only 4 of the columns on the bus (the others stopped, a fresh
gateway), to tell what the number of columns costs from what the machine costs.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import latency_rig as rig
from bench.paced_bus import PacedBusRelay
from bench.stats import median, summary
from bench.suite import Context
from hil.rig.broker import Broker, Listener
from hil.rig.column_farm import FarmColumn
from tools.firmware_build import build

TARGET_COLUMNS = 32
SMALL_SITE = 4   # the reference run: the same series with this many columns on the bus
BAUD = 115200
GOAL_P99_MS = 250.0


def site_doc(cols: list[FarmColumn], port: int, bus_path: str, work: Path) -> dict[str, Any]:
    columns = [{"id": c.config["column_id"], "hardware_a": 32, "link": "modbus-rtu", "bus": "bus-a",
                "address": c.config["bus_address"]} for c in cols]
    return rig.site_doc(len(cols), columns, port, work, buses={"bus-a": {"device": bus_path, "baud": BAUD}})


def wire_figures(bus: PacedBusRelay, limits: rig.LimitRun,
                 since_s: float) -> tuple[list[float], list[float], float, dict[str, int]]:
    """Per limit: wire ms of its writes and echoes, and of all traffic in its window; the wire
    time used since `since_s`; how many limit frames went out and how many were broadcasts."""
    limit_wire, all_wire = [], []
    for x in limits.applied:
        t0, t1 = x.t_pub / 1000, (x.t_pub + (x.last or 0)) / 1000
        limit_wire.append(1000 * bus.limit_wire_s(t0, t1))
        all_wire.append(1000 * sum(bus.wire_s(f) for f in bus.between(t0, t1)))
    frames = [f for f in list(bus.frames) if f.start_s >= since_s]
    busy = sum(bus.wire_s(f) for f in frames)
    kinds = {"limit_writes": sum(1 for f in frames if f.is_limit_write),
             "broadcast_limit_frames": sum(1 for f in frames if f.is_limit_write and f.head[0] == 0)}
    return limit_wire, all_wire, busy, kinds


def run(ctx: Context) -> dict[str, Any]:
    target = 4 if ctx.quick else TARGET_COLUMNS
    n_limits = 10 if ctx.quick else 60
    bundle = build(out=ctx.work / "bundle", link="modbus-rtu")

    def make_config(i: int) -> dict[str, Any]:
        return {**rig.COLUMN_BASE, "column_id": "rtu-%02d" % (i + 1), "bus_address": i + 1,
                "link": {"mode": "modbus-rtu", "baud": BAUD}}

    with ExitStack() as stack:
        broker = stack.enter_context(Broker([Listener("plain")], workdir=ctx.work / "broker"))
        port = broker.port("plain")
        cols, sizing = rig.start_columns(stack, [make_config(i) for i in range(target)], bundle.root,
                                         ctx.work / "columns", log=ctx.log)
        n = len(cols)
        # The farm's columns share one line: the bus has one device end (every column hears it).
        bus = PacedBusRelay(sorted({c.link_path or "" for c in cols}), BAUD)
        stack.enter_context(bus)
        rig.plug_in(cols)
        t_series = time.monotonic()
        limits, cpu = rig.series(cols, site_doc(cols, port, bus.path, ctx.work / "site"), ctx.work / "site",
                                 broker, n_limits, log=ctx.log)
        series_s = time.monotonic() - t_series
        wire = wire_figures(bus, limits, t_series)
        reference = None
        if not ctx.quick and n > SMALL_SITE:
            for c in cols[SMALL_SITE:]:
                c.close()
            small = cols[:SMALL_SITE]
            ref = rig.series(small, site_doc(small, port, bus.path, ctx.work / "small"), ctx.work / "small",
                             broker, 30, log=ctx.log)
            reference = (SMALL_SITE, *ref)
    limit_wire, all_wire, busy, kinds = wire
    p50 = median(limits.latencies_ms) if limits.latencies_ms else None
    wire50 = median(limit_wire) if limit_wire else None
    baseline = {
        "name": "wire time of the frames actually sent for each limit on the 115200 baud bus (limit writes "
                "and their echoes, with the frame-ending silence), same run",
        "limit_frames_wire_ms": summary(limit_wire, 2),
        "all_frames_in_window_wire_ms": summary(all_wire, 2),
        "ratio_p50_to_baseline": round(p50 / wire50, 1) if p50 and wire50 else None,
        "summary": (f"limit frames {wire50:.2f} ms of wire per limit (p50); all traffic in a limit's window "
                    f"{median(all_wire):.2f} ms") if wire50 is not None and all_wire else "n/a",
    }
    notes = [f"Bus from the gateway's start to the last limit: {busy / series_s * 100:.0f} % of the wire's "
             f"time in use (polls at 1 Hz, heartbeats, limits); {kinds['limit_writes']} limit frames, "
             f"{kinds['broadcast_limit_frames']} of them broadcast table frames."]
    method = __doc__.split("\n\n", 1)[1].strip() if __doc__ else ""
    result = rig.figure(limits, sizing, baseline=baseline, goal_ms=GOAL_P99_MS,
                        goal="p99 ≤ 250 ms (32 columns)", cpu=cpu, method=method, quick=ctx.quick,
                        notes=notes,
                        reference=reference)
    result["baud"] = BAUD
    result["bus_utilisation"] = round(busy / series_s, 3)
    result["frames"] = kinds
    return result
