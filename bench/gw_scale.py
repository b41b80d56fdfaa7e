"""One step of columns_per_core: the gateway service (gateway.service.GatewayService, as
`python -m gateway run` builds it) in this process for one site file, measured from inside.

    python -m bench.gw_scale SITE.toml OUT.json --window S [--settle S] [--profile OUT.prof]

Once every column is online and `--settle` seconds have passed, it measures two windows of
`--window` seconds each. The first, which the verdict judges, has only the cheap probes on:
the process's CPU (all threads), one sample a second, and each thread's share; poll lateness
(how late each column's poll is taken against its schedule: PollSchedule.take is wrapped here
to record it, nothing else is changed); polls, telemetry messages acknowledged by the broker,
the outbox backlog, poll cycles skipped, events dropped. The second turns on the timers that
say where the CPU goes (clock reads around every timed call: a few µs per column and second
that the gateway itself does not spend; its CPU is reported as `cpu_fraction_timed`): how
long each telemetry round takes and how long each of its slices holds the event loop
(GatewayService.telemetry_round, _column_telemetry and the outbox transaction); the event
loop's time in each control step (GatewayService._open_step, _collect, _step_inputs,
_solve_step, _finish_slice, _close_step, _send_limits, and _Step.run, a small site's
allocation at once); each garbage collection's pause (gc.callbacks); and from these where the
CPU per column went. RSS at the end, and its high-water mark (the start included). With
--profile, cProfile records the event loop's thread during the second window. It writes
OUT.json, then stops the service cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

from gateway.collector import manage_collector
from gateway.config import load_config
from gateway.north import payloads, topics
from gateway.north.auth import sign_command
from gateway.north.mqtt_client import MqttConnection
from gateway.north.publisher import InboundMessage, Publisher
from gateway.service import GatewayService, _Step
from gateway.south.schedule import Due, PollSchedule

DRAIN_WAIT_S = 30.0   # at most this long for the start's outbox backlog before the window
SITE_LIMIT_WAIT_S = 30.0   # at most this long for the writes of the site limit after the windows
LATE_S: list[float] = []
TELEMETRY_S: list[float] = []   # one telemetry round, start to end (the loop is free between its slices)
SLICE_S: list[float] = []       # one slice of a round: payloads built and queued, the loop held
STEP_S: list[float] = []        # the event loop's time in one control step (see _record_control_steps)
STEP_BY_GENERATION: list[dict[int, float]] = []   # the loop's time per step, by step number
GC_S: list[list[float]] = [[], [], []]   # each garbage collection's pause, by generation
# The CPU breakdown counts the event loop thread's CPU time (time.thread_time), not wall time
# (another thread's time would be charged to a part preempted for the interpreter lock).
TIMED_S: dict[str, float] = {}  # CPU seconds in parts of the service (_record_time_in), summed
CPU_S: dict[str, float] = {"control_step": 0.0, "telemetry_slices": 0.0}   # the loop's CPU in both
TIMING = [False]   # the timers' switch: off in the verdict's window, on in the breakdown's


def _record_telemetry() -> None:
    """Time each telemetry round (GatewayService.telemetry_round) and each of its slices, the
    time the event loop is held (from _column_telemetry to the end of its _enqueue), by wrapping
    those methods; nothing else changes."""
    round_ = GatewayService.telemetry_round
    build = GatewayService._column_telemetry
    enqueue = GatewayService._enqueue
    started: list[float] = []
    started_cpu: list[float] = []

    async def timed_round(self: GatewayService) -> None:
        if not TIMING[0]:
            return await round_(self)
        t0 = time.perf_counter()
        await round_(self)
        TELEMETRY_S.append(time.perf_counter() - t0)

    def timed_build(self: GatewayService, views: Any, now: int) -> Any:
        if TIMING[0]:
            started.append(time.perf_counter())
            started_cpu.append(time.thread_time())
        return build(self, views, now)

    def timed_enqueue(self: GatewayService, messages: Any) -> None:
        enqueue(self, messages)
        if TIMING[0] and started and messages and messages[0].kind == "telemetry":
            SLICE_S.append(time.perf_counter() - started.pop())
            CPU_S["telemetry_slices"] += time.thread_time() - started_cpu.pop()

    GatewayService.telemetry_round = timed_round  # type: ignore[method-assign]
    GatewayService._column_telemetry = timed_build  # type: ignore[method-assign]
    GatewayService._enqueue = timed_enqueue  # type: ignore[method-assign]


def _record_control_steps() -> None:
    """STEP_S: the event loop's time in each control step (all of it on a small site; on a large
    one, slice by slice: see gateway.service), by step number."""
    per_step: dict[int, float] = {}

    def timed_part(owner: Any, name: str, generation: Any) -> None:
        method = getattr(owner, name)

        def timed(self: Any, *args: Any) -> Any:
            if not TIMING[0]:
                return method(self, *args)
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return method(self, *args)
            finally:
                number = generation(self)
                per_step[number] = per_step.get(number, 0.0) + time.perf_counter() - t0
                CPU_S["control_step"] += time.thread_time() - c0

        setattr(owner, name, timed)

    for name in ("_open_step", "_collect", "_step_inputs", "_solve_step", "_finish_slice", "_close_step",
                 "_send_limits"):
        timed_part(GatewayService, name, lambda service: service._step_generation)
    timed_part(_Step, "run", lambda step: step.generation)
    STEP_BY_GENERATION.append(per_step)


def _record_lateness() -> None:
    take = PollSchedule.take

    def measured(self: PollSchedule[Any, Any], now: float) -> Due[Any] | None:
        due = take(self, now)
        if due is not None and due.key == "poll":
            LATE_S.append(due.late_s)
        return due

    PollSchedule.take = measured  # type: ignore[method-assign]


def _record_time_in(part: str, *targets: tuple[Any, tuple[str, ...]]) -> None:
    """Sum the time spent in the methods of each (class, names) target into TIMED_S[part]
    (outermost calls only: one may call another), to split the CPU per column between its parts."""
    depth = [0]
    TIMED_S[part] = 0.0

    def wrap(method: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not TIMING[0]:
                return method(*args, **kwargs)
            depth[0] += 1
            t0 = time.thread_time()
            try:
                return method(*args, **kwargs)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    TIMED_S[part] += time.thread_time() - t0
        return timed

    for cls, names in targets:
        for name in names:
            setattr(cls, name, wrap(getattr(cls, name)))


def _record_gc() -> None:
    """Time every collection of the cyclic garbage collector (gc.callbacks), by generation: a
    full collection walks every long-lived object of thousands of columns."""
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            GC_S[info["generation"]].append(time.perf_counter() - started.pop())

    gc.callbacks.append(on_gc)


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds of each thread of this process, by thread name (the event loop's thread is
    MainThread, asyncio.to_thread workers asyncio_N)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(task.name), "other")
        name = "to_thread" if name.startswith("asyncio_") else name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def rss_kb(field: str = "VmRSS") -> int:
    """The process's resident memory now (VmRSS), or its high-water mark (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _counters(service: GatewayService) -> tuple[int, int, int, int, int]:
    tcp: Any = service.south.adapters["modbus-tcp"]
    pub, outbox = service.publisher, service.outbox
    assert pub is not None and outbox is not None
    return tcp.stats.polls, tcp.stats.poll_failures, tcp.stats.events_dropped, pub.stats.acked, len(outbox)


async def measure(service: GatewayService, settle_s: float, window_s: float, online_timeout_s: float,
                  profile: cProfile.Profile | None) -> dict[str, Any]:
    await asyncio.wait_for(service.ready.wait(), 60)
    t0 = time.monotonic()
    n = len(service.views)
    while sum(1 for v in service.views.values() if v.online) < n and time.monotonic() - t0 < online_timeout_s:
        await asyncio.sleep(0.2)
    online_s = time.monotonic() - t0
    online = sum(1 for v in service.views.values() if v.online)
    await asyncio.sleep(settle_s)
    # The start (every column's online event and status, telemetry queued while thousands of
    # columns connect) leaves a backlog in the outbox: the window measures the steady state, so
    # it begins once that is down to one round of telemetry (or after DRAIN_WAIT_S: then the
    # verdict's backlog check judges it).
    outbox = service.outbox
    t1 = time.monotonic()
    while outbox is not None and len(outbox) > n and time.monotonic() - t1 < DRAIN_WAIT_S:
        await asyncio.sleep(0.2)
    drained_s = time.monotonic() - t1
    channels = getattr(service.south.adapters["modbus-tcp"], "_channels", {})
    verdict = await _verdict_window(service, channels, window_s)
    TIMING[0] = True
    timed = await _timed_window(service, window_s, n, profile)
    TIMING[0] = False
    return {
        "columns": n, "online": online, "online_after_s": round(online_s, 1),
        "start_backlog_drained_after_s": round(drained_s, 1), **verdict, **timed,
        "rss_kb": rss_kb(), "rss_peak_kb": rss_kb("VmHWM"),
        "telemetry_interval_s": service.telemetry_interval_s,
    }


async def _cpu_window(window_s: float) -> tuple[float, float, list[float]]:
    """Wall and process CPU seconds of a window, and its CPU fraction second by second."""
    samples = []
    w0, c0 = time.monotonic(), time.process_time()
    last_w, last_c = w0, c0
    while time.monotonic() - w0 < window_s:
        await asyncio.sleep(1.0)
        w, c = time.monotonic(), time.process_time()
        samples.append((c - last_c) / (w - last_w))
        last_w, last_c = w, c
    return time.monotonic() - w0, time.process_time() - c0, samples


async def _verdict_window(service: GatewayService, channels: dict[str, Any],
                          window_s: float) -> dict[str, Any]:
    """What the verdict judges, with the timers off: CPU, lateness, throughput, backlog."""
    skipped0 = sum(ch.schedule.skipped_cycles for ch in channels.values())
    stats0 = _counters(service)
    LATE_S.clear()
    threads0 = thread_cpu_s()
    wall, cpu, samples = await _cpu_window(window_s)
    threads1 = thread_cpu_s()
    stats1 = _counters(service)
    late = sorted(LATE_S)
    return {
        "window_s": round(wall, 2), "cpu_s": round(cpu, 3), "cpu_fraction": round(cpu / wall, 4),
        "cpu_fraction_samples": [round(x, 4) for x in samples],
        "cpu_fraction_by_thread": {k: round((v - threads0.get(k, 0.0)) / wall, 4)
                                   for k, v in sorted(threads1.items())},
        "polls": stats1[0] - stats0[0], "poll_failures": stats1[1] - stats0[1],
        "events_dropped": stats1[2] - stats0[2], "telemetry_acked": stats1[3] - stats0[3],
        "outbox_backlog_start": stats0[4], "outbox_backlog_end": stats1[4],
        "lateness_samples": len(late),
        "lateness_s": late[:: max(1, len(late) // 20000)],   # at most ~20k samples back
        "skipped_cycles": sum(ch.schedule.skipped_cycles for ch in channels.values()) - skipped0,
    }


async def _timed_window(service: GatewayService, window_s: float, n: int,
                        profile: cProfile.Profile | None) -> dict[str, Any]:
    """Where the CPU goes, with the timers on (and cProfile, if asked)."""
    TELEMETRY_S.clear()
    SLICE_S.clear()
    STEP_S.clear()
    for per_step in STEP_BY_GENERATION:
        per_step.clear()
    for pauses in GC_S:
        pauses.clear()
    for part in TIMED_S:
        TIMED_S[part] = 0.0
    for part in CPU_S:
        CPU_S[part] = 0.0
    if profile is not None:
        profile.enable()
    threads0 = thread_cpu_s()
    wall, cpu, _samples = await _cpu_window(window_s)
    threads1 = thread_cpu_s()
    if profile is not None:
        profile.disable()
    STEP_S.extend(v for per_step in STEP_BY_GENERATION for v in per_step.values())
    per_col = 1e6 / (wall * max(1, n))   # seconds in the window -> µs per column and second
    by_thread = {k: (v - threads0.get(k, 0.0)) for k, v in threads1.items()}
    parts = {"control_step": CPU_S["control_step"],
             "telemetry_slices": CPU_S["telemetry_slices"], **TIMED_S,
             "garbage_collector": sum(sum(x) for x in GC_S),   # ticks vs process_time:
             "other_threads": max(0.0, cpu - by_thread.get("MainThread", cpu))}
    parts["polls_and_rest"] = max(0.0, cpu - sum(parts.values()))
    return {
        "cpu_fraction_timed": round(cpu / wall, 4),
        "telemetry_round_ms": [round(1000 * x, 2) for x in TELEMETRY_S],
        "telemetry_slice_ms": [round(1000 * x, 2) for x in SLICE_S],
        "control_step_ms": [round(1000 * x, 2) for x in STEP_S],
        "gc": {"collections": [len(x) for x in GC_S], "s": [round(sum(x), 4) for x in GC_S],
               "max_ms": round(1000 * max((p for x in GC_S for p in x), default=0.0), 2)},
        # Where the CPU went, µs per column and second, from the loop thread's CPU time in each
        # timed part and other threads' CPU; the rest is the polls (the south adapter, asyncio,
        # sockets) and everything not timed. The timers' own cost is in it: cpu_fraction_timed
        # minus the verdict window's cpu_fraction.
        "breakdown_us_per_column_s": {k: round(v * per_col, 1) for k, v in parts.items()},
    }


async def site_limit_change(service: GatewayService) -> dict[str, Any]:
    """A DNO site limit at half of what the columns are offered now, handled as one from the
    broker is (signature, audit, a control step, the writes): how long until its ack, and
    until every write it caused has been answered, and how late polls were meanwhile."""
    views = service.views
    before = {cid: v.requested_a for cid, v in views.items()}
    offered = sum(a or 0.0 for a in before.values())   # per phase: every column is 3-phase
    dno = service.config.dno
    keys = dno.load_keys()
    key_id = keys.key_ids[0]
    key = keys.get(key_id)
    assert key is not None
    topic = topics.cmd_site_limit(service.site_id)
    limit_a = round(max(6.0, offered / 2), 1)
    body = payloads.limit_command("bench-site-limit", limit_a, validity_s=600)
    message = InboundMessage(topic, json.dumps(sign_command(body, topic, key_id, key)).encode(), 1, False)
    LATE_S.clear()
    t0 = time.monotonic()
    decision = await service.handle_command(message)
    acked = time.monotonic() - t0
    written = await service.flush_limits(SITE_LIMIT_WAIT_S)
    done = time.monotonic() - t0
    changed = [cid for cid, v in views.items() if v.requested_a != before[cid]]
    applied = sum(1 for cid in changed if views[cid].applied_a == views[cid].requested_a)
    return {
        "limit_a": limit_a, "offered_before_a": round(offered, 1), "accepted": decision.accepted,
        "columns_changed": len(changed), "columns_applied": applied, "all_written": written,
        "ack_ms": round(1000 * acked, 1), "all_written_ms": round(1000 * done, 1),
        "lateness_max_ms": round(1000 * max(LATE_S, default=0.0), 1),
    }


async def main_async(args: argparse.Namespace) -> None:
    config = load_config(args.site)
    service = GatewayService(config)
    profile = cProfile.Profile() if args.profile else None
    task = asyncio.create_task(service.run())
    # The collector's policy, as `python -m gateway run` applies it (frozen once ready and again
    # once every column is online: before the window).
    collector = asyncio.create_task(manage_collector(service.ready, service.all_columns_online))
    try:
        result = await measure(service, args.settle, args.window, args.online_timeout, profile)
        if profile is None:
            result["site_limit"] = await site_limit_change(service)
        # Written before the (slow, hand-over) stop: the caller may stop waiting once it is there.
        if profile is not None:
            profile.dump_stats(args.profile)
        args.out.write_text(json.dumps(result))
    finally:
        collector.cancel()
        service.request_stop()
        try:
            await asyncio.wait_for(task, 60)
        except (TimeoutError, Exception) as exc:  # report what was measured even if the stop is slow
            print(f"gw_scale: stop: {type(exc).__name__}: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gw_scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("site", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--window", type=float, default=8.0)
    p.add_argument("--settle", type=float, default=3.0)
    p.add_argument("--online-timeout", type=float, default=30.0)
    p.add_argument("--profile", type=Path)
    args = p.parse_args(argv)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    _record_lateness()
    _record_telemetry()
    _record_control_steps()
    _record_gc()
    # The southbound events (a reading per poll) and the MQTT side (the client reading PUBACKs
    # and writing what was queued, outbox rows read and published, acknowledged rows deleted)
    # run in the loop's thread: timed as parts.
    _record_time_in("readings_handled", (GatewayService, ("_on_south",)))
    _record_time_in("mqtt_publishing", (MqttConnection, ("data_received", "flush")),
                    (Publisher, ("_fill", "_flush_acks")))
    asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
