"""`python -m tools.power_cut_campaign` as a person runs it: a subprocess per interpreter,
its exit status and its figures. The same seed must give the same campaign on CPython
and on the MicroPython unix port (the firmware side draws from its own generator), so
the two legs cross-check each other cut for cut."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from hil.rig.firmware_proc import INTERPRETERS, REPO
from tools import power_cut_campaign

CUTS = 300
SEED = 424242


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.power_cut_campaign", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def figures() -> dict[str, dict[str, Any]]:
    out = {}
    for interp in INTERPRETERS:
        done = _run("--cuts", str(CUTS), "--interp", interp, "--seed", str(SEED), "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        out[interp] = json.loads(done.stdout)
    return out


@pytest.mark.parametrize("interp", INTERPRETERS)
def test_a_campaign_keeps_the_register_and_the_config(figures: dict[str, dict[str, Any]],
                                                      interp: str) -> None:
    f = figures[interp]
    assert f["interp"] == interp and f["cuts"] == CUTS and f["seed"] == SEED and f["ok"]
    assert f["corrupt_reads"] == 0 and f["backwards"] == 0 and f["over_quantum"] == 0
    assert f["bad_boots"] == 0 and f["failures"] == []
    assert 0 < f["max_loss_wh"] < f["quantum_wh"] + f["max_reading_wh"]
    assert sum(f["kinds"].values()) == CUTS
    rec = f["recovered"]
    assert rec["a"] + rec["b"] + rec["empty"] == f["kinds"]["energy"] + f["kinds"]["boot"]
    assert rec["new"] + rec["previous"] + rec["empty"] == rec["a"] + rec["b"] + rec["empty"]
    booted = f["booted"]
    config_cuts = sum(f["kinds"][k] for k in ("save", "cbor", "modbus", "first"))
    assert booted["old"] + booted["new"] + booted["unconfigured"] == config_cuts
    assert f["wall_s"] > 0


def test_both_interpreters_run_the_same_campaign(figures: dict[str, dict[str, Any]]) -> None:
    a, b = (dict(figures[i]) for i in INTERPRETERS)
    for f in (a, b):
        del f["interp"], f["wall_s"]
    assert a == b


def test_the_summary_names_every_figure_and_the_exit_status_is_0() -> None:
    done = _run("--cuts", "40", "--seed", "7")
    assert done.returncode == 0, done.stdout + done.stderr
    text = done.stdout
    for needle in ("power cuts: 40 (cpython, seed 7,", "recovered from slot A", "max loss",
                   "corrupt reads 0, backwards 0", "booted with the old config", "OK"):
        assert needle in text, text


def test_a_failed_campaign_exits_1_and_says_how_to_rerun_it(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    done = _run("--cuts", "20", "--seed", "9", "--json")
    bad = json.loads(done.stdout)
    bad.update(ok=False, corrupt_reads=1, failures=["seed 9, cut 3: read (...), wrote (...)"])
    monkeypatch.setattr(power_cut_campaign, "run_campaign", lambda *a, **k: bad)
    assert power_cut_campaign.main(["--cuts", "20", "--seed", "9"]) == 1
    out = capsys.readouterr().out
    assert "corrupt reads 1" in out and "FAILED: seed 9, cut 3" in out
    assert "--cuts 20 --interp cpython --seed 9" in out


def test_nonsense_arguments_are_refused() -> None:
    done = _run("--cuts", "0")
    assert done.returncode == 2 and "--cuts must be at least 1" in done.stderr
    done = _run("--interp", "jython")
    assert done.returncode == 2
