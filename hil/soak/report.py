"""The soak's report: a table on stdout, summary.json and report.md in the report folder."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hil.replay.oracles import OracleResult
from hil.soak.run import Recording


def facts(rec: Recording, wall_s: float) -> dict[str, Any]:
    """The run itself: length, site, faults as they happened, traffic."""
    plan = rec.plan
    links: dict[str, int] = {}
    for s in plan.specs:
        key = "%s/%s" % (s.link, "mpy" if s.interp == "micropython" else "py")
        links[key] = links.get(key, 0) + 1
    faults = [
        {
            "kind": r.fault.kind,
            "n": r.fault.n,
            "target": r.fault.target,
            "planned_at_s": r.fault.at_s,
            "planned_s": r.fault.duration_s,
            "started_s": None if r.started_ms is None else r.started_ms / 1000.0,
            "ended_s": None if r.ended_ms is None else r.ended_ms / 1000.0,
            **r.detail,
        }
        for r in rec.faults
    ]
    counts: dict[str, int] = {}
    for r in rec.faults:
        if r.started_ms is not None:
            counts[r.fault.kind] = counts.get(r.fault.kind, 0) + 1
    return {
        "duration_s": plan.duration_s,
        "ran_s": rec.ended_ms / 1000.0,
        "wall_s": round(wall_s, 1),
        "seed": plan.seed,
        "columns": len(plan.specs),
        "links": links,
        "stopped_early": rec.stopped_early or None,
        "faults_done": counts,
        "faults": faults,
        "messages_received": len(rec.messages),
        "dno_commands_sent": len(rec.commands),
        "samples": len(rec.sample_times),
    }


def table(results: Sequence[OracleResult]) -> list[str]:
    width = max(len(r.id) for r in results)
    return ["  %-4s %-*s  %s" % ("ok" if r.ok else "FAIL", width, r.id, r.message) for r in results]


def summary_lines(
    rec: Recording, results: Sequence[OracleResult], info: dict[str, Any], folder: Path | None
) -> list[str]:
    ok = all(r.ok for r in results)
    done = info["faults_done"]
    lines = [
        "",
        "soak: %.0f s with %d columns (%s), seed %d%s"
        % (
            info["ran_s"],
            info["columns"],
            ", ".join("%d %s" % (n, k) for k, n in info["links"].items()),
            info["seed"],
            " (stopped early)" if info["stopped_early"] else "",
        ),
        "  faults: " + ", ".join("%d %s" % (n, k) for k, n in done.items()),
        "  traffic: %d MQTT messages received, %d DNO commands sent"
        % (info["messages_received"], info["dno_commands_sent"]),
        "  checks: %d of %d passed" % (sum(1 for r in results if r.ok), len(results)),
        *table(results),
    ]
    if folder is not None:
        lines.append("  report: %s" % folder)
    lines.append("soak passed: %s" % ("yes" if ok else "NO (exit status 1)"))
    return lines


def write(folder: Path, rec: Recording, results: Sequence[OracleResult], info: dict[str, Any]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    summary = {"ok": all(r.ok for r in results), "run": info, "checks": [r.as_dict() for r in results]}
    out = folder / "summary.json"
    out.write_text(json.dumps(summary, indent=1, default=str) + "\n")
    md = folder / "report.md"
    rows = ["| check | result | figure |", "|---|---|---|"]
    rows += [
        "| `%s` | %s | %s |" % (r.id, "pass" if r.ok else "**FAIL**", r.message.replace("|", "/"))
        for r in results
    ]
    faults = ["| kind | # | target | at s | lasted s |", "|---|---:|---|---:|---:|"]
    for f in info["faults"]:
        lasted = (
            "" if f["started_s"] is None or f["ended_s"] is None else "%.1f" % (f["ended_s"] - f["started_s"])
        )
        faults.append(
            "| %s | %d | %s | %s | %s |"
            % (
                f["kind"],
                f["n"],
                f["target"] or "",
                "" if f["started_s"] is None else "%.1f" % f["started_s"],
                lasted,
            )
        )
    md.write_text(
        "# Fault soak\n\n%s\n\n%s\n\n## Faults\n\n%s\n"
        % ("\n".join(summary_lines(rec, results, info, None)[1:4]), "\n".join(rows), "\n".join(faults))
    )
    return [out, md]
