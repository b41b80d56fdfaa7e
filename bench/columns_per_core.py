"""columns_per_core: how many Modbus-TCP columns one gateway process sustains at 1 Hz polling
with QoS 1 telemetry for every column (telemetry_interval_s = 1, through the outbox to a real
mosquitto), at ≤ 70 % of one core with poll lateness p99 ≤ 100 ms.

The columns are cheap: one process outside the gateway's (bench/modbus_farm.py) answers every
column from a static input image, one connection per column as the gateway makes them. Each
step starts the whole service (gateway.service.GatewayService) for N columns in its own process
(bench/gw_scale.py), waits until every column is online and the allocation has settled, then
measures for a window: CPU of the process (all threads), poll lateness against the schedule,
polls, telemetry acknowledged by the broker, outbox backlog, events dropped, RSS. A step
passes when every column is online, CPU ≤ 70 %, lateness p99 ≤ 100 ms, ≥ 95 % of the polls
and ≥ 90 % of the telemetry went through, the backlog did not grow and nothing was dropped.
N doubles until the CPU criterion fails, then the gap below the first failure is bisected.

Baselines in the same run (this process, flat out, same farm and broker): the raw pymodbus
client (reading the same image in a closed loop from 100 connections) and raw paho QoS 1
publishing the same telemetry; the gateway's CPU per column and second is compared with one
poll plus one message of theirs. Memory per column is the slope of RSS over N. Where the goal
is not met, the first failing N is run again under cProfile.
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

from bench.raw_clients import paho_publish, pymodbus_polls, telemetry, wire_messages
from bench.stats import median, percentile, spread
from bench.suite import Context
from hil.rig.broker import Broker, Listener
from hil.rig.site_files import new_key, toml_text, write_secrets

REPO = Path(__file__).resolve().parents[1]
GOAL_COLUMNS = 5000
CPU_MAX = 0.70
LATE_P99_MAX_S = 0.100
MAX_COLUMNS = 8000
UNITS_PER_PORT = 247


class Farm:
    """bench/modbus_farm.py as a process: its ports, and its counters on demand."""

    def __init__(self, work: Path, listeners: int) -> None:
        self.ports_file = work / "farm-ports.json"
        self.stats_file = work / "farm-stats.json"
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
         profile: Path | None = None) -> dict[str, Any]:
    """One gateway process for N columns; its measurements and the verdict."""
    sdir = work / ("n%05d%s" % (n, "-profile" if profile else ""))
    site = site_file(n, farm.ports, broker_port, sdir)
    out = sdir / "out.json"
    cmd = [sys.executable, "-m", "bench.gw_scale", str(site), str(out), "--window", str(window_s),
           "--settle", str(settle_s), "--online-timeout", "30"]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    before = farm.counters()
    t0 = time.monotonic()
    with open(sdir / "gateway.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60 + window_s + settle_s
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
    rounds = r.pop("telemetry_round_ms", [])
    r["telemetry_round_ms"] = {"p50": round(median(rounds), 1), "max": round(max(rounds), 1),
                               "n": len(rounds)} if rounds else {}
    r["lateness_ms"] = {"p50": round(1000 * median(late), 1), "p99": round(1000 * percentile(late, 99), 1),
                        "max": round(1000 * max(late), 1)} if late else {}
    served = after["requests"] - before["requests"]
    r["farm_cpu_fraction"] = round((after["cpu_s"] - before["cpu_s"]) / span, 3)
    farm_cpu = after["cpu_s"] - before["cpu_s"]
    r["farm_cpu_us_per_request"] = round(1e6 * farm_cpu / served, 1) if served else None
    ok, why = verdict(r)
    r["passed"], r["failed_on"] = ok, why
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
                verdict_text = "pass" if r["passed"] else "fail: " + "; ".join(r["failed_on"])
                ctx.log(f"columns_per_core: {n} columns: CPU {r['cpu_fraction'] * 100:.0f} %, lateness p99 "
                        f"{r['lateness_ms'].get('p99')} ms -> {verdict_text}")
                steps.append(r)
                return r

            if ctx.quick:
                do(100)
            else:
                n = 125
                while n <= MAX_COLUMNS:
                    r = do(n)
                    if r["cpu_fraction"] > CPU_MAX or r["online"] < n:
                        break
                    n *= 2
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
    xs = [float(s["columns"]) for s in steps]
    fit_steps = [s for s in steps if s["cpu_fraction"] <= 0.95] or steps
    a, b = _fit([float(s["columns"]) for s in fit_steps], [s["cpu_fraction"] for s in fit_steps]) \
        if len(fit_steps) >= 2 else (0.0, fit_steps[0]["cpu_fraction"] / fit_steps[0]["columns"])
    cpu_bound = int((CPU_MAX - a) / b) if b > 0 else None
    _a2, mem_b = _fit(xs, [float(s["rss_kb"]) for s in steps]) if len(steps) >= 2 else (0.0, 0.0)
    poll_us = median([r["pymodbus"]["cpu_us_per_poll"] for r in base_runs])
    msg_us = median([r["paho"]["cpu_us_per_msg"] for r in base_runs])
    col_us = 1e6 * b
    result: dict[str, Any] = {
        "columns": columns,
        "columns_cpu_bound_estimate": cpu_bound,
        "cpu_us_per_column_s": round(col_us, 1),
        "memory_per_column_kb": round(mem_b, 1) if len(steps) >= 2 else None,
        "criteria": {"cpu_max_fraction": CPU_MAX, "lateness_p99_max_ms": LATE_P99_MAX_S * 1000,
                     "poll_period_s": 1.0, "telemetry_interval_s": 1.0, "qos": 1},
        "steps": steps,
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
        "lower_bound_only": ctx.quick,
        "method": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
    }
    result["table"] = {
        "header": ["columns", "CPU %", "lateness p50 ms", "lateness p99 ms", "telemetry round ms (p50)",
                   "polls/s", "telemetry/s", "RSS MB", "farm CPU %", "result"],
        "rows": [[s["columns"], round(100 * s["cpu_fraction"], 1), s["lateness_ms"].get("p50"),
                  s["lateness_ms"].get("p99"), s["telemetry_round_ms"].get("p50"),
                  round(s["polls"] / s["window_s"]),
                  round(s["telemetry_acked"] / s["window_s"]), round(s["rss_kb"] / 1024, 1),
                  round(100 * s["farm_cpu_fraction"], 1),
                  "pass" if s["passed"] else "fail: " + "; ".join(s["failed_on"])]
                 for s in steps],
    }
    result["notes"] = _notes(result, steps)
    if result["goal_met"] is False:
        result["bottleneck"] = _bottleneck(result, steps, profile)
    if ctx.quick:
        result["notes"].append("--quick: one step of 100 columns, so `columns` is only a lower bound.")
    return result


def _notes(r: dict[str, Any], steps: list[dict[str, Any]]) -> list[str]:
    notes = [f"Per column and second the gateway process spends {r['cpu_us_per_column_s']} µs of CPU (slope "
             f"of CPU over N); at that rate 70 % of a core carries about {r['columns_cpu_bound_estimate']} "
             "columns if nothing else limited it."]
    if r["memory_per_column_kb"] is not None:
        notes.append(f"Memory: {r['memory_per_column_kb']} KB of RSS per column (slope over the steps).")
    if r.get("farm_cpu_us_per_request"):
        notes.append(f"The simulated columns cost the farm process {r['farm_cpu_us_per_request']} µs per "
                     f"request (at most {max(s['farm_cpu_fraction'] for s in steps) * 100:.0f} % of a core, "
                     "averaged over a step): "
                     "not the bottleneck.")
    return notes


def _bottleneck(r: dict[str, Any], steps: list[dict[str, Any]], profile: dict[str, Any] | None) -> list[str]:
    out = []
    fails = [s for s in steps if not s["passed"]]
    if fails:
        f = min(fails, key=lambda s: s["columns"])
        out.append(f"First failing step: {f['columns']} columns: " + "; ".join(f["failed_on"]) + ".")
        late = f["lateness_ms"]
        if late and "lateness" in " ".join(f["failed_on"]) and f["cpu_fraction"] <= CPU_MAX:
            out.append(f"Lateness fails before the CPU does ({f['cpu_fraction'] * 100:.0f} % CPU): p50 "
                       f"{late.get('p50')} ms, p99 {late.get('p99')} ms, max {late.get('max')} ms. Every TCP "
                       "column's poll job starts at the same moment with phase 0 and the same period "
                       "(gateway/south/modbus_tcp.py, ModbusTcpColumns.start), so each second all N polls "
                       "fall due at once and the loop works through them in a burst: the last ones wait "
                       "about N x the CPU per poll. The once-a-second telemetry round (every column's "
                       "payload built and validated, then one outbox transaction, on the loop) holds it for "
                       f"{f['telemetry_round_ms'].get('p50')} ms (p50) on top.")
    if profile:
        comps = ", ".join(f"{k} {v} %" for k, v in list(profile["by_component_pct"].items())[:6])
        tops = ", ".join(f"{t['function']} {t['pct']} %" for t in profile["top_functions"][:6])
        out.append(f"cProfile of the event loop at {profile['columns']} columns (busy time): by component "
                   f"{comps}; top functions by own time: {tops}.")
    ratio = r["baseline"].get("gateway_cost_ratio")
    out.append(f"Cost ratio: the gateway's CPU per column-second is {ratio}x one raw pymodbus poll plus one "
               "raw paho QoS 1 message.")
    return out
