"""Replay reports: summary.json, a JUnit XML file for CI, and PNG plots.

`write_report(result, folder)` writes, for one run:
- `summary.json`: the run (trace, target, virtual and wall time, real-time factor, steps),
  every oracle with its verdict, expectation and figure, per-column and gateway figures;
- `junit.xml`: one testsuite, one testcase per oracle (a failure carries the figure; an
  expected failure that happened passes, with a note);
- `site.png` and `column-<id>.png`: offered limit vs measured current vs DNO limit over
  time (matplotlib, Agg, no pyplot state).

`write_suite_report(results, folder)` writes a suite: `junit.xml` with one testsuite per
trace, `summary.json` listing the runs, and one sub-folder per run with its own report.

The engine records plot series while it runs (`PlotData`): each series keeps a point only
when its value changes (step plots), so a 24 h run stays small; drawing thins any series
longer than `MAX_POINTS` by keeping each bucket's extremes.
"""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hil.replay.engine import RunResult

MAX_POINTS = 4000


class Series:
    """A step series: (t_ms, value) kept only where the value moves by more than `eps`."""

    __slots__ = ("eps", "t", "v")

    def __init__(self, eps: float = 0.01) -> None:
        self.eps = eps
        self.t = array("d")
        self.v = array("d")

    def add(self, t_ms: int, value: float | None) -> None:
        x = math.nan if value is None or not math.isfinite(value) else float(value)
        v = self.v
        if v:
            last = v[-1]
            if (math.isnan(x) and math.isnan(last)) or abs(x - last) <= self.eps:
                return
        self.t.append(t_ms)
        v.append(x)

    def close(self, t_ms: int) -> None:
        """Extend the last value to t_ms (the end of the run)."""
        if self.v and self.t[-1] < t_ms:
            self.t.append(t_ms)
            self.v.append(self.v[-1])

    def __len__(self) -> int:
        return len(self.t)

    def points(self, max_points: int = MAX_POINTS) -> tuple[list[float], list[float]]:
        """(t in ms, values), thinned to about max_points keeping each bucket's min and max."""
        n = len(self.t)
        if n <= max_points:
            return list(self.t), list(self.v)
        per = math.ceil(n / (max_points // 2))
        ts: list[float] = []
        vs: list[float] = []
        for start in range(0, n, per):
            idx = range(start, min(n, start + per))
            good = [i for i in idx if not math.isnan(self.v[i])]
            if not good:
                ts.append(self.t[start])
                vs.append(math.nan)
                continue
            lo = min(good, key=lambda i: self.v[i])
            hi = max(good, key=lambda i: self.v[i])
            for i in sorted({lo, hi}):
                ts.append(self.t[i])
                vs.append(self.v[i])
        return ts, vs


@dataclass
class ColumnPlot:
    limit: Series = field(default_factory=Series)  # the column's limit in force (assignment / failsafe)
    offer: Series = field(default_factory=Series)  # what the pilot offers
    current: Series = field(default_factory=lambda: Series(0.05))  # measured (modelled) max phase
    dno: Series = field(default_factory=Series)  # a DNO limit on this column
    recorded: Series = field(default_factory=lambda: Series(0.05))  # a log's recorded current


@dataclass
class SitePlot:
    limit: Series = field(default_factory=Series)  # effective site limit (lowest phase)
    dno: Series = field(default_factory=Series)  # lowest valid DNO site limit
    offered: Series = field(default_factory=lambda: Series(0.05))  # sum of offers, highest phase
    phases: tuple[Series, Series, Series] = field(
        default_factory=lambda: (Series(0.1), Series(0.1), Series(0.1))
    )


@dataclass
class PlotData:
    site: SitePlot = field(default_factory=SitePlot)
    columns: dict[str, ColumnPlot] = field(default_factory=dict)

    def close(self, t_ms: int) -> None:
        for s in self._all():
            s.close(t_ms)

    def _all(self) -> list[Series]:
        out = [self.site.limit, self.site.dno, self.site.offered, *self.site.phases]
        for c in self.columns.values():
            out += [c.limit, c.offer, c.current, c.dno, c.recorded]
        return out


# ---- summary.json --------------------------------------------------------------------------


def summary_dict(result: RunResult) -> dict[str, Any]:
    return {
        "trace": result.trace,
        "source": result.source,
        "scenario": result.scenario,
        "description": result.description,
        "target": result.target,
        "ok": result.ok,
        "oracles_total": len(result.results),
        "oracles_ok": sum(1 for r in result.results if r.ok),
        "virtual_s": result.duration_ms / 1000.0,
        "wall_s": round(result.wall_s, 3),
        "realtime_factor": round(result.realtime_factor, 1),
        "column_steps": result.column_steps,
        "iterations": result.iterations,
        "columns_count": len(result.columns),
        "step_us_per_column_step": round(1e6 * result.wall_s / result.column_steps, 2)
        if result.column_steps
        else None,
        "oracles": [r.as_dict() for r in result.results],
        "columns": result.columns,
        "gateway": result.gateway,
        "target_stats": result.target_stats,
        "recorded": result.recorded,
        "notes": result.notes,
    }


def write_summary(result: RunResult, path: Path) -> None:
    path.write_text(json.dumps(summary_dict(result), indent=2, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


# ---- JUnit ------------------------------------------------------------------------------------


def _suite_name(result: RunResult) -> str:
    return "hil.replay." + (result.scenario or Path(result.trace).stem)


def junit_suite(result: RunResult) -> ET.Element:
    fails = sum(1 for r in result.results if not r.ok)
    suite = ET.Element(
        "testsuite",
        name=_suite_name(result),
        tests=str(len(result.results)),
        failures=str(fails),
        errors="0",
        skipped="0",
        time="%.3f" % result.wall_s,
    )
    props = ET.SubElement(suite, "properties")
    for key, value in (
        ("trace", result.trace),
        ("target", result.target),
        ("virtual_s", "%.1f" % (result.duration_ms / 1000.0)),
        ("realtime_factor", "%.1f" % result.realtime_factor),
    ):
        ET.SubElement(props, "property", name=key, value=str(value))
    for r in result.results:
        case = ET.SubElement(
            suite, "testcase", classname=_suite_name(result) + "." + r.group, name=r.id, time="0"
        )
        figure = json.dumps(dict(r.figure), sort_keys=True, default=_json_default)
        if not r.ok:
            what = "expected to fail but passed: " if r.expected == "fail" else ""
            fail = ET.SubElement(case, "failure", message=what + r.message, type="OracleFailure")
            fail.text = figure
        else:
            note = "expected failure observed: " if r.expected == "fail" else ""
            ET.SubElement(case, "system-out").text = note + r.message + "\n" + figure
    return suite


def write_junit(results: Sequence[RunResult], path: Path, skipped: Sequence[tuple[str, str]] = ()) -> None:
    root = ET.Element("testsuites", name="hil")
    for result in results:
        root.append(junit_suite(result))
    for name, reason in skipped:
        suite = ET.SubElement(
            root,
            "testsuite",
            name="hil.replay." + name,
            tests="1",
            failures="0",
            errors="0",
            skipped="1",
            time="0",
        )
        case = ET.SubElement(suite, "testcase", classname="hil.replay." + name, name=name, time="0")
        ET.SubElement(case, "skipped", message=reason)
    ET.indent(root)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


# ---- plots ----------------------------------------------------------------------------------


def _time_axis(t_end_ms: float) -> tuple[float, str]:
    if t_end_ms > 3 * 3600_000:
        return 3600_000.0, "time (h)"
    if t_end_ms > 180_000:
        return 60_000.0, "time (min)"
    return 1000.0, "time (s)"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _draw(ax: Any, series: Series, scale: float, **style: Any) -> bool:
    if not len(series):
        return False
    ts, vs = series.points()
    if all(math.isnan(v) for v in vs):
        return False
    ax.plot([t / scale for t in ts], vs, drawstyle="steps-post", **style)
    return True


def write_plots(result: RunResult, folder: Path) -> list[Path]:
    """site.png and one column-<id>.png per column; returns the files written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plots = result.plots
    scale, xlabel = _time_axis(max(result.duration_ms, 1))
    title = result.scenario or Path(result.trace).name
    written = []

    def save(fig: Figure, name: str) -> None:
        FigureCanvasAgg(fig)
        path = folder / name
        fig.savefig(path, dpi=90)
        written.append(path)

    fig = Figure(figsize=(11, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    site = plots.site
    for i, s in enumerate(site.phases):
        _draw(ax, s, scale, label="measured L%d" % (i + 1), linewidth=0.9)
    _draw(ax, site.offered, scale, label="offered (sum, highest phase)", linewidth=0.9, linestyle=":")
    _draw(ax, site.limit, scale, label="site limit", color="0.4", linewidth=2.5, zorder=1)
    _draw(ax, site.dno, scale, label="DNO limit", color="red", linewidth=1.4, linestyle="--")
    ax.set(title="%s: site, %s" % (title, result.target), xlabel=xlabel, ylabel="current per phase (A)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    save(fig, "site.png")

    for cid, cp in plots.columns.items():
        fig = Figure(figsize=(11, 3.8))
        ax = fig.add_subplot(1, 1, 1)
        _draw(
            ax, cp.limit, scale, label="column limit (gateway/failsafe)", color="0.6", linewidth=3.0, zorder=1
        )
        _draw(ax, cp.recorded, scale, label="measured (recorded)", color="tab:gray", linewidth=0.7, alpha=0.7)
        _draw(ax, cp.offer, scale, label="offered on the pilot", color="tab:green", linewidth=1.2, zorder=3)
        _draw(ax, cp.current, scale, label="measured (model)", color="tab:blue", linewidth=1.0, zorder=4)
        _draw(ax, cp.dno, scale, label="DNO column limit", color="red", linewidth=1.4, linestyle="--")
        ax.set(title="%s: column %s, %s" % (title, cid, result.target), xlabel=xlabel, ylabel="current (A)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        save(fig, "column-%s.png" % _safe(cid))
    return written


def write_report(result: RunResult, folder: str | Path, *, plots: bool = True) -> list[Path]:
    """summary.json, junit.xml and the PNG plots of one run into `folder` (created)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    write_summary(result, out / "summary.json")
    write_junit([result], out / "junit.xml")
    files = [out / "summary.json", out / "junit.xml"]
    if plots:
        files += write_plots(result, out)
    return files


def write_suite_report(
    results: Sequence[RunResult],
    folder: str | Path,
    *,
    skipped: Sequence[tuple[str, str]] = (),
    plots: bool = True,
) -> None:
    """A suite: junit.xml with a testsuite per run, summary.json, and a folder per run."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for result in results:
        sub = out / _safe(result.scenario or Path(result.trace).stem)
        sub.mkdir(exist_ok=True)
        write_summary(result, sub / "summary.json")
        if plots:
            write_plots(result, sub)
    write_junit(results, out / "junit.xml", skipped)
    doc = {
        "ok": all(r.ok for r in results),
        "runs": [
            {
                "scenario": r.scenario or Path(r.trace).stem,
                "ok": r.ok,
                "target": r.target,
                "virtual_s": r.duration_ms / 1000.0,
                "wall_s": round(r.wall_s, 3),
                "realtime_factor": round(r.realtime_factor, 1),
                "failed": [x.id for x in r.results if not x.ok],
            }
            for r in results
        ],
        "skipped": [{"scenario": n, "reason": why} for n, why in skipped],
    }
    (out / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
