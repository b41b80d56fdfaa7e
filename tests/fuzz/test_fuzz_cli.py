"""`python -m fuzz` end to end (what `make fuzz` runs), short: every target, 2000 inputs each,
and the firmware targets under MicroPython (compared with CPython input by input)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from fuzz import targets
from fuzz.engine import REGRESSIONS, REPO

LINE = re.compile(r"^(?P<name>[a-z-]+)\s+(?P<inputs>\d+)\s+(?P<rate>\d+)\s+(?P<rejected>\d+)"
                  r"\s+(?P<distinct>\d+)\s+(?P<crashes>\d+)\s+(?P<hangs>\d+)\s+(?P<property>\d+)\s+(?P<max_ms>[\d.]+)\s+(?P<wall>[\d.]+)$")


Result = dict[str, dict]   # the printed rows by target, and the JSON summary


def fuzz(tmp_path: Path, *args: str, timeout_s: float) -> tuple[subprocess.CompletedProcess[str], Result]:
    """Run the CLI with the regression cases copied aside (a finding must not land in the repo)."""
    regressions = tmp_path / "regressions"
    shutil.copytree(REGRESSIONS, regressions)
    summary = tmp_path / "summary.json"
    command = [sys.executable, "-m", "fuzz", *args, "--jobs", "2", "--regressions", str(regressions),
               "--summary", str(summary)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout_s, check=False)
    rows = {m["name"]: m.groupdict() for m in map(LINE.match, done.stdout.splitlines()) if m}
    assert summary.exists(), done.stdout + done.stderr
    return done, {"rows": rows, **json.loads(summary.read_text())}


def check(done: subprocess.CompletedProcess[str], result: Result, names: tuple[str, ...],
          inputs: int) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "no findings" in done.stdout and "FINDING" not in done.stdout, output
    rows = result["rows"]
    assert sorted(rows) == sorted(names), output
    for name in names:
        row, entry = rows[name], result["targets"][name]
        assert int(row["inputs"]) == inputs == entry["inputs"], output
        assert row["crashes"] == row["hangs"] == row["property"] == "0", output
        assert int(row["rate"]) > 0 and float(row["max_ms"]) > 0, output
        assert int(row["rejected"]) > 0 and int(row["distinct"]) == entry["distinct_errors"] > 1, output
        assert entry["regressions_failing"] == [], output


def test_every_target_end_to_end(tmp_path: Path) -> None:
    done, result = fuzz(tmp_path, "--inputs", "2000", timeout_s=900)
    check(done, result, targets.NAMES, 2000)
    replayed = sum(entry["regressions_replayed"] for entry in result["targets"].values())
    assert replayed == sum(len(list((REGRESSIONS / n).glob("*.*"))) for n in targets.NAMES
                           if (REGRESSIONS / n).is_dir())


def test_firmware_targets_under_micropython(tmp_path: Path) -> None:
    done, result = fuzz(tmp_path, "--target", "modbus-fw,cbor-fw", "--interp", "micropython",
                        "--inputs", "1500", timeout_s=900)
    check(done, result, ("modbus-fw", "cbor-fw"), 1500)
    assert result["interp"] == "micropython"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    for args in (["--target", "nope"], ["--target", "trace", "--interp", "micropython"], ["--inputs", "0"]):
        done = subprocess.run([sys.executable, "-m", "fuzz", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
