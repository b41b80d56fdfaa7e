"""The soak's verdicts: what a run (hil.soak.run.Recording) must show, each with a figure.

Ids and what passes (times as in docs/hil.md, hil.replay.oracles and hil.demo_report):

- `telemetry.seq`: after dropping duplicates by (site, seq) as docs/mqtt-api.md says,
  every seq the gateway ever committed (1 up to the outbox's next seq at the end) was
  received exactly once: none lost, none left queued, no seq with two different
  payloads, no drop reported. Lost means a committed seq that never arrived: a seq is
  committed with its message in one SQLite transaction, so what a SIGKILL interrupts
  before the commit never had a seq (a telemetry round not made is a gap in time, not in
  seq), and what was committed must arrive.
- `outbox.kills`: for each gateway SIGKILL, the messages still queued in the outbox
  file right after it (read from the file while no process held it) all arrived.
- `acks`: every command the gateway decided on (its audit log, all incarnations) was
  acknowledged with that decision, and no ack came for a command it did not decide on.
  Exempt: a decision whose gateway was SIGKILLed within ACK_WAIT_S + 1 s of it (the ack
  is queued only after the column writes, at most ACK_WAIT_S later); counted apart.
- `limit.site`, `limit.circuit`: the measured site (and each circuit's) current per
  phase, from the cars' currents through each column's phase rotation, within the
  connection capacity (circuit rating) and the DNO site limit in force (the latest
  accepted one until its validity ends: docs/mqtt-api.md, "a new limit replaces the
  previous one"); an excursion must end within RESPONSE_S (12 s: the car's 10 s, the
  gateway's step, the bus and the pilot). While the gateway is down (from a SIGKILL to
  its first telemetry after the restart, and after the final stop) the columns hold
  their failsafes, planned inside the DNO failsafe budget, so the DNO limit is relaxed
  to that budget there; the capacity and the ratings never are.
- `limit.column.dno`: the same for the cars of columns the DNO limited.
- `dno.reported`: the gateway's site telemetry never shows a site limit above the DNO
  limit in force once REPORTED_WITHIN_S has passed since it was accepted (a gateway
  that forgot an accepted limit, e.g. after a restart, fails this).
- `limit.offer`: each pilot offer within what its firmware holds (the assignment while
  it is in force, else the failsafe: the board's tap) within one control step
  (oracles' offer_response_ms) plus OS scheduling slack (FIRMWARE_SLACK_MS).
- `limit.reported`: each pilot offer within the assignment the gateway reports for that
  column (telemetry applied_limit_a; the failsafe when none): an excursion that begins with
  the report falling below what the column keeps offering (a write the column never got,
  e.g. a broadcast eaten by noise), or with the column falling back to a failsafe the
  gateway does not know of, must end within OFFER_REPORT_S (a report comes every telemetry
  interval and records a write once its answer is back, at most ACK_WAIT_S). One that
  begins with the column raising its offer under its gateway assignment is a write whose
  answer is late: counted, not judged (limit.offer checks the column against what it got).
- `failsafe.reached`: whenever the gateway was down longer than the heartbeat timeout
  + 1 s, every running column was at its failsafe (failsafe active, offer within the
  failsafe limit) within heartbeat timeout + oracles' failsafe_margin_ms.
- `failsafe.sum`: at every instant the failsafe limits the columns hold (what each would
  offer with the gateway gone) add up, per phase, to no more than the site capacity and
  each circuit's rating.
- `fault.<kind>`: each fault took effect (the gateway reconnected after each broker
  restart, restarted after each kill, saw killed and silent columns go and come back,
  the noise corrupted bytes, the failed meter paused its column), so that a soak that
  passes really went through its schedule.
- `processes`: nothing died unless killed, the gateway's final stop was clean, and the
  consumer never lost its session (else a gap could be ours, not the gateway's).

Sampling slack: the cars see the pilot through the run's loop (every STEP_S), so a late
loop delays a car's reaction by as much; the car-level checks add the longest loop gap
of the run beyond its step to RESPONSE_S (reported as `slack_s`). Measured spells start
and end at samples, so they never overstate a true excursion.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.core.site import SITE_NODE, Site
from gateway.north import topics
from gateway.service import ACK_WAIT_S
from hil.demo_report import REPORTED_WITHIN_S, RESPONSE_S, Excursions
from hil.replay.oracles import LimitWatch, OracleConfig, OracleResult
from hil.soak.judge_faults import FaultChecks
from hil.soak.plan import HEARTBEAT_TIMEOUT_S
from hil.soak.run import STEP_S, GatewayDown, Recording

ORACLES = OracleConfig()
TOLERANCE_A = 0.2  # as hil.demo_report: measurement and rounding
FIRMWARE_SLACK_MS = 900  # ~25 processes on 2 cores: a firmware process may wait this long to run
OFFER_REPORT_S = 1.0 + ACK_WAIT_S + 1.0  # telemetry interval + a write's answer + the gateway's scheduling
REPORT_COVERS_MS = 2000  # a column's report stands for its assignment this long (2 intervals)
GRID_MS = 100
ACK_EXEMPT_MS = int(ACK_WAIT_S * 1000) + 1000


def judge(rec: Recording) -> list[OracleResult]:
    j = _Judge(rec)
    return [
        j.telemetry(),
        j.kills(),
        j.acks(),
        *j.site_limits(),
        j.column_dno(),
        j.dno_reported(),
        j.offer(),
        j.reported(),
        j.failsafe_reached(),
        j.failsafe_sum(),
        *j.faults(),
        j.processes(),
    ]


@dataclass(frozen=True)
class _Timeline:
    """Piecewise-constant limits from accepted commands: (from, until, value), replace semantics."""

    spans: tuple[tuple[int, int, float], ...]

    def at(self, t_ms: int) -> float | None:
        i = bisect.bisect_right([s[0] for s in self.spans], t_ms) - 1
        if i < 0:
            return None
        _start, until, value = self.spans[i]
        return value if t_ms < until else None

    def changes(self) -> list[int]:
        return sorted({s[0] for s in self.spans} | {s[1] for s in self.spans})


class _Judge(FaultChecks):
    def __init__(self, rec: Recording) -> None:
        self.rec = rec
        self.site: Site = rec.site
        self.bodies = [(m, m.body()) for m in rec.messages]
        self.failsafe_a = {s.id: float((s.config or {}).get("failsafe_a", 0.0)) for s in rec.plan.specs}
        self.end_ms = max(rec.sample_times[-1] if rec.sample_times else 0, rec.ended_ms)
        gaps = [b - a for a, b in zip(rec.sample_times, rec.sample_times[1:], strict=False)]
        self.max_gap_ms = max(gaps, default=0)
        self.slack_ms = max(0, self.max_gap_ms - int(STEP_S * 1000))
        self.down = [(d.from_ms, self._ready(d), d) for d in rec.gateway_down]
        self.site_dno, self.column_dno_lines = self._dno_timelines()

    # -- helpers -------------------------------------------------------------------------------
    def t(self, ts_ms: Any) -> int | None:
        return self.rec.mono_of_utc(int(ts_ms)) if isinstance(ts_ms, int) else None

    def _ready(self, d: GatewayDown) -> int:
        """Until when the gateway counts as down: its first site telemetry after the restart."""
        if d.until_ms is None:
            return self.end_ms + 1
        topic = topics.site_telemetry(self.rec.site_id)
        firsts = [
            t
            for m, b in self.bodies
            if m.topic == topic and (t := self.t(b.get("ts_ms"))) is not None and t >= d.until_ms
        ]
        return min(firsts, default=self.end_ms + 1)

    def gateway_down_at(self, t_ms: int) -> bool:
        return any(a <= t_ms < b for a, b, _d in self.down)

    def _dno_timelines(self) -> tuple[_Timeline, dict[str, _Timeline]]:
        site_spans: list[tuple[int, int, float]] = []
        col_spans: dict[str, list[tuple[int, int, float]]] = {}
        for entry in self.rec.audit:
            if entry.get("decision") != "accepted" or entry.get("kind") not in ("site_limit", "column_limit"):
                continue
            t = self.t(entry.get("ts_ms"))
            until = self.t(entry.get("valid_until_ms"))
            value = entry.get("limit_a")
            if t is None or until is None or not isinstance(value, int | float):
                continue
            if entry["kind"] == "site_limit":
                spans = site_spans
            else:
                column = topics.parse(str(entry.get("topic"))).column_id or ""
                spans = col_spans.setdefault(column, [])
            if spans:  # a new limit replaces the previous one from the moment it is accepted
                a, b, v = spans[-1]
                spans[-1] = (a, min(b, t), v)
            spans.append((t, until, float(value)))
        return _Timeline(tuple(site_spans)), {c: _Timeline(tuple(s)) for c, s in col_spans.items()}

    def _seq_messages(self) -> list[tuple[int, dict[str, Any], str]]:
        return [(b["seq"], b, m.topic) for m, b in self.bodies if isinstance(b.get("seq"), int)]

    # -- telemetry -----------------------------------------------------------------------------
    def telemetry(self) -> OracleResult:
        rec = self.rec
        first: dict[int, str] = {}
        raw = conflicts = 0
        dropped_reports = 0
        for seq, body, topic in self._seq_messages():
            raw += 1
            canon = topic + json.dumps(body, sort_keys=True)
            held = first.setdefault(seq, canon)
            if held != canon:
                conflicts += 1
            if body.get("event") == "outbox_dropped":
                dropped_reports += 1
        expected = set(range(1, rec.outbox_next_seq))
        received = set(first)
        queued = set(rec.outbox_pending)
        lost = sorted(expected - received - queued)
        strange = sorted(received - expected)
        ok = not lost and not queued and not conflicts and not strange and not dropped_reports
        fig = {
            "committed": len(expected),
            "received_unique": len(received),
            "received_raw": raw,
            "duplicates": raw - len(received),
            "lost": len(lost),
            "lost_seqs": _ranges(lost)[:20],
            "queued_at_end": len(queued),
            "conflicting_payloads": conflicts,
            "unknown_seqs": _ranges(strange)[:20],
            "outbox_dropped_reports": dropped_reports,
            "consumer_sessions_lost": rec.observer_sessions_lost,
        }
        msg = (
            "%d seqs committed, %d received (%d raw, %d duplicates dropped): %d lost, %d left queued, "
            "%d conflicting"
            % (len(expected), len(received), raw, raw - len(received), len(lost), len(queued), conflicts)
        )
        return OracleResult(
            "telemetry.seq", "every committed seq received exactly once after dedup", ok, fig, msg
        )

    def kills(self) -> OracleResult:
        received = {seq for seq, _b, _t in self._seq_messages()}
        rows = []
        bad = 0
        for d in self.rec.gateway_down:
            if d.cause != "kill":
                continue
            missing = [s for s in d.outbox_pending if s not in received]
            bad += len(missing)
            rows.append(
                {
                    "at_s": d.from_ms / 1000.0,
                    "outbox_next_seq": d.outbox_next_seq,
                    "queued": len(d.outbox_pending),
                    "arrived": len(d.outbox_pending) - len(missing),
                    "missing": _ranges(missing)[:10],
                }
            )
        queued = sum(r["queued"] for r in rows)
        msg = "%d SIGKILLs, %d messages queued at the kills, %s" % (
            len(rows),
            queued,
            "all arrived" if not bad else "%d never arrived" % bad,
        )
        return OracleResult(
            "outbox.kills",
            "what the outbox held at each SIGKILL arrived",
            bool(rows) and not bad,
            {"kills": rows},
            msg if rows else "no SIGKILL happened",
        )

    # -- commands ------------------------------------------------------------------------------
    def acks(self) -> OracleResult:
        rec = self.rec
        ack_topic = topics.ack(rec.site_id)
        acks: dict[str, set[str]] = {}
        for m, b in self.bodies:
            if (m.topic == ack_topic or m.topic.startswith(ack_topic + "/")) and "result" in b:
                acks.setdefault(str(b.get("id")), set()).add(str(b.get("result")))
        kills = [d.from_ms for d in rec.gateway_down if d.cause == "kill"]
        decided = ok = exempt = 0
        missing: list[dict[str, Any]] = []
        reasons: dict[str, int] = {}
        ids = set()
        for entry in rec.audit:
            decided += 1
            cid = str(entry.get("id"))
            ids.add(cid)
            reasons[str(entry.get("reason"))] = reasons.get(str(entry.get("reason")), 0) + 1
            if entry.get("decision") in acks.get(cid, set()):
                ok += 1
                continue
            t = self.t(entry.get("ts_ms")) or 0
            if any(t <= k <= t + ACK_EXEMPT_MS for k in kills):
                exempt += 1
                continue
            missing.append({"id": cid, "at_s": t / 1000.0, "decision": entry.get("decision")})
        unexplained = sorted(set(acks) - ids)
        sent = len(rec.commands)
        accepted = sum(1 for e in rec.audit if e.get("decision") == "accepted")
        fig = {
            "sent": sent,
            "send_errors": sum(1 for c in rec.commands if c.error),
            "decided": decided,
            "accepted": accepted,
            "reasons": reasons,
            "acknowledged": ok,
            "lost_with_a_killed_gateway": exempt,
            "unacknowledged": missing[:20],
            "acks_without_a_decision": unexplained[:20],
            "never_reached_the_gateway": sent - decided,
        }
        passed = decided > 0 and not missing and not unexplained
        msg = (
            "%d commands sent, %d decided (%d accepted), %d acknowledged, %d lost with a killed gateway, "
            "%d unacknowledged, %d acks without a decision"
            % (sent, decided, accepted, ok, exempt, len(missing), len(unexplained))
        )
        return OracleResult("acks", "every command the gateway decided on was acknowledged", passed, fig, msg)

    # -- limits: the measured currents -------------------------------------------------------
    def _phase_loads(self) -> tuple[list[int], dict[str, list[list[float]]]]:
        """Per sample: site and circuit current per phase (node -> [phase][sample])."""
        rec, site = self.rec, self.site
        n = len(rec.sample_times)
        nodes: dict[str, list[list[float]]] = {SITE_NODE: [[0.0] * n for _ in range(3)]}
        for cid in site.circuits:
            nodes[cid] = [[0.0] * n for _ in range(3)]
        for col in site.columns:
            path = site.node_path(col.circuit)
            samples = rec.samples[col.id]
            for k in range(min(n, len(samples))):
                amps = samples[k][1:4]
                for i, phase in enumerate(col.rotation):
                    a = amps[i]
                    if a:
                        for node in path:
                            nodes[node][phase][k] += a
        return rec.sample_times, nodes

    def _watch(
        self, times: Sequence[int], values: Sequence[float], limit_at: Callable[[int], float]
    ) -> Excursions:
        w = Excursions(int(RESPONSE_S * 1000) + self.slack_ms, TOLERANCE_A)
        for t, v in zip(times, values, strict=False):
            w.set_limit(limit_at(t))
            w.observe(t, v)
        return w

    def site_limits(self) -> list[OracleResult]:
        times, nodes = self._phase_loads()
        site = self.site
        budget = _failsafe_budget(site)
        out = []
        watches = []
        for phase in range(3):
            cap = site.capacity_a[phase]

            def limit_at(t: int, cap: float = cap, phase: int = phase) -> float:
                dno = self.site_dno.at(t)
                if dno is None:
                    return cap
                if self.gateway_down_at(t):
                    dno = max(dno, budget[phase])
                return min(cap, dno)

            watches.append(self._watch(times, nodes[SITE_NODE][phase], limit_at))
        out.append(
            self._phases("limit.site", "site current within the capacity and the DNO limit in force", watches)
        )
        circuit_watches = {}
        for cid, circuit in site.circuits.items():
            circuit_watches[cid] = [
                self._watch(times, nodes[cid][p], lambda _t, r=circuit.rating_a[p]: r) for p in range(3)
            ]
        bad = {c: w for c, w in circuit_watches.items() if not all(x.passed for x in w)}
        figs = {c: {"L%d" % (p + 1): w[p].figure() for p in range(3)} for c, w in circuit_watches.items()}
        longest = max((x.longest_ms for w in circuit_watches.values() for x in w), default=0)
        msg = (
            "%d circuits kept their ratings; longest excursion %.1f s (allowed %.1f s)"
            % (len(circuit_watches), longest / 1000.0, RESPONSE_S + self.slack_ms / 1000.0)
            if not bad
            else "over their rating for longer than the response time: " + ", ".join(sorted(bad))
        )
        out.append(OracleResult("limit.circuit", "each circuit within its rating", not bad, figs, msg))
        return out

    def _phases(self, oid: str, title: str, watches: Sequence[Excursions]) -> OracleResult:
        figs: dict[str, Any] = {"L%d" % (i + 1): w.figure() for i, w in enumerate(watches)}
        figs["slack_s"] = self.slack_ms / 1000.0
        passed = all(w.passed for w in watches)
        worst = max(watches, key=lambda w: (w.violations, w.longest_ms))
        allowed = RESPONSE_S + self.slack_ms / 1000.0
        if passed:
            msg = "kept: %d excursion(s), longest %.1f s (allowed %.1f s), worst %.1f A over" % (
                sum(w.count for w in watches),
                max(w.longest_ms for w in watches) / 1000.0,
                allowed,
                max(w.worst_excess for w in watches),
            )
        else:
            msg = "%d excursion(s) longer than %.1f s, first at %.1f s, longest %.1f s, worst %.1f A over" % (
                sum(w.violations for w in watches),
                allowed,
                (worst.first_violation_ms or 0) / 1000.0,
                worst.longest_ms / 1000.0,
                worst.worst_excess,
            )
        return OracleResult(oid, title, passed, figs, msg)

    def column_dno(self) -> OracleResult:
        rec = self.rec
        figs = {}
        bad = []
        for cid, line in sorted(self.column_dno_lines.items()):
            fs = self.failsafe_a.get(cid, 0.0)

            def limit_at(t: int, line: _Timeline = line, fs: float = fs) -> float:
                v = line.at(t)
                if v is None:
                    return math.inf
                return max(v, fs) if self.gateway_down_at(t) else v

            samples = rec.samples.get(cid, [])
            w = self._watch([s[0] for s in samples], [max(s[1:4]) for s in samples], limit_at)
            figs[cid] = w.figure()
            if not w.passed:
                bad.append(cid)
        msg = (
            "%d limited columns kept their DNO limits" % len(figs)
            if not bad
            else "over the DNO's column limit too long: " + ", ".join(bad)
        )
        return OracleResult(
            "limit.column.dno",
            "cars within the DNO's column limits",
            not bad,
            figs,
            msg if figs else "no column limit was accepted",
        )

    def dno_reported(self) -> OracleResult:
        topic = topics.site_telemetry(self.rec.site_id)
        within = int(REPORTED_WITHIN_S * 1000)
        changes = self.site_dno.changes()
        judged = bad = 0
        worst = 0.0
        examples = []
        for m, b in self.bodies:
            if m.topic != topic:
                continue
            t = self.t(b.get("ts_ms"))
            limit = b.get("limit_a")
            if t is None or not isinstance(limit, int | float):
                continue
            i = bisect.bisect_right(changes, t) - 1
            if i >= 0 and t - changes[i] < within:
                continue
            dno = self.site_dno.at(t)
            if dno is None:
                continue
            judged += 1
            if limit > dno + 0.05:
                bad += 1
                worst = max(worst, limit - dno)
                if len(examples) < 5:
                    examples.append(
                        {
                            "at_s": t / 1000.0,
                            "reported_a": limit,
                            "source": b.get("limit_source"),
                            "dno_a": dno,
                        }
                    )
        fig = {
            "judged": judged,
            "above": bad,
            "worst_above_a": round(worst, 2),
            "examples": examples,
            "within_s": REPORTED_WITHIN_S,
        }
        msg = "%d site reports under a DNO limit, %d above it%s" % (
            judged,
            bad,
            ", first %s" % examples[0] if examples else "",
        )
        return OracleResult(
            "dno.reported",
            "the gateway reports the DNO limit in force (also after a restart)",
            bad == 0,
            fig,
            msg,
        )

    # -- limits: the firmware's offer ---------------------------------------------------------
    def offer(self) -> OracleResult:
        figs = {}
        bad = []
        for cid, lines in self.rec.board.items():
            w = LimitWatch(ORACLES.offer_response_ms + FIRMWARE_SLACK_MS, ORACLES.offer_tolerance_a)
            for line in lines:
                t = int(line["t"])
                if line.get("off") or "fs" not in line:
                    continue
                allowed = int(line.get("fda", 0)) if line["fs"] else int(line.get("ada", 0))
                w.set_limit(t, allowed / 10.0)
                w.observe(t, int(line.get("offered_da", 0)) / 10.0)
            figs[cid] = w.figure()
            if not w.passed:
                bad.append(cid)
        worst = max(figs.values(), key=lambda f: f["worst_excess_a"], default={"worst_excess_a": 0.0})
        msg = (
            "every offer within the firmware's assignment or failsafe within %.1f s (worst excess %.2f A)"
            % ((ORACLES.offer_response_ms + FIRMWARE_SLACK_MS) / 1000.0, worst["worst_excess_a"])
            if not bad
            else "offer above the column's own limit: " + ", ".join(bad)
        )
        return OracleResult(
            "limit.offer", "each pilot offer within the limit its firmware holds", not bad, figs, msg
        )

    def reported(self) -> OracleResult:
        """Excursions of the offer above the reported assignment, by how they began: with the
        column raising its offer under its gateway assignment (tap: failsafe off), the gateway
        wrote that limit and its answer is late or was lost on the wire (it retries): counted
        as lagging reports, not judged; any other (the report fell below what the column
        keeps offering: a write the column never got; or the column fell back to a failsafe
        the gateway does not know of) must end within OFFER_REPORT_S."""
        rec = self.rec
        allow = int(OFFER_REPORT_S * 1000)
        figs: dict[str, Any] = {}
        bad = []
        longest = lag_longest = 0
        for spec in rec.plan.specs:
            cid = spec.id
            reports = self._reports(cid)
            offers = [
                (
                    int(line["t"]),
                    0.0 if line.get("off") else int(line.get("offered_da", 0)) / 10.0,
                    not line.get("off") and line.get("fs") == 0,
                )
                for line in rec.board.get(cid, [])
                if "offered_da" in line
            ]
            r_times = [r[0] for r in reports]
            o_times = [o[0] for o in offers]
            since: int | None = None
            by_write = False
            spell_report = 0.0
            spells = lagging = violations = judged = 0
            worst = 0.0
            examples = []
            for t in range(0, self.end_ms, GRID_MS):
                i = bisect.bisect_right(o_times, t) - 1
                j = bisect.bisect_right(r_times, t) - 1
                if i < 0 or j < 0 or t - reports[j][0] > REPORT_COVERS_MS or self.gateway_down_at(t):
                    since = None
                    continue
                judged += 1
                offer, assigned = offers[i][1], reports[j][1]
                if offer <= assigned + ORACLES.offer_tolerance_a:
                    since = None
                    continue
                if since is None or assigned < spell_report:  # a new excursion, or the report fell
                    before = bisect.bisect_right(o_times, t - GRID_MS) - 1
                    by_write = since is None and offers[i][2] and (before < 0 or offers[before][1] < offer)
                    since, spell_report = t, assigned
                    spells += 1
                    lagging += by_write
                spell = t - since
                if by_write:
                    lag_longest = max(lag_longest, spell)
                    continue
                longest = max(longest, spell)
                if spell > allow and spell - GRID_MS <= allow:
                    violations += 1
                    worst = max(worst, offer - assigned)
                    if len(examples) < 3:
                        examples.append({"from_s": since / 1000.0, "offer_a": offer, "reported_a": assigned})
            figs[cid] = {
                "judged_s": judged * GRID_MS / 1000.0,
                "spells": spells,
                "lagging_reports": lagging,
                "violations": violations,
                "worst_excess_a": round(worst, 2),
                "examples": examples,
            }
            if violations:
                bad.append(cid)
        msg = (
            "offers within the reported assignments; longest excursion %.1f s (allowed %.1f s); reports "
            "lagging a raise up to %.1f s" % (longest / 1000.0, OFFER_REPORT_S, lag_longest / 1000.0)
            if not bad
            else "offer above the gateway's reported assignment for more than %.1f s: %s"
            % (OFFER_REPORT_S, ", ".join("%s (%s)" % (c, figs[c]["examples"][:1]) for c in bad))
        )
        figs.update(
            longest_s=longest / 1000.0, lagging_longest_s=lag_longest / 1000.0, allowed_s=OFFER_REPORT_S
        )
        return OracleResult(
            "limit.reported", "each pilot offer within the assignment the gateway reports", not bad, figs, msg
        )

    def _reports(self, cid: str) -> list[tuple[int, float]]:
        topic = topics.column_telemetry(self.rec.site_id, cid)
        out = []
        for m, b in self.bodies:
            if m.topic != topic:
                continue
            t = self.t(b.get("ts_ms"))
            if t is None:
                continue
            applied = b.get("applied_limit_a")
            out.append(
                (t, float(applied) if isinstance(applied, int | float) else self.failsafe_a.get(cid, 0.0))
            )
        return sorted(set(out))

    # -- failsafe ------------------------------------------------------------------------------
    def failsafe_reached(self) -> OracleResult:
        limit_ms = HEARTBEAT_TIMEOUT_S * 1000 + ORACLES.failsafe_margin_ms
        windows = []
        bad = []
        worst = 0
        for start, _ready, d in self.down:
            end = d.until_ms if d.until_ms is not None else self.end_ms
            if end - start <= limit_ms:
                continue
            times = {}
            for cid, lines in self.rec.board.items():
                got = _reached(lines, start, start + limit_ms + 5000)
                if got is None:
                    continue  # not running then
                times[cid] = got
                if got > limit_ms:
                    bad.append(
                        "%s at %.1f s (%s)"
                        % (cid, start / 1000.0, "never" if math.isinf(got) else "%.1f s" % (got / 1000.0))
                    )
                elif got > worst:
                    worst = got
            windows.append(
                {
                    "cause": d.cause,
                    "from_s": start / 1000.0,
                    "down_s": (end - start) / 1000.0,
                    "columns": len(times),
                    "slowest_s": max((v for v in times.values() if not math.isinf(v)), default=0) / 1000.0,
                }
            )
        fig = {"windows": windows, "limit_s": limit_ms / 1000.0, "late": bad[:20]}
        msg = (
            "%d gateway outages, every running column at its failsafe within %.1f s (slowest %.1f s)"
            % (len(windows), limit_ms / 1000.0, worst / 1000.0)
            if not bad
            else "late or never at the failsafe: " + "; ".join(bad[:6])
        )
        return OracleResult(
            "failsafe.reached",
            "every column at its failsafe within heartbeat timeout + 1 s whenever the gateway was down",
            bool(windows) and not bad,
            fig,
            msg if windows else "the gateway was never down long enough",
        )

    def failsafe_sum(self) -> OracleResult:
        site = self.site
        events = []
        for cid, lines in self.rec.board.items():
            for line in lines:
                if line.get("off"):
                    events.append((int(line["t"]), cid, 0.0))
                elif "fda" in line:
                    events.append((int(line["t"]), cid, int(line["fda"]) / 10.0))
        events.sort(key=lambda e: e[0])
        held = dict(self.failsafe_a)
        cols = {c.id: c for c in site.columns}
        paths = {c.id: site.node_path(c.circuit) for c in site.columns}
        limits = {SITE_NODE: site.capacity_a, **{cid: c.rating_a for cid, c in site.circuits.items()}}
        peak = {node: [0.0, 0.0, 0.0] for node in limits}
        over: list[dict[str, Any]] = []

        def sums() -> dict[str, list[float]]:
            out = {node: [0.0, 0.0, 0.0] for node in limits}
            for cid, amps in held.items():
                for phase in set(cols[cid].rotation):
                    for node in paths[cid]:
                        out[node][phase] += amps
            return out

        for k, (t, cid, amps) in enumerate([(0, "", 0.0), *events]):
            if cid:
                if held.get(cid) == amps:
                    continue
                held[cid] = amps
            for node, per in sums().items():
                for p in range(3):
                    peak[node][p] = max(peak[node][p], per[p])
                    if per[p] > limits[node][p] + 1e-6 and len(over) < 10:
                        over.append(
                            {
                                "at_s": t / 1000.0,
                                "node": node,
                                "phase": "L%d" % (p + 1),
                                "sum_a": round(per[p], 1),
                                "limit_a": limits[node][p],
                                "event": k,
                            }
                        )
        budget = _failsafe_budget(site)
        fig = {
            "peak_a": {n: [round(x, 1) for x in v] for n, v in peak.items()},
            "limits_a": {n: list(v) for n, v in limits.items()},
            "budget_a": list(budget),
            "over": over,
            "changes": len(events),
        }
        msg = (
            "the failsafes held add up to at most %s A per phase on the site (capacity %s A, budget %s A)"
            % (
                "/".join("%.1f" % x for x in peak[SITE_NODE]),
                "/".join("%g" % x for x in site.capacity_a),
                "/".join("%g" % x for x in budget),
            )
            if not over
            else "the failsafes add up to more than a rating: %s" % over[0]
        )
        return OracleResult(
            "failsafe.sum",
            "the sum of failsafe limits never above the site capacity (nor a circuit's rating)",
            not over,
            fig,
            msg,
        )

    def processes(self) -> OracleResult:
        rec = self.rec
        ok = not rec.failures and rec.gateway_exit == 0 and rec.observer_sessions_lost == 0
        parts = [f.splitlines()[0][:200] for f in rec.failures]
        if rec.gateway_exit != 0:
            parts.append("the gateway's final stop exited with %s" % rec.gateway_exit)
        if rec.observer_sessions_lost:
            parts.append("the consumer lost its session %d times" % rec.observer_sessions_lost)
        msg = (
            "; ".join(parts)
            if parts
            else "nothing died unless killed; the gateway stopped cleanly at the end"
        )
        return OracleResult(
            "processes",
            "only the scheduled faults stopped anything",
            ok,
            {
                "failures": rec.failures,
                "gateway_exit": rec.gateway_exit,
                "consumer_sessions_lost": rec.observer_sessions_lost,
            },
            msg,
        )


def _reached(lines: Sequence[Mapping[str, Any]], start: int, horizon: int) -> float | None:
    """ms from `start` until the column was at its failsafe; None when it was not running at
    `start` or was killed before it got there (not judged), inf when it never got there
    before `horizon`. A board line holds until the next one."""
    before = [x for x in lines if int(x["t"]) <= start]
    if not before or before[-1].get("off"):
        return None
    if _at_failsafe(before[-1]):
        return 0.0
    for line in lines[len(before) :]:
        t = int(line["t"])
        if t > horizon:
            break
        if line.get("off"):
            return None
        if _at_failsafe(line):
            return float(t - start)
    return math.inf


def _at_failsafe(line: Mapping[str, Any]) -> bool:
    return bool(line.get("fs")) and int(line.get("offered_da", 0)) <= int(line.get("fda", 0))


def _failsafe_budget(site: Site) -> tuple[float, float, float]:
    from gateway.core.failsafe import failsafe_budget_a

    return failsafe_budget_a(site)


def _ranges(seqs: Sequence[int]) -> list[str]:
    out: list[str] = []
    for s in sorted(seqs):
        if out and out[-1].split("-")[-1] == str(s - 1):
            out[-1] = out[-1].split("-")[0] + "-" + str(s)
        else:
            out.append(str(s))
    return out
