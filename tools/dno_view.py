"""What the DNO console shows: one line per message of a site, and the measured result of a limit.

Pure functions and a small site model, no MQTT: `tools/dno.py` feeds it the messages it
receives. Times are shown in UTC (`12:00:05Z`), currents in amps per phase, power in kW.
A limit is judged by measured current per phase against the limit in force, with
`TOLERANCE_A` for meter resolution and rounding; site power is shown next to the power that
limit allows at the nominal voltage, for information.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.north import topics
from gateway.north.payloads import NOMINAL_VOLTAGE_V

TOLERANCE_A = 0.5      # measured current may exceed a limit by this much and still count as within
_DEDUP_MEMORY = 10_000
LABEL_WIDTH = 10

# What to do about a rejection (docs/mqtt-api.md, "Acks and reason codes").
REASON_HINTS: dict[str, str] = {
    "bad_signature": "wrong key for this key id, or the gateway has another key under it",
    "unknown_key": "the gateway has no key with this key id: check the key distribution",
    "unauthenticated": "the command was not signed",
    "stale": "issued too long ago for the gateway's clock: check this computer's clock (NTP)",
    "future": "issued ahead of the gateway's clock: check both clocks (NTP)",
    "expired": "the validity was already over when the gateway checked it",
    "replayed": "this command id was used before: send a new command",
    "busy": "the gateway's replay memory is full: retry later",
    "out_of_range": "the limit or validity is outside what the site or column allows",
    "unknown_column": "the site has no such column",
    "wrong_site": "the command went to another site's topic",
    "internal_error": "the gateway failed to apply it: retry, and report it",
}


def utc_clock(ts_ms: Any) -> str:
    """12:00:05Z for a UTC millisecond timestamp, with the date when it is 12 h or more away
    from now (2026-01-02 12:00:05Z); '?' when there is none."""
    if not isinstance(ts_ms, int | float) or isinstance(ts_ms, bool):
        return "?"
    far = abs(ts_ms / 1000 - time.time()) >= 12 * 3600
    return time.strftime("%Y-%m-%d %H:%M:%SZ" if far else "%H:%M:%SZ", time.gmtime(ts_ms / 1000))


def amps(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, int | float) and not isinstance(value, bool) else "-"


def phases(values: Any) -> str:
    """15.8/15.9/15.7 for [L1, L2, L3]."""
    if not isinstance(values, list):
        return "-"
    return "/".join(amps(v) for v in values)


def kw(watts: Any) -> str:
    return f"{watts / 1000:.1f} kW" if isinstance(watts, int | float) and not isinstance(watts, bool) else "-"


def _max_phase(values: Any) -> float | None:
    nums = [v for v in values if isinstance(v, int | float)] if isinstance(values, list) else []
    return max(nums) if nums else None


def _seq(payload: Mapping[str, Any]) -> str:
    return f"  #{payload['seq']}" if "seq" in payload else ""


def _label(text: str) -> str:
    return text.ljust(LABEL_WIDTH)


def message_line(site_id: str, topic: str, payload: Mapping[str, Any] | None, raw: bytes = b"") -> str:
    """The live line for one message of the site (`watch`)."""
    base = f"{topics.PREFIX}/{site_id}"
    if topic == f"{base}/bridge/state":
        state = raw.decode(errors="replace").strip()
        return f"{utc_clock(time.time() * 1000)} {_label('bridge')} {'up' if state == '1' else 'down'}"
    if topic.startswith(f"{base}/ack/") or topic == f"{base}/ack":
        return ack_line(payload or {}, topic)
    try:
        parsed = topics.parse(topic)
    except topics.TopicError:
        parsed = None
    if parsed is None or payload is None:
        shown = raw[:120].decode(errors="replace")
        return f"{utc_clock(time.time() * 1000)} {_label('?')} {topic} {shown}"
    p, kind, cid = payload, parsed.kind, parsed.column_id or ""
    ts = utc_clock(p.get("ts_ms"))
    if kind is topics.TopicKind.GATEWAY_STATE:
        cause = f" ({p['cause']})" if p.get("cause") else ""
        return f"{ts} {_label('gateway')} {p.get('state', '?')}{cause}"
    if kind is topics.TopicKind.SITE_TELEMETRY:
        until = p.get("limit_valid_until_ms")
        valid = f" until {utc_clock(until)}" if until is not None else ""
        return (f"{ts} {_label('site')} {kw(p.get('power_w'))}  {phases(p.get('current_a'))} A  "
                f"limit {amps(p.get('limit_a'))} A {p.get('limit_source', '?')}{valid}  "
                f"{p.get('active_sessions', '?')} sessions{_seq(p)}")
    if kind is topics.TopicKind.COLUMN_TELEMETRY:
        assigned = p.get("applied_limit_a")
        return (f"{ts} {_label(cid)} {p.get('state', '?')} {str(p.get('status', '?')).ljust(13)} "
                f"offered {amps(p.get('offered_a'))} A  measured {phases(p.get('current_a'))} A  "
                f"assigned {amps(assigned)} A ({p.get('limit_source', '?')})  {kw(p.get('power_w'))}  "
                f"{p.get('energy_wh', 0) / 1000:.1f} kWh{_seq(p)}")
    if kind is topics.TopicKind.COLUMN_STATUS:
        online = "online" if p.get("online") else "OFFLINE"
        return (f"{ts} {_label(cid)} status {p.get('status', '?')} {p.get('state', '?')} "
                f"{p.get('error', '?')} {online}{_seq(p)}")
    if kind in (topics.TopicKind.SITE_EVENTS, topics.TopicKind.COLUMN_EVENTS):
        data = " ".join(f"{k}={v}" for k, v in p.items() if k not in ("event", "ts_ms", "seq", "column_id"))
        return f"{ts} {_label(cid or 'site')} event {p.get('event', '?')}  {data}{_seq(p)}".rstrip()
    return f"{ts} {_label('?')} {topic}"


def ack_line(ack: Mapping[str, Any], topic: str = "") -> str:
    applied = ack.get("applied_limit_a")
    shown = f"  applied {amps(applied)} A" if applied is not None else ""
    detail = f"  ({ack['detail']})" if ack.get("detail") else ""
    where = f"  on {topic.rsplit('/', 1)[-1] if topic.count('/') > 3 else 'ack'}" if topic else ""
    return (f"{utc_clock(ack.get('ts_ms'))} {_label('ack')} {ack.get('id')} {ack.get('result', '?')} "
            f"{ack.get('reason', '?')}{shown}{detail}{where}{_seq(ack)}")


def ack_report(ack: Mapping[str, Any], label: str = "applied limit") -> list[str]:
    """What the `limit` and `failsafe` commands print for their ack."""
    reason = str(ack.get("reason", "?"))
    if ack.get("result") == "accepted":
        applied = ack.get("applied_limit_a")
        lines = [f"ack: accepted ({reason}) at {utc_clock(ack.get('ts_ms'))}"]
        if applied is not None:
            lines.append(f"{label}: {amps(applied)} A per phase")
        return lines
    lines = [f"ack: REJECTED: {reason}" + (f" ({ack['detail']})" if ack.get("detail") else "")]
    if reason in REASON_HINTS:
        lines.append(f"  {REASON_HINTS[reason]}")
    return lines


# -- the site, as the messages describe it -------------------------------------------------------

@dataclass
class Seen:
    payload: dict[str, Any]
    at: float            # time.monotonic() when it arrived


@dataclass
class SiteView:
    """The latest state, status and telemetry of one site; duplicates (same seq) dropped."""

    site_id: str
    state: dict[str, Any] | None = None
    status: dict[str, Seen] = field(default_factory=dict)
    column_telemetry: dict[str, Seen] = field(default_factory=dict)
    site_telemetry: Seen | None = None
    duplicates: int = 0
    _seqs: set[int] = field(default_factory=set)
    _order: deque[int] = field(default_factory=deque)

    def take(self, topic: str, payload: dict[str, Any] | None, at: float) -> bool:
        """Record a message; False for a duplicate (already seen seq) or one of no interest."""
        if payload is None:
            return topic.endswith("/bridge/state")
        seq = payload.get("seq")
        if isinstance(seq, int):
            if seq in self._seqs:
                self.duplicates += 1
                return False
            self._seqs.add(seq)
            self._order.append(seq)
            if len(self._order) > _DEDUP_MEMORY:
                self._seqs.discard(self._order.popleft())
        try:
            parsed = topics.parse(topic)
        except topics.TopicError:
            return True
        seen = Seen(payload, at)
        if parsed.kind is topics.TopicKind.GATEWAY_STATE:
            self.state = payload
        elif parsed.kind is topics.TopicKind.SITE_TELEMETRY:
            self.site_telemetry = seen
        elif parsed.kind is topics.TopicKind.COLUMN_TELEMETRY and parsed.column_id:
            self.column_telemetry[parsed.column_id] = seen
        elif parsed.kind is topics.TopicKind.COLUMN_STATUS and parsed.column_id:
            self.status[parsed.column_id] = seen
        return True

    @property
    def columns(self) -> list[str]:
        return sorted(set(self.status) | set(self.column_telemetry))


# -- the measured result of a limit --------------------------------------------------------------

@dataclass
class Verdict:
    lines: list[str]
    within: bool | None            # None: no telemetry to judge by
    detail: dict[str, Any] = field(default_factory=dict)


def _column_row(cid: str, seen: Seen | None, since: float) -> tuple[str, bool | None]:
    if seen is None or seen.at < since:
        return f"  {cid.ljust(LABEL_WIDTH)} no telemetry since the ack (offline or not charging?)", None
    p = seen.payload
    assigned = p.get("applied_limit_a")
    peak = _max_phase(p.get("current_a"))
    offered = p.get("offered_a")
    ok: bool | None = None
    if isinstance(assigned, int | float):
        ok = ((peak is None or peak <= assigned + TOLERANCE_A)
              and (not isinstance(offered, int | float) or offered <= assigned + TOLERANCE_A))
    mark = {True: "ok", False: "ABOVE", None: ""}[ok]
    row = (f"  {cid.ljust(LABEL_WIDTH)} {str(p.get('state', '?')).ljust(5)} {amps(offered).rjust(7)} A "
           f"{phases(p.get('current_a')).rjust(18)} A {amps(assigned).rjust(8)} A  {mark}")
    return row.rstrip(), ok


def measured_result(view: SiteView, *, since: float, limit_a: float | None, column_id: str | None = None,
                    voltage_v: float = NOMINAL_VOLTAGE_V) -> Verdict:
    """The site (or one column) after a limit, from telemetry received at or after `since`.

    `limit_a` is the limit the ack said is applied (site: the effective site limit; column:
    the column's). The site is judged by its measured current per phase, a column by its
    measured current and its offered current.
    """
    lines: list[str] = []
    site = view.site_telemetry if view.site_telemetry and view.site_telemetry.at >= since else None
    fresh = [s.at for s in (site, *view.column_telemetry.values()) if s is not None and s.at >= since]
    if not fresh:
        return Verdict(["measured result: no telemetry from the site since the ack"], None)
    when = utc_clock(site.payload.get("ts_ms")) if site else "?"
    lines.append(f"measured result (telemetry of {when}):")
    lines.append(f"  {'column'.ljust(LABEL_WIDTH)} state {'offered'.rjust(9)} "
                 f"{'measured L1/L2/L3'.rjust(20)} {'assigned'.rjust(10)}")
    rows: dict[str, bool | None] = {}
    for cid in view.columns:
        row, ok = _column_row(cid, view.column_telemetry.get(cid), since)
        rows[cid] = ok
        lines.append(row)
    peak = None
    if site is not None:
        p = site.payload
        in_force = p.get("limit_a")
        until = p.get("limit_valid_until_ms")
        valid = f" until {utc_clock(until)}" if until is not None else ""
        peak = _max_phase(p.get("current_a"))
        power_limit = f" of {kw(in_force * voltage_v * 3)}" if isinstance(in_force, int | float) else ""
        lines.append(f"  {'site'.ljust(LABEL_WIDTH)} power {kw(p.get('power_w'))}{power_limit}  current "
                     f"{phases(p.get('current_a'))} A of {amps(in_force)} A "
                     f"(limit {p.get('limit_source', '?')}{valid})")
    detail: dict[str, Any] = {"columns": rows, "site_peak_a": peak, "limit_a": limit_a}
    if column_id is not None:
        ok = rows.get(column_id)
        if ok is None:
            lines.append(f"column {column_id}: cannot judge (no telemetry with an assigned limit "
                         "since the ack)")
            return Verdict(lines, None, detail)
        seen = view.column_telemetry[column_id].payload
        word = "within" if ok else "ABOVE"
        lines.append(f"column {column_id} {word} its limit: offered {amps(seen.get('offered_a'))} A, "
                     f"highest phase {amps(_max_phase(seen.get('current_a')))} A, limit "
                     f"{amps(seen.get('applied_limit_a'))} A")
        return Verdict(lines, ok, detail)
    if site is None or peak is None or limit_a is None:
        lines.append("site: cannot judge (no site telemetry since the ack)")
        return Verdict(lines, None, detail)
    site_ok = peak <= limit_a + TOLERANCE_A
    word = "within the limit" if site_ok else "ABOVE the limit"
    sign = "<=" if site_ok else ">"
    lines.append(f"site {word}: highest phase {amps(peak)} A {sign} {amps(limit_a)} A "
                 f"(power {kw(site.payload.get('power_w'))}, the limit allows {kw(limit_a * voltage_v * 3)} "
                 f"at {voltage_v:.0f} V)")
    return Verdict(lines, site_ok, detail)
