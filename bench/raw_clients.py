"""Baselines without the gateway: paho-mqtt publishing at QoS 1 and pymodbus polling, flat out.

What the gateway does per message and per poll is measured against these, in the same run and
with the same payloads: real column telemetry (gateway.north.payloads) and the column's whole
input-register image (firmware.regmap.INPUT_COUNT registers).
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
from pymodbus.client import AsyncModbusTcpClient

from firmware import regmap
from gateway.north import payloads, topics
from gateway.north.outbox import MessageKind, Outgoing


def telemetry(n: int, site: str = "bench", columns: int = 100) -> list[Outgoing]:
    """n column telemetry messages of a charging site, as the service queues them."""
    out = []
    for i in range(n):
        cid = "c%04d" % (i % columns)
        body = payloads.column_telemetry(
            ts_ms=payloads.utc_ms(), column_id=cid, current_a=[15.9, 16.0, 15.8],
            voltage_v=[230.1, 229.8, 231.0], power_w=11020, energy_wh=1_234_567 + i, offered_a=16.0,
            applied_limit_a=16.0, limit_source="gateway", state="C", status="Charging")
        out.append(Outgoing(topics.column_telemetry(site, cid), body, MessageKind.TELEMETRY))
    return out


def wire_messages(messages: list[Outgoing]) -> list[tuple[str, bytes]]:
    """The same messages as the outbox sends them (with a seq)."""
    return [(m.topic, payloads.encode({**m.payload, "seq": i + 1})) for i, m in enumerate(messages)]


def nodelay(_client: Any, _userdata: Any, sock: Any) -> None:
    """paho on_socket_open: TCP_NODELAY, as the gateway's Publisher sets it (Nagle costs ~10 ms)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def paho_publish(host: str, port: int, messages: list[tuple[str, bytes]], *, inflight: int = 64,
                 timeout_s: float = 120.0) -> dict[str, float]:
    """Publish every message at QoS 1 with one paho client (TCP_NODELAY, `inflight` window) and
    wait for every PUBACK: wall time and this process's CPU time."""
    acked = 0
    done = threading.Event()
    lock = threading.Lock()
    total = len(messages)

    def on_publish(*_a: Any) -> None:
        nonlocal acked
        with lock:
            acked += 1
            if acked >= total:
                done.set()

    connected = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-paho-%d" % time.monotonic_ns(),
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    client.on_publish = on_publish
    client.on_connect = lambda *_a: connected.set()
    client.on_socket_open = nodelay
    client.connect(host, port)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise TimeoutError("paho baseline: no CONNACK")
        cpu0, t0 = time.process_time(), time.perf_counter()
        for topic, body in messages:
            client.publish(topic, body, qos=1)
        if not done.wait(timeout_s):
            raise TimeoutError(f"paho baseline: {acked} of {total} PUBACKs")
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        client.disconnect()
        client.loop_stop()
    return {"wall_s": wall, "cpu_s": cpu, "msgs": total, "msgs_per_s": total / wall}


async def pymodbus_polls(host: str, ports: list[int], clients: int, seconds: float) -> dict[str, float]:
    """`clients` pymodbus TCP clients, each reading the column's input image in a closed loop
    for `seconds`: polls done, wall time and this process's CPU time."""
    conns = [AsyncModbusTcpClient(host, port=ports[i % len(ports)], timeout=2, retries=0)
             for i in range(clients)]
    for c in conns:
        await c.connect()
    polls = 0
    stop = False

    async def loop(c: AsyncModbusTcpClient, unit: int) -> None:
        nonlocal polls
        while not stop:
            rr = await c.read_input_registers(0, count=regmap.INPUT_COUNT, device_id=unit)
            if not rr.isError():
                polls += 1

    cpu0, t0 = time.process_time(), time.perf_counter()
    tasks = [asyncio.create_task(loop(c, 1 + i % 247)) for i, c in enumerate(conns)]
    await asyncio.sleep(seconds)
    stop = True
    await asyncio.gather(*tasks, return_exceptions=True)
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    for c in conns:
        c.close()
    return {"polls": polls, "wall_s": wall, "cpu_s": cpu, "polls_per_s": polls / wall,
            "cpu_us_per_poll": 1e6 * cpu / max(1, polls)}
