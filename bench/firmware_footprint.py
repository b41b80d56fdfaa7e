"""firmware_footprint: the firmware's size in flash and RAM under the MicroPython unix port,
loaded from its .mpy bundle as a board loads it, and the cost of its control step.

- ``bundle_bytes``: what a board carries. A board runs one gateway link mode and is flashed with
  only the modules that mode imports (``tools.firmware_build --link MODE``, what ``tools.flash``
  copies): the .mpy files plus boot.py/main.py, per link mode; the headline is the largest, the
  bundle a board of the largest mode carries. The all-modes bundle (``make firmware``) is
  reported next to it. Baseline: the firmware's Python sources.
- Module paths: the code-heap probe and every column import the bundle as a board does.
  ``tools.flash`` copies a mode's files to the board's filesystem root (``firmware/app.mpy``,
  ...), the working directory a board boots in, and a board's ``sys.path`` starts with ``''``:
  so both run in the bundle's folder (a column in a copy of it, with its column.json at the
  root, as flashed) with ``''`` first on their path, and every firmware
  module's ``__file__``, a path MicroPython interns on import, is the board's string
  (``firmware/app.mpy``, checked against ``tools.flash`` in every run and reported as
  ``app_file``), not a temporary folder's, which cost about 1.3 KB more code heap and 2 KB
  more peak (the peak also holds the paths of the boot-time modules the app unloads).
- ``code_heap_bytes``: ``gc.mem_alloc()`` after a collection once every module a running column
  loads (listed by booting the real app, bench/mpy/app_modules.py) is imported, with asyncio (and
  the asyncio submodules the column loads on demand) and the virtual board's ``machine``
  (bench/mpy/code_heap.py). Baseline: the empty interpreter.
- ``peak_heap_bytes``: the firmware's peak, judged against the goal: the highest ``heap_used``
  (gc.mem_alloc) that hil/vcolumn_main.py reports during a charging session with the meter
  polled and the gateway's own adapter on the link (polls, heartbeats, a new limit every 0.5 s),
  in every link mode, each column loaded from its mode's own bundle, minus the code of that
  harness, which a board does not have (``harness_code_heap_bytes``: bench/mpy/code_heap.py
  compiles and runs hil/vcolumn_main.py's source up to the line that starts the column, after
  the firmware's modules, and takes the growth of ``gc.mem_alloc()`` after a collection). The
  peak as measured, harness code included, is ``peak_heap_bytes_with_harness``. Nothing else
  is subtracted: the harness's data (its line buffers, task, state, its scripts' paths) and
  the virtual board's ``machine`` stay in. The collector runs after every 1 KB allocated
  (bench/mpy/vcolumn_gc.py) so the figure is live data plus at most ~1 KB of garbage; next to
  it, ``live_heap_at_peak_bytes`` is the heap after a collection run right after that sample
  (the harness's code subtracted too; informational). ``data_heap_bytes`` = peak - code of
  the same link mode. The headline is the link mode with the highest peak, and every mode is
  judged against the goals on its own in the table.
- ``allocs_per_step``: steps of a charging session that allocate, each run under
  ``micropython.heap_lock()`` (bench/mpy/control_step.py); the step time is the same session on
  both interpreters (CPython is the baseline).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from unittest import mock

import hil.rig.vcolumn as vcolumn_mod
from bench.stats import median, spread
from bench.suite import Context
from firmware.status import ST_CHARGING
from gateway.south.cbor_columns import CborColumns, CborConfig, CborSerialColumn, CborTcpColumn
from gateway.south.modbus_bus import ModbusRtuBus, RtuBusConfig, RtuColumn
from gateway.south.modbus_tcp import ModbusTcpColumns, TcpColumn, TcpConfig
from gateway.south.types import LimitCommand
from hil.rig.firmware_proc import REPO, run_firmware
from hil.rig.ports import free_port
from hil.rig.serial_pair import SerialPair
from hil.rig.vcolumn import VirtualColumn
from tools.firmware_build import build
from tools.flash import bundle_files

MPY = Path(__file__).resolve().parent / "mpy"
HEAP = "128K"
PROBE_HEAP = "512K"
GOALS = {"bundle_bytes": 32 * 1024, "peak_heap_bytes": 96 * 1024, "data_heap_bytes": 16 * 1024,
         "allocs_per_step": 0}
LINK_MODES = ("modbus-rtu", "modbus-tcp", "cbor-serial", "cbor-tcp")
COLUMN_BASE: dict[str, Any] = {
    "column_id": "fp-1", "bus_address": 1, "phases": 3, "hardware_rating_a": 32,
    "installation_rating_a": 32, "failsafe_a": 6, "meter": {"type": "sdm630", "address": 1, "baud": 9600},
    "heartbeat_timeout_s": 10, "min_pause_s": 0, "pwm_min_change_interval_s": 0,
}
LIMITS_A = (10.0, 16.0, 13.0)


def _config(mode: str) -> dict[str, Any]:
    if mode.endswith("-tcp"):
        link: dict[str, Any] = {"mode": mode, "tcp_port": free_port(), "host": "127.0.0.1"}
    else:
        link = {"mode": mode, "baud": 115200}
    return {**COLUMN_BASE, "link": link}


def _mpy(script: str, args: list[str], bundle: Path, cwd: Path, *, timeout_s: float = 60.0,
         heap: str = HEAP) -> str:
    done = run_firmware("micropython", MPY / script, args, heap=heap, timeout_s=timeout_s, cwd=cwd,
                        bundle=bundle)
    out = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        err = (out + done.stderr.decode(errors="replace"))[-800:]
        raise RuntimeError(f"{script} failed ({done.returncode}): {err}")
    return out.strip().splitlines()[-1]


# -- what a running column loads, and the heap its code takes ----------------------------------------

def app_modules(mode: str, bundle: Path, work: Path) -> list[str]:
    work.mkdir(parents=True, exist_ok=True)
    cfg = _config(mode)
    (work / "column.json").write_text(json.dumps(cfg))
    with SerialPair() as meter, SerialPair() as link:
        link_arg = "-" if mode.endswith("-tcp") else link.b_path
        names = json.loads(_mpy("app_modules.py", ["column.json", meter.b_path, link_arg], bundle, work))
    # Dependencies first (the library's submodules, the package, then the firmware modules).
    return sorted(names, key=lambda n: (n.startswith("firmware"), n != "firmware", n))


def firmware_modules(names: list[str]) -> list[str]:
    return [n for n in names if n == "firmware" or n.startswith("firmware.")]


def board_app_path(bundle: Path, mode: str) -> str:
    """firmware.app's __file__ on a board of `mode`: where tools.flash copies app.mpy, relative
    to the filesystem root, which is the working directory a board boots in ('' on sys.path)."""
    return next(f.remote for f in bundle_files(bundle, mode) if f.remote.rpartition("/")[2] == "app.mpy")


def code_heap(modules: list[str], bundle: Path, work: Path) -> dict[str, Any]:
    """Run in the bundle's folder, so the modules are imported from the board's paths."""
    # A file, not argv: the unix port dies ("uncaught NLR") on a long argument here. Named
    # relative to the bundle: argv is on the heap before the empty interpreter's figure.
    listing = work / "modules.txt"
    listing.write_text("\n".join(modules) + "\n")
    harness = str(REPO / "hil" / "vcolumn_main.py")
    # gc.mem_alloc() does not depend on the heap's size; a larger one leaves room to compile
    # the harness's source next to the CBOR link's code (a column never compiles source).
    return json.loads(_mpy("code_heap.py", [os.path.relpath(listing, bundle), harness], bundle, bundle,
                           heap=PROBE_HEAP))


# -- a charging session per link mode, heap sampled by the running column ------------------------------

def _adapter(mode: str, col: VirtualColumn) -> Any:
    cid = col.config["column_id"]
    if mode == "modbus-rtu":
        return ModbusRtuBus(RtuBusConfig(col.link_path or "", baud=115200, heartbeat_period_s=2.0),
                            [RtuColumn(cid, 1, poll_period_s=0.25)])
    if mode == "modbus-tcp":
        return ModbusTcpColumns([TcpColumn(cid, "127.0.0.1", col.config["link"]["tcp_port"], 1,
                                           poll_period_s=0.25)], TcpConfig(heartbeat_period_s=2.0))
    column = (CborSerialColumn(cid, col.link_path or "", 115200) if mode == "cbor-serial"
              else CborTcpColumn(cid, "127.0.0.1", col.config["link"]["tcp_port"]))
    return CborColumns([column], CborConfig(heartbeat_interval_s=2))


async def _drive(col: VirtualColumn, mode: str, seconds: float) -> None:
    """Plug a car in, then a new limit every 0.5 s through the gateway's adapter for the link."""
    cid = col.config["column_id"]
    col.board(cp_mv=9000, diode=1, pp_ohms=220, live=1)   # live: heap_live after each sample
    await asyncio.sleep(0.3)
    col.board(cp_mv=6000)
    col.meter.set_load([10.0, 10.0, 10.0])
    adapter = _adapter(mode, col)
    await adapter.start()

    async def drain() -> None:
        while True:
            await adapter.events.get()

    drainer = asyncio.create_task(drain())
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        n = 0
        while loop.time() < end:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(adapter.set_limits(
                    [LimitCommand(cid, LIMITS_A[n % len(LIMITS_A)], 60, failsafe_a=6.0)]), 2.0)
            n += 1
            for _ in range(5):
                col.outputs()
                await asyncio.sleep(0.1)
    finally:
        drainer.cancel()
        await adapter.stop()


@contextlib.contextmanager
def _gc_runner() -> Iterator[None]:
    """VirtualColumn starts bench/mpy/vcolumn_gc.py (vcolumn_main.py with a 1 KB GC threshold)."""
    with mock.patch.object(vcolumn_mod, "RUNNER", MPY / "vcolumn_gc.py"):
        yield


def sessions(modes: tuple[str, ...], bundles: dict[str, Path], work: Path,
             seconds: float) -> dict[str, dict[str, Any]]:
    """One column per link mode, each from its mode's bundle, all at once; each one's heap
    reports (as measured: the harness's code is in them) and what it did. Each column runs in
    a copy of its bundle, the board's filesystem root, with its column.json beside boot.py."""
    roots = {}
    for m in modes:
        roots[m] = work / m
        shutil.copytree(bundles[m], roots[m])
    out: dict[str, dict[str, Any]] = {}
    with ExitStack() as stack:
        stack.enter_context(_gc_runner())
        cols = {m: stack.enter_context(VirtualColumn("micropython", roots[m], _config(m), bundle=roots[m],
                                                     heap=HEAP)) for m in modes}

        async def main() -> None:
            await asyncio.gather(*(_drive(col, m, seconds) for m, col in cols.items()))

        asyncio.run(main())
        for m, col in cols.items():
            col.outputs()
            log = col.board_log
            samples = [e for e in log if e.get("heap_used")]
            peak = max(samples, key=lambda e: int(e["heap_used"])) if samples else {}
            charging = [e for e in log if e.get("status") == ST_CHARGING and e.get("contactor")]
            offers = sorted({int(e.get("offered_da", 0)) for e in charging})
            out[m] = {"heap_samples": len(samples),
                      "peak_heap_bytes_with_harness": int(peak["heap_used"]) if peak else None,
                      "live_heap_at_peak_bytes_with_harness": peak.get("heap_live"),
                      "first_heap_bytes_with_harness": int(samples[0]["heap_used"]) if samples else None,
                      "charged": bool(charging), "offers_da_while_charging": offers}
    for m, col in cols.items():   # stopped: what each printed, its firmware.app path first
        text = col.output.decode(errors="replace")
        paths = [ln.split()[-1] for ln in text.splitlines() if ln.startswith("vcolumn_gc: firmware.app ")]
        out[m]["app_file_column"] = paths[0] if paths else None
    return out


# -- the control step ---------------------------------------------------------------------------------

def control_step(bundle: Path, work: Path, steps: int, repeats: int) -> dict[str, Any]:
    runs = {}
    for interp in ("micropython", "cpython"):
        done = run_firmware(interp, MPY / "control_step.py", [str(steps), str(repeats)], heap=HEAP,
                            timeout_s=120, cwd=work, bundle=bundle)
        text = done.stdout.decode(errors="replace").strip()
        if done.returncode != 0:
            err = (text + done.stderr.decode(errors="replace"))[-800:]
            raise RuntimeError(f"control_step.py on {interp} failed: {err}")
        runs[interp] = json.loads(text.splitlines()[-1])
    per_step = {k: [t / steps for t in v["us_per_repeat"]] for k, v in runs.items()}
    mpy, cpy = median(per_step["micropython"]), median(per_step["cpython"])
    m = runs["micropython"]
    return {"steps_that_allocated": m["steps_that_allocated"], "steps_locked": steps,
            "bytes_allocated_per_step": m["bytes_allocated"] / steps,
            "heap_lock_catches_allocations": m["heap_lock_catches_allocations"],
            "us_per_step": {"micropython": round(mpy, 2), "cpython": round(cpy, 2)},
            "spread_us_per_step": {k: spread(v, 2) for k, v in per_step.items()},
            "ratio": round(mpy / cpy, 2) if cpy > 0 else None}


def _judge(p: dict[str, Any]) -> dict[str, bool]:
    return {"bundle_bytes": p["bundle_bytes"] <= GOALS["bundle_bytes"],
            "peak_heap_bytes": _within(p.get("peak_heap_bytes"), GOALS["peak_heap_bytes"]),
            "data_heap_bytes": _within(p.get("data_heap_bytes"), GOALS["data_heap_bytes"])}


def run(ctx: Context) -> dict[str, Any]:
    work = ctx.work
    everything = build(out=work / "bundle")
    sources = sorted((REPO / "firmware").glob("*.py"))
    source_bytes = sum(p.stat().st_size for p in sources)
    modes = ("modbus-rtu",) if ctx.quick else LINK_MODES
    bundles = {m: build(out=work / ("bundle-" + m), link=m) for m in modes}
    per_mode: dict[str, dict[str, Any]] = {}
    for m in modes:
        b = bundles[m]
        mods = app_modules(m, b.root, work / ("probe-" + m))
        heap = code_heap(mods, b.root, work)
        board_path = board_app_path(b.root, m)
        if heap["app_file"] != board_path:
            raise RuntimeError(f"{m}: the code-heap probe imported firmware.app from {heap['app_file']!r}, "
                               f"a board from {board_path!r}")
        if heap["harness"] < 0:
            raise RuntimeError(f"{m}: the harness's code was not measured (hil/vcolumn_main.py changed "
                               "its last line?): the firmware's peak cannot be told from the harness's")
        fw_mods = firmware_modules(mods)
        mpy_files = [b.root / (n.replace(".", "/") + ".mpy") for n in fw_mods if n != "firmware"]
        mpy_files.append(b.root / "firmware" / "__init__.mpy")
        per_mode[m] = {"bundle_bytes": b.size_bytes, "bundle_files": len(b.files),
                       "modules": len(fw_mods), "library_modules": sorted(set(mods) - set(fw_mods)),
                       "code_heap_bytes": heap["code"],
                       "platform_heap_bytes": heap["platform"], "empty_heap_bytes": heap["empty"],
                       "harness_code_heap_bytes": heap["harness"],
                       "app_file": board_path, "app_file_code_probe": heap["app_file"],
                       "loaded_mpy_bytes": sum(f.stat().st_size for f in mpy_files if f.exists()),
                       "largest_mpy_files": [{"file": f.name, "bytes": f.stat().st_size} for f in
                                             sorted(b.files, key=lambda f: -f.stat().st_size)[:5]]}
    ctx.log("firmware_footprint: charging sessions in " + ", ".join(modes))
    for m, s in sessions(modes, {m: b.root for m, b in bundles.items()}, work / "sessions",
                         5.0 if ctx.quick else 12.0).items():
        p = per_mode[m]
        p.update(s)
        if s["app_file_column"] is not None and s["app_file_column"] != p["app_file"]:
            raise RuntimeError(f"{m}: the column imported firmware.app from {s['app_file_column']!r}, "
                               f"a board from {p['app_file']!r}")
        # The firmware's figures: the measured heap less the harness's code (a board has none).
        harness = p["harness_code_heap_bytes"]
        raw = s["peak_heap_bytes_with_harness"]
        p["peak_heap_bytes"] = None if raw is None else raw - harness
        p["data_heap_bytes"] = None if raw is None else raw - harness - p["code_heap_bytes"]
        live = s["live_heap_at_peak_bytes_with_harness"]
        p["live_heap_at_peak_bytes"] = None if live is None else live - harness
    for p in per_mode.values():
        p["goals"] = _judge(p)
    step = control_step(everything.root, work, 3000 if ctx.quick else 6000, 3 if ctx.quick else 7)

    measured = [m for m in modes if per_mode[m].get("peak_heap_bytes")]
    worst = max(measured, key=lambda m: per_mode[m]["peak_heap_bytes"]) if measured else modes[0]
    largest = max(modes, key=lambda m: per_mode[m]["bundle_bytes"])
    w = per_mode[worst]
    allocs = step["steps_that_allocated"] / step["steps_locked"]
    result: dict[str, Any] = {
        "bundle_bytes": per_mode[largest]["bundle_bytes"],
        "code_heap_bytes": w["code_heap_bytes"],
        "peak_heap_bytes": w.get("peak_heap_bytes"),
        "data_heap_bytes": w.get("data_heap_bytes"),
        "allocs_per_step": 0 if step["steps_that_allocated"] == 0 else allocs,
        "peak_heap_bytes_with_harness": w.get("peak_heap_bytes_with_harness"),
        "harness_code_heap_bytes": w.get("harness_code_heap_bytes"),
        "live_heap_at_peak_bytes": w.get("live_heap_at_peak_bytes"),
        "app_file": w["app_file"],
        "step_time_ratio_mpy_vs_cpython": step["ratio"],
        "link_mode": worst,
        "bundle_link_mode": largest,
        "all_modes_bundle_bytes": everything.size_bytes,
        "all_modes_bundle_files": len(everything.files),
        "firmware_code_heap_bytes": w["code_heap_bytes"] - w["platform_heap_bytes"],
        "per_link_mode": per_mode,
        "control_step": step,
        "largest_mpy_files": per_mode[largest]["largest_mpy_files"],
        "gc_threshold_bytes": 1024,
        "heap_size": HEAP,
        "baseline": {
            "name": "the firmware's Python sources (bundle), the empty MicroPython heap (code heap), "
                    "CPython running the same control-step session (step time)",
            "source_bytes": source_bytes,
            "empty_heap_bytes": w["empty_heap_bytes"],
            "cpython_us_per_step": step["us_per_step"]["cpython"],
            "summary": f"sources {source_bytes / 1024:.1f} KB; empty heap {w['empty_heap_bytes']} B; "
                       f"CPython {step['us_per_step']['cpython']} µs per step vs MicroPython "
                       f"{step['us_per_step']['micropython']} µs",
        },
        "goal": "bundle ≤ 32 KB, peak heap ≤ 96 KB, data heap ≤ 16 KB, 0 allocations per step",
        "method": __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
    }
    checks = {
        "bundle_bytes": per_mode[largest]["goals"]["bundle_bytes"],
        "peak_heap_bytes": _within(w.get("peak_heap_bytes"), GOALS["peak_heap_bytes"]),
        "data_heap_bytes": _within(w.get("data_heap_bytes"), GOALS["data_heap_bytes"]),
        "allocs_per_step": step["steps_that_allocated"] == 0 and step["heap_lock_catches_allocations"],
    }
    result["goals"] = checks
    result["goal_met"] = all(checks.values())
    result["goals_met_by_link_mode"] = {m: all(p["goals"].values()) and checks["allocs_per_step"]
                                        for m, p in per_mode.items()}
    result["notes"] = _notes(result, per_mode, modes)
    result["bottleneck"] = _bottlenecks(result, checks, per_mode, modes)
    result["table"] = {
        "header": ["link mode", "bundle", "modules loaded", "loaded .mpy", "code heap",
                   "peak heap (firmware)", "peak measured, with harness code", "harness code (subtracted)",
                   "data heap (peak − code)", "live heap at the peak sample", "samples", "charged",
                   "goals met"],
        "rows": [[m, _kb(p["bundle_bytes"]), p["modules"], _kb(p["loaded_mpy_bytes"]),
                  _kb(p["code_heap_bytes"]), _kb(p.get("peak_heap_bytes")),
                  _kb(p.get("peak_heap_bytes_with_harness")), _kb(p.get("harness_code_heap_bytes")),
                  _kb(p.get("data_heap_bytes")), _kb(p.get("live_heap_at_peak_bytes")),
                  p.get("heap_samples"), "yes" if p.get("charged") else "no", _met(p["goals"])]
                 for m, p in per_mode.items()],
    }
    return result


def _met(goals: dict[str, bool]) -> str:
    missed = [k.replace("_bytes", "").replace("_", " ") for k, ok in goals.items() if not ok]
    return "all" if not missed else "not " + ", ".join(missed)


def _within(value: int | None, goal: int) -> bool:
    return value is not None and value <= goal


def _minus(a: int | None, b: int | None) -> int | None:
    return None if a is None or b is None else a - b


def _kb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1024:.1f} KB"


def _notes(r: dict[str, Any], per_mode: dict[str, dict[str, Any]], modes: tuple[str, ...]) -> list[str]:
    step = r["control_step"]
    notes = [
        f"bundle_bytes is the bundle a board of the largest link mode carries ({r['bundle_link_mode']}, "
        f"{_kb(r['bundle_bytes'])}): a board is flashed with the modules its link mode imports only "
        f"(tools.firmware_build --link, tools.flash). Every mode's bundle is in the table; all modes "
        f"together ({r['all_modes_bundle_files']} files, what make firmware builds for the tests) take "
        f"{_kb(r['all_modes_bundle_bytes'])}.",
        f"Headline heap figures: {r['link_mode']} (the highest peak of {', '.join(modes)}); heap figures "
        f"are from the 64-bit unix port with a {HEAP} heap (objects are larger than on a 32-bit board).",
        f"code heap = firmware modules + asyncio (with any submodule the column loads on demand; "
        f"the TCP modes serve plain sockets, no asyncio.stream) + the virtual board's machine module; "
        f"of it the firmware's own modules take {_kb(r['firmware_code_heap_bytes'])}.",
        f"Peak heap is sampled by the column itself at every pilot or contactor change (heap_used), "
        f"with the collector run after every {r['gc_threshold_bytes']} B allocated. The column runs in "
        f"the virtual board's harness (hil/vcolumn_main.py), which a board does not have: the peak and "
        f"data heap judged are the firmware's, the measured peak less the harness's code "
        f"({_kb(r['harness_code_heap_bytes'])} in {r['link_mode']}, per mode in the table: its source up "
        f"to the line that starts the column, compiled and run after the firmware's modules by the "
        f"code-heap probe, the growth of gc.mem_alloc() after a collection). As measured, harness code "
        f"included, {r['link_mode']} peaked at {_kb(r['peak_heap_bytes_with_harness'])} "
        f"(peak_heap_bytes_with_harness). Nothing else is subtracted: the harness's data (line buffers, "
        f"its task and state, its scripts' paths) and the virtual board's machine module stay in.",
        f"Module paths as on a board: each column and probe runs in its bundle's folder with '' first on "
        f"sys.path, as a board boots in its filesystem root, so firmware.app's __file__ (a path "
        f"MicroPython interns) is {r['app_file']!r}, where tools.flash puts it (checked in every run, "
        f"in the code-heap probe and in every column).",
        f"Live heap at the peak sample (informational): the column runs gc.collect() right after each "
        f"heap_used sample and reports gc.mem_alloc() (heap_live); in {r['link_mode']} "
        f"{_kb(r['live_heap_at_peak_bytes'])} (less the harness's code), so the peak holds "
        f"{_kb(_minus(r['peak_heap_bytes'], r['live_heap_at_peak_bytes']))} of garbage.",
        f"Control step: {step['steps_locked']} steps of a whole charging session under heap_lock, "
        f"{step['steps_that_allocated']} allocated (heap_lock proven to catch an allocation: "
        f"{step['heap_lock_catches_allocations']}); {step['us_per_step']['micropython']} µs per step on "
        f"MicroPython, {step['us_per_step']['cpython']} µs on CPython.",
    ]
    not_charged = [m for m in modes if not per_mode[m].get("charged")]
    if not_charged:
        notes.append("No charging seen in " + ", ".join(not_charged) + ": their peaks are not a session's.")
    return notes


def _bottlenecks(r: dict[str, Any], checks: dict[str, bool], per_mode: dict[str, dict[str, Any]],
                 modes: tuple[str, ...]) -> list[str]:
    out = []
    if not checks["bundle_bytes"]:
        big = ", ".join(f"{f['file']} {f['bytes'] / 1024:.1f} KB" for f in r["largest_mpy_files"])
        sizes = ", ".join(f"{m} {_kb(per_mode[m]['bundle_bytes'])}" for m in modes)
        out.append(f"bundle of the largest link mode {r['bundle_link_mode']} {_kb(r['bundle_bytes'])} "
                   f"> 32 KB (per mode: {sizes}); its largest files are {big}. About a third of a .mpy "
                   "is the names it uses (identifiers and strings, stored again in every file that uses "
                   "them), the rest bytecode; a smaller bundle needs less code, not another build option.")
    if (not checks["peak_heap_bytes"] or not checks["data_heap_bytes"]) and r["peak_heap_bytes"]:
        w = per_mode[r["link_mode"]]
        share = 100.0 * r["code_heap_bytes"] / r["peak_heap_bytes"]
        expand = w["code_heap_bytes"] - w["platform_heap_bytes"]
        out.append(f"heap in {r['link_mode']}: peak {_kb(r['peak_heap_bytes'])} = code "
                   f"{_kb(r['code_heap_bytes'])} ({share:.0f} %) + data {_kb(r['data_heap_bytes'])}. The "
                   f"firmware's code takes {_kb(expand)} of RAM for {_kb(w['loaded_mpy_bytes'])} of .mpy "
                   f"({expand / max(1, w['loaded_mpy_bytes']):.1f}x on this 64-bit port); the data figure "
                   f"still holds the harness's data (line buffers, its task and state), not its code "
                   f"({_kb(w.get('harness_code_heap_bytes'))}, subtracted).")
    if not checks["allocs_per_step"]:
        out.append("the control step allocates: see control_step.steps_that_allocated")
    return out
