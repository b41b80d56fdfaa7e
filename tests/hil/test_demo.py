"""`python -m hil demo` (what `make run` runs): a whole site on this machine, end to end.

The runs are real: the demo as a subprocess starts mosquitto, the gateway and virtual
columns running the firmware (MicroPython on an RS-485 bus, Modbus TCP, CBOR link);
the tests read what it prints and writes, and check from /proc that every process it
started is gone afterwards. The pure parts (schedule, site plan, checks, live view) are
tested directly, including that the checks do fail.
"""

from __future__ import annotations

import io
import json
import re
import signal
import subprocess
import sys
import time
import tomllib
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from gateway.config import load_config
from hil.demo import LINK_PLAN, site_plan
from hil.demo_report import RESPONSE_S, Excursions, SiteWatch
from hil.demo_view import ColumnRow, LiveView, SiteRow, render
from hil.rig.broker import Broker
from hil.rig.cars import car_schedule
from hil.rig.firmware_proc import REPO, firmware_env
from hil.rig.site import ColumnSpec, gateway_column
from hil.rig.site_files import new_key, toml_text, write_secrets
from tests.proc_tree import ProcessWatch

COLUMNS = [("c01", "modbus-rtu", "mpy"), ("c02", "modbus-rtu", "mpy"), ("c03", "modbus-tcp", "py"),
           ("c04", "modbus-tcp", "py"), ("c05", "cbor-tcp", "py"), ("c06", "cbor-serial", "py")]


# -- the demo as a process -----------------------------------------------------------------------

def _start(out: Path, *args: str) -> subprocess.Popen[bytes]:
    log = open(out, "wb")
    try:
        return subprocess.Popen([sys.executable, "-m", "hil", "demo", *args], cwd=REPO, env=firmware_env(),
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        log.close()


def _watch(proc: subprocess.Popen[bytes], timeout_s: float, until: Callable[[], bool] | None = None,
           watch: ProcessWatch | None = None) -> ProcessWatch:
    """Collect the demo's descendants every 0.5 s until it exits (or `until()` holds)."""
    watch = watch or ProcessWatch()
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        watch.scan(proc.pid)
        if until is not None and until():
            return watch
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)
        pytest.fail(f"the demo did not end within {timeout_s} s")
    return watch


def _assert_all_gone(watch: ProcessWatch) -> None:
    time.sleep(0.2)
    left = watch.still_running()
    assert not left, f"processes the demo started are still running: {left}"


@pytest.mark.slow
def test_a_run_keeps_every_limit_shows_the_site_and_writes_the_report(tmp_path: Path) -> None:
    report = tmp_path / "report"
    out_path = tmp_path / "out.txt"
    proc = _start(out_path, "--duration", "45", "--report", str(report))
    seen = _watch(proc, 120)
    out = out_path.read_text(errors="replace")
    assert proc.returncode == 0, out[-6000:]
    # What it started: a private broker, the gateway, six firmware processes (two MicroPython).
    commands = seen.commands()
    assert sum("mosquitto" in c for c in commands) == 1
    assert sum("-m gateway run" in c for c in commands) == 1
    assert sum("vcolumn_main.py" in c for c in commands) == 6
    assert sum("micropython" in c and "vcolumn_main.py" in c for c in commands) == 2
    _assert_all_gone(seen)

    # The live view (plain lines: stdout is not a terminal): the site against its limit and
    # every column's state, offer, measurement and energy, every 10 s.
    site_lines = re.findall(r"^\[\s*[\d.]+ s\] site\s+([\d.]+) kW of ([\d.]+) kW limit .* A of (\d+) A per "
                            r"phase \((\w+)", out, re.M)
    assert len(site_lines) >= 4, out[-4000:]
    assert {source for *_x, source in site_lines} >= {"connection", "dno"}
    for cid, link, interp in COLUMNS:
        rows = re.findall(rf"^\s+{cid}\s+{link}\s+{interp}\s+\w+\s+[A-F-]\s+offer\s+[\d.]+ A\s+limit\s+\S+ A"
                          r"\s+measured\s+\S+ A\s+\S+ Wh", out, re.M)
        assert len(rows) >= 4, (cid, out[-4000:])
    # Cars come and go, the DNO's curtailment is sent, accepted and expires.
    assert "a car arrives" in out and "the car leaves" in out
    assert "session_started" in out and "session_stopped" in out
    assert re.search(r"DNO: signed site limit 30 A per phase for 15 s sent", out)
    assert re.search(r"DNO: command \S+ accepted \(applied 30 A\)", out)
    assert re.search(r"site limit_changed \(limit_a 30, limit_source dno\)", out)
    assert re.search(r"site limit_changed \(limit_a 100, limit_source connection\)", out)
    # The summary.
    assert "summary: the site ran 45 s with 6 columns (2 modbus-rtu/mpy, 2 modbus-tcp/py, 1 cbor-tcp/py, " \
           "1 cbor-serial/py)" in out
    assert re.search(r"checks: (\d+) of \1 passed", out)
    assert out.rstrip().endswith("site kept every limit: yes")

    summary = json.loads((report / "summary.json").read_text())
    assert summary["ok"] is True and summary["scenario"] == "site-demo"
    oracles = {o["id"]: o for o in summary["oracles"]}
    assert {"limit.site", "dno.ack", "dno.reported", "columns.online", "processes"} <= set(oracles)
    assert {f"limit.offer/{cid}" for cid, *_x in COLUMNS} <= set(oracles)
    assert {"limit.circuit/" + c for c in ("feeder-a", "feeder-b", "feeder-b-kiosk")} <= set(oracles)
    site = oracles["limit.site"]["figure"]
    assert all(site[p]["lowest_limit_a"] == 30 and site[p]["samples"] > 300 for p in ("L1", "L2", "L3"))
    assert oracles["dno.ack"]["figure"]["ack"]["result"] == "accepted"
    shown = oracles["dno.reported"]["figure"]
    assert shown["judged"] == {"shown": True, "restored": True}
    assert 15 <= shown["reported_s"] < 22 and 30 <= shown["restored_s"] < 37
    assert sum(oracles[f"limit.offer/{cid}"]["figure"]["verified"] for cid, *_x in COLUMNS) >= 12
    assert summary["gateway"]["embedded_broker"] is True and summary["gateway"]["exit_code"] == 0
    assert sum(c["energy_wh"] for c in summary["columns"].values()) > 20
    # JUnit for CI, the plots, the site file the gateway ran with and its log.
    suite = ET.parse(report / "junit.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("failures") == "0" and int(suite.get("tests", 0)) == len(oracles)
    for name in ["site.png"] + [f"column-{cid}.png" for cid, *_x in COLUMNS]:
        data = (report / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
    site_file = tomllib.loads((report / "site.toml").read_text())
    assert [c["link"] for c in site_file["columns"]] == [link for link, _i in LINK_PLAN]
    assert "gateway started" in (report / "gateway.log").read_text()


@pytest.mark.slow
def test_an_existing_broker_is_used_and_left_running(mqtt_broker: Broker, tmp_path: Path) -> None:
    got: list[str] = []
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, msg: got.append(msg.topic)
    client.connect(mqtt_broker.host, mqtt_broker.port())
    client.subscribe("evedge/v1/+/telemetry", qos=1)
    client.loop_start()
    try:
        out_path = tmp_path / "out.txt"
        proc = _start(out_path, "--duration", "6", "--columns", "2", "--report", str(tmp_path / "r"),
                      "--broker", f"{mqtt_broker.host}:{mqtt_broker.port()}")
        seen = _watch(proc, 60)
        out = out_path.read_text(errors="replace")
        assert proc.returncode == 0, out[-4000:]
    finally:
        client.loop_stop()
        client.disconnect()
    site_id = re.search(r"site '(demo-[0-9a-f]{6})'", out)
    assert site_id, out[:500]
    assert f"evedge/v1/{site_id.group(1)}/telemetry" in got        # the gateway published there
    assert "broker: mosquitto" not in out and not any("mosquitto" in c for c in seen.commands())
    assert sum("vcolumn_main.py" in c for c in seen.commands()) == 2
    _assert_all_gone(seen)
    assert mqtt_broker.proc is not None and mqtt_broker.proc.poll() is None   # not ours to stop
    assert "site kept every limit: yes" in out


@pytest.mark.slow
def test_sigint_stops_the_run_cleanly_and_leaves_nothing_running(tmp_path: Path) -> None:
    out_path = tmp_path / "out.txt"
    report = tmp_path / "report"
    proc = _start(out_path, "--duration", "120", "--columns", "3", "--report", str(report))

    def running() -> bool:
        text = out_path.read_text(errors="replace")
        return bool(re.search(r"^\[\s*[\d.]+ s\] site\s+[\d.]+ kW of", text, re.M))

    seen = _watch(proc, 60, until=running)
    assert proc.poll() is None, out_path.read_text()
    seen.scan(proc.pid)
    commands = seen.commands()
    assert sum("vcolumn_main.py" in c for c in commands) == 3 and any("mosquitto" in c for c in commands)
    proc.send_signal(signal.SIGINT)
    _watch(proc, 40, watch=seen)
    out = out_path.read_text(errors="replace")
    assert proc.returncode == 0, out[-4000:]
    _assert_all_gone(seen)
    assert "stopping early (SIGINT)" in out and "(stopped early: SIGINT)" in out
    assert "site kept every limit: yes" in out
    assert json.loads((report / "summary.json").read_text())["notes"][0].startswith("interrupted at")


@pytest.mark.slow
def test_user_mistakes_and_an_unreachable_broker_exit_2_starting_nothing(tmp_path: Path) -> None:
    mistakes = ((["--columns", "0"], "must be 1..24"), (["--broker", "nohost"], "expected HOST:PORT"),
                (["--duration", "-3"], "must be > 0"))
    for args, message in mistakes:
        done = subprocess.run([sys.executable, "-m", "hil", "demo", *args], cwd=REPO, env=firmware_env(),
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
    from hil.rig.ports import free_port

    port = free_port()
    out_path = tmp_path / "out.txt"
    proc = _start(out_path, "--broker", f"127.0.0.1:{port}", "--report", str(tmp_path / "r"))
    seen = _watch(proc, 30)
    out = out_path.read_text()
    assert proc.returncode == 2 and f"error: cannot reach the broker at 127.0.0.1:{port}" in out, out
    assert not seen.seen and not (tmp_path / "r").exists()


# -- the parts ----------------------------------------------------------------------------------

def test_the_site_is_the_example_site_with_virtual_devices() -> None:
    tables, specs = site_plan(8)
    example = tomllib.loads((REPO / "examples" / "site.toml").read_text())
    assert tables["site"]["capacity_a"] == example["site"]["capacity_a"] and "id" not in tables["site"]
    assert tables["circuits"] == example["circuits"]
    assert [(s.id, s.link, s.interp) for s in specs[:6]] == [
        ("c01", "modbus-rtu", "micropython"), ("c02", "modbus-rtu", "micropython"),
        ("c03", "modbus-tcp", "cpython"), ("c04", "modbus-tcp", "cpython"), ("c05", "cbor-tcp", "cpython"),
        ("c06", "cbor-serial", "cpython")]
    assert specs[6].link == "modbus-rtu" and specs[6].address == 7          # cycled past six
    for spec, col in zip(specs, example["columns"] * 2, strict=False):
        assert (spec.phases, spec.rotation, spec.circuit) == (col.get("phases", 3), col.get("rotation"),
                                                              col.get("circuit"))


def test_the_site_file_the_rig_writes_checks_out(tmp_path: Path) -> None:
    tables, specs = site_plan(6)

    class Col:
        def __init__(self, spec: ColumnSpec) -> None:
            self.config = {"link": {"tcp_port": 5000 + spec.address}}
            self.link_path = "/dev/null"

    doc = {"site": {**tables["site"], "id": "t"}, "circuits": tables["circuits"],
           "buses": {"rs485-a": {"device": "/dev/null", "baud": 19200}}, "allocation": tables["allocation"],
           "columns": [gateway_column(s, Col(s)) for s in specs],  # type: ignore[arg-type]
           "mqtt": {"host": "127.0.0.1", "port": 1883, "outbox": {"path": str(tmp_path / "o.sqlite3")}},
           "dno": {"keys_file": "secrets/dno-keys", "audit_path": str(tmp_path / "audit.jsonl")},
           "gateway": tables["gateway"]}
    (tmp_path / "site.toml").write_text(toml_text(doc))
    write_secrets(tmp_path, new_key())
    config = load_config(tmp_path / "site.toml")
    assert [c.link.kind for c in config.site.columns] == [link for link, _i in LINK_PLAN]
    assert config.site.allocation.increase_delay_max_s == 5 and config.service.telemetry_interval_s == 1


def test_the_car_schedule_is_seeded_and_fits_the_run() -> None:
    cols = [("c01", 3), ("c02", 3), ("c03", 1), ("c04", 3)]
    plan = car_schedule(cols, 180, seed=4)
    assert plan == car_schedule(cols, 180, seed=4) and plan != car_schedule(cols, 180, seed=5)
    assert {v.column for v in plan} == {"c01", "c02", "c03", "c04"}
    assert any(v.leave_s is not None for v in plan) and any(v.leave_s is None for v in plan)
    for v in plan:
        assert 0 < v.arrive_s < 180 * 0.85 and (v.leave_s is None or v.arrive_s < v.leave_s < 180)
        if v.column == "c03":
            assert "1ph" in v.profile          # a 1-phase column gets 1-phase cars
    by_column: dict[str, list[float]] = {}
    for v in plan:                             # one car at a time per column
        assert not by_column.get(v.column) or by_column[v.column][-1] <= v.arrive_s
        by_column[v.column] = [v.arrive_s, v.leave_s if v.leave_s is not None else 1e9]


def test_an_excursion_longer_than_the_response_time_is_a_violation() -> None:
    watch = Excursions(response_ms=int(RESPONSE_S * 1000), tolerance=0.2)
    watch.set_limit(30)
    for t in range(0, 20_000, 100):                      # 2 A over for 5 s: a transient
        watch.observe(t, 32.0 if 5_000 <= t < 10_000 else 20.0)
    assert watch.passed and watch.count == 1
    for t in range(20_000, 40_000, 100):                 # 1 A over for 13 s: a violation
        watch.observe(t, 31.0 if t < 33_100 else 29.0)
    assert not watch.passed and watch.violations == 1 and watch.first_violation_ms == 32_100
    fig = watch.figure()
    assert fig["longest_excursion_s"] == 13.0 and fig["worst_excess_a"] == 2.0


def _watch_of(tmp_path: Path) -> SiteWatch:
    tables, specs = site_plan(1)
    doc = {"site": {**tables["site"], "id": "t"}, "circuits": tables["circuits"],
           "columns": [{"id": "c01", "phases": 3, "hardware_a": 32, "link": "modbus-tcp", "host": "127.0.0.1",
                        "port": 5020, "circuit": specs[0].circuit}],
           "mqtt": {"host": "127.0.0.1", "port": 1883, "outbox": {"path": str(tmp_path / "o.sqlite3")}},
           "dno": {"keys_file": "secrets/dno-keys", "audit_path": str(tmp_path / "a.jsonl")}}
    (tmp_path / "site.toml").write_text(toml_text(doc))
    write_secrets(tmp_path, new_key())
    site = load_config(tmp_path / "site.toml").site
    return SiteWatch(site, {"c01": {"failsafe_a": 6}}, t0_utc_ms=1_000_000, failsafe_a={"c01": 8.0})


def _telemetry(t_ms: int, applied: float | None) -> object:
    from hil.rig.dno_client import Received

    body = {"ts_ms": 1_000_000 + t_ms, "column_id": "c01", "current_a": [0, 0, 0], "applied_limit_a": applied,
            "offered_a": 0, "energy_wh": 0, "status": "Charging", "state": "C"}
    return Received("evedge/v1/t/columns/c01/telemetry", body, False, None, 0.0)


def test_an_offer_above_the_reported_assignment_fails_and_a_blip_is_only_counted(tmp_path: Path) -> None:
    watch = _watch_of(tmp_path)
    offers = {0: 16.0, 5_000: 10.0, 9_000: 12.0, 9_400: 6.0, 14_000: 6.0}
    assignment = {0: 16.0, 5_000: 10.0, 9_000: 6.0, 12_000: 6.0}   # the 12 A spell was never reported
    for t in range(0, 15_000, 100):
        offer = [v for s, v in offers.items() if s <= t][-1]
        watch.sample(t, {"c01": (1.0, 1.0, 1.0)}, {"c01": offer}, {"c01": 0.0})
        if t % 1000 == 0:
            watch.message(_telemetry(t, [v for s, v in assignment.items() if s <= t][-1]))  # type: ignore[arg-type]
    result = watch._offer_result("c01")
    assert result.passed, result.message
    assert result.figure["unverified_short"] == 1 and result.figure["verified"] >= 3
    # The same, but the column keeps offering 10 A after the gateway reported 6 A.
    watch = _watch_of(tmp_path)
    for t in range(0, 15_000, 100):
        watch.sample(t, {"c01": (1.0, 1.0, 1.0)}, {"c01": 10.0 if t >= 5_000 else 16.0}, {"c01": 0.0})
        if t % 1000 == 0:
            watch.message(_telemetry(t, 16.0 if t < 5_000 else 10.0 if t < 9_000 else 6.0))  # type: ignore[arg-type]
    result = watch._offer_result("c01")
    assert not result.passed and result.figure["worst_excess_a"] == 4.0
    assert "above the reported assignment" in result.message
    # No valid assignment: the failsafe (the larger of the plan's and the column's own) binds.
    watch = _watch_of(tmp_path)
    for t in range(0, 5_000, 100):
        watch.sample(t, {"c01": (0.0, 0.0, 0.0)}, {"c01": 9.0}, {"c01": 0.0})
        if t % 1000 == 0:
            watch.message(_telemetry(t, None))  # type: ignore[arg-type]
    assert watch._offer_result("c01").figure["worst_excess_a"] == 1.0


def test_the_live_view_redraws_on_a_terminal_and_prints_lines_elsewhere() -> None:
    site = SiteRow(t_s=61.0, duration_s=180, power_w=20_700.0, current_a=[29.5, 30.0, 12.0], limit_a=30.0,
                   source="dno", valid_until_s=120.0, sessions=5)
    cols = [ColumnRow("c01", "modbus-rtu", "mpy", "Charging", "C", 16.0, 16.0, 15.7, 1234.0,
                      "3ph-11kw C 45%"),
            ColumnRow("c06", "cbor-serial", "py", "Available", "A", 0.0, None, None, None, "-")]
    lines = render(site, cols, [(60.2, "site limit_changed (limit_a 30, limit_source dno)")], "demo")
    assert lines[1] == ("site    20.7 kW of 20.7 kW limit   L1/L2/L3 29.5/30.0/12.0 A of 30 A per phase "
                        "(dno, 59 s left)   sessions 5")
    assert lines[2].split() == ["c01", "modbus-rtu", "mpy", "Charging", "C", "offer", "16.0", "A", "limit",
                                "16.0", "A", "measured", "15.7", "A", "1234", "Wh", "3ph-11kw", "C", "45%"]
    assert "limit    - A" in lines[3] and "      - Wh" in lines[3]
    assert lines[5] == "    60.2 s  site limit_changed (limit_a 30, limit_source dno)"
    plain = io.StringIO()
    view = LiveView("demo", plain, tty=False, plain_every_s=10)
    view.update(site, cols, [])
    view.update(site, cols, [])                  # not due again before 71 s
    view.note(61.5, "c01 session_started")
    assert plain.getvalue().count("site    20.7 kW") == 1 and "\x1b" not in plain.getvalue()
    assert plain.getvalue().endswith("[  61.5 s] c01 session_started\n")
    term = io.StringIO()
    view = LiveView("demo", term, tty=True)
    view.update(site, cols, [], force=True)
    view.update(site, cols, [], force=True)
    view.close()
    text = term.getvalue()
    n = len(render(site, cols, [], "demo"))
    assert text.startswith("\x1b[?25l") and text.count(f"\x1b[{n}A") == 1 and text.endswith("\x1b[?25h")
