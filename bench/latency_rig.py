"""The site behind the limit-latency figures: virtual columns running the real firmware (the
MicroPython unix port, from the .mpy bundle), the gateway as its own process
(`python -m gateway run`), a real mosquitto, and a DNO client that signs and publishes site
limits. Used by limit_latency_tcp and limit_latency_rtu.

A limit's latency runs from the moment before the DNO client publishes it to the moment the
last column's pilot offers its share: the column's own timestamp (`t`, the firmware's
ticks_ms, which is CLOCK_MONOTONIC on the unix port like this process's time.monotonic),
taken when its control step writes the new duty to the PWM. The site limits alternate
between two values whose shares differ (a decrease, then an increase), so every limit
changes every pilot.

How many columns: all the issue asks for, 100 (TCP) and 32 (RTU). They run in column
farms (hil/rig/column_farm.py): MicroPython processes hosting COLUMNS_PER_FARM columns each,
every column the real firmware app with its own controller, register image, energy store,
meter driver and Modbus server (its own TCP port, or its own address on the one RS-485
line), where a process per column would cost several % of a core each even when idle. A
farm runs its columns' control tasks every 10 ms on one core, so they share that core where
real columns each have their own: the figure reports the farms' CPU, and the stages say
where the time goes.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from bench.machine import cpu_ticks as machine_ticks
from bench.raw_clients import nodelay
from bench.stats import median, percentile, summary
from hil.rig.column_farm import ColumnFarm, FarmColumn
from hil.rig.dno_client import DnoClient
from hil.rig.gateway_proc import GatewayProcess
from hil.rig.site_files import new_key, toml_text, write_secrets

SITE = "bench-site"
LOCAL = "127.0.0.1"
REPLIES = "dno/replies/bench"
COLUMN_BASE: dict[str, Any] = {
    "phases": 3, "hardware_rating_a": 32, "installation_rating_a": 32, "failsafe_a": 6,
    "meter": {"type": "sdm630", "address": 1, "baud": 9600},
    # Both directions of the alternating limit apply at once: the firmware's 5 s minimum
    # between increases and its pause timer are off (the gateway's random increase delay too).
    "min_pause_s": 0, "pwm_min_change_interval_s": 0,
}
ALLOCATION = {"increase_delay_max_s": 0, "min_pause_s": 0, "rotation_s": 3600, "reclaim_settle_s": 3600}
SHARES_A = (10.0, 13.0)    # per column; the site limit is share x columns
COLUMNS_PER_FARM = 25      # columns hosted by one farm process


def mono_ms() -> float:
    return time.monotonic_ns() / 1e6


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU used over a span: the whole machine (all processes), named processes, this one."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids
        self._t0 = time.monotonic()
        self._mach0 = machine_ticks()
        self._self0 = time.process_time()
        self._proc0 = {k: sum(proc_cpu_s(p) for p in v) for k, v in pids.items()}

    def read(self) -> dict[str, float]:
        """Cores used on average since construction, by group; `machine` is the busy fraction
        of all cores (other work on the machine included)."""
        span = max(1e-6, time.monotonic() - self._t0)
        out = {k: round((sum(proc_cpu_s(p) for p in v) - self._proc0[k]) / span, 3)
               for k, v in self.pids.items()}
        out["bench"] = round((time.process_time() - self._self0) / span, 3)
        m1 = machine_ticks()
        total = m1[0] - self._mach0[0]
        out["machine_busy_fraction"] = round(1 - (m1[1] - self._mach0[1]) / total, 3) if total > 0 else 0.0
        return out


# -- columns ---------------------------------------------------------------------------------------

@dataclass
class Sizing:
    target: int
    columns: int = 0
    core_per_column: float = 0.0    # the farms' CPU at rest, per column
    farm_cores: float = 0.0         # ... and in all
    farms: int = 0                  # farm processes
    note: str = ""


def start_columns(stack: ExitStack, configs: Sequence[dict[str, Any]], bundle: Path, work: Path, *,
                  interp: str = "micropython", per_farm: int = COLUMNS_PER_FARM,
                  log: Callable[[str], None] = print) -> tuple[list[FarmColumn], Sizing]:
    """Every column in column farms of at most `per_farm` columns each, a car's meter load on
    each; what the farms cost at rest (booted, tasks running, no gateway yet)."""
    farms = [stack.enter_context(ColumnFarm(interp, work / f"farm-{k}", configs[i:i + per_farm],
                                            bundle=bundle))
             for k, i in enumerate(range(0, len(configs), per_farm))]
    cols = [c for farm in farms for c in farm.columns]
    for col in cols:
        col.meter.set_load([5.0, 5.0, 5.0])
    time.sleep(2.0)
    pids = [farm.proc.pid for farm in farms if farm.proc is not None]
    a = sum(proc_cpu_s(p) for p in pids)
    t0 = time.monotonic()
    time.sleep(2.0)
    cores = (sum(proc_cpu_s(p) for p in pids) - a) / (time.monotonic() - t0)
    n = len(cols)
    sizing = Sizing(n, n, round(cores / max(1, n), 5), round(cores, 3), len(farms))
    sizing.note = (f"The {n} columns run in {len(farms)} column farm process(es) of up to {per_farm} "
                   f"(hil/rig/column_farm.py, {interp}), each column the real firmware app on its own "
                   f"virtual board; at rest they take {cores * 100:.0f} % of a core, "
                   f"{cores / max(1, n) * 100:.2f} % per column. Farms of a few dozen columns each, not "
                   "one of a hundred: the columns of one farm share one core where real ones each have "
                   "their own, and on a busy machine a single process gets one process's share of the "
                   "cores")
    log(f"columns: {n} in {len(farms)} farms, {cores * 100:.0f} % of a core at rest")
    return cols, sizing


def plug_in(cols: Sequence[FarmColumn]) -> None:
    """Cars in state B, then C (charging) on every column."""
    for col in cols:
        col.board(cp_mv=9000, diode=1, pp_ohms=220)
    time.sleep(0.3)
    for col in cols:
        col.board(cp_mv=6000)


def offers(cols: Sequence[FarmColumn]) -> list[int]:
    return [int(c.outputs().get("offered_da", -1)) for c in cols]


def wait_offers(cols: Sequence[FarmColumn], da: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(o == da for o in offers(cols)):
            return True
        time.sleep(0.1)
    return False


# -- the gateway's site --------------------------------------------------------------------------

def site_doc(n: int, columns: list[dict[str, Any]], broker_port: int, work: Path,
             buses: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"site": {"id": SITE, "capacity_a": 32 * n, "dno_failsafe_a": 6 * n}}
    if buses:
        doc["buses"] = buses
    doc.update({
        "allocation": dict(ALLOCATION),
        "columns": columns,
        "mqtt": {"host": LOCAL, "port": broker_port, "protocol": "5",
                 "outbox": {"path": str(work / "outbox.sqlite3")}},
        "dno": {"keys_file": "secrets/dno-keys", "audit_path": str(work / "audit.jsonl")},
        "gateway": {"control_interval_s": 1.0, "telemetry_interval_s": 10, "poll_period_s": 1.0,
                    "heartbeat_period_s": 10, "limit_validity_s": 120},
    })
    return doc


@dataclass
class Site:
    gateway: GatewayProcess
    dno: DnoClient
    audit_path: Path


def start_site(stack: ExitStack, doc: dict[str, Any], work: Path, broker_port: int) -> Site:
    key = new_key()
    write_secrets(work, key)
    path = work / "site.toml"
    path.write_text(toml_text(doc))
    dno = DnoClient(LOCAL, broker_port, SITE, key)
    stack.callback(dno.close)
    gateway = GatewayProcess(path, work / "gateway.log")
    stack.callback(gateway.close)
    return Site(gateway, dno, Path(doc["dno"]["audit_path"]))


def series(cols: Sequence[FarmColumn], doc: dict[str, Any], work: Path, broker: Any, n_limits: int, *,
           log: Callable[[str], None] = print) -> tuple[LimitRun, dict[str, float]]:
    """A gateway for these columns (its own process, DNO client and files in `work`), n_limits
    limits once it has taken every column over, then a clean stop: the limits and the CPU used."""
    work.mkdir(parents=True, exist_ok=True)
    port = broker.port("plain")
    with ExitStack() as stack:
        site = start_site(stack, doc, work, port)
        if not wait_offers(cols, 320, 60):
            raise RuntimeError(f"the gateway did not take over every column: offers {offers(cols)}")
        log(f"{n_limits} limits over {len(cols)} columns")
        meter = CpuMeter(cpu_groups(site, cols, broker))
        limits = run_limits(site, cols, n_limits, log=log)
        cpu = meter.read()
        site.gateway.terminate()
    return limits, cpu


def cpu_groups(site: Site, cols: Sequence[FarmColumn], broker: Any) -> dict[str, list[int]]:
    farms = sorted({c.proc.pid for c in cols if c.proc is not None})   # columns share their farm's
    return {"gateway": [site.gateway.proc.pid], "columns": farms,
            "broker": [broker.proc.pid] if getattr(broker, "proc", None) is not None else []}


# -- baselines -----------------------------------------------------------------------------------

def mqtt_round_trips(port: int, n: int) -> list[float]:
    """Publish at QoS 1 to a topic this client subscribes to; ms until it comes back."""
    import threading

    got = threading.Event()
    connected = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-rtt-%d" % os.getpid(),
                         protocol=mqtt.MQTTv5)
    client.on_socket_open = nodelay
    client.on_connect = lambda c, *_a: c.subscribe("bench/rtt", qos=1)
    client.on_subscribe = lambda *_a: connected.set()
    client.on_message = lambda *_a: got.set()
    client.connect(LOCAL, port)
    client.loop_start()
    out = []
    try:
        if not connected.wait(10):
            raise TimeoutError("rtt client: no SUBACK")
        for i in range(n):
            got.clear()
            t0 = time.perf_counter()
            client.publish("bench/rtt", b"%d" % i, qos=1)
            if got.wait(2):
                out.append((time.perf_counter() - t0) * 1000)
            time.sleep(0.01 + random.random() * 0.01)
    finally:
        client.disconnect()
        client.loop_stop()
    return out


# -- the limits ----------------------------------------------------------------------------------

@dataclass
class Limit:
    """One published limit; times in ms after the publish (None: not seen)."""

    cmd_id: str
    t_pub: float                    # monotonic ms just before the publish
    direction: str                  # "decrease" | "increase"
    first: float | None = None      # first column's pilot shows its share
    last: float | None = None       # last column's pilot shows its share (the latency)
    decided: float | None = None    # the gateway's audit record (its decision)
    ack: float | None = None        # the ack is back at the DNO client


@dataclass
class LimitRun:
    limits: list[Limit] = field(default_factory=list)

    @property
    def applied(self) -> list[Limit]:
        return [x for x in self.limits if x.last is not None]

    @property
    def latencies_ms(self) -> list[float]:
        return [x.last for x in self.limits if x.last is not None]

    @property
    def missed(self) -> int:
        return sum(1 for x in self.limits if x.last is None)


def run_limits(site: Site, cols: Sequence[FarmColumn], n_limits: int, *, timeout_s: float = 5.0,
               log: Callable[[str], None] = print) -> LimitRun:
    """Publish n_limits site limits, alternating SHARES_A x columns; wait until every column's
    pilot shows its share each time."""
    run = LimitRun()
    n = len(cols)
    for k in range(n_limits):
        share = SHARES_A[k % 2]   # the site starts at the capacity (32 A each): first a decrease
        expect_da = round(share * 10)
        for c in cols:
            c.outputs()
        marks = [len(c.board_log) for c in cols]
        topic, cmd = site.dno.site_limit(share * n, validity_s=600)
        t_pub = mono_ms()
        site.dno.publish(topic, cmd, reply_to=REPLIES, correlation=cmd["id"].encode())
        done: list[float | None] = [None] * n
        deadline = t_pub + timeout_s * 1000
        while mono_ms() < deadline:
            for i, c in enumerate(cols):
                if done[i] is not None:
                    continue
                c.outputs()
                for e in c.board_log[marks[i]:]:
                    if int(e.get("offered_da", -1)) == expect_da and e.get("t", 0) >= t_pub - 1:
                        done[i] = float(e["t"])
                        break
            if all(d is not None for d in done):
                break
            # The latency is the columns' own timestamp, not when we look: look every 10 ms,
            # which leaves the CPU to the columns and the gateway.
            time.sleep(0.01)
        limit = Limit(cmd["id"], t_pub, "decrease" if k % 2 == 0 else "increase")
        run.limits.append(limit)
        applied = [d for d in done if d is not None]
        if len(applied) < n:
            log(f"limit {k}: {n - len(applied)} of {n} columns did not apply {share} A within {timeout_s} s")
            continue
        limit.first, limit.last = min(applied) - t_pub, max(applied) - t_pub
        time.sleep(0.1 + random.random() * 0.3)   # off the poll cycle's phase
    _acks_and_decisions(site, run)
    return run


def _acks_and_decisions(site: Site, run: LimitRun) -> None:
    """The gateway's side: when it decided (audit log, wall ms) and when its ack arrived."""
    offset_ms = time.time_ns() / 1e6 - mono_ms()    # wall - monotonic, the same for every process
    decided: dict[str, float] = {}
    try:
        for line in site.audit_path.read_text().splitlines():
            entry = json.loads(line)
            decided[str(entry.get("id"))] = float(entry["ts_ms"]) - offset_ms
    except (OSError, ValueError, KeyError):
        pass
    acks = {m.correlation.decode(errors="replace"): m.at * 1000 for m in site.dno.snapshot()
            if m.topic == REPLIES and m.correlation}
    for x in run.limits:
        if x.cmd_id in decided:
            x.decided = decided[x.cmd_id] - x.t_pub
        if x.cmd_id in acks:
            x.ack = acks[x.cmd_id] - x.t_pub


def _diffs(limits: list[Limit], a: str, b: str) -> list[float]:
    out = []
    for x in limits:
        va = 0.0 if a == "publish" else getattr(x, a)
        vb = getattr(x, b)
        if va is not None and vb is not None:
            out.append(vb - va)
    return out


def latency_summary(run: LimitRun) -> dict[str, Any]:
    lat = run.latencies_ms
    ok = run.applied
    return {
        "p50_ms": round(median(lat), 1) if lat else None,
        "p99_ms": round(percentile(lat, 99), 1) if lat else None,
        "limits": len(lat),
        "missed_limits": run.missed,
        "latency_ms": summary(lat, 1),
        "decrease_ms": summary([x.last for x in ok if x.direction == "decrease" and x.last is not None], 1),
        "increase_ms": summary([x.last for x in ok if x.direction == "increase" and x.last is not None], 1),
        # Per limit, then summarised: each stage's own distribution.
        "stages_ms": {
            "publish_to_gateway_decision": summary(_diffs(ok, "publish", "decided"), 1),
            "decision_to_first_column": summary(_diffs(ok, "decided", "first"), 1),
            "first_to_last_column": summary(_diffs(ok, "first", "last"), 1),
            "publish_to_last_column": summary(lat, 1),
            "publish_to_ack_at_dno": summary(_diffs(ok, "publish", "ack"), 1),
        },
    }


def block_spread(run: LimitRun, blocks: int) -> dict[str, Any]:
    """The limits in `blocks` consecutive repeats: each block's p50 and p99, and their range."""
    lat = run.latencies_ms
    size = max(1, len(lat) // blocks)
    parts = [lat[i * size:(i + 1) * size] for i in range(blocks) if lat[i * size:(i + 1) * size]]
    p50 = [round(median(p), 1) for p in parts]
    p99 = [round(percentile(p, 99), 1) for p in parts]
    return {"repeats": len(parts), "p50_ms": p50, "p99_ms": p99,
            "p50_range_ms": [min(p50), max(p50)] if p50 else None}


# -- the figure ----------------------------------------------------------------------------------

STAGES = (
    ("publish_to_gateway_decision", "broker -> gateway decision (MQTT, signature check, audit fsync)"),
    ("decision_to_first_column", "decision -> first column's pilot (allocation, write, firmware step)"),
    ("first_to_last_column", "first -> last column (fan-out of the writes)"),
)


def stage_text(st: dict[str, dict[str, Any]], n: int) -> str:
    parts = [f"{label} p50 {st[key].get('p50')} / p99 {st[key].get('p99')} ms" for key, label in STAGES]
    return f"Stages per limit over {n} columns: " + "; ".join(parts) + "."


def stage_bottleneck(st: dict[str, dict[str, Any]], n: int) -> list[str]:
    """Which stage of the path takes the time, from each stage's own p99 per limit."""
    p99 = {label: st[key].get("p99") for key, label in STAGES if st[key].get("p99") is not None}
    if not p99:
        return ["no stage timings (audit log or board lines missing)"]
    worst = max(p99, key=lambda k: p99[k] or 0.0)
    return [f"Over {n} columns the stage with the largest p99 is {worst} ({p99[worst]} ms); every stage is "
            "in the notes above."]


def growth_bottleneck(main: dict[str, dict[str, Any]], small: dict[str, Any], n: int,
                      cpu: dict[str, float]) -> list[str]:
    """What grows between the small site and the full one, stage by stage (p99)."""
    rn = small["columns"]
    growth = {}
    parts = []
    for key, label in STAGES:
        a, b = small["stages_ms"][key].get("p99"), main[key].get("p99")
        if a is not None and b is not None:
            growth[label] = b - a
            parts.append(f"{label} {a} -> {b} ms")
    if not growth:
        return []
    worst = max(growth, key=lambda k: growth[k])
    out = [f"From {rn} to {n} columns, p99 per stage: " + "; ".join(parts) + f". It grows most in: {worst}."]
    gw, cols = cpu.get("gateway", 0.0), cpu.get("columns", 0.0)
    cores = len(os.sched_getaffinity(0))
    if gw < 0.25 and worst != STAGES[0][1]:
        out.append(f"The gateway process used {gw * 100:.0f} % of a core during the limits, the farms of "
                   f"the {n} columns {cols:.2f} of the machine's {cores} cores (the machine "
                   f"{cpu.get('machine_busy_fraction', 0) * 100:.0f} % busy). The growth is in the stages "
                   "where every column must run at the same moment (take the write, step, report its "
                   "pilot), which points to the columns queueing for the cores of the one machine that "
                   "simulates them all, rather than to the gateway's own work per column.")
    return out


def figure(limits: LimitRun, sizing: Sizing, *, baseline: dict[str, Any], goal_ms: float, goal: str,
           cpu: dict[str, float], method: str, notes: list[str], quick: bool = False,
           reference: tuple[int, LimitRun, dict[str, float]] | None = None) -> dict[str, Any]:
    """The result dict both latency figures share."""
    s = latency_summary(limits)
    n = sizing.columns
    met = s["p99_ms"] is not None and s["p99_ms"] <= goal_ms and s["missed_limits"] == 0
    head = []
    if sizing.note:
        head.append(sizing.note + ".")
    head.append(f"{s['limits']} limits alternating {SHARES_A[0]:g} A and {SHARES_A[1]:g} A per column "
                f"(decreases p50 {s['decrease_ms'].get('p50')} ms, increases p50 "
                f"{s['increase_ms'].get('p50')} ms).")
    head.append(f"CPU during the limits (cores): gateway {cpu.get('gateway')}, the {n} columns "
                f"{cpu.get('columns')}, broker {cpu.get('broker')}, bench {cpu.get('bench')}; the whole "
                f"machine was {cpu.get('machine_busy_fraction', 0) * 100:.0f} % busy (other work on it "
                "included).")
    head.append(stage_text(s["stages_ms"], n))
    if quick:
        head.append(f"--quick: {n} columns and {s['limits']} limits, a smoke run; the goal is not judged.")
    if s["missed_limits"]:
        head.append(f"{s['missed_limits']} limits were not applied by every column within 5 s (not in the "
                    "percentiles).")
    result: dict[str, Any] = {
        "p50_ms": s["p50_ms"], "p99_ms": s["p99_ms"], "columns": n, "columns_asked": sizing.target,
        "limits": s["limits"], "missed_limits": s["missed_limits"],
        "interpreter": "micropython (unix port, .mpy bundle), columns hosted in column-farm processes",
        "farm_processes": sizing.farms,
        "latency_ms": s["latency_ms"], "decrease_ms": s["decrease_ms"], "increase_ms": s["increase_ms"],
        "stages_ms": s["stages_ms"],
        "spread_over_repeats": block_spread(limits, 3),
        "cpu_cores_during_limits": cpu,
        "column_core_fraction_idle": sizing.core_per_column,
        "farm_cores_idle": sizing.farm_cores,
        "baseline": baseline,
        "goal": goal,
        # --quick runs a handful of columns: a smoke run, not a judgement of the goal.
        "goal_met": None if quick else met,
        "method": method,
        "notes": head + notes,
    }
    if reference is not None:
        rn, rl, rcpu = reference
        rs = latency_summary(rl)
        result["small_site"] = {"columns": rn, "p50_ms": rs["p50_ms"], "p99_ms": rs["p99_ms"],
                                "limits": rs["limits"], "missed_limits": rs["missed_limits"],
                                "stages_ms": rs["stages_ms"],
                                "cpu_cores_during_limits": rcpu}
        result["notes"].append(
            f"The same run with only {rn} of the columns (the others stopped, a fresh gateway): p50 "
            f"{rs['p50_ms']} ms, p99 {rs['p99_ms']} ms over {rs['limits']} limits, the machine "
            f"{rcpu.get('machine_busy_fraction', 0) * 100:.0f} % busy.")
    if not met and not quick:
        result["bottleneck"] = stage_bottleneck(s["stages_ms"], n)
        if reference is not None:
            result["bottleneck"] += growth_bottleneck(s["stages_ms"], result["small_site"], n, cpu)
    return result
