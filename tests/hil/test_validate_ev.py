"""`validate-ev`: the EV model against the real 1 s log, the lag figures, traces, the CLI."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from hil import validate_ev
from hil.models.ev import CALIBRATED, EvModel
from hil.models.ev_profiles import BUILTIN, traces_dir
from hil.trace import TraceWriter, declare, make_header

REAL_LOG = traces_dir() / "openevse-shaper" / "shaper_1s_part1.csv"
needs_real_log = pytest.mark.skipif(not REAL_LOG.is_file(),
                                    reason="real log not found at %s (set EVEDGE_TRACES)" % REAL_LOG)
REPO = Path(__file__).resolve().parents[2]

# RMSE threshold on the real log, in A. The log's current is sampled and held about every
# 2 s in 0.22 A steps: it differs from itself one second later by 0.45 A RMS, so a model
# whose timing is off by one sample scores about that. An instant follower (no lag, no
# ramp) scores 1.21 A. 0.5 A keeps the model within a sample's timing of the real car;
# the calibrated model scores 0.35 A.
RMSE_LIMIT_A = 0.5


@pytest.fixture(scope="module")
def real() -> tuple[validate_ev.Recording, dict[str, Any]]:
    if not REAL_LOG.is_file():
        pytest.skip("real log not found at %s (set EVEDGE_TRACES)" % REAL_LOG)
    rec = validate_ev.read_csv(REAL_LOG)
    return rec, validate_ev.validate(rec)


# ---- the real log -----------------------------------------------------------------------

@needs_real_log
def test_real_log_rmse_is_below_the_justified_threshold(real: Any) -> None:
    rec, report = real
    assert report["samples"] == 3900 and len(rec.t_ms) == 3900
    assert report["rmse_a"] <= RMSE_LIMIT_A
    assert abs(report["bias_a"]) < 0.1


@needs_real_log
def test_the_models_dynamics_matter_an_instant_follower_is_far_worse(real: Any) -> None:
    rec, report = real
    instant = replace(CALIBRATED, response_delay_ms=0, tau_up_s=1e-3, tau_down_s=1e-3,
                      max_rise_a_per_s=1e6, start_ramp_a_per_s=1e6, stop_ramp_a_per_s=1e6,
                      wake_delay_ms=0, start_delay_ms=0)
    baseline = validate_ev.validate(rec, dynamics=instant)
    assert baseline["rmse_a"] > 1.0
    assert baseline["rmse_a"] >= 2 * report["rmse_a"]


@needs_real_log
def test_recorded_figures_are_the_documented_ones(real: Any) -> None:
    # traces/README: median 2 s, at most about 10 s; a ramp 1.3 -> 22 A in about 19 s.
    recorded = real[1]["recorded"]
    lag = recorded["reduction_lag_s"]
    assert (lag["median"], lag["count"], lag["unresolved"]) == (2.0, 34, 0)
    assert lag["max"] <= 10.0
    assert recorded["ramp_up_s"]["max"] == 19.0
    assert real[1]["inferred_pause_s"] == 232.0          # the start and one relay pause


@needs_real_log
def test_modelled_lags_are_close_to_the_recorded_ones(real: Any) -> None:
    # Tolerances: median within 1 s (one sample); p90 within 1.5 s; the model's worst case
    # no slower than the car's, and at least its median (the car's 7 s and 9 s cases come
    # from it settling 0.1-0.2 A above a 24-25 A offer, which the model leaves out); the
    # start ramp within 2 s; about as many reductions seen (within 20 %).
    recorded, modelled = real[1]["recorded"], real[1]["modelled"]
    rec_lag, mod_lag = recorded["reduction_lag_s"], modelled["reduction_lag_s"]
    assert abs(mod_lag["median"] - rec_lag["median"]) <= 1.0
    assert abs(mod_lag["p90"] - rec_lag["p90"]) <= 1.5
    assert rec_lag["median"] <= mod_lag["max"] <= rec_lag["max"]
    assert abs(mod_lag["count"] - rec_lag["count"]) <= 0.2 * rec_lag["count"]
    assert mod_lag["unresolved"] == 0
    rec_ramp, mod_ramp = recorded["ramp_up_s"], modelled["ramp_up_s"]
    assert mod_ramp["count"] == rec_ramp["count"]
    assert abs(mod_ramp["max"] - rec_ramp["max"]) <= 2.0


@needs_real_log
def test_without_pause_inference_the_unrecorded_relay_pauses_dominate(real: Any) -> None:
    report = validate_ev.validate(real[0], infer_pauses=False)
    assert report["inferred_pause_s"] is None
    assert report["rmse_a"] > 5 * real[1]["rmse_a"]


@needs_real_log
def test_imported_trace_gives_the_same_report_as_the_csv(real: Any, tmp_path: Path) -> None:
    from hil.trace.csv_import import import_csv

    trace = tmp_path / "shaper.trace"
    import_csv(REAL_LOG, "openevse-shaper", trace)
    report = validate_ev.validate(validate_ev.read_trace(trace))
    for key in ("samples", "rmse_a", "bias_a", "inferred_pause_s", "recorded", "modelled"):
        assert report[key] == real[1][key], key


@needs_real_log
def test_cli_on_the_real_log_prints_json_and_honours_max_rmse(capsys: pytest.CaptureFixture[str]) -> None:
    assert validate_ev.main([str(REAL_LOG), "--csv"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"rmse_a", "recorded", "modelled", "model"}
    assert report["model"]["profile"] == "openevse-log"
    assert validate_ev.main([str(REAL_LOG), "--max-rmse", "0.1"]) == 1
    assert "above --max-rmse" in capsys.readouterr().err


# ---- the figures' definitions -----------------------------------------------------------

def test_reduction_lag_counts_until_below_the_limit_in_force() -> None:
    t = [i * 1000 for i in range(10)]
    offered = [20, 20, 10, 10, 10, 10, 16, 16, 8, 8]
    current = [19, 19, 19, 15, 12, 9.5, 9.5, 9.5, 9.5, 7.0]
    lags, unresolved = validate_ev.reduction_lags(t, offered, current)
    assert lags == [3.0, 1.0] and unresolved == 0
    # Never below: unresolved; a reduction the car is already under: not counted.
    assert validate_ev.reduction_lags(t[:4], [20, 10, 10, 10], [19, 19, 19, 19]) == ([], 1)
    assert validate_ev.reduction_lags(t[:3], [20, 10, 10], [8, 8, 8]) == ([], 0)
    # PWM off (offer 0): stopped means below 0.5 A.
    assert validate_ev.reduction_lags(t[:4], [16, 0, 0, 0], [15, 15, 3, 0.2]) == ([2.0], 0)


def test_ramp_up_runs_from_a_start_to_90_percent_for_three_samples() -> None:
    t = [i * 1000 for i in range(16)]
    offered = [16] * 16
    current = [0, 0, 0, 0, 0, 0, 1, 4, 8, 12, 15, 14, 15, 15, 15, 15]
    assert validate_ev.ramp_ups(t, offered, current) == ([6.0], 0)
    # A short dip (< 5 s) is not a new start.
    dip = [0] * 6 + [15, 15, 15, 0, 0, 15, 15, 15, 15, 15]
    assert validate_ev.ramp_ups(t, offered, dip) == ([0.0], 0)
    # A recording that begins while charging has no start in it.
    assert validate_ev.ramp_ups(t, offered, [15] * 16) == ([], 0)


def test_describe_uses_nearest_rank_percentiles() -> None:
    assert validate_ev.describe([3, 1, 2, 10]) == {"median": 2.5, "p90": 10, "max": 10, "count": 4,
                                                   "unresolved": 0}
    assert validate_ev.describe([], 2)["count"] == 0


# ---- traces and CSVs written here ---------------------------------------------------------

PROFILE = BUILTIN["generic-3ph-11kw"]
SCRIPT = [(0, 16.0), (30_000, 10.0), (60_000, 6.0), (75_000, 0.0), (100_000, 13.0), (140_000, 16.0)]


def model_session(end_ms: int = 170_000) -> list[tuple[int, float, float]]:
    """(t, offered, current) every second from the EV model itself: a 'recording' it must match."""
    model = EvModel(PROFILE, soc=0.2)
    out, k, offered = [], 0, 0.0
    for t in range(0, end_ms + 1, 1000):
        while k < len(SCRIPT) and SCRIPT[k][0] <= t:
            offered = SCRIPT[k][1]
            model.set_pilot(t, offered)
            k += 1
        model.step(t)
        out.append((t, offered, model.draw_a))
    return out


def write_trace(path: Path, columns: tuple[str, ...] = ("c1",), with_current: bool = True) -> Path:
    decls = {}
    for col in columns:
        for base in ("pilot.offered_a",) + (("meter.current_a",) if with_current else ()):
            name, decl = declare(base, col)
            decls[name] = decl
    name, decl = declare("site.power_w")
    decls[name] = decl
    header = make_header("test", 1_700_000_000_000, decls)
    last = None
    with TraceWriter(path, header) as writer:
        for t, offered, current in model_session():
            for col in columns:
                if offered != last:
                    writer.write(t, col + "/pilot.offered_a", offered)
                if with_current:
                    writer.write(t, col + "/meter.current_a", [current, current, current])
            last = offered
            writer.write(t, "site.power_w", current * 690.0)
    return path


def write_csv(path: Path, rows: list[tuple[int, float, float]] | None = None) -> Path:
    start = datetime(2023, 12, 17, 13, 25, 0)
    lines = ["\ufeffTimeStamp;Live_Power;Charging_Current;Current_Capacity"]
    for t, offered, current in rows or model_session():
        stamp = (start + timedelta(milliseconds=t)).strftime("%d/%m/%Y %H:%M:%S")
        lines.append("%s;0;%s;%s" % (stamp, ("%.4f" % current).replace(".", ","), offered))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_the_model_reproduces_its_own_session_from_a_trace(tmp_path: Path) -> None:
    rec = validate_ev.read_trace(write_trace(tmp_path / "t.trace"))
    report = validate_ev.validate(rec, PROFILE)
    assert report["samples"] == 171
    assert report["rmse_a"] < 0.01
    assert report["recorded"] == report["modelled"]
    lags = report["recorded"]["reduction_lag_s"]
    assert (lags["count"], lags["unresolved"]) == (3, 0)    # 16 -> 10, 10 -> 6, 6 -> PWM off
    assert lags["max"] <= 3.0


def test_csv_and_trace_of_the_same_session_agree(tmp_path: Path) -> None:
    from_trace = validate_ev.validate(validate_ev.read_trace(write_trace(tmp_path / "t.trace")), PROFILE)
    from_csv = validate_ev.validate(validate_ev.read_csv(write_csv(tmp_path / "log.csv")), PROFILE)
    for key in ("samples", "rmse_a", "recorded", "modelled", "inferred_pause_s"):
        assert from_csv[key] == from_trace[key], key


def test_a_trace_with_several_columns_needs_column(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "two.trace", ("c1", "c2"))
    assert validate_ev.main([str(trace), "--profile", PROFILE.name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--column" in err and "c1, c2" in err
    assert validate_ev.main([str(trace), "--profile", PROFILE.name, "--column", "c2"]) == 0
    assert json.loads(capsys.readouterr().out)["rmse_a"] < 0.01


# ---- user mistakes: one line, exit 2 ----------------------------------------------------------

def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("validate-ev: error: ") and captured.err.count("\n") == 1
    for needle in needles:
        assert needle in captured.err


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert validate_ev.main([str(tmp_path / "nope.trace")]) == 2
    _one_line_error(capsys, "nope.trace")


def test_trace_without_the_needed_channels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "t.trace", with_current=False)
    assert validate_ev.main([str(trace)]) == 2
    _one_line_error(capsys, "meter.current_a")


def test_corrupt_and_foreign_traces(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write_trace(tmp_path / "t.trace")
    data = trace.read_bytes()
    cut = tmp_path / "cut.trace"
    cut.write_bytes(data[: len(data) // 2])
    assert validate_ev.main([str(cut)]) == 2
    _one_line_error(capsys, "byte offset")
    junk = tmp_path / "junk.trace"
    junk.write_bytes(b"\x00\x01 not cbor at all")
    assert validate_ev.main([str(junk)]) == 2
    _one_line_error(capsys, "junk.trace")


def test_csv_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    no_cols = tmp_path / "other.csv"
    no_cols.write_text("time;a;b\n1;2;3\n", encoding="utf-8")
    assert validate_ev.main([str(no_cols)]) == 2
    _one_line_error(capsys, "Current_Capacity", "columns: time, a, b")
    bad = write_csv(tmp_path / "bad.csv", [(0, 16.0, 0.0), (1000, 16.0, 0.0)])
    bad.write_text(bad.read_text(encoding="utf-8") + "17/12/2023 13:25:02;0;lots;16\n", encoding="utf-8")
    assert validate_ev.main([str(bad), "--csv"]) == 2
    _one_line_error(capsys, "line 4", "Charging_Current")
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    assert validate_ev.main([str(empty)]) == 2
    _one_line_error(capsys, "empty.csv")


def test_unknown_profile_and_bad_period(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = write_csv(tmp_path / "log.csv")
    assert validate_ev.main([str(csv_path), "--profile", "no such car anywhere"]) == 2
    _one_line_error(capsys, "no such car anywhere")
    assert validate_ev.main([str(csv_path), "--period-ms", "0"]) == 2
    _one_line_error(capsys, "--period-ms")


def test_other_vehicle_profiles_are_accepted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = write_csv(tmp_path / "log.csv")
    assert validate_ev.main([str(csv_path), "--profile", "generic-1ph-3.7kw"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["phases"] == 1


def test_mounts_as_a_subcommand(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m hil")
    validate_ev.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["validate-ev", str(write_trace(tmp_path / "t.trace")),
                              "--profile", PROFILE.name])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 171


def test_module_entry_point_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hil.validate_ev", str(tmp_path / "missing.trace")],
                          check=False, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("validate-ev: error:") and "Traceback" not in proc.stderr

