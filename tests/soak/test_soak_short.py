"""The fault soak, short: `python -m hil soak` for 60 s with 8 columns, every kind of fault and every check.

A real run as a subprocess (mosquitto, the gateway, the firmware in CPython and MicroPython,
the RS-485 bus, cars, DNO commands every few seconds, and the schedule: broker restarts, a
gateway SIGKILL with its restart, a column SIGKILL with its restart, bus noise, a silent
column, a failing meter). The test reads its exit status, its summary and the processes it
started (from /proc while it runs), and checks that every one of them is gone afterwards.

Timing: every check judges against the documented response times (hil.soak.judge); the
slack for a loaded machine is the run loop's own longest gap, measured and reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hil.rig.firmware_proc import REPO, firmware_env
from hil.soak.plan import KINDS
from tests.proc_tree import ProcessWatch

CHECKS = {
    "telemetry.seq",
    "outbox.kills",
    "acks",
    "limit.site",
    "limit.circuit",
    "limit.column.dno",
    "dno.reported",
    "limit.offer",
    "limit.reported",
    "failsafe.reached",
    "failsafe.sum",
    "processes",
    *("fault." + k for k in KINDS),
}
RUN_TIMEOUT_S = 400


@pytest.mark.slow
@pytest.mark.timeout(RUN_TIMEOUT_S + 60)
def test_a_short_soak_goes_through_every_fault_and_passes_every_check(tmp_path: Path) -> None:
    report = tmp_path / "report"
    out_path = tmp_path / "out.txt"
    with open(out_path, "wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "hil",
                "soak",
                "--duration",
                "60",
                "--columns",
                "8",
                "--seed",
                "1",
                "--report",
                str(report),
            ],
            cwd=REPO,
            env=firmware_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    seen = ProcessWatch()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen.scan(proc.pid)
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.terminate()  # the soak stops what it started on SIGTERM
            proc.wait(60)
    out = out_path.read_text(errors="replace")
    assert proc.returncode == 0, out[-8000:]
    assert out.rstrip().endswith("soak passed: yes"), out[-4000:]
    for kind in (
        "broker restart",
        "gateway SIGKILL",
        "column SIGKILL",
        "bus noise 1 %",
        "column stops answering",
        "meter fails",
    ):
        assert f"  {kind} #1" in out, kind  # the printed schedule

    # What it started, and that all of it is gone: mosquitto (again after each restart), the
    # gateway (again after the kill), eight firmware processes (one MicroPython) and the restart.
    commands = seen.commands()
    assert sum("mosquitto" in c for c in commands) >= 3, commands
    assert sum("-m gateway run" in c for c in commands) >= 2
    assert sum("vcolumn_main.py" in c for c in commands) >= 9
    assert sum("micropython" in c and "vcolumn_main.py" in c for c in commands) >= 1
    time.sleep(0.2)
    left = seen.still_running()
    assert not left, f"processes the soak started are still running: {left}"

    summary = json.loads((report / "summary.json").read_text())
    checks = {c["id"]: c for c in summary["checks"]}
    assert summary["ok"] is True and set(checks) == CHECKS
    assert all(c["ok"] for c in checks.values())
    run = summary["run"]
    assert set(run["faults_done"]) == set(KINDS) and all(n >= 1 for n in run["faults_done"].values())
    assert run["columns"] == 8 and run["links"]["modbus-rtu/mpy"] == 1
    tele = checks["telemetry.seq"]["figure"]
    assert tele["committed"] > 300 and tele["lost"] == 0 and tele["received_unique"] == tele["committed"]
    assert checks["acks"]["figure"]["decided"] >= 3
    causes = [w["cause"] for w in checks["failsafe.reached"]["figure"]["windows"]]
    assert causes.count("kill") >= 1 and causes.count("stop") == 1
    assert checks["fault.bus_noise"]["figure"]["corrupted"] > 0
    for name in ("report.md", "site.toml", "gateway.log", "gateway-2.log", "dno-audit.jsonl"):
        assert (report / name).is_file(), name
