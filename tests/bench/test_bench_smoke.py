"""The benchmark runner works: `python -m bench --quick` for the cheap figures writes
results.json with the keys the issue names (each figure with its baseline and machine) and the
results.md table. No timing is asserted: performance is measured by `make bench`, never by tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import report

REPO = Path(__file__).resolve().parents[2]
CHEAP = ("firmware_footprint", "hil_speed", "outbox_throughput")
REQUIRED = {
    "firmware_footprint": ("bundle_bytes", "code_heap_bytes", "peak_heap_bytes", "data_heap_bytes",
                           "allocs_per_step"),
    "hil_speed": ("realtime_factor",),
    "outbox_throughput": ("msgs_per_s", "ratio_vs_paho"),
}


def _bench(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


@pytest.mark.slow
def test_quick_run_of_the_cheap_figures_writes_results_json_and_md(tmp_path: Path) -> None:
    done = _bench("--quick", "--only", ",".join(CHEAP), "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    machine = doc["machine"]
    for key in ("cpu_model", "cores", "python", "micropython"):
        assert machine[key], key
    assert machine["micropython"].startswith("MicroPython ")
    for name, keys in REQUIRED.items():
        fig = doc[name]
        assert "error" not in fig, fig.get("error")
        for key in keys:
            assert isinstance(fig[key], int | float), (name, key, fig.get(key))
        assert fig["baseline"]["name"], name
        assert fig["machine"].startswith(machine["cpu_model"]), fig["machine"]
        assert fig["quick"] is True
    fp = doc["firmware_footprint"]
    assert fp["data_heap_bytes"] == fp["peak_heap_bytes"] - fp["code_heap_bytes"]
    assert fp["control_step"]["heap_lock_catches_allocations"] is True
    md = (tmp_path / "results.md").read_text()
    assert "| figure | result | goal | met | baseline (same run) |" in md
    for name in CHEAP:
        assert f"## {name}" in md
    assert machine["cpu_model"] in md


def test_an_unknown_figure_is_a_usage_error(tmp_path: Path) -> None:
    done = _bench("--only", "hil_speed,warp_drive", "--out", str(tmp_path), timeout_s=60)
    assert done.returncode == 2
    assert "unknown figure warp_drive" in done.stderr
    assert not (tmp_path / "results.json").exists()


def test_a_partial_run_keeps_the_other_figures_of_the_last_run(tmp_path: Path) -> None:
    machine = {"cpu_model": "Test CPU", "cores": 2, "python": "CPython 3.11",
               "micropython": "MicroPython 1.29"}
    old = {"hil_speed": {"realtime_factor": 1234.0, "baseline": {"name": "bare step"}, "machine": "Test CPU",
                         "goal_met": True}}
    report.write(tmp_path, report.merge(tmp_path, machine, old))
    new = {"outbox_throughput": {"msgs_per_s": 900.0, "ratio_vs_paho": 0.4, "baseline": {"name": "paho"},
                                 "machine": "Test CPU", "goal_met": None}}
    report.write(tmp_path, report.merge(tmp_path, machine, new))
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["hil_speed"]["realtime_factor"] == 1234.0
    assert doc["outbox_throughput"]["ratio_vs_paho"] == 0.4
    md = (tmp_path / "results.md").read_text()
    assert "real-time factor 1,234 x" in md and "900 msg/s" in md
