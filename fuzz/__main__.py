"""``python -m fuzz`` (what ``make fuzz`` runs): mutation fuzzing of every input parser.

    python -m fuzz                              # every target, FUZZ_INPUTS (default 10^6) inputs each
    python -m fuzz --target cbor-fw --inputs 20000
    python -m fuzz --target modbus-fw --interp micropython --inputs 3000
    python -m fuzz --jobs 2 --seed 7

Per target it prints the inputs run, inputs/s (of one worker, from its CPU time, so that
other load on the machine does not count), the inputs the code under test rejected and how
many distinct error messages they gave, crashes, hangs, property violations, the longest
time one input took and the wall time its shards spanned. Every finding is written to
fuzz/regressions/<target>/<sha1>.bin|json (replayed by tests/fuzz and at the start of
every run). Details (each distinct error message with its count) go to
build/fuzz/summary.json.

Exit status: 0 when nothing was found, 1 on any finding (a crash, a hang, a broken
property, a regression case that fails again), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import tempfile
import time
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from fuzz import targets
from fuzz.engine import (
    REGRESSIONS,
    REPO,
    ShardResult,
    regression_files,
    replay,
    run_shard,
    save_findings,
    scratch_dir,
)

DEFAULT_INPUTS = 1_000_000
SHARD_MAX = 100_000
DEFAULT_SUMMARY = REPO / "build" / "fuzz" / "summary.json"


def _shard(name: str, seed: str, inputs: int, hang_s: float, interp: str) -> ShardResult:
    """One worker's share of a target (runs in a pool process)."""
    target = targets.get(name)
    with tempfile.TemporaryDirectory(prefix="fuzz-", dir=scratch_dir()) as tmp:
        workdir = Path(tmp)
        if interp == "micropython":
            from fuzz.fw.mpy import run_shard_mpy

            return run_shard_mpy(target, workdir, seed=seed, inputs=inputs, hang_s=hang_s)
        return run_shard(target, lambda: target.harness(workdir), seed=seed, inputs=inputs, hang_s=hang_s)


def _die_with_parent() -> None:
    """Pool worker start: a worker must not outlive its run (a parent killed by a signal
    leaves its pool's workers waiting on a pipe they hold both ends of)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


def _replay_regressions(name: str, root: Path) -> tuple[int, list[str]]:
    """Every stored finding of a target through a fresh harness: (cases, failures)."""
    target = targets.get(name)
    files = regression_files(root, name)
    failures = []
    if not files:
        return 0, failures
    with tempfile.TemporaryDirectory(prefix="fuzz-replay-", dir=scratch_dir()) as tmp:
        harness = target.harness(Path(tmp))
        try:
            for path in files:
                verdict = replay(target, harness, path.read_bytes())
                if verdict.kind is not None:
                    failures.append("%s: %s: %s" % (path.name, verdict.kind, verdict.message))
                    harness.close()
                    harness = target.harness(Path(tmp))
        finally:
            harness.close()
    return len(files), failures


def _shards(total: int, jobs: int) -> list[int]:
    size = max(1, min(SHARD_MAX, -(-total // max(1, jobs))))
    out = []
    while total > 0:
        out.append(min(size, total))
        total -= out[-1]
    return out


HEADER = ("%-14s %9s %10s %9s %9s %8s %6s %9s %12s %8s"
          % ("target", "inputs", "inputs/s", "rejected", "distinct", "crashes", "hangs", "property",
             "max ms/input", "wall s"))


def _rate(r: ShardResult) -> float:
    """Inputs per second of one worker, from its CPU time (other load on the machine does not
    count against it)."""
    spent = r.cpu_s or r.seconds
    return r.inputs / spent if spent > 0 else 0.0


def _line(r: ShardResult, wall_s: float) -> str:
    rate = _rate(r)
    return ("%-14s %9d %10.0f %9d %9d %8d %6d %9d %12.2f %8.1f"
            % (r.target, r.inputs, rate, r.rejected, len(r.errors), r.crashes, r.hangs, r.properties,
               r.max_s * 1000, wall_s))


def _summary_entry(r: ShardResult, wall_s: float, regressions: int, regression_failures: list[str],
                   saved: list[Path]) -> dict[str, Any]:
    return {
        "inputs": r.inputs, "worker_cpu_s": round(r.cpu_s, 2), "worker_wall_s": round(r.seconds, 2),
        "wall_s": round(wall_s, 2), "inputs_per_s": round(_rate(r), 1),
        "rejected": r.rejected, "distinct_errors": len(r.errors),
        "errors": dict(r.errors.most_common(200)),
        "crashes": r.crashes, "hangs": r.hangs, "property_violations": r.properties,
        "max_ms_per_input": round(r.max_s * 1000, 3),
        "findings": [{"kind": f.kind, "message": f.message} for f in r.findings],
        "saved": [str(p) for p in saved],
        "regressions_replayed": regressions, "regressions_failing": regression_failures,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", action="append", metavar="NAME",
                        help="fuzz only this target (repeatable or comma-separated): "
                        + ", ".join(targets.NAMES))
    parser.add_argument("--inputs", type=int, default=None,
                        help="inputs per target (default: $FUZZ_INPUTS or %d)" % DEFAULT_INPUTS)
    parser.add_argument("--seed", default="1",
                        help="run seed (default 1); the same seed gives the same inputs")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: cores)")
    parser.add_argument("--interp", choices=("cpython", "micropython"), default="cpython",
                        help="run firmware targets in this interpreter (micropython: modbus-fw, cbor-fw)")
    parser.add_argument("--hang-s", type=float, default=10.0, help="an input running longer is a hang (10 s)")
    parser.add_argument("--regressions", type=Path, default=REGRESSIONS,
                        help="where findings are written and replayed from (default fuzz/regressions)")
    parser.add_argument("--summary", type=Path, default=DEFAULT_SUMMARY,
                        help="JSON details (default build/fuzz/summary.json)")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    args = parser.parse_args(argv)

    if args.list:
        for name in targets.NAMES:
            print("%-14s %s" % (name, targets.get(name).about))
        return 0
    names = [n.strip() for item in (args.target or [",".join(targets.NAMES)])
             for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in targets.MODULES]
    inputs = args.inputs if args.inputs is not None else int(os.environ.get("FUZZ_INPUTS", DEFAULT_INPUTS))
    if unknown or inputs < 1 or args.jobs < 1:
        print("python -m fuzz: %s" % ("unknown target " + ", ".join(unknown) if unknown
                                       else "--inputs and --jobs must be >= 1"), file=sys.stderr)
        return 2
    if args.interp == "micropython":
        not_fw = [n for n in names if not targets.get(n).micropython]
        if not_fw:
            print("python -m fuzz: --interp micropython runs only the firmware targets "
                  "(modbus-fw, cbor-fw), not " + ", ".join(not_fw), file=sys.stderr)
            return 2

    print("fuzz: %d target(s), %d inputs each, seed %s, %d job(s), %s"
          % (len(names), inputs, args.seed, args.jobs, args.interp), flush=True)
    replays: dict[str, tuple[int, list[str]]] = {n: _replay_regressions(n, args.regressions) for n in names}
    for name, (count, failures) in replays.items():
        if count:
            print("%s: %d regression case(s) replayed, %d failing" % (name, count, len(failures)), flush=True)
        for failure in failures:
            print("  REGRESSION %s: %s" % (name, failure), flush=True)

    summary: dict[str, Any] = {"seed": args.seed, "inputs_per_target": inputs, "jobs": args.jobs,
                               "interp": args.interp, "targets": {}}
    findings_total = sum(len(f) for _c, f in replays.values())
    started = time.monotonic()
    print(HEADER, flush=True)
    ctx = get_context("fork") if sys.platform.startswith("linux") else get_context()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, initializer=_die_with_parent) as pool:
        plan: dict[str, list[Future[ShardResult]]] = {}
        for name in names:
            plan[name] = [pool.submit(_shard, name, "%s/%s/%d" % (args.seed, name, i), n, args.hang_s,
                                      args.interp) for i, n in enumerate(_shards(inputs, args.jobs))]
        for name in names:
            merged = ShardResult(name)
            for fut in plan[name]:
                merged.merge(fut.result())
            wall = merged.ended_at - merged.started_at   # its shards' span (targets overlap a little)
            print(_line(merged, wall), flush=True)
            saved = save_findings(args.regressions, targets.get(name), merged.findings)
            for f, path in zip(merged.findings, saved, strict=True):
                print("  FINDING %s %s: %s\n    input kept as %s" % (name, f.kind, f.message[:400], path),
                      flush=True)
            findings_total += merged.finding_count
            count, failures = replays[name]
            summary["targets"][name] = _summary_entry(merged, wall, count, failures, saved)
    total_s = time.monotonic() - started
    summary["wall_s"] = round(total_s, 1)
    print("fuzz: %s in %.1f s: %s" % ("all targets" if len(names) == len(targets.NAMES) else ", ".join(names),
                                      total_s, "%d finding(s)" % findings_total if findings_total else
                                      "no findings"), flush=True)
    try:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")
    except OSError as exc:
        print("fuzz: cannot write %s: %s" % (args.summary, exc), file=sys.stderr)
    return 1 if findings_total else 0


if __name__ == "__main__":
    sys.exit(main())
