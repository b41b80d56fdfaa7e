"""outbox_throughput: messages per second through the SQLite outbox and the Publisher to a real
mosquitto at QoS 1 (the cost of never losing data), against paho publishing the same messages at
QoS 1 without the outbox, in the same run, to the same broker.

The outbox run: a producer enqueues column telemetry in transactions of 100 (as the service
queues a telemetry round) while the Publisher drains the outbox with its default window of 64
messages in flight; the clock runs from the first enqueue until the last row is acknowledged and
deleted. Durability "full" (the default: synchronous=FULL, on disk when enqueue returns); the
"normal" durability is measured too. The baseline: one paho client, TCP_NODELAY, the same window
of 64, the same topics and payload bytes, timed until the last PUBACK. Runs alternate (outbox,
paho, outbox normal) so the ratio holds on a noisy machine; medians and spread over repeats.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.raw_clients import paho_publish, telemetry, wire_messages
from bench.stats import median, spread
from bench.suite import Context
from gateway.north.outbox import Outbox, Outgoing
from gateway.north.publisher import Publisher
from gateway.north.settings import parse_mqtt
from hil.rig.broker import Broker, Listener

BATCH = 100
INFLIGHT = 64


async def _outbox_run(port: int, db: Path, messages: list[Outgoing], durability: str) -> dict[str, float]:
    settings = parse_mqtt({"host": "127.0.0.1", "port": port, "client_id": "bench-outbox-" + db.stem,
                           "inflight_max": INFLIGHT, "outbox": {"path": str(db), "durability": durability}})
    outbox = Outbox(db, durability=durability)
    publisher = Publisher(settings, outbox, site_id="bench")
    task = asyncio.create_task(publisher.run())
    try:
        deadline = time.monotonic() + 10
        while not publisher.connected:
            if time.monotonic() > deadline:
                raise TimeoutError("outbox publisher did not connect")
            await asyncio.sleep(0.01)
        cpu0, t0 = time.process_time(), time.perf_counter()
        for i in range(0, len(messages), BATCH):
            outbox.enqueue_many(messages[i:i + BATCH])
            await asyncio.sleep(0)   # the publisher runs between transactions, as in the service
        if not await publisher.drained(120):
            raise TimeoutError(f"outbox not drained: {len(outbox)} rows left")
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        acked = publisher.stats.acked
    finally:
        await publisher.stop()
        await task
        outbox.close()
    return {"wall_s": wall, "cpu_s": cpu, "msgs": len(messages), "msgs_per_s": len(messages) / wall,
            "acked": acked}


def run(ctx: Context) -> dict[str, Any]:
    n = 1000 if ctx.quick else 5000
    repeats = 1 if ctx.quick else 3
    messages = telemetry(n)
    wire = wire_messages(messages)
    runs: dict[str, list[dict[str, float]]] = {"outbox": [], "paho": [], "outbox_normal": []}
    with Broker([Listener("plain")], workdir=ctx.work / "broker") as broker:
        port = broker.port("plain")
        for r in range(repeats):
            ctx.log(f"outbox_throughput: repeat {r + 1}/{repeats} ({n} messages each)")
            for durability, key in (("full", "outbox"), (None, "paho"), ("normal", "outbox_normal")):
                if durability is None:
                    runs[key].append(paho_publish(broker.host, port, wire, inflight=INFLIGHT))
                else:
                    db = ctx.work / f"{durability}-{r}.sqlite3"
                    runs[key].append(asyncio.run(_outbox_run(port, db, messages, durability)))
    rate = {k: median([x["msgs_per_s"] for x in v]) for k, v in runs.items()}
    cpu_us = {k: median([1e6 * x["cpu_s"] / x["msgs"] for x in v]) for k, v in runs.items()}
    # The ratio per repeat (each outbox run next to its own paho run), then the median.
    ratios = [o["msgs_per_s"] / p["msgs_per_s"] for o, p in zip(runs["outbox"], runs["paho"], strict=True)]
    ratio = median(ratios)
    result: dict[str, Any] = {
        "msgs_per_s": round(rate["outbox"], 0),
        "ratio_vs_paho": round(ratio, 3),
        "durability": "full",
        "messages_per_run": n,
        "repeats": repeats,
        "cpu_us_per_msg": round(cpu_us["outbox"], 1),
        "spread_msgs_per_s": spread([x["msgs_per_s"] for x in runs["outbox"]], 0),
        "spread_ratio_vs_paho": spread(ratios, 3),
        "durability_normal": {"msgs_per_s": round(rate["outbox_normal"], 0),
                              "ratio_vs_paho": round(rate["outbox_normal"] / rate["paho"], 3),
                              "cpu_us_per_msg": round(cpu_us["outbox_normal"], 1),
                              "spread_msgs_per_s": spread([x["msgs_per_s"] for x in runs["outbox_normal"]],
                                                          0)},
        "baseline": {
            "name": "paho-mqtt QoS 1 without the outbox (one client, TCP_NODELAY, 64 in flight, same "
                    "messages, same broker), same run",
            "msgs_per_s": round(rate["paho"], 0),
            "cpu_us_per_msg": round(cpu_us["paho"], 1),
            "spread_msgs_per_s": spread([x["msgs_per_s"] for x in runs["paho"]], 0),
            "summary": f"paho QoS 1 {rate['paho']:,.0f} msg/s ({cpu_us['paho']:.0f} µs CPU each)",
        },
        "goal": "none set (the cost of never losing data)",
        "goal_met": None,
        "method": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        "notes": [
            f"outbox (durability full) {rate['outbox']:,.0f} msg/s at {cpu_us['outbox']:.0f} µs CPU per "
            "message; "
            f"durability normal {rate['outbox_normal']:,.0f} msg/s at {cpu_us['outbox_normal']:.0f} µs; "
            f"paho alone {rate['paho']:,.0f} msg/s at {cpu_us['paho']:.0f} µs.",
            f"Messages are column telemetry of {len(wire[0][1])} bytes of JSON, QoS 1, no subscriber.",
        ],
    }
    return result
