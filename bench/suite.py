"""The figure registry and the runner behind ``python -m bench``.

Each figure is a module of this package with ``run(ctx) -> dict``; the dict holds the figure's
keys (results.json names them), its ``baseline`` (a dict with at least ``name``), ``goal`` and
``goal_met``, and ``notes``. The runner adds the machine, the time and the wall time, and a
figure that raises is recorded with its error instead of stopping the suite.
"""

from __future__ import annotations

import importlib
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import machine as machine_mod

# results.json key -> module; run in this order (cheap ones first).
FIGURES: dict[str, str] = {
    "firmware_footprint": "bench.firmware_footprint",
    "hil_speed": "bench.hil_speed",
    "outbox_throughput": "bench.outbox_throughput",
    "limit_latency_tcp": "bench.limit_latency_tcp",
    "limit_latency_rtu": "bench.limit_latency_rtu",
    "columns_per_core": "bench.columns_per_core",
}


@dataclass
class Context:
    """What a figure gets: the mode, a scratch folder of its own, the machine, a logger."""

    quick: bool
    work: Path
    machine: dict[str, Any]
    log: Callable[[str], None] = field(default=lambda msg: print(msg, file=sys.stderr, flush=True))

    @property
    def label(self) -> str:
        return machine_mod.label(self.machine)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_figures(names: list[str], *, quick: bool, machine: dict[str, Any],
                log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Run the named figures in registry order; every result carries its machine label."""
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="evedge-bench-") as tmp:
        for name in [n for n in FIGURES if n in names]:
            work = Path(tmp) / name
            work.mkdir()
            ctx = Context(quick=quick, work=work, machine=machine, log=log)
            log(f"bench: {name}{' (quick)' if quick else ''} ...")
            t0 = time.monotonic()
            try:
                module = importlib.import_module(FIGURES[name])
                result = dict(module.run(ctx))
            except Exception as exc:  # one broken figure must not hide the others
                log(traceback.format_exc())
                result = {"error": f"{type(exc).__name__}: {exc}", "goal_met": None}
            wall = time.monotonic() - t0
            result.setdefault("notes", [])
            result.update({"machine": ctx.label, "measured_at": now_iso(), "quick": quick,
                           "wall_s": round(wall, 1)})
            results[name] = result
            log(f"bench: {name} done in {wall:.1f} s")
    return results
