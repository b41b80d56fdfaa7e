"""The in-repo HIL scenario suite, generated as traces (`python -m hil scenarios [-o DIR]`).

Each scenario is a small, deterministic trace whose header says what it is (meta
`scenario`, `description`, `duration_ms`, `seed`) and what must happen (meta `expect`:
checks expected to fail, e.g. a misbehaving car's `limit.car/<column>`, and errors the
firmware must report). `python -m hil suite` replays them all (hil.replay.cli).

Scenarios: dno-curtailment, dno-expiry, gateway-loss, broker-outage, car-ignores-reduction,
meter-failure, power-cut, bus-noise, ev-faults, site-24h-20col. The last one is 20 columns
for 24 h under a site limit with DNO curtailments, driven by the arrivals of the busiest
September 2021 day of the ACN-Data session list when ../shared/traces/acn-sessions is
there (read in place with hil.trace.sessions_import, never copied), otherwise by a seeded
synthetic arrival process; its meta `arrivals` says which.
"""

from __future__ import annotations

import argparse
import io
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hil.models.ev_profiles import traces_dir
from hil.trace.channels import declare, split_name
from hil.trace.format import (
    TraceError,
    TraceImportError,
    TraceReader,
    TraceWriter,
    atomic_output,
    make_header,
)

START_UTC_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z: scenarios carry no real date
ACN_FILE = "acn-sessions/acndata_sessions_0002_2021.json"
ACN_DAY = "2021-09-10"  # the busiest September 2021 day in that file (41 arrivals)
ACN_CITE = "ACN-Data (Caltech), site 0002; cite Lee, Li & Low, e-Energy 2019"
MIX = ("generic-3ph-11kw", "generic-1ph-7kw", "generic-3ph-22kw", "generic-1ph-3.7kw", "generic-3ph-11kw")

# Short scenarios: a quick gateway (5 s allocation period, 10 s refresh) and a short
# randomised increase delay, so that a few minutes show the whole story.
QUICK_GATEWAY = {"period_s": 5, "refresh_s": 10, "validity_s": 60}
QUICK_ALLOCATION = {"increase_delay_max_s": 10, "dno_restore_without_delay": True}


@dataclass
class Scenario:
    name: str
    description: str
    duration_ms: int
    layout: dict[str, Any]
    records: list[tuple[int, str, Any]] = field(default_factory=list)
    expect: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    realtime_ok: bool = True  # short enough to replay in real time on mpy / serial

    def add(self, t_s: float, channel: str, value: Any) -> Scenario:
        self.records.append((round(t_s * 1000), channel, value))
        return self


def _site(capacity_a: float, **extra: Any) -> dict[str, Any]:
    site = {"id": "scenario", "capacity_a": capacity_a, "allocation": dict(QUICK_ALLOCATION)}
    site.update(extra)
    return site


def _columns(n: int, phases: int = 3, rating_a: float = 32.0, **extra: Any) -> list[dict[str, Any]]:
    return [{"id": "c%d" % (i + 1), "phases": phases, "hardware_a": rating_a, **extra} for i in range(n)]


def _plug(profile: str = "generic-3ph-11kw", soc_pct: float = 30.0, **extra: Any) -> dict[str, Any]:
    return {"type": "plug", "profile": profile, "soc_pct": soc_pct, **extra}


def _dno(limit: float, validity_s: float, ident: str, unit: str = "A") -> dict[str, Any]:
    return {"limit_a" if unit == "A" else "limit_kw": float(limit), "validity_s": validity_s, "id": ident}


def _fault(kind: str, duration_s: float, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "duration_ms": round(duration_s * 1000), **extra}


def _layout(
    site: dict[str, Any], columns: list[dict[str, Any]], gateway: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {"site": site, "columns": columns, "gateway": dict(gateway or QUICK_GATEWAY)}


# ---- the scenarios ------------------------------------------------------------------------------


def dno_curtailment() -> Scenario:
    sc = Scenario(
        "dno-curtailment",
        "three cars charging; the DNO curtails the site to 24 A, then to 11 kW "
        "(one car paused); the limits expire",
        420_000,
        _layout(_site(63.0), _columns(3)),
    )
    for i in range(3):
        sc.add(1 + i, "c%d/ev.event" % (i + 1), _plug(soc_pct=30 + 5 * i))
    sc.add(120, "dno.limit", _dno(24, 120, "curtail-1"))
    sc.add(240, "dno.limit", _dno(11.0, 90, "curtail-2", unit="kW"))
    return sc


def dno_expiry() -> Scenario:
    sc = Scenario(
        "dno-expiry",
        "a DNO limit expires and the site returns to its capacity; a second one is "
        "withdrawn by the DNO (validity 0)",
        360_000,
        _layout(_site(40.0), _columns(2)),
    )
    sc.add(1, "c1/ev.event", _plug()).add(2, "c2/ev.event", _plug(soc_pct=40))
    sc.add(60, "dno.limit", _dno(12, 90, "d1"))
    sc.add(200, "dno.limit", _dno(20, 600, "d2"))
    sc.add(260, "dno.limit", _dno(0, 0, "d2"))
    return sc


def gateway_loss() -> Scenario:
    sc = Scenario(
        "gateway-loss",
        "the gateway goes silent for 150 s: every column falls to its pre-assigned "
        "failsafe within its 60 s heartbeat timeout, then returns to its allocation",
        300_000,
        _layout(_site(48.0, dno_failsafe_a=24.0), _columns(3)),
    )
    for i in range(3):
        sc.add(1 + i, "c%d/ev.event" % (i + 1), _plug())
    sc.add(60, "link.fault", _fault("silent", 150))
    return sc


def broker_outage() -> Scenario:
    sc = Scenario(
        "broker-outage",
        "the DNO's broker link is down while its limit expires: the site falls to "
        "its DNO failsafe (20 A), not to its capacity, until the link is back",
        420_000,
        _layout(_site(40.0, dno_failsafe_a=20.0), _columns(2)),
    )
    sc.add(1, "c1/ev.event", _plug()).add(2, "c2/ev.event", _plug(soc_pct=40))
    sc.add(30, "dno.limit", _dno(30, 120, "d1"))
    sc.add(60, "link.fault", _fault("silent", 240, link="dno"))
    return sc


def car_ignores_reduction() -> Scenario:
    sc = Scenario(
        "car-ignores-reduction",
        "the car on c1 ignores a reduction: the harness sees it break its "
        "limit and the site's, while the firmware's offer keeps the limit and the firmware suspends "
        "the car for overdraw (OverCurrentFailure) and opens the contactor",
        240_000,
        _layout(_site(32.0), _columns(2)),
    )
    sc.add(1, "c1/ev.event", _plug()).add(2, "c2/ev.event", _plug(soc_pct=40))
    sc.add(60, "c1/ev.event", {"type": "misbehave", "what": "ignore_reduction"})
    sc.add(90, "dno.limit", _dno(16, 600, "d1"))
    sc.add(150, "c1/ev.event", {"type": "unplug"})
    sc.add(160, "c1/ev.event", _plug(soc_pct=50))
    sc.expect = {"fail": ["limit.car/c1", "limit.site"], "errors": {"c1": ["OverCurrentFailure"]}}
    return sc


def meter_failure() -> Scenario:
    sc = Scenario(
        "meter-failure",
        "the column's meter stops answering for 60 s: the firmware pauses "
        "(PowerMeterFailure), keeps the energy register right, and resumes after its minimum pause",
        480_000,
        _layout(_site(32.0), _columns(1, phases=1)),
    )
    sc.add(1, "c1/ev.event", _plug("generic-1ph-7kw"))
    sc.add(60, "c1/link.fault", _fault("silent", 60, link="meter"))
    sc.expect = {"errors": {"c1": ["PowerMeterFailure"]}}
    return sc


def power_cut() -> Scenario:
    sc = Scenario(
        "power-cut",
        "two of three columns lose power mid-session (20 s and 60 s); they boot, "
        "close the cut session, start a new one at their failsafe and rejoin the allocation",
        300_000,
        _layout(_site(63.0), _columns(3)),
    )
    for i in range(3):
        sc.add(1 + i, "c%d/ev.event" % (i + 1), _plug())
    sc.add(90, "c1/power.cut", {"duration_ms": 20_000})
    sc.add(95, "c2/power.cut", {"duration_ms": 60_000})
    return sc


def bus_noise() -> Scenario:
    gateway = dict(QUICK_GATEWAY, retry_s=0.5)
    sc = Scenario(
        "bus-noise",
        "corrupted, dropped and delayed frames on the columns' links during a DNO "
        "curtailment: the gateway retries and every limit is kept",
        300_000,
        _layout(_site(48.0), _columns(3), gateway),
    )
    for i in range(3):
        sc.add(1 + i, "c%d/ev.event" % (i + 1), _plug())
    sc.add(60, "c1/link.fault", _fault("corrupt", 120, rate=0.3))
    sc.add(60, "c2/link.fault", _fault("drop", 120, rate=0.5))
    sc.add(60, "c3/link.fault", _fault("delay", 120, delay_ms=800))
    sc.add(90, "dno.limit", _dno(24, 600, "d1"))
    sc.add(150, "dno.limit", _dno(0, 0, "d1"))
    return sc


def ev_faults() -> Scenario:
    sc = Scenario(
        "ev-faults",
        "a car that draws in state B (contactor must open within 100 ms), a car "
        "without its diode (never closed: EVDiodeMissing), a pilot short (state E: open within 3 s)",
        200_000,
        _layout(_site(63.0), _columns(3)),
    )
    sc.add(1, "c1/ev.event", _plug())
    sc.add(2, "c2/ev.event", _plug(misbehave=["diode_missing"]))
    sc.add(3, "c3/ev.event", _plug())
    sc.add(60, "c1/ev.event", {"type": "misbehave", "what": "draw_in_b"})
    sc.add(100, "c3/ev.state", "E")
    sc.add(130, "c3/ev.state", "B")
    sc.expect = {"errors": {"c2": ["EVDiodeMissing"], "c3": ["CPShort"]}}
    return sc


# ---- 20 columns, 24 h --------------------------------------------------------------------------


def _acn_events(path: Path, n_columns: int) -> tuple[list[tuple[int, str, dict[str, Any]]], list[str], str]:
    from hil.trace.sessions_import import import_acn_sessions

    buf = io.BytesIO()
    import_acn_sessions(path, buf, start=ACN_DAY, end="2021-09-11", max_columns=n_columns)
    buf.seek(0)
    with TraceReader(buf) as reader:
        ids = [c["id"] for c in reader.header["layout"]["columns"]]
        events = [(r.t_ms, str(split_name(r.channel)[0]), dict(r.value)) for r in reader]
    return (
        events,
        ids,
        "acn-sessions: %s, %s (local, America/Los_Angeles), %d sessions; %s"
        % (path.name, ACN_DAY, sum(1 for e in events if e[2]["type"] == "plug"), ACN_CITE),
    )


def _synthetic_events(
    rng: random.Random, n_columns: int, seed: int
) -> tuple[list[tuple[int, str, dict[str, Any]]], list[str], str]:
    ids = ["c%02d" % (i + 1) for i in range(n_columns)]
    peaks = ((8.5, 1.0, 0.5), (13.0, 1.5, 0.25), (18.5, 1.5, 0.25))  # hour, spread, share
    events = []
    for cid in ids:
        free = 0.0
        for _ in range(rng.choice((1, 2, 2, 3))):
            hour, spread, _share = rng.choices(peaks, weights=[p[2] for p in peaks])[0]
            arrive = max(free + 0.25, rng.gauss(hour, spread))
            stay = max(0.33, rng.lognormvariate(1.2, 0.6))
            if arrive >= 23.5:
                break
            session = "%s-%d" % (cid, len(events))
            plug = {
                "type": "plug",
                "session": session,
                "energy_wh": round(rng.uniform(4000, 30000)),
                "stay_ms": round(stay * 3600_000),
            }
            events.append((round(arrive * 3600_000), cid, plug))
            events.append((round((arrive + stay) * 3600_000), cid, {"type": "unplug", "session": session}))
            free = arrive + stay
    events.sort(key=lambda e: (e[0], e[2]["type"] == "plug"))
    return events, ids, "synthetic: seeded arrival process (seed %d; peaks 08:30, 13:00, 18:30)" % seed


def site_24h(seed: int = 1, traces: Path | None = None) -> Scenario:
    n = 20
    day_ms = 24 * 3600_000
    rng = random.Random(seed)
    acn = (traces or traces_dir()) / ACN_FILE
    if acn.is_file():
        events, ids, arrivals = _acn_events(acn, n)
    else:
        events, ids, arrivals = _synthetic_events(rng, n, seed)
    while len(ids) < n:
        ids.append("spare%02d" % len(ids))
    rotations = ("L1L2L3", "L2L3L1", "L3L1L2")
    columns = [
        {"id": cid, "phases": 3, "hardware_a": 32.0, "rotation": rotations[i % 3]}
        for i, cid in enumerate(ids)
    ]
    site = {
        "id": "garage",
        "capacity_a": 80.0,
        "dno_failsafe_a": 60.0,
        "allocation": {"increase_delay_max_s": 600, "dno_restore_without_delay": True},
    }
    sc = Scenario(
        "site-24h-20col",
        "20 columns for 24 h under an 80 A site limit, with a morning DNO limit "
        "(60 A) and an evening curtailment (50 kW), driven by a day of session arrivals",
        day_ms,
        {"site": site, "columns": columns, "gateway": {"period_s": 10, "refresh_s": 15, "validity_s": 60}},
        meta={"arrivals": arrivals},
        realtime_ok=False,
    )
    for t_ms, cid, event in events:
        if t_ms >= day_ms:
            continue
        if event["type"] == "plug":  # a car from the mix, with a state of charge
            event = dict(event, profile=rng.choice(MIX), soc_pct=round(rng.uniform(15, 60)))  # noqa: PLW2901
        sc.records.append((t_ms, cid + "/ev.event", event))
    sc.add(8 * 3600, "dno.limit", _dno(60, 3600, "morning"))
    sc.add(17 * 3600, "dno.limit", _dno(50, 3 * 3600, "evening", unit="kW"))
    return sc


BUILDERS: dict[str, Callable[[], Scenario]] = {
    "dno-curtailment": dno_curtailment,
    "dno-expiry": dno_expiry,
    "gateway-loss": gateway_loss,
    "broker-outage": broker_outage,
    "car-ignores-reduction": car_ignores_reduction,
    "meter-failure": meter_failure,
    "power-cut": power_cut,
    "bus-noise": bus_noise,
    "ev-faults": ev_faults,
    "site-24h-20col": site_24h,
}


def write_trace(sc: Scenario, path: str | Path, *, seed: int = 1) -> Path:
    """Write one scenario as a trace file."""
    channels: dict[str, dict[str, Any]] = {}
    for _t, name, _v in sc.records:
        if name not in channels:
            column, base = split_name(name)
            channels.update([declare(base, column)])
    meta = {
        "scenario": sc.name,
        "description": sc.description,
        "duration_ms": sc.duration_ms,
        "seed": seed,
        "realtime_ok": sc.realtime_ok,
        "generator": "hil.scenarios",
    }
    if sc.expect:
        meta["expect"] = sc.expect
    meta.update(sc.meta)
    header = make_header("scenario:" + sc.name, START_UTC_MS, channels, layout=sc.layout, meta=meta)
    out = Path(path)
    records = sorted(sc.records, key=lambda r: r[0])  # stable: same-time records keep their order
    with atomic_output(out) as target, TraceWriter(target, header) as writer:
        for t_ms, name, value in records:
            writer.write(t_ms, name, value)
    return out


def write_scenarios(
    folder: str | Path, names: list[str] | None = None, *, seed: int = 1, traces: Path | None = None
) -> list[Path]:
    """Generate the suite (or the named scenarios) into `folder`; returns the trace paths."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [n for n in names or [] if n not in BUILDERS]
    if unknown:
        raise ValueError("unknown scenario %s (known: %s)" % (", ".join(unknown), ", ".join(BUILDERS)))
    paths = []
    for name in names or list(BUILDERS):
        sc = site_24h(seed, traces) if name == "site-24h-20col" else BUILDERS[name]()
        paths.append(write_trace(sc, out / (name + ".trace"), seed=seed))
    return paths


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "scenarios",
        help="generate the in-repo HIL scenario suite as traces",
        description="Write the scenario traces (%s) into DIR." % ", ".join(BUILDERS),
    )
    p.add_argument("-o", "--output", metavar="DIR", default="build/hil/scenarios", help="folder (created)")
    p.add_argument("--only", metavar="NAME", action="append", help="only this scenario (repeatable)")
    p.add_argument("--seed", type=int, default=1, help="seed of the random parts (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        paths = write_scenarios(args.output, args.only, seed=args.seed)
    except (ValueError, OSError, TraceError, TraceImportError) as exc:
        print("error: %s" % exc, file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0
