"""Power-cut campaign: `python -m tools.power_cut_campaign --cuts 10000 [--interp micropython] [--seed S]`.

Runs `tools/power_cut_sim.py` (the firmware's own energy store, flash slots and config
writer, cut at random instants: see its header) in a scratch folder under the chosen
interpreter, the MicroPython unix port loading the firmware from its mpy-cross bundle as
a board does. Prints the figures and exits 0 when every cut kept the register and the
config (no corrupt read, never backwards, loss under one quantum, a safe boot every
time), 1 otherwise: the seed reproduces the run.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hil.rig.firmware_proc import INTERPRETERS, REPO, run_firmware
from tools.firmware_build import BuildError, build

SIM = REPO / "tools" / "power_cut_sim.py"
HEAP = "256K"   # the campaign holds the whole App, both links and its own bookkeeping


def run_campaign(cuts: int, interp: str = "cpython", seed: int | None = None,
                 timeout_s: float = 3600.0) -> dict[str, Any]:
    """The campaign's figures (a dict, see power_cut_sim.Campaign.figures) plus wall_s."""
    if seed is None:
        seed = random.randrange(1, 2**31)
    with tempfile.TemporaryDirectory(prefix="powercut-") as scratch:
        root = Path(scratch)
        bundle = build(out=root / "bundle").root if interp == "micropython" else None
        work = root / "work"
        work.mkdir()
        started = time.monotonic()
        done = run_firmware(interp, SIM, [str(seed), str(cuts)], heap=HEAP, timeout_s=timeout_s,
                            cwd=work, bundle=bundle)
        wall_s = time.monotonic() - started
    out = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or not out:
        err = (done.stdout + done.stderr).decode(errors="replace")  # MicroPython: tracebacks on stdout
        raise RuntimeError(f"power-cut campaign (seed {seed}, {interp}) crashed, exit code "
                           f"{done.returncode}:\n{err[-3000:]}")
    figures: dict[str, Any] = json.loads(out[-1])
    figures["interp"] = interp
    figures["wall_s"] = round(wall_s, 1)
    return figures


def summary(f: dict[str, Any]) -> str:
    """The figures as a few lines for a person."""
    rec = f["recovered"]
    booted = f["booted"]
    kinds = f["kinds"]
    lines = [
        f"power cuts: {f['cuts']} ({f['interp']}, seed {f['seed']}, {f['wall_s']} s)",
        f"  energy writes cut: {kinds['energy']} during readings/sessions, {kinds['boot']} boot counts; "
        f"how: {', '.join(f'{k} {v}' for k, v in f['energy_cut_modes'].items())}",
        f"  recovered from slot A {rec['a']}, slot B {rec['b']}: the cut record {rec['new']}, "
        f"the previous one {rec['previous']}, empty store {rec['empty']}",
        f"  max loss {f['max_loss_wh']} Wh (quantum {f['quantum_wh']} Wh + one reading of at most "
        f"{f['max_reading_wh']} Wh), {f['lost_wh_total']} Wh lost in all",
        f"  corrupt reads {f['corrupt_reads']}, backwards {f['backwards']}, "
        f"over one quantum {f['over_quantum']}",
        f"  config writes cut: save_config {kinds['save']}, CBOR ChangeConfiguration {kinds['cbor']}, "
        f"Modbus address change {kinds['modbus']}, first config {kinds['first']}; at "
        f"{', '.join(f'{k} {v}' for k, v in f['config_cut_at'].items())}",
        f"  booted with the old config {booted['old']}, the new one {booted['new']}, "
        f"none yet (safe, ConfigError) {booted['unconfigured']}; broken or unsafe boots {f['bad_boots']}",
    ]
    lines += [f"  FAILED: {text}" for text in f["failures"]]
    lines.append("OK" if f["ok"] else f"FAILED (rerun: python -m tools.power_cut_campaign "
                                      f"--cuts {f['cuts']} --interp {f['interp']} --seed {f['seed']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.power_cut_campaign",
                                     description="Simulated power cuts around the firmware's flash writes.")
    parser.add_argument("--cuts", type=int, default=10000, help="power cuts to simulate (default 10000)")
    parser.add_argument("--interp", choices=INTERPRETERS, default="cpython")
    parser.add_argument("--seed", type=int, default=None, help="reproduce a run (default: random)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    if args.cuts < 1:
        parser.error("--cuts must be at least 1")
    try:
        figures = run_campaign(args.cuts, args.interp, args.seed)
    except (RuntimeError, BuildError, subprocess.TimeoutExpired, FileNotFoundError) as exc:
        print(f"power-cut campaign: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(figures) if args.json else summary(figures))
    return 0 if figures["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
