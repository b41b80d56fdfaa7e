"""build/bench/results.json and results.md: the figures, their baselines, goals and machine.

results.json: top-level ``machine`` (bench.machine.describe), ``generated``, and one key per
figure (the names the issue lists). A run of some figures (``--only``) replaces those keys
and keeps the others from the previous file, so the table always shows the latest of each;
every figure says when and on which machine it was measured.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bench.suite import FIGURES, now_iso


def merge(out_dir: Path, machine: dict[str, Any], results: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """The previous results.json (if any) with these figures replaced."""
    path = out_dir / "results.json"
    doc: dict[str, Any] = {}
    if path.is_file():
        try:
            doc = json.loads(path.read_text())
        except ValueError:
            doc = {}
    doc["machine"] = machine
    doc["generated"] = now_iso()
    doc.update(results)
    return doc


def write(out_dir: Path, doc: dict[str, Any]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    md_path = out_dir / "results.md"
    json_path.write_text(json.dumps(doc, indent=2, sort_keys=False, default=_jsonable) + "\n")
    md_path.write_text(render(doc))
    return json_path, md_path


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


# -- markdown --------------------------------------------------------------------------------------

def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        text = f"{value:,.{digits}f}"
    elif isinstance(value, int):
        text = f"{value:,}"
    else:
        text = str(value)
    return text + (" " + unit if unit else "")


def _met(goal_met: Any) -> str:
    return {True: "yes", False: "**no**"}.get(goal_met, "n/a")


def _kb(n: Any) -> str:
    return "n/a" if n is None else f"{n / 1024:.1f} KB"


def _h_footprint(r: dict[str, Any]) -> str:
    return (f"bundle {_kb(r.get('bundle_bytes'))}, code heap {_kb(r.get('code_heap_bytes'))}, peak heap "
            f"{_kb(r.get('peak_heap_bytes'))}, data heap {_kb(r.get('data_heap_bytes'))}, "
            f"{_fmt(r.get('allocs_per_step'))} allocations per control step, step time MicroPython/CPython "
            f"{_fmt(r.get('step_time_ratio_mpy_vs_cpython'), 'x')}")


def _h_hil(r: dict[str, Any]) -> str:
    text = (f"real-time factor {_fmt(r.get('realtime_factor'), 'x', 0)}, "
            f"{_fmt(r.get('us_per_column_step'), 'µs', 1)} per column-step")
    real = r.get("real_trace")
    if isinstance(real, dict) and real.get("realtime_factor") is not None:
        text += f"; real trace {_fmt(real.get('realtime_factor'), 'x', 0)}"
    return text


def _h_outbox(r: dict[str, Any]) -> str:
    return (f"{_fmt(r.get('msgs_per_s'), 'msg/s', 0)}, {_fmt(r.get('ratio_vs_paho'), '', 2)} of paho's "
            f"rate")


def _h_latency(r: dict[str, Any]) -> str:
    cols = _fmt(r.get("columns"))
    if r.get("columns_asked") and r.get("columns") != r.get("columns_asked"):
        cols += f" of {r['columns_asked']} asked"
    return f"p50 {_fmt(r.get('p50_ms'), 'ms')}, p99 {_fmt(r.get('p99_ms'), 'ms')} ({cols} columns, " \
           f"{_fmt(r.get('limits'))} limits)"


def _h_cpc(r: dict[str, Any]) -> str:
    at_least = "≥ " if r.get("lower_bound_only") else ""
    return (f"{at_least}{_fmt(r.get('columns'))} columns per core; "
            f"{_fmt(r.get('memory_per_column_kb'), 'KB', 1)} per column")


HEADLINES: dict[str, Callable[[dict[str, Any]], str]] = {
    "firmware_footprint": _h_footprint,
    "hil_speed": _h_hil,
    "outbox_throughput": _h_outbox,
    "limit_latency_tcp": _h_latency,
    "limit_latency_rtu": _h_latency,
    "columns_per_core": _h_cpc,
}


def _baseline_text(r: dict[str, Any]) -> str:
    base = r.get("baseline")
    if not isinstance(base, dict):
        return "n/a"
    return str(base.get("summary") or base.get("name") or "n/a")


def _machine_line(machine: dict[str, Any]) -> str:
    parts = (machine.get("cpu_model"), f"{machine.get('cores')} cores ({machine.get('usable_cores')} usable)",
             f"{machine.get('memory_mb')} MB", machine.get("os"), machine.get("python"),
             machine.get("micropython"), "mosquitto " + str(machine.get("mosquitto")),
             "pymodbus " + str(machine.get("pymodbus")), "paho-mqtt " + str(machine.get("paho_mqtt")))
    return "Machine: " + ", ".join(str(x) for x in parts) + "."


def render(doc: dict[str, Any]) -> str:
    machine = doc.get("machine", {})
    lines = ["# Benchmark results", "",
             f"Generated {doc.get('generated', '?')} by `make bench` (`python -m bench`).", "",
             _machine_line(machine),
             f"Load average at start {machine.get('loadavg_at_start')}, machine "
             f"{_pct(machine.get('busy_fraction_at_start'))} busy before the suite started (other work "
             "shares this machine: every figure is measured next to a baseline in the same run).", "",
             "| figure | result | goal | met | baseline (same run) |", "|---|---|---|---|---|"]
    present = [n for n in FIGURES if n in doc]
    for name in present:
        r = doc[name]
        if "error" in r:
            lines.append(f"| `{name}` | failed: {r['error']} | {r.get('goal', '')} | n/a | |")
            continue
        quick = " (quick)" if r.get("quick") else ""
        met = _met(r.get("goal_met"))
        asked = r.get("columns_asked")
        if r.get("goal_met") is not None and asked and r.get("columns") != asked:
            met += f" (at {r.get('columns')} of {asked} columns)"
        lines.append(f"| `{name}`{quick} | {HEADLINES[name](r)} | {r.get('goal', '')} "
                     f"| {met} | {_baseline_text(r)} |")
    lines.append("")
    for name in present:
        r = doc[name]
        when = f"Measured {r.get('measured_at')} in {r.get('wall_s')} s on {r.get('machine')}"
        lines += [f"## {name}", "", when + (" (`--quick`: reduced run)" if r.get("quick") else "") + ".", ""]
        if "error" in r:
            lines += [f"The figure failed: `{r['error']}`", ""]
        if r.get("method"):
            lines += [str(r["method"]), ""]
        base = r.get("baseline")
        if isinstance(base, dict):
            lines.append("Baseline: " + str(base.get("name", "")) + ".")
            if base.get("summary"):
                lines.append(str(base["summary"]) + ".")
            lines.append("")
        if r.get("goal"):
            verdict = {True: "met.", False: "not met."}.get(r.get("goal_met"), "not judged.")
            lines += [f"Goal: {r['goal']}: {verdict}", ""]
        for note in r.get("notes", []):
            lines.append("- " + str(note))
        if r.get("notes"):
            lines.append("")
        bottleneck = r.get("bottleneck")
        if bottleneck:
            lines += ["Bottleneck:", ""]
            lines += ["- " + str(b) for b in (bottleneck if isinstance(bottleneck, list) else [bottleneck])]
            lines.append("")
        table = r.get("table")
        if isinstance(table, dict) and table.get("rows"):
            lines.append("| " + " | ".join(table["header"]) + " |")
            lines.append("|" + "---|" * len(table["header"]))
            for row in table["rows"]:
                lines.append("| " + " | ".join(_fmt(c, digits=2) if isinstance(c, float) else str(c)
                                               for c in row) + " |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _pct(x: Any) -> str:
    return "n/a" if x is None else f"{x * 100:.0f} %"
