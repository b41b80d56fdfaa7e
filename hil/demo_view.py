"""The site demo's live view: one line for the site, one per column, the latest events.

On a terminal the block is redrawn in place (ANSI: cursor up, clear to end of line) a
few times a second, each line cut to the terminal's width so that none wraps; anywhere
else (a pipe, a CI log) it prints the same lines as plain text every `plain_every_s`
seconds, prefixed with the run time, and each event as a line of its own when it
happens. `render` is pure: the data in, the lines out.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

_EVENTS_SHOWN = 6


@dataclass(frozen=True)
class ColumnRow:
    id: str
    link: str
    interp: str
    status: str          # as the gateway reports it (telemetry / status topic)
    cp: str              # CP state the column sees
    offered_a: float     # what the pilot offers now (board line)
    limit_a: float | None  # the gateway's assignment (telemetry), None when none is valid
    measured_a: float | None  # highest phase current in the gateway's telemetry
    energy_wh: float | None   # the column's energy register (telemetry)
    car: str             # the simulated car: profile, CP state, state of charge
    online: bool = True


@dataclass(frozen=True)
class SiteRow:
    t_s: float
    duration_s: float
    power_w: float | None
    current_a: Sequence[float] | None
    limit_a: float | None
    source: str | None
    valid_until_s: float | None   # the limit's expiry, run time
    sessions: int | None
    voltage_v: float = 230.0
    phases: int = 3


def _a(value: float | None, width: int = 5) -> str:
    return ("%*.1f A" % (width, value)) if value is not None else " " * (width - 1) + "- A"


def site_line(site: SiteRow) -> str:
    if site.limit_a is None:
        return "site   waiting for the gateway's first site telemetry"
    limit_kw = site.limit_a * site.voltage_v * site.phases / 1000.0
    power = "%5.1f kW" % (site.power_w / 1000.0) if site.power_w is not None else "    - kW"
    phases = "/".join("%.1f" % a for a in (site.current_a or ()))
    until = ""
    if site.valid_until_s is not None:
        until = ", %.0f s left" % max(site.valid_until_s - site.t_s, 0.0)
    return ("site   %s of %.1f kW limit   L1/L2/L3 %s A of %.0f A per phase (%s%s)   sessions %s"
            % (power, limit_kw, phases or "-", site.limit_a, site.source or "?", until,
               "-" if site.sessions is None else site.sessions))


def column_line(row: ColumnRow) -> str:
    energy = "%7.0f Wh" % row.energy_wh if row.energy_wh is not None else "      - Wh"
    status = row.status if row.online else "offline"
    return ("%-5s %-11s %-4s %-13s %-2s offer %s  limit %s  measured %s  %s  %s"
            % (row.id, row.link, row.interp, status, row.cp, _a(row.offered_a, 4), _a(row.limit_a, 4),
               _a(row.measured_a, 4), energy, row.car))


def render(site: SiteRow, columns: Sequence[ColumnRow], events: Sequence[tuple[float, str]],
           title: str) -> list[str]:
    """The whole live block: title, site, columns, latest events."""
    lines = ["%s   %5.0f s of %.0f s   (Ctrl-C stops it)" % (title, site.t_s, site.duration_s),
             site_line(site)]
    lines += [column_line(c) for c in columns]
    lines.append("events:")
    shown = list(events)[-_EVENTS_SHOWN:]
    lines += ["  %6.1f s  %s" % (t, text) for t, text in shown]
    lines += [""] * (_EVENTS_SHOWN - len(shown))
    return lines


class LiveView:
    """Draws the block; `tty=None` asks the stream (isatty)."""

    def __init__(self, title: str, out: TextIO | None = None, *, tty: bool | None = None,
                 redraw_s: float = 0.5, plain_every_s: float = 10.0) -> None:
        self.title = title
        self.out = out or sys.stdout
        self.tty = self.out.isatty() if tty is None else tty
        self.redraw_s = redraw_s
        self.plain_every_s = plain_every_s
        self._drawn = 0
        self._last = -1e9
        self._next_plain = min(5.0, plain_every_s)
        if self.tty:
            self.out.write("\x1b[?25l")   # hide the cursor while redrawing

    def note(self, t_s: float, text: str) -> None:
        """An event: printed at once as a plain line (on a terminal it shows in the block)."""
        if not self.tty:
            self.out.write("[%6.1f s] %s\n" % (t_s, text))
            self.out.flush()

    def update(self, site: SiteRow, columns: Sequence[ColumnRow], events: Sequence[tuple[float, str]],
               *, force: bool = False) -> None:
        now = time.monotonic()
        if self.tty:
            if not force and now - self._last < self.redraw_s:
                return
            self._last = now
            width = max(shutil.get_terminal_size((160, 40)).columns - 1, 40)
            lines = [line[:width] for line in render(site, columns, events, self.title)]
            buf = ["\x1b[%dA" % self._drawn] if self._drawn else []
            buf += ["\r" + line + "\x1b[K\n" for line in lines]
            buf.append("\x1b[J")
            self.out.write("".join(buf))
            self.out.flush()
            self._drawn = len(lines)
            return
        if not force and site.t_s < self._next_plain:
            return
        self._next_plain = site.t_s + self.plain_every_s
        stamp = "[%6.1f s] " % site.t_s
        self.out.write(stamp + site_line(site) + "\n")
        for row in columns:
            self.out.write(" " * len(stamp) + column_line(row) + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty:
            self.out.write("\x1b[?25h")
            self.out.flush()
