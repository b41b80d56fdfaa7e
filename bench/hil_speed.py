"""hil_speed: how fast the HIL replays in virtual time on the `sim` target (the firmware core
in-process under CPython).

- The 20-column, 24-hour site scenario (hil.scenarios.site_24h, ACN-Data arrivals when
  ../shared/traces is there): real-time factor (virtual time / wall time) and wall time per
  column-step (one firmware control step of one column, with its car, meter and the gateway
  model around it).
- The single-column real trace (the OpenEVSE shaper log, imported with `hil import`), when
  ../shared/traces has it.
- Baseline in the same run: the bare firmware control step on CPython (bench/mpy/control_step.py:
  a whole charging session, no world, no gateway, no oracles); the ratio says what the replay
  engine adds per column-step.

Repeats alternate baseline and replays; the figures are medians with their spread.
`--quick` replays the first 9 hours of the day once.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

from bench.stats import median, spread
from bench.suite import Context
from hil import scenarios
from hil.models.ev_profiles import traces_dir
from hil.replay.engine import replay
from hil.replay.sim import SimTarget
from hil.rig.firmware_proc import run_firmware

GOAL_FACTOR = 1000.0
REAL_LOG = Path("openevse-shaper") / "shaper_1s_part1.csv"
CONTROL_STEP = Path(__file__).resolve().parent / "mpy" / "control_step.py"


def bare_step_us(work: Path, steps: int = 20000) -> float:
    """µs per bare Controller.step on CPython (median of 3 runs of `steps`)."""
    done = run_firmware("cpython", CONTROL_STEP, [str(steps), "3"], timeout_s=120, cwd=work)
    if done.returncode != 0:
        err = (done.stdout + done.stderr).decode(errors="replace")[-500:]
        raise RuntimeError("control_step.py failed: " + err)
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return median([t / steps for t in out["us_per_repeat"]])


def site_trace(work: Path, hours: int | None) -> tuple[Path, str]:
    sc = scenarios.site_24h()
    if hours is not None:
        sc = copy.deepcopy(sc)
        sc.duration_ms = hours * 3600_000
        sc.records = [r for r in sc.records if r[0] < sc.duration_ms]
    return scenarios.write_trace(sc, work / "site.trace"), str(sc.meta.get("arrivals", ""))


def real_trace(work: Path) -> Path | None:
    csv = traces_dir() / REAL_LOG
    if not csv.is_file():
        return None
    from hil.__main__ import main as hil_main

    out = work / "shaper.trace"
    with contextlib.redirect_stdout(io.StringIO()):
        code = hil_main(["import", str(csv), "--mapping", "openevse-shaper", "-o", str(out)])
    if code != 0:
        raise RuntimeError(f"hil import {csv} failed ({code})")
    return out


def run(ctx: Context) -> dict[str, Any]:
    repeats = 1 if ctx.quick else 3
    hours = 9 if ctx.quick else None
    site, arrivals = site_trace(ctx.work, hours)
    real = real_trace(ctx.work)
    bare: list[float] = []
    site_runs: list[dict[str, Any]] = []
    real_runs: list[dict[str, Any]] = []
    for i in range(repeats):
        ctx.log(f"hil_speed: repeat {i + 1}/{repeats}")
        bare.append(bare_step_us(ctx.work))
        r = replay(site, SimTarget())
        site_runs.append({"ok": r.ok, "wall_s": r.wall_s, "factor": r.realtime_factor,
                          "duration_ms": r.duration_ms, "column_steps": r.column_steps,
                          "us_per_step": 1e6 * r.wall_s / max(1, r.column_steps)})
        if real is not None:
            rr = replay(real, SimTarget())
            real_runs.append({"ok": rr.ok, "wall_s": rr.wall_s, "factor": rr.realtime_factor,
                              "duration_ms": rr.duration_ms, "column_steps": rr.column_steps})
    factor = median([s["factor"] for s in site_runs])
    us_step = median([s["us_per_step"] for s in site_runs])
    bare_us = median(bare)
    result: dict[str, Any] = {
        "realtime_factor": round(factor, 0),
        "us_per_column_step": round(us_step, 2),
        "scenario": "site-24h-20col" + (f" (first {hours} h)" if hours else ""),
        "arrivals": arrivals,
        "virtual_s": site_runs[0]["duration_ms"] / 1000,
        "wall_s_median": round(median([s["wall_s"] for s in site_runs]), 3),
        "column_steps": site_runs[0]["column_steps"],
        "oracles_passed": all(s["ok"] for s in site_runs),
        "spread_realtime_factor": spread([s["factor"] for s in site_runs], 0),
        "spread_us_per_column_step": spread([s["us_per_step"] for s in site_runs], 2),
        "repeats": repeats,
        "real_trace": None,
        "baseline": {
            "name": "bare firmware control step on CPython (bench/mpy/control_step.py), same run",
            "us_per_step": round(bare_us, 2),
            "spread_us_per_step": spread(bare, 2),
            "engine_overhead_x": round(us_step / bare_us, 1) if bare_us > 0 else None,
            "summary": f"bare step {bare_us:.2f} µs; a replayed column-step costs "
                       f"{us_step / bare_us:.1f}x that",
        },
        "goal": "real-time factor ≥ 1,000x",
        "goal_met": factor >= GOAL_FACTOR,
        "method": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
    }
    if real_runs:
        result["real_trace"] = {
            "trace": str(REAL_LOG), "virtual_s": real_runs[0]["duration_ms"] / 1000,
            "realtime_factor": round(median([s["factor"] for s in real_runs]), 0),
            "spread_realtime_factor": spread([s["factor"] for s in real_runs], 0),
            "column_steps": real_runs[0]["column_steps"], "oracles_passed": all(s["ok"] for s in real_runs)}
    notes = [f"{result['column_steps']:,} column-steps for {result['virtual_s']:,.0f} s of virtual time "
             f"(the engine steps each column only as finely as the moment needs); arrivals: {arrivals}."]
    if real is None:
        notes.append(f"real trace not measured: {traces_dir() / REAL_LOG} not found (set EVEDGE_TRACES)")
    else:
        notes.append(f"real trace {REAL_LOG}: {result['real_trace']['virtual_s']:,.0f} s replayed at "
                     f"{result['real_trace']['realtime_factor']:,.0f}x real time")
    if not result["oracles_passed"]:
        notes.append("some oracle failed during the replay: the speed is of a run that did not pass")
    result["notes"] = notes
    if not result["goal_met"]:
        result["bottleneck"] = [f"{us_step:.1f} µs per column-step, {us_step / bare_us:.1f}x the bare step: "
                                "profile with `python -m cProfile -m hil replay <trace>`"]
    return result
