"""The soak's `fault.<kind>` checks: each fault of the schedule happened and took effect.

A soak that passes must really have gone through its schedule: the gateway reconnected
after every broker restart and came back after every SIGKILL, killed and silent columns
went and came back in its view, the noise corrupted bytes on the RS-485 bus, and a failed
meter paused its column (within meter_stale_s + the oracles' margin) and was reported.
`FaultChecks` is a part of the judge (hil.soak.judge), which provides the helpers below.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from gateway.north import topics
from hil.replay.oracles import OracleConfig, OracleResult
from hil.soak.observer import Seen
from hil.soak.run import FaultRecord, GatewayDown, Recording

ORACLES = OracleConfig()
METER_STALE_MS = 5000  # firmware default meter_stale_s


class FaultChecks:
    rec: Recording
    bodies: list[tuple[Seen, dict[str, Any]]]
    end_ms: int

    def t(self, ts_ms: Any) -> int | None:
        raise NotImplementedError

    def gateway_down_at(self, t_ms: int) -> bool:
        raise NotImplementedError

    def _ready(self, d: GatewayDown) -> int:
        raise NotImplementedError

    def faults(self) -> list[OracleResult]:
        rec = self.rec
        by_kind: dict[str, list[FaultRecord]] = {}
        for r in rec.faults:
            by_kind.setdefault(r.fault.kind, []).append(r)
        return [
            self._fault_broker(by_kind.get("broker_restart", [])),
            self._fault_gateway(by_kind.get("gateway_kill", [])),
            self._fault_column(by_kind.get("column_kill", [])),
            self._fault_noise(by_kind.get("bus_noise", [])),
            self._fault_silent(by_kind.get("column_silent", [])),
            self._fault_meter(by_kind.get("meter_fail", [])),
        ]

    def _arrivals(self, topic: str, pred: Callable[[dict[str, Any]], bool] = lambda b: True) -> list[float]:
        t0 = self.rec.t0_mono_ms
        return sorted(m.at * 1000 - t0 for m, b in self.bodies if m.topic == topic and pred(b))

    def _fault_broker(self, recs: list[FaultRecord]) -> OracleResult:
        births = self._arrivals(topics.gateway_state(self.rec.site_id), lambda b: b.get("state") == "online")
        delays, missing = [], []
        for r in recs:
            if r.ended_ms is None:
                missing.append(r.fault.n)
                continue
            if self.gateway_down_at(r.ended_ms):
                continue
            after = [b for b in births if b >= r.ended_ms]
            if not after:
                missing.append(r.fault.n)
            else:
                delays.append(after[0] - r.ended_ms)
        fig = {
            "restarts": len(recs),
            "reconnected": len(delays),
            "not_reconnected": missing,
            "reconnect_max_s": max(delays, default=0) / 1000.0,
            "reconnect_median_s": _median(delays) / 1000.0,
        }
        msg = (
            "%d broker restarts, the gateway's birth seen again after each (%.1f s median, %.1f s max)"
            % (len(recs), fig["reconnect_median_s"], fig["reconnect_max_s"])
            if not missing
            else "no birth after broker restart(s) %s" % missing
        )
        return OracleResult(
            "fault.broker_restart",
            "the gateway reconnected after every broker restart",
            bool(recs) and not missing,
            fig,
            msg,
        )

    def _fault_gateway(self, recs: list[FaultRecord]) -> OracleResult:
        rows, bad = [], []
        for d in self.rec.gateway_down:
            if d.cause != "kill":
                continue
            ready = self._ready(d)
            ok = d.until_ms is not None and ready <= self.end_ms
            rows.append(
                {
                    "killed_s": d.from_ms / 1000.0,
                    "restarted_s": None if d.until_ms is None else d.until_ms / 1000.0,
                    "first_telemetry_after_s": None if not ok else (ready - (d.until_ms or 0)) / 1000.0,
                }
            )
            if not ok:
                bad.append(d.from_ms / 1000.0)
        msg = (
            "%d SIGKILLs, each restarted on the same config and outbox and publishing again "
            "(first telemetry %.1f s after the restart at most)"
            % (len(rows), max((r["first_telemetry_after_s"] or 0 for r in rows), default=0))
            if not bad
            else "the gateway did not come back after the kill(s) at %s s" % bad
        )
        return OracleResult(
            "fault.gateway_kill",
            "the gateway came back after every SIGKILL",
            bool(rows) and len(rows) == len(recs) and not bad,
            {"kills": rows},
            msg,
        )

    def _fault_column(self, recs: list[FaultRecord]) -> OracleResult:
        rows, bad = [], []
        for r in recs:
            cid = r.fault.target
            back = r.ended_ms
            lines = self.rec.board.get(cid, [])
            booted = back is not None and any(int(x["t"]) >= back and not x.get("off") for x in lines)
            seen = back is not None and any(
                (t := self.t(b.get("ts_ms"))) is not None and t >= back
                for m, b in self.bodies
                if m.topic == topics.column_telemetry(self.rec.site_id, cid)
            )
            rows.append(
                {
                    "column": cid,
                    "killed_s": (r.started_ms or 0) / 1000.0,
                    "booted": booted,
                    "reported_again": seen,
                }
            )
            if not (booted and seen):
                bad.append(cid)
        msg = (
            "%d column SIGKILLs (%s), each booted again and reported by the gateway again"
            % (len(rows), ", ".join(sorted({str(r["column"]) for r in rows})))
            if not bad
            else "not back: " + ", ".join(str(b) for b in bad)
        )
        return OracleResult(
            "fault.column_kill", "killed columns came back", bool(recs) and not bad, {"kills": rows}, msg
        )

    def _fault_noise(self, recs: list[FaultRecord]) -> OracleResult:
        noisy = sum((r.ended_ms or 0) - (r.started_ms or 0) for r in recs) / 1000.0
        moved = sum(int(r.detail.get("bytes", 0)) for r in recs)
        corrupted = sum(int(r.detail.get("corrupted", 0)) for r in recs)
        rate = 100.0 * corrupted / moved if moved else 0.0
        fig = {
            "windows": len(recs),
            "noisy_s": noisy,
            "bytes": moved,
            "corrupted": corrupted,
            "corrupted_pct": round(rate, 2),
        }
        msg = "%d noise windows (%.0f s): %d of %d bytes on the RS-485 bus corrupted (%.2f %%)" % (
            len(recs),
            noisy,
            corrupted,
            moved,
            rate,
        )
        return OracleResult(
            "fault.bus_noise",
            "bus noise corrupted bytes on the RS-485 bus",
            bool(recs) and corrupted > 0,
            fig,
            msg,
        )

    def _fault_silent(self, recs: list[FaultRecord]) -> OracleResult:
        rows, bad = [], []
        site = self.rec.site_id
        for r in recs:
            cid = r.fault.target
            start, end = r.started_ms or 0, r.ended_ms or self.end_ms
            status = [
                (t, b.get("online"))
                for m, b in self.bodies
                if m.topic == topics.column_status(site, cid) and (t := self.t(b.get("ts_ms"))) is not None
            ]
            offline = [t for t, on in status if on is False and start <= t <= end + 2000]
            online = [t for t, on in status if on is True and t >= end]
            rows.append(
                {
                    "column": cid,
                    "from_s": start / 1000.0,
                    "silent_s": (end - start) / 1000.0,
                    "silenced_bytes": self.rec.wire_counts.get(cid or "", {}).get("silenced", 0),
                    "offline_after_s": (offline[0] - start) / 1000.0 if offline else None,
                    "online_again_after_s": (online[0] - end) / 1000.0 if online else None,
                }
            )
            if not offline or not online:
                bad.append(cid)
        msg = (
            "%d silences; the gateway saw the column go (after %s s) and come back"
            % (len(rows), ", ".join("%.1f" % r["offline_after_s"] for r in rows if r["offline_after_s"]))
            if not bad
            else "the gateway did not see %s go and come back" % bad
        )
        return OracleResult(
            "fault.column_silent",
            "a column that stops answering goes offline and comes back",
            bool(recs) and not bad,
            {"silences": rows},
            msg,
        )

    def _fault_meter(self, recs: list[FaultRecord]) -> OracleResult:
        rows, bad = [], []
        site = self.rec.site_id
        for r in recs:
            cid = r.fault.target
            start, end = r.started_ms or 0, r.ended_ms or self.end_ms
            errors = [
                t
                for m, b in self.bodies
                if m.topic == topics.column_status(site, cid)
                and b.get("error") == "PowerMeterFailure"
                and (t := self.t(b.get("ts_ms"))) is not None
                and start <= t <= end + 5000
            ]
            lines = [x for x in self.rec.board.get(cid, []) if "offered_da" in x]
            due = start + METER_STALE_MS + ORACLES.failsafe_margin_ms
            at_due = [x for x in lines if int(x["t"]) <= due]
            paused = not at_due or int(at_due[-1].get("offered_da", 0)) == 0 or (end < due)
            rows.append(
                {
                    "column": cid,
                    "from_s": start / 1000.0,
                    "failed_s": (end - start) / 1000.0,
                    "reported_after_s": (errors[0] - start) / 1000.0 if errors else None,
                    "offer_zero_by_stale_time": paused,
                }
            )
            if not errors or not paused:
                bad.append(cid)
        msg = (
            "%d meter failures; each column paused and reported PowerMeterFailure (after %s s)"
            % (len(rows), ", ".join("%.1f" % r["reported_after_s"] for r in rows))
            if not bad
            else "meter failure not handled on %s" % bad
        )
        return OracleResult(
            "fault.meter_fail",
            "a failed meter pauses its column and is reported",
            bool(recs) and not bad,
            {"failures": rows},
            msg,
        )


def _median(values: Iterable[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if v else 0.0
