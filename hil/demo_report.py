"""What the site demo observed, the checks that decide its exit status, and its report.

`SiteWatch` is fed while the demo runs: every 100 ms the physical currents (what each
column's meter measures: the simulated car) and each pilot's offer, and every MQTT
message the control room receives (telemetry, status, events, the DNO acknowledgement).
At the end it judges (ids as in hil.replay.oracles):

- `limit.site`: the measured current on each site phase within the effective site limit
  (the connection capacity, and the DNO limit from its acknowledgement until its expiry):
  every excursion above it must end within the allowed response time `RESPONSE_S`;
- `limit.circuit/<id>`: the same for each circuit (feeder) rating of the site file;
- `limit.offer/<column>`: the pilot's offer within the column's assignment as the
  gateway reports it (`applied_limit_a` of its telemetry; the failsafe when there is
  none) at every report made while that offer lasted; an offer shorter than a telemetry
  period cannot be checked this way and is counted as unverified;
- `dno.ack`: the curtailment was acknowledged as accepted with the limit applied;
- `dno.reported`: the site telemetry showed the DNO limit while it was valid and the
  connection capacity again after it expired;
- `columns.online`: every column's telemetry reached the control room (a run stopped in
  its first seconds: the gateway reported it online).

`write_demo_report` writes the HIL report (hil.replay.report: summary.json, junit.xml,
site.png and column-<id>.png with offered vs measured current vs DNO limit).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.core.site import SITE_NODE, Site
from gateway.north import topics
from hil.replay.oracles import OracleResult
from hil.replay.report import ColumnPlot, PlotData, write_report
from hil.rig.dno_client import Received

RESPONSE_S = 12.0        # the car's 10 s (STANDARDS.md) + the gateway's step, the bus and the pilot
OFFER_SETTLE_S = 0.5     # an offer's first reports may predate the gateway's record of it
OFFER_END_S = 0.3        # ... and its last ones follow the next assignment (board read every 0.1 s)
REPORTED_WITHIN_S = 6.0  # the site telemetry shows a new limit within this
TOLERANCE_A = 0.2
EARLY_S = 5.0           # a run stopped before this is not expected to have telemetry yet


class Excursions:
    """A measured value against a limit that changes: every spell above limit + tolerance
    must end within `response_ms` (a reduction, or a new car while others still draw)."""

    def __init__(self, response_ms: int, tolerance: float) -> None:
        self.response_ms = response_ms
        self.tolerance = tolerance
        self.limit = math.inf
        self.lowest_limit = math.inf
        self._since: int | None = None
        self._flagged = False
        self._last_t: int | None = None
        self._last_over = 0.0
        self.count = 0               # spells above the limit
        self.violations = 0          # ... that lasted longer than the response time
        self.first_violation_ms: int | None = None
        self.longest_ms = 0
        self.worst_excess = 0.0
        self.overshoot_as = 0.0
        self.max_measured = 0.0
        self.samples = 0

    def set_limit(self, value: float | None) -> None:
        self.limit = math.inf if value is None else float(value)
        self.lowest_limit = min(self.lowest_limit, self.limit)

    def observe(self, t_ms: int, measured: float) -> None:
        if self._last_t is not None and self._last_over > 0:
            self.overshoot_as += self._last_over * (t_ms - self._last_t) / 1000.0
        over = measured - self.limit
        self._last_t, self._last_over = t_ms, max(over, 0.0)
        self.samples += 1
        self.max_measured = max(self.max_measured, measured)
        self.worst_excess = max(self.worst_excess, over)
        if over <= self.tolerance:
            self._since = None
            return
        if self._since is None:
            self._since = t_ms
            self._flagged = False
            self.count += 1
        spell = t_ms - self._since
        self.longest_ms = max(self.longest_ms, spell)
        if spell > self.response_ms and not self._flagged:
            self._flagged = True          # one violation per spell
            self.violations += 1
            if self.first_violation_ms is None:
                self.first_violation_ms = t_ms

    @property
    def passed(self) -> bool:
        return self.violations == 0

    def figure(self) -> dict[str, Any]:
        return {"violations": self.violations, "excursions": self.count,
                "longest_excursion_s": round(self.longest_ms / 1000.0, 2),
                "worst_excess_a": round(self.worst_excess, 2), "overshoot_as": round(self.overshoot_as, 2),
                "max_measured_a": round(self.max_measured, 2),
                "lowest_limit_a": None if math.isinf(self.lowest_limit) else round(self.lowest_limit, 2),
                "response_s": self.response_ms / 1000.0, "samples": self.samples}


@dataclass
class ColumnSeen:
    """The latest of one column as the control room and the board line see it."""

    telemetry: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)
    telemetry_count: int = 0
    reports: list[tuple[int, float]] = field(default_factory=list)   # (t_ms, limit in force)
    offers: list[tuple[int, float]] = field(default_factory=list)    # (t_ms, pilot offer) at each change
    max_offered_a: float = 0.0


@dataclass
class DnoCurtailment:
    limit_a: float
    validity_s: float
    sent_ms: int = 0
    until_ms: int = 0
    command_id: str = ""
    ack: dict[str, Any] | None = None
    ack_ms: int | None = None
    reported_ms: int | None = None       # site telemetry first showed source dno at this limit
    restored_ms: int | None = None       # ... and the connection capacity again after expiry


class SiteWatch:
    def __init__(self, site: Site, column_info: Mapping[str, Mapping[str, Any]], *, t0_utc_ms: int,
                 failsafe_a: Mapping[str, float]) -> None:
        self.site = site
        self.site_id = site.id
        self.info = dict(column_info)
        self.t0_utc_ms = t0_utc_ms
        self.failsafe_a = dict(failsafe_a)
        self.capacity = tuple(site.capacity_a)
        response = int(RESPONSE_S * 1000)
        self.site_phases = [Excursions(response, TOLERANCE_A) for _ in range(3)]
        for phase, watch in enumerate(self.site_phases):
            watch.set_limit(self.capacity[phase])
        self.circuits = {cid: [Excursions(response, TOLERANCE_A) for _ in range(3)] for cid in site.circuits}
        for cid, watches in self.circuits.items():
            for phase, watch in enumerate(watches):
                watch.set_limit(site.circuits[cid].rating_a[phase])
        self.paths = {col.id: site.node_path(col.circuit) for col in site.columns}
        self.rotation = {col.id: col.rotation for col in site.columns}
        self.columns = {col.id: ColumnSeen() for col in site.columns}
        self.site_telemetry: dict[str, Any] = {}
        self.site_telemetry_count = 0
        self.gateway_state: dict[str, Any] = {}
        self.dno: DnoCurtailment | None = None
        self.plots = PlotData()
        for col in site.columns:
            self.plots.columns[col.id] = ColumnPlot()
        self.samples = 0
        self.last_ms = 0
        self._energy: dict[str, float] = {}

    # -- time ------------------------------------------------------------------------------
    def t_of(self, utc_ms: int) -> int:
        return int(utc_ms) - self.t0_utc_ms

    def site_limit(self, t_ms: int) -> tuple[tuple[float, float, float], str]:
        """The effective site limit per phase and its source, as the demo set it up."""
        dno = self.dno
        if dno is not None and dno.ack_ms is not None and dno.ack is not None \
                and dno.ack.get("result") == "accepted" and t_ms < dno.until_ms:
            applied = float(dno.ack.get("applied_limit_a") or dno.limit_a)
            lim = tuple(min(c, applied) for c in self.capacity)
            return (lim[0], lim[1], lim[2]), "dno"
        return (self.capacity[0], self.capacity[1], self.capacity[2]), "connection"

    # -- samples -----------------------------------------------------------------------------
    def sample(self, t_ms: int, currents: Mapping[str, Sequence[float]], offers: Mapping[str, float],
               energy_wh: Mapping[str, float]) -> None:
        """One look at every column: its meter's phase currents (column phases), its offer."""
        self.samples += 1
        self.last_ms = t_ms
        limit, _source = self.site_limit(t_ms)
        site = [0.0, 0.0, 0.0]
        offered = [0.0, 0.0, 0.0]
        nodes: dict[str, list[float]] = {cid: [0.0, 0.0, 0.0] for cid in self.circuits}
        for cid, amps in currents.items():
            rot = self.rotation[cid]
            for i, site_phase in enumerate(rot):
                a = amps[i] if i < len(amps) else 0.0
                site[site_phase] += a
                offered[site_phase] += offers.get(cid, 0.0)
                for node in self.paths[cid]:
                    if node != SITE_NODE:
                        nodes[node][site_phase] += a
            offer = offers.get(cid, 0.0)
            seen = self.columns[cid]
            if not seen.offers or seen.offers[-1][1] != offer:
                seen.offers.append((t_ms, offer))
            seen.max_offered_a = max(seen.max_offered_a, offer)
            plot = self.plots.columns[cid]
            plot.offer.add(t_ms, offer)
            plot.current.add(t_ms, max(amps) if amps else 0.0)
        self._energy = dict(energy_wh)
        for phase in range(3):
            self.site_phases[phase].set_limit(limit[phase])
            self.site_phases[phase].observe(t_ms, site[phase])
            self.plots.site.phases[phase].add(t_ms, site[phase])
        for node, amps in nodes.items():
            for phase in range(3):
                self.circuits[node][phase].observe(t_ms, amps[phase])
        self.plots.site.limit.add(t_ms, min(limit))
        self.plots.site.offered.add(t_ms, max(offered))
        dno = self.dno
        valid = dno is not None and dno.ack_ms is not None and t_ms < dno.until_ms
        self.plots.site.dno.add(t_ms, dno.limit_a if valid and dno is not None else None)

    # -- messages --------------------------------------------------------------------------
    def message(self, msg: Received) -> str | None:
        """Take one MQTT message; returns a line for the event log when it is worth one."""
        body = msg.payload
        t = self.t_of(body["ts_ms"]) if isinstance(body.get("ts_ms"), int) else self.last_ms
        if self.dno is not None and body.get("id") == self.dno.command_id and "result" in body:
            return self._ack(t, body)
        site = self.site_id
        if msg.topic == topics.site_telemetry(site):
            self._site_telemetry(t, body)
        elif msg.topic == topics.site_events(site):
            return self._event(t, None, body)
        elif msg.topic == topics.gateway_state(site):
            self.gateway_state = body
            return "gateway %s" % body.get("state", "?")
        else:
            for cid, seen in self.columns.items():
                if msg.topic == topics.column_telemetry(site, cid):
                    self._column_telemetry(t, cid, seen, body)
                elif msg.topic == topics.column_status(site, cid):
                    seen.status = body
                elif msg.topic == topics.column_events(site, cid):
                    return self._event(t, cid, body)
        return None

    def _ack(self, t: int, body: dict[str, Any]) -> str:
        dno = self.dno
        assert dno is not None
        if dno.ack is None:
            dno.ack, dno.ack_ms = body, t
        applied = body.get("applied_limit_a")
        return "DNO: command %s %s%s" % (body.get("id"), body.get("result"),
                                          " (applied %s A)" % _num(applied) if applied is not None
                                          else " (%s)" % body.get("reason"))

    def _site_telemetry(self, t: int, body: dict[str, Any]) -> None:
        self.site_telemetry = body
        self.site_telemetry_count += 1
        dno = self.dno
        if dno is None or dno.ack_ms is None:
            return
        if dno.reported_ms is None and body.get("limit_source") == "dno" \
                and abs(float(body.get("limit_a", -1)) - dno.limit_a) < 0.05:
            dno.reported_ms = t
        if dno.restored_ms is None and t >= dno.until_ms and body.get("limit_source") == "connection":
            dno.restored_ms = t

    def _column_telemetry(self, t: int, cid: str, seen: ColumnSeen, body: dict[str, Any]) -> None:
        seen.telemetry = body
        seen.telemetry_count += 1
        applied = body.get("applied_limit_a")
        limit = float(applied) if isinstance(applied, int | float) else self._failsafe(cid)
        seen.reports.append((t, limit))
        self.plots.columns[cid].limit.add(t, limit)

    def _failsafe(self, cid: str) -> float:
        return max(self.failsafe_a.get(cid, 0.0), float(self.info[cid].get("failsafe_a", 0.0)))

    def _event(self, t: int, cid: str | None, body: dict[str, Any]) -> str:
        name = str(body.get("event", "?"))
        details = []
        for key in ("reason", "error", "limit_a", "limit_source", "energy_wh", "meter_stop_wh"):
            if key in body:
                value = body[key]
                details.append("%s %s" % (key, _num(value) if isinstance(value, int | float) else value))
        text = (cid or "site") + " " + name + (" (" + ", ".join(details) + ")" if details else "")
        return text

    # -- verdicts ------------------------------------------------------------------------------
    def results(self, ended_ms: int) -> list[OracleResult]:
        out = [self._site_result()]
        for node, watches in self.circuits.items():
            out.append(_phases_result("limit.circuit/" + node, "circuit %s within its rating" % node,
                                      watches))
        for cid in self.columns:
            out.append(self._offer_result(cid))
        out += self._dno_results(ended_ms)
        # A run stopped in its first seconds may end before the first telemetry round: the
        # gateway's retained "online" status then stands for it.
        early = ended_ms < EARLY_S * 1000
        missing = sorted(cid for cid, seen in self.columns.items() if seen.telemetry_count == 0
                         and not (early and seen.status.get("online")))
        out.append(OracleResult(
            "columns.online", "every column's telemetry reached the control room", not missing,
            {"columns": len(self.columns), "silent": missing,
             "telemetry_messages": {cid: s.telemetry_count for cid, s in self.columns.items()}},
            "all %d columns reported" % len(self.columns) if not missing else "no telemetry from %s"
            % ", ".join(missing)))
        return out

    def _site_result(self) -> OracleResult:
        return _phases_result("limit.site", "site current within the effective site limit (capacity, DNO)",
                              self.site_phases)

    def _offer_result(self, cid: str) -> OracleResult:
        """Each spell of one pilot offer against the assignments the telemetry reported while
        it lasted (from OFFER_SETTLE_S after it began to OFFER_END_S before it ended: the
        gateway records an assignment when the column confirms it, and the board line is
        read every 100 ms). A spell no report fell into (shorter than a telemetry period)
        cannot be checked and is counted as unverified."""
        seen = self.columns[cid]
        reports = seen.reports
        changes = [*seen.offers, (self.last_ms, math.nan)]
        settle, end_margin = int(OFFER_SETTLE_S * 1000), int(OFFER_END_S * 1000)
        spells = verified = unverified = bad = 0
        worst = 0.0
        examples: list[dict[str, Any]] = []
        lo = 0
        for (a, offer), (b, _next) in itertools.pairwise(changes):
            if not offer > 0:
                continue
            spells += 1
            while lo < len(reports) and reports[lo][0] < a + settle:
                lo += 1
            inside = [v for tr, v in reports[lo:] if tr <= b - end_margin]
            if not inside:
                unverified += 1
                continue
            below = [v for v in inside if v < offer - 0.05]
            if not below:
                verified += 1
                continue
            bad += 1
            worst = max(worst, offer - min(below))
            if len(examples) < 5:
                examples.append({"from_s": a / 1000.0, "to_s": b / 1000.0, "offer_a": offer,
                                 "reported_a": inside})
        fig = {"offer_spells": spells, "verified": verified, "unverified_short": unverified,
               "violations": bad,
               "worst_excess_a": round(worst, 2), "max_offered_a": seen.max_offered_a,
               "limit_reports": len(reports), "examples": examples}
        if bad:
            first = examples[0]
            msg = "%d offer(s) above the reported assignment, worst %.1f A over, first %.1f A at %.1f s" % (
                bad, worst, first["offer_a"], first["from_s"])
        else:
            msg = "%d offers within the assignment (%d too short to check), max %.1f A" % (
                verified, unverified, seen.max_offered_a)
        return OracleResult("limit.offer/" + cid, "pilot offer within the gateway's assignment", not bad, fig,
                            msg, column=cid)

    def _dno_results(self, ended_ms: int) -> list[OracleResult]:
        dno = self.dno
        title_ack = "the DNO curtailment acknowledged"
        title_shown = "the site telemetry shows the DNO limit and its expiry"
        if dno is None:
            note = "not judged: the run ended before the curtailment was sent"
            return [OracleResult("dno.ack", title_ack, True, {}, note),
                    OracleResult("dno.reported", title_shown, True, {}, note)]
        within = int(REPORTED_WITHIN_S * 1000)
        ack = dno.ack or {}
        applied = ack.get("applied_limit_a")
        accepted = ack.get("result") == "accepted" and isinstance(applied, int | float) \
            and abs(applied - dno.limit_a) < 0.05
        fig = {"limit_a": dno.limit_a, "validity_s": dno.validity_s, "sent_s": dno.sent_ms / 1000.0,
               "ack_s": _s(dno.ack_ms), "ack": ack or None}
        if accepted:
            msg = "accepted, applied %s A, %.2f s after sending" % (_num(applied),
                                                                   ((dno.ack_ms or 0) - dno.sent_ms) / 1000.0)
        elif dno.ack is None and ended_ms < dno.sent_ms + within:
            accepted, msg = True, "not judged: the run ended before an acknowledgement was due"
        else:
            msg = "not accepted: %s" % (ack or "no acknowledgement")
        out = [OracleResult("dno.ack", title_ack, accepted, fig, msg)]
        acked = dno.ack_ms if dno.ack_ms is not None else dno.sent_ms
        shown = dno.reported_ms is not None and dno.reported_ms - acked <= within
        restored = dno.restored_ms is not None and dno.restored_ms - dno.until_ms <= within
        judge_shown = ended_ms >= acked + within
        judge_restored = ended_ms >= dno.until_ms + within
        ok = (shown or not judge_shown) and (restored or not judge_restored)
        fig = {"reported_s": _s(dno.reported_ms), "expires_s": dno.until_ms / 1000.0,
               "restored_s": _s(dno.restored_ms), "within_s": REPORTED_WITHIN_S,
               "judged": {"shown": judge_shown, "restored": judge_restored}}
        parts = []
        if dno.reported_ms is not None:
            parts.append("DNO limit shown %.1f s after the ack" % ((dno.reported_ms - acked) / 1000.0))
        else:
            parts.append("DNO limit never shown" if judge_shown else "DNO limit not judged (run ended first)")
        if dno.restored_ms is not None:
            late = (dno.restored_ms - dno.until_ms) / 1000.0
            parts.append("capacity shown again %.1f s after expiry" % late)
        elif judge_restored:
            parts.append("capacity never shown again")
        else:
            parts.append("expiry not judged (run ended first)")
        out.append(OracleResult("dno.reported", title_shown, ok, fig, "; ".join(parts)))
        return out

    # -- figures for the summary ---------------------------------------------------------------
    def column_figures(self) -> dict[str, dict[str, Any]]:
        out = {}
        for cid, seen in self.columns.items():
            tele = seen.telemetry
            out[cid] = {**self.info[cid], "energy_wh": round(self._energy.get(cid, 0.0), 1),
                        "energy_wh_reported": tele.get("energy_wh"), "max_offered_a": seen.max_offered_a,
                        "telemetry_messages": seen.telemetry_count, "last_status": tele.get("status")}
        return out


def _phases_result(oid: str, title: str, watches: Sequence[Excursions]) -> OracleResult:
    figs = {"L%d" % (i + 1): w.figure() for i, w in enumerate(watches)}
    passed = all(w.passed for w in watches)
    worst = max(watches, key=lambda w: (w.violations, w.longest_ms))
    if passed:
        msg = "kept: %d excursion(s) above the limit, longest %.1f s (allowed %.0f s), overshoot %.1f A·s" % (
            sum(w.count for w in watches), max(w.longest_ms for w in watches) / 1000.0, RESPONSE_S,
            sum(w.overshoot_as for w in watches))
    else:
        msg = "%d excursion(s) longer than %.0f s, first at %.1f s, longest %.1f s, worst %.1f A over" % (
            sum(w.violations for w in watches), RESPONSE_S, (worst.first_violation_ms or 0) / 1000.0,
            worst.longest_ms / 1000.0, worst.worst_excess)
    return OracleResult(oid, title, passed, figs, msg)


def _s(t_ms: int | None) -> float | None:
    return None if t_ms is None else t_ms / 1000.0


def _num(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class RunFacts:
    """What the summary and the report say about the run itself."""

    site_id: str
    broker: str
    embedded_broker: bool
    ran_s: float
    seed: int
    interrupted: str                    # the signal's name, "" when the run went to its end
    gateway_exit: int | None
    columns: list[tuple[str, str, str]]  # (id, link, interpreter)
    visits: list[str]

    def links(self) -> str:
        counts: dict[tuple[str, str], int] = {}
        for _cid, link, interp in self.columns:
            counts[(link, interp)] = counts.get((link, interp), 0) + 1
        return ", ".join("%d %s/%s" % (n, link, interp) for (link, interp), n in counts.items())


def process_result(failures: Sequence[str], gateway_exit: int | None) -> OracleResult:
    """The processes check: nothing died while the site ran; the gateway stopped cleanly."""
    ok = not failures and gateway_exit == 0
    if failures:
        msg = "; ".join(f.splitlines()[0] for f in failures)
    else:
        msg = "the gateway stopped cleanly" if gateway_exit == 0 else "gateway exit code %s" % gateway_exit
    title = "the gateway and every column ran throughout; the gateway stopped cleanly"
    fig = {"failures": list(failures), "gateway_exit": gateway_exit}
    return OracleResult("processes", title, ok, fig, msg)


def write_demo_report(folder: Path, *, watch: SiteWatch, results: list[OracleResult], facts: RunFacts,
                      wall_s: float, iterations: int) -> list[Path]:
    """The HIL report of the demo run: summary.json, junit.xml and the PNG plots."""
    from hil.replay.engine import RunResult

    duration_ms = max(watch.last_ms, 1)
    watch.plots.close(duration_ms)
    dno = watch.dno
    gateway = {"site_id": facts.site_id, "broker": facts.broker, "embedded_broker": facts.embedded_broker,
               "exit_code": facts.gateway_exit, "site_telemetry_messages": watch.site_telemetry_count,
               "dno": None if dno is None else {
                   "limit_a": dno.limit_a, "validity_s": dno.validity_s, "sent_s": dno.sent_ms / 1000.0,
                   "expires_s": dno.until_ms / 1000.0, "ack": dno.ack,
                   "reported_s": None if dno.reported_ms is None else dno.reported_ms / 1000.0,
                   "restored_s": None if dno.restored_ms is None else dno.restored_ms / 1000.0}}
    notes = ["interrupted at %.1f s (%s)" % (facts.ran_s, facts.interrupted)] if facts.interrupted else []
    notes.append("car visits: " + "; ".join(facts.visits))
    result = RunResult(trace="python -m hil demo", source="live site on this machine", target="site demo",
                       scenario="site-demo", results=results,
                       description="site demo: %d columns (%s), seed %d" % (len(facts.columns), facts.links(),
                                                                          facts.seed),
                       duration_ms=duration_ms, wall_s=wall_s, column_steps=iterations * len(watch.columns),
                       iterations=iterations, columns=watch.column_figures(), gateway=gateway,
                       target_stats={}, recorded={}, notes=notes, plots=watch.plots)
    return write_report(result, folder)


def summary_lines(watch: SiteWatch, results: Sequence[OracleResult], facts: RunFacts, folder: Path,
                  files: Sequence[str]) -> list[str]:
    """What the demo prints at the end."""
    lines = ["", "summary: the site ran %.0f s%s with %d columns (%s), seed %d" % (
        facts.ran_s, " (stopped early: %s)" % facts.interrupted if facts.interrupted else "",
        len(facts.columns), facts.links(), facts.seed)]
    dno = watch.dno
    if dno is None:
        lines.append("  DNO curtailment: not sent (the run ended first)")
    else:
        ack = dno.ack or {}
        applied = ack.get("applied_limit_a")
        lines.append("  DNO curtailment: %.0f A per phase sent at %.1f s, %s%s; valid until %.1f s%s" % (
            dno.limit_a, dno.sent_ms / 1000.0, ack.get("result", "no acknowledgement"),
            " (applied %s A)" % _num(applied) if applied is not None else "", dno.until_ms / 1000.0,
            ", the capacity back in the telemetry at %.1f s" % (dno.restored_ms / 1000.0)
            if dno.restored_ms is not None else ""))
    lines.append("  cars: %d visits; energy per column (its meter / its telemetry):" % len(facts.visits))
    for cid, fig in watch.column_figures().items():
        reported = fig["energy_wh_reported"]
        lines.append("    %-4s %-11s %-11s %6.0f Wh / %s Wh, max offered %4.1f A, %d telemetry messages" % (
            cid, fig["link"], fig["interp"], fig["energy_wh"], "-" if reported is None else "%.0f" % reported,
            fig["max_offered_a"], fig["telemetry_messages"]))
    lines.append("  checks: %d of %d passed" % (sum(1 for r in results if r.ok), len(results)))
    width = max(len(r.id) for r in results)
    for r in results:
        lines.append("    %-4s %-*s  %s" % ("ok" if r.ok else "FAIL", width, r.id, r.message))
    lines.append("  report: %s (%s)" % (folder, ", ".join(sorted(files))))
    ok = all(r.ok for r in results)
    lines.append("site kept every limit: %s" % ("yes" if ok else "NO (exit status 1)"))
    return lines
