"""columns_per_core: how many Modbus-TCP columns one gateway process sustains at 1 Hz polling
with QoS 1 telemetry for every column (telemetry_interval_s = 1, through the outbox to a real
mosquitto), at ≤ 70 % of one core with poll lateness p99 ≤ 100 ms.

The columns are cheap: one process outside the gateway's (bench/modbus_farm.py) answers every
column from a static input image (a poll's reply is cached per connection), one connection per
column as the gateway makes them. Each step starts the whole service
(gateway.service.GatewayService) for N columns in its own process (bench/gw_scale.py), waits
until every column is online, the allocation has settled and the outbox holds no more than one
round of telemetry (the start's online events and statuses sent), then measures for a window: CPU of
the process (all threads, and each thread's share), poll lateness against the schedule, polls,
telemetry acknowledged by the broker, outbox backlog, poll cycles skipped, events dropped. A
second window of the same length, with timers on (their cost is the gateway's CPU in it minus
the first window's), says where the CPU went and how long the control step and each telemetry
slice hold the event loop; RSS at the end and its high-water mark. Last, a DNO site limit at
half the current offer, handled as one from the broker is: how long until its ack and until
every write it caused is answered, and how late the polls were meanwhile. A step
passes when every column is online, CPU ≤ 70 %, lateness p99 ≤ 100 ms, ≥ 95 % of the polls
and ≥ 90 % of the telemetry went through, the backlog did not grow and nothing was dropped.
N doubles until the CPU criterion fails (at most MAX_COLUMNS: if that passes too, the figure
is a lower bound), then the gap below the first failure is bisected. A
step that fails only on wall-clock criteria with CPU to spare is run once more (the machine is
shared: another job's burst shows as lateness); it passes only if that second try passes.

Baselines in the same run (this process, flat out, same farm and broker): the raw pymodbus
client (reading the same image in a closed loop from 100 connections) and raw paho QoS 1
publishing the same telemetry; the gateway's CPU per column and second is compared with one
poll plus one message of theirs. Memory per column is the slope over N of the process's RSS
high-water mark (VmHWM: the start's burst of connects, online events and first limits
included). Where the goal is not met, the first failing N is run again under cProfile.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import pstats
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.gw_scale import DRAIN_WAIT_S, SITE_LIMIT_WAIT_S
from bench.raw_clients import paho_publish, pymodbus_polls, telemetry, wire_messages
from bench.stats import median, percentile, spread
from bench.suite import Context
from gateway.collector import YOUNG_THRESHOLD
from gateway.service import ACK_WAIT_S, SLICE_MIN_COLUMNS, STEP_SLICE, TELEMETRY_SLICE
from hil.rig.broker import Broker, Listener
from hil.rig.site_files import new_key, toml_text, write_secrets

REPO = Path(__file__).resolve().parents[1]
GOAL_COLUMNS = 5000
CPU_MAX = 0.70
LATE_P99_MAX_S = 0.100
MAX_COLUMNS = 12000   # the largest step (the farm listens for this many)
UNITS_PER_PORT = 247


class Farm:
    """bench/modbus_farm.py as a process: its ports, and its counters on demand."""

    def __init__(self, work: Path, listeners: int) -> None:
        self.ports_file = work / "farm-ports.json"
        self.stats_file = work / "farm-stats.json"
        self.ports_file.unlink(missing_ok=True)   # a stale file would name another run's ports
        env = dict(os.environ, PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "bench.modbus_farm", "--listeners", str(listeners),
               "--ports-file", str(self.ports_file), "--stats-file", str(self.stats_file)]
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self.ports_file.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.close()
                raise RuntimeError("the Modbus farm did not start")
            time.sleep(0.05)
        time.sleep(0.05)
        self.ports: list[int] = json.loads(self.ports_file.read_text())

    def counters(self) -> dict[str, Any]:
        """Requests served and CPU seconds so far."""
        self.stats_file.unlink(missing_ok=True)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                data = json.loads(self.stats_file.read_text())
                return {"requests": sum(data["requests"].values()), "cpu_s": data["cpu_s"]}
            except (OSError, ValueError, KeyError):
                time.sleep(0.02)
        return {"requests": 0, "cpu_s": 0.0}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def site_file(n: int, ports: list[int], broker_port: int, work: Path) -> Path:
    """N Modbus-TCP columns on the farm, a car on each, telemetry every second."""
    work.mkdir(parents=True, exist_ok=True)
    write_secrets(work, new_key())
    doc = {
        "site": {"id": "scale", "capacity_a": 10000},
        # A steady state for the window: no random delays, no rotation, no reclaiming.
        "allocation": {"increase_delay_max_s": 0, "rotation_s": 3600, "reclaim_settle_s": 3600},
        "columns": [{"id": "c%05d" % i, "hardware_a": 32, "link": "modbus-tcp", "host": "127.0.0.1",
                     "port": ports[i // UNITS_PER_PORT], "unit": 1 + i % UNITS_PER_PORT} for i in range(n)],
        "mqtt": {"host": "127.0.0.1", "port": broker_port, "protocol": "5",
                 "outbox": {"path": str(work / "outbox.sqlite3")}},
        "dno": {"keys_file": "secrets/dno-keys", "audit_path": str(work / "audit.jsonl")},
        "gateway": {"telemetry_interval_s": 1, "poll_period_s": 1.0},
    }
    path = work / "site.toml"
    path.write_text(toml_text(doc))
    return path


def step(n: int, farm: Farm, broker_port: int, work: Path, *, window_s: float, settle_s: float,
         profile: Path | None = None, tag: str = "") -> dict[str, Any]:
    """One gateway process for N columns; its measurements and the verdict."""
    sdir = work / ("n%05d%s%s" % (n, "-profile" if profile else "", tag))
    load_1m = os.getloadavg()[0]
    site = site_file(n, farm.ports, broker_port, sdir)
    out = sdir / "out.json"
    online_timeout_s = max(30, n // 100)   # N connections, N online events and statuses first
    cmd = [sys.executable, "-m", "bench.gw_scale", str(site), str(out), "--window", str(window_s),
           "--settle", str(settle_s), "--online-timeout", str(online_timeout_s)]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    before = farm.counters()
    t0 = time.monotonic()
    with open(sdir / "gateway.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60 + online_timeout_s + 2 * window_s + settle_s + DRAIN_WAIT_S \
                + SITE_LIMIT_WAIT_S
            while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            after = farm.counters()
            span = time.monotonic() - t0
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)   # the clean stop hands every column its failsafe
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
    if not out.exists():
        tail = (sdir / "gateway.log").read_text(errors="replace")[-1500:]
        raise RuntimeError(f"gw_scale for {n} columns wrote no result:\n{tail}")
    r = json.loads(out.read_text())
    late = r.pop("lateness_s")
    for key in ("telemetry_round_ms", "telemetry_slice_ms", "control_step_ms"):
        xs = r.pop(key, [])
        r[key] = {"p50": round(median(xs), 1), "max": round(max(xs), 1), "n": len(xs)} if xs else {}
    r["lateness_ms"] = {"p50": round(1000 * median(late), 1), "p99": round(1000 * percentile(late, 99), 1),
                        "max": round(1000 * max(late), 1)} if late else {}
    served = after["requests"] - before["requests"]
    r["farm_cpu_fraction"] = round((after["cpu_s"] - before["cpu_s"]) / span, 3)
    farm_cpu = after["cpu_s"] - before["cpu_s"]
    r["farm_cpu_us_per_request"] = round(1e6 * farm_cpu / served, 1) if served else None
    ok, why = verdict(r)
    r["passed"], r["failed_on"] = ok, why
    r["load_1m"] = round(load_1m, 2)   # the machine's load average as the step started
    return r


def verdict(r: dict[str, Any]) -> tuple[bool, list[str]]:
    n, w = r["columns"], r["window_s"]
    why = []
    if r["online"] < n:
        why.append(f"{n - r['online']} columns never online")
    if r["cpu_fraction"] > CPU_MAX:
        why.append(f"CPU {r['cpu_fraction'] * 100:.0f} % > 70 %")
    p99 = r["lateness_ms"].get("p99")
    if p99 is None or p99 > LATE_P99_MAX_S * 1000:
        why.append(f"poll lateness p99 {p99} ms > 100 ms")
    if r["polls"] < 0.95 * n * w:
        why.append(f"polls {r['polls'] / w:.0f}/s < 95 % of {n}/s")
    if r["telemetry_acked"] < 0.9 * n * w / r["telemetry_interval_s"]:
        why.append(f"telemetry {r['telemetry_acked'] / w:.0f} msg/s acked < 90 % of {n}/s")
    if r["outbox_backlog_end"] > r["outbox_backlog_start"] + n + 1:
        why.append(f"outbox backlog grew {r['outbox_backlog_start']} -> {r['outbox_backlog_end']}")
    if r["events_dropped"]:
        why.append(f"{r['events_dropped']} events dropped")
    if r["skipped_cycles"]:
        why.append(f"{r['skipped_cycles']} poll cycles skipped")
    return not why, why


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


COMPONENTS = (("/pymodbus/", "pymodbus"), ("/paho/", "paho-mqtt"), ("/gateway/south/", "gateway.south"),
              ("/gateway/north/", "gateway.north"), ("/gateway/core/", "gateway.core"),
              ("/gateway/service.py", "gateway.service"), ("/asyncio/", "asyncio"), ("/json/", "json"),
              ("/dataclasses.py", "dataclasses"), ("/logging/", "logging"), ("/firmware/", "firmware"))


def profile_summary(path: Path, top: int = 12) -> dict[str, Any]:
    """Where the event loop's time went: share of the (non-idle) time by component and the top
    functions by own time. Waiting in epoll is idle time and left out."""
    st = pstats.Stats(str(path))
    rows = []
    for (filename, line, func), (_cc, nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        rows.append((filename, line, func, nc, tt))
    idle = sum(tt for _f, _l, fn, _n, tt in rows if "epoll" in fn)
    busy = sum(tt for *_x, tt in rows) - idle
    comps: dict[str, float] = {}
    for f, _l, fn, _n, tt in rows:
        if "epoll" in fn:
            continue
        name = next((c for key, c in COMPONENTS if key in f), None)
        if name is None:
            name = "sqlite3" if "sqlite3" in fn else ("builtins/C" if f == "~" else "other Python")
        comps[name] = comps.get(name, 0.0) + tt
    top_rows = sorted((r for r in rows if "epoll" not in r[2]), key=lambda r: -r[4])[:top]
    return {
        "busy_s": round(busy, 3), "idle_s": round(idle, 3),
        "by_component_pct": {k: round(100 * v / busy, 1)
                             for k, v in sorted(comps.items(), key=lambda kv: -kv[1]) if busy > 0},
        "top_functions": [{"function": f"{Path(f).name}:{line}({fn})" if f != "~" else fn, "calls": nc,
                           "own_s": round(tt, 3), "pct": round(100 * tt / busy, 1) if busy else None}
                          for f, line, fn, nc, tt in top_rows],
    }


def baselines(farm: Farm, broker: Broker, n_msgs: int, seconds: float) -> dict[str, Any]:
    polls = asyncio.run(pymodbus_polls("127.0.0.1", farm.ports, 100, seconds))
    pub = paho_publish(broker.host, broker.port("plain"), wire_messages(telemetry(n_msgs)))
    return {"pymodbus": polls, "paho": {**pub, "cpu_us_per_msg": 1e6 * pub["cpu_s"] / pub["msgs"]}}


def run(ctx: Context) -> dict[str, Any]:
    window, settle = (4.0, 2.0) if ctx.quick else (8.0, 3.0)
    steps: list[dict[str, Any]] = []
    base_runs: list[dict[str, Any]] = []
    profile: dict[str, Any] | None = None
    listeners = math.ceil((100 if ctx.quick else MAX_COLUMNS) / UNITS_PER_PORT)
    with Broker([Listener("plain")], workdir=ctx.work / "broker") as broker:
        farm = Farm(ctx.work, listeners)
        try:
            ctx.log("columns_per_core: baselines (raw pymodbus polls, raw paho QoS 1)")
            base_runs.append(baselines(farm, broker, 2000 if ctx.quick else 5000, 2.0 if ctx.quick else 3.0))
            port = broker.port("plain")

            def do(n: int) -> dict[str, Any]:
                ctx.log(f"columns_per_core: {n} columns ...")
                r = step(n, farm, port, ctx.work, window_s=window, settle_s=settle)
                if not r["passed"] and r["cpu_fraction"] <= CPU_MAX and r["online"] >= n and not ctx.quick:
                    # A wall-clock criterion (lateness, throughput) failed with CPU to spare: on a
                    # shared machine that can be another job's burst. Once more, in a fresh folder;
                    # the step counts as passed only if this second try passes.
                    ctx.log(f"columns_per_core: {n} columns: " + "; ".join(r["failed_on"]) + " -> once more")
                    again = step(n, farm, port, ctx.work, window_s=window, settle_s=settle, tag="-2")
                    again["first_try_failed_on"] = r["failed_on"]
                    r = again
                verdict_text = "pass" if r["passed"] else "fail: " + "; ".join(r["failed_on"])
                ctx.log(f"columns_per_core: {n} columns: CPU {r['cpu_fraction'] * 100:.0f} %, lateness p99 "
                        f"{r['lateness_ms'].get('p99')} ms -> {verdict_text}")
                steps.append(r)
                return r

            if ctx.quick:
                do(100)
            else:
                n = 125
                while True:
                    r = do(n)
                    if r["cpu_fraction"] > CPU_MAX or r["online"] < n or n >= MAX_COLUMNS:
                        break
                    n = min(2 * n, MAX_COLUMNS)
                for _ in range(2):   # bisect below the first failure
                    passed = [s["columns"] for s in steps if s["passed"]]
                    failed = [s["columns"] for s in steps if not s["passed"]]
                    lo = max(passed, default=0)
                    hi = min((f for f in failed if f > lo), default=None)
                    if hi is None or hi - lo <= max(25, lo // 8):
                        break
                    do((lo + hi) // 2)
                first_fail = min((s["columns"] for s in steps if not s["passed"]), default=None)
                if first_fail is not None:
                    ctx.log(f"columns_per_core: profiling {first_fail} columns")
                    prof = ctx.work / "profile.prof"
                    step(first_fail, farm, port, ctx.work, window_s=5.0, settle_s=settle, profile=prof)
                    profile = profile_summary(prof)
                    profile["columns"] = first_fail
                base_runs.append(baselines(farm, broker, 5000, 3.0))
        finally:
            farm.close()
    return _result(ctx, steps, base_runs, profile)


def _result(ctx: Context, steps: list[dict[str, Any]], base_runs: list[dict[str, Any]],
            profile: dict[str, Any] | None) -> dict[str, Any]:
    steps.sort(key=lambda s: s["columns"])
    passed = [s["columns"] for s in steps if s["passed"]]
    columns = max(passed, default=0)
    # Slopes (CPU, memory, control step per column) only over steps in the steady state the
    # figure is about: every column online, the polls done, the telemetry of the window sent and
    # no more. A step that fell over spent less CPU per column than one that kept up, and one
    # still sending the backlog of its start (thousands of online events) spent more.
    def steady(s: dict[str, Any]) -> bool:
        asked = s["columns"] * s["window_s"]
        sent = s["telemetry_acked"] * s["telemetry_interval_s"]
        return (s["cpu_fraction"] <= 0.95 and s["online"] >= s["columns"] and s["polls"] >= 0.95 * asked
                and 0.9 * asked <= sent <= 1.15 * asked)

    healthy = [s for s in steps if steady(s)]
    fit_steps = healthy if len(healthy) >= 2 else [s for s in steps if s["cpu_fraction"] <= 0.95] or steps
    xs = [float(s["columns"]) for s in fit_steps]
    a, b = _fit([float(s["columns"]) for s in fit_steps], [s["cpu_fraction"] for s in fit_steps]) \
        if len(fit_steps) >= 2 else (0.0, fit_steps[0]["cpu_fraction"] / fit_steps[0]["columns"])
    cpu_bound = int((CPU_MAX - a) / b) if b > 0 else None
    # The high-water mark: what a machine must have for the site, the start's burst included.
    _a2, mem_b = _fit(xs, [float(s.get("rss_peak_kb") or s["rss_kb"]) for s in fit_steps]) \
        if len(fit_steps) >= 2 else (0.0, 0.0)
    timed = [s for s in fit_steps if s.get("control_step_ms")]
    _a3, step_b = _fit([float(s["columns"]) for s in timed], [s["control_step_ms"]["p50"] for s in timed]) \
        if len(timed) >= 2 else (0.0, 0.0)
    poll_us = median([r["pymodbus"]["cpu_us_per_poll"] for r in base_runs])
    msg_us = median([r["paho"]["cpu_us_per_msg"] for r in base_runs])
    col_us = 1e6 * b
    result: dict[str, Any] = {
        "columns": columns,
        "columns_cpu_bound_estimate": cpu_bound,
        "cpu_us_per_column_s": round(col_us, 1),
        "memory_per_column_kb": round(mem_b, 1) if len(fit_steps) >= 2 else None,
        "fit_columns": [s["columns"] for s in fit_steps],
        "control_step_us_per_column": round(1000 * step_b, 1) if step_b > 0 else None,
        "criteria": {"cpu_max_fraction": CPU_MAX, "lateness_p99_max_ms": LATE_P99_MAX_S * 1000,
                     "poll_period_s": 1.0, "telemetry_interval_s": 1.0, "qos": 1},
        "steps": steps,
        # The top passing step's DNO site limit (gw_scale.site_limit_change).
        "site_limit_change": next((dict(s["site_limit"], columns=s["columns"]) for s in reversed(steps)
                                   if s["passed"] and s.get("site_limit")), None),
        "first_failing_columns": min((s["columns"] for s in steps if not s["passed"]), default=None),
        "farm_cpu_us_per_request": round(median([s["farm_cpu_us_per_request"] for s in steps
                                                 if s.get("farm_cpu_us_per_request")]), 1) if steps else None,
        "profile": profile,
        "baseline": {
            "name": "raw pymodbus client polls (100 connections, closed loop) and raw paho QoS 1 publishing, "
                    "same farm, same broker, same run",
            "pymodbus_polls_per_s": round(median([r["pymodbus"]["polls_per_s"] for r in base_runs]), 0),
            "pymodbus_cpu_us_per_poll": round(poll_us, 1),
            "paho_msgs_per_s": round(median([r["paho"]["msgs_per_s"] for r in base_runs]), 0),
            "paho_cpu_us_per_msg": round(msg_us, 1),
            "spread_pymodbus_cpu_us_per_poll": spread([r["pymodbus"]["cpu_us_per_poll"] for r in base_runs],
                                                      1),
            "spread_paho_cpu_us_per_msg": spread([r["paho"]["cpu_us_per_msg"] for r in base_runs], 1),
            "gateway_cost_ratio": round(col_us / (poll_us + msg_us), 2) if poll_us + msg_us > 0 else None,
            "summary": f"pymodbus {poll_us:.0f} µs CPU per poll + paho {msg_us:.0f} µs per QoS 1 message = "
                       f"{poll_us + msg_us:.0f} µs; the gateway spends {col_us:.0f} µs per column and second "
                       f"({col_us / (poll_us + msg_us):.1f}x)" if poll_us + msg_us > 0 else "n/a",
        },
        "goal": "≥ 5,000 columns per core",
        # --quick runs one small step: a lower bound, not a judgement of the goal.
        "goal_met": None if ctx.quick else columns >= GOAL_COLUMNS,
        # --quick runs one small step, and a run whose largest step passed found no limit.
        "lower_bound_only": ctx.quick or (bool(steps) and all(s["passed"] for s in steps)),
        "method": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
    }
    result["table"] = {
        "header": ["columns", "CPU %", "lateness p50 ms", "lateness p99 ms", "control step loop ms (p50)",
                   "telemetry slice ms (max)", "polls/s", "telemetry/s", "RSS MB (peak)",
                   "site limit: ack / all written ms", "farm CPU %",
                   "load avg", "result"],
        "rows": [[s["columns"], round(100 * s["cpu_fraction"], 1), s["lateness_ms"].get("p50"),
                  s["lateness_ms"].get("p99"), s["control_step_ms"].get("p50"),
                  s["telemetry_slice_ms"].get("max"),
                  round(s["polls"] / s["window_s"]),
                  round(s["telemetry_acked"] / s["window_s"]),
                  "%.1f (%.1f)" % (s["rss_kb"] / 1024, s.get("rss_peak_kb", 0) / 1024),
                  "%s / %s" % (s["site_limit"]["ack_ms"], s["site_limit"]["all_written_ms"])
                  if s.get("site_limit") else None,
                  round(100 * s["farm_cpu_fraction"], 1), s.get("load_1m"),
                  ("pass" if s["passed"] else "fail: " + "; ".join(s["failed_on"]))
                  + (" (2nd try; 1st: " + "; ".join(s["first_try_failed_on"]) + ")"
                     if s.get("first_try_failed_on") else "")]
                 for s in steps],
    }
    result["notes"] = _notes(result, steps)
    if result["goal_met"] is False:
        result["bottleneck"] = _bottleneck(result, steps, profile)
    if ctx.quick:
        result["notes"].append("--quick: one step of 100 columns, so `columns` is only a lower bound.")
    return result


def _notes(r: dict[str, Any], steps: list[dict[str, Any]]) -> list[str]:
    fit = ", ".join(str(n) for n in r["fit_columns"])
    notes = [f"Per column and second the gateway process spends {r['cpu_us_per_column_s']} µs of CPU (slope "
             f"of CPU over N, steps of {fit} columns, where the gateway kept up); at that rate 70 % of a "
             f"core carries about {r['columns_cpu_bound_estimate']} columns if nothing else limited it."]
    top = max(steps, key=lambda s: s["columns"] if s["columns"] in r["fit_columns"] else 0)
    threads = top.get("cpu_fraction_by_thread") or {}
    if threads:
        notes.append(f"CPU by thread at {top['columns']} columns: " + ", ".join(
            f"{name} {100 * frac:.1f} %" for name, frac in sorted(threads.items(), key=lambda kv: -kv[1])
            if frac > 0) + " of a core.")
    step_us = r.get("control_step_us_per_column")
    if step_us:
        notes.append(f"The control step (one allocation over every column, once a second and on changes) "
                     f"takes about {step_us} µs of the event loop's time per column (slope of its p50 "
                     f"over N). Below {SLICE_MIN_COLUMNS} columns that is one stretch; from there the "
                     f"step reads the columns, finishes their offers and sends their limits {STEP_SLICE} "
                     "at a time with the loop free in between, and holds it once for the site-wide "
                     "part of the allocation and the load check (gateway.service).")
    parts = top.get("breakdown_us_per_column_s")
    if parts:
        names = {"polls_and_rest": "polls (south adapter, asyncio, sockets) and the rest",
                 "telemetry_slices": "telemetry built and queued in the outbox",
                 "control_step": "the control step", "readings_handled": "readings handled by the service",
                 "mqtt_publishing": "MQTT (the client reading PUBACKs and writing, outbox rows read, "
                                    "published and deleted)",
                 "other_threads": "other threads", "garbage_collector": "the garbage collector"}
        notes.append(f"Where the CPU per column and second went at {top['columns']} columns: " + ", ".join(
            f"{names.get(k, k)} {v} µs" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])) + ". "
            f"Measured in a second window with timers around those parts: it ran at "
            f"{100 * top['cpu_fraction_timed']:.1f} % CPU against the verdict's window's "
            f"{100 * top['cpu_fraction']:.1f} % (the timers' own cost, in the rest, and whatever "
            "changed between the two windows: near a core, a backlog grows).")
    gc_top = top.get("gc")
    if gc_top:
        notes.append(f"Garbage collector at {top['columns']} columns: {sum(gc_top['collections'])} "
                     f"collections (by generation {', '.join(str(c) for c in gc_top['collections'])}) took "
                     f"{100 * sum(gc_top['s']) / top['window_s']:.1f} % of a core, the longest "
                     f"{gc_top['max_ms']} ms (the loop held: poll lateness); a gateway process freezes its "
                     "long-lived objects once ready and again once every column is online (gc.freeze, "
                     f"gateway.collector) and collects its young generation after {YOUNG_THRESHOLD:,} net "
                     "allocations.")
    if r["memory_per_column_kb"] is not None:
        notes.append(f"Memory: {r['memory_per_column_kb']} KB of RSS per column (slope of the process's "
                     "high-water mark, the start included, over the same steps).")
    sl = r.get("site_limit_change")
    if sl:
        notes.append(f"A DNO site limit at {sl['columns']} columns (half the current offered, "
                     f"{sl['limit_a']} A, handled as one from the broker: signature, audit, a control step "
                     f"at once, the writes): {sl['columns_changed']} columns' limits changed, acked after "
                     f"{sl['ack_ms']} ms (the ack waits at most {ACK_WAIT_S:.0f} s for the writes), "
                     f"every write answered after {sl['all_written_ms']} ms ({sl['columns_applied']} "
                     f"applied), polls at most {sl['lateness_max_ms']} ms late meanwhile.")
    if r.get("farm_cpu_us_per_request"):
        notes.append(f"The simulated columns cost the farm process {r['farm_cpu_us_per_request']} µs per "
                     f"request (at most {max(s['farm_cpu_fraction'] for s in steps) * 100:.0f} % of a core, "
                     "averaged over a step): not the bottleneck.")
    return notes


def _holds(s: dict[str, Any]) -> str:
    """What held the event loop during a step, longest first."""
    parts = []
    step, piece = s.get("control_step_ms") or {}, s.get("telemetry_slice_ms") or {}
    if step:
        parts.append(f"a control step's loop time (the allocation over every column; in slices "
                     f"from {SLICE_MIN_COLUMNS} columns) {step['p50']} ms (max {step['max']})")
    if piece:
        parts.append(f"a telemetry slice (up to {TELEMETRY_SLICE} columns' payloads built and queued in one "
                     f"outbox transaction) {piece['p50']} ms (max {piece['max']})")
    return "; ".join(parts)


def _bottleneck(r: dict[str, Any], steps: list[dict[str, Any]], profile: dict[str, Any] | None) -> list[str]:
    out = []
    fails = [s for s in steps if not s["passed"]]
    if fails:
        f = min(fails, key=lambda s: s["columns"])
        out.append(f"First failing step: {f['columns']} columns: " + "; ".join(f["failed_on"]) + ".")
        late = f["lateness_ms"]
        if late and "lateness" in " ".join(f["failed_on"]) and f["cpu_fraction"] <= CPU_MAX:
            out.append(f"Lateness fails before the CPU does ({f['cpu_fraction'] * 100:.0f} % CPU): p50 "
                       f"{late.get('p50')} ms, p99 {late.get('p99')} ms, max {late.get('max')} ms. The polls "
                       "are spread over the period (column i of N at i/N of it), so a poll is late when "
                       "something holds the event loop as it falls due: " + _holds(f) + ".")
    if profile:
        comps = ", ".join(f"{k} {v} %" for k, v in list(profile["by_component_pct"].items())[:6])
        tops = ", ".join(f"{t['function']} {t['pct']} %" for t in profile["top_functions"][:6])
        out.append(f"cProfile of the event loop at {profile['columns']} columns (busy time): by component "
                   f"{comps}; top functions by own time: {tops}.")
    ratio = r["baseline"].get("gateway_cost_ratio")
    out.append(f"Cost ratio: the gateway's CPU per column-second is {ratio}x one raw pymodbus poll plus one "
               "raw paho QoS 1 message.")
    base = r["baseline"]
    budget_us = 1e6 * CPU_MAX / GOAL_COLUMNS
    poll_us, msg_us = base.get("pymodbus_cpu_us_per_poll") or 0.0, base.get("paho_cpu_us_per_msg") or 0.0
    if msg_us:
        text = (f"The goal leaves {budget_us:.0f} µs of CPU per column and second ({CPU_MAX:.0%} of a "
                f"core over {GOAL_COLUMNS:,} columns); in this run raw paho alone spends {msg_us:.0f} µs "
                f"on one QoS 1 message ({msg_us / budget_us:.2f} of that budget), raw pymodbus "
                f"{poll_us:.0f} µs on one poll.")
        text += (" The gateway publishes with an MQTT client of its own (gateway/north/mqtt_client.py), "
                 "not paho; the breakdown in the notes says where each column's second goes now.")
        out.append(text)
    return out
