"""``python -m bench`` (what ``make bench`` runs): the benchmark suite.

    python -m bench                      # every figure (a few minutes on 2 cores)
    python -m bench --quick              # reduced runs of every figure (about a minute)
    python -m bench --only hil_speed     # one figure (repeatable, or comma-separated)
    python -m bench --out DIR            # results.json / results.md there (default build/bench)

Exit status: 0 when every figure ran (a goal not met is a result, not a failure), 1 when a
figure failed to run, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import machine as machine_mod
from bench import report
from bench.suite import FIGURES, run_figures

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "build" / "bench"


def _names(only: list[str] | None) -> list[str]:
    if not only:
        return list(FIGURES)
    names = [n.strip() for item in only for n in item.split(",") if n.strip()]
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        raise SystemExit(f"python -m bench: unknown figure {', '.join(unknown)} "
                         f"(choose from {', '.join(FIGURES)})")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced runs (about a minute in all)")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only this figure (repeatable or comma-separated): " + ", ".join(FIGURES))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default build/bench)")
    args = parser.parse_args(argv)
    try:
        names = _names(args.only)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    machine = machine_mod.describe()
    log("bench: machine " + machine_mod.label(machine))
    results = run_figures(names, quick=args.quick, machine=machine, log=log)
    doc = report.merge(args.out, machine, results)
    json_path, md_path = report.write(args.out, doc)
    text = report.render({"machine": machine, "generated": doc["generated"], **results})
    print(text.split("\n## ", 1)[0].rstrip())   # the summary table; the details are in results.md
    print(f"wrote {json_path} and {md_path}")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
