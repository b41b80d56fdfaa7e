"""The board line's tap: what a virtual column's firmware says of itself, for the realtime
targets whose columns are hil.rig.vcolumn.VirtualColumns (`mpy`, `site`).

`{"tap": 1}` on the board's I/O line (hil/vcolumn_main.py) adds the firmware's own view to
every line it writes: CP state, limit source, failsafe, error, energy register, and counts
of the assignments, heartbeats and failsafe limits its link handed the controller. From
the latest line of the column's current process `TapColumns` gives

- the outputs (one consistent snapshot of the column's edge), and
- `gateway_writes(column_id)`: each counter change as a GatewayWrite stamped with the
  trace time of the step at which the harness saw it, so the column checks judge the
  firmware from when it received an assignment, not from when a gateway decided it
  (a write may wait for the link's turn, retries on a noisy wire, a rebooting column).

The tap is switched on when a column starts and again whenever it boots (the board's
inputs are re-sent then); a new process counts from 0, so the counts are reset at power-on,
after the old process's last lines have been read.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from firmware.status_names import CP_NAMES, ERROR_NAMES, LIMIT_SOURCE_NAMES, STATUS_NAMES
from hil.replay.column_link import TargetError
from hil.replay.realtime import Column, RealtimeColumns, outputs_from
from hil.replay.target import ColumnOutputs, GatewayWrite
from hil.rig.vcolumn import VirtualColumn

__all__ = ["ColumnTap", "TapColumns", "outputs_from_tap"]


def _name(names: tuple[str, ...], code: Any) -> str:
    return names[code] if isinstance(code, int) and 0 <= code < len(names) else "unknown(%r)" % (code,)


def outputs_from_tap(line: Mapping[str, Any]) -> ColumnOutputs:
    """ColumnOutputs from a board line with the tap on (hil/vcolumn_main.py)."""
    return ColumnOutputs(duty=int(line["duty"]), offered_a=int(line["offered_da"]) / 10,
                         contactor=bool(line["contactor"]), status=_name(STATUS_NAMES, line["status"]),
                         cp_state=_name(CP_NAMES, line["cp"]),
                         limit_source=_name(LIMIT_SOURCE_NAMES, line["src"]),
                         failsafe_active=bool(line["fs"]), energy_wh=int(line["wh"]),
                         error=_name(ERROR_NAMES, line["err"]))


@dataclass
class ColumnTap:
    """One column's tap: where its current process's lines start in the board log, the
    counts last seen, and the writes not yet handed to the engine."""

    vcol: VirtualColumn
    since: int = 0                              # board_log index of the current process's first line
    counts: tuple[int, int, int] = (0, 0, 0)    # assignments, heartbeats, failsafe limits
    writes: list[GatewayWrite] = field(default_factory=list)

    def line(self) -> dict[str, Any]:
        """The latest board line of the current process ({} before its first)."""
        vcol = self.vcol
        vcol.outputs()
        log = vcol.board_log
        return log[-1] if len(log) > self.since else {}

    def take(self, now_ms: int, line: Mapping[str, Any]) -> None:
        """Turn the counters' moves since the last line seen into one GatewayWrite: an
        assignment (the latest, with the failsafe in force) or a sign of life."""
        counts = (int(line["na"]), int(line["nh"]), int(line["nf"]))
        na, nh, nf = self.counts
        self.counts = counts
        failsafe_a = int(line["fda"]) / 10
        if counts[0] != na:
            write = GatewayWrite(now_ms, int(line["ada"]) / 10, int(line["as"]), failsafe_a)
        elif counts[1] != nh or counts[2] != nf:
            write = GatewayWrite(now_ms, None, 0, failsafe_a if counts[2] != nf else None)
        else:
            return
        self.writes.append(write)

    def restart(self) -> None:
        """A new process: read what the old one wrote last, then count from 0 again."""
        self.vcol.outputs()
        self.since = len(self.vcol.board_log)
        self.counts = (0, 0, 0)


class TapColumns(RealtimeColumns):
    """Realtime columns observed through the board line's tap; a subclass calls `_tap_on`
    for each column it starts and `_wait_tapped` before trace time 0."""

    reports_writes = True   # hil.replay.target: the engine judges from gateway_writes()

    def __init__(self, speed: float | str | None = 1.0, boot_timeout_s: float = 20.0) -> None:
        super().__init__(speed, boot_timeout_s)
        self._taps: dict[str, ColumnTap] = {}
        self._now_ms = 0

    def _tap_on(self, col: Column, vcol: VirtualColumn) -> None:
        col.board_state["tap"] = 1   # sent again with the board's inputs whenever the column boots
        self._taps[col.column_id] = ColumnTap(vcol, since=len(vcol.board_log))
        vcol.board(tap=1)

    def _line(self, col: Column) -> dict[str, Any]:
        """The latest board line of the column's current process ({} before its first)."""
        return self._taps[col.column_id].line()

    def _wait_tapped(self, timeout_s: float) -> None:
        """Until every column's board line carries the tap (TargetError after timeout_s)."""
        deadline = time.monotonic() + timeout_s
        for col in self.columns.values():
            while "cp" not in self._line(col):
                self._check_alive(col)
                if time.monotonic() > deadline:
                    raise TargetError("column %s: its board line never carried the tap (no {\"tap\": 1} "
                                      "answer within %.0f s)" % (col.column_id, timeout_s))
                time.sleep(0.02)

    # -- Target ----------------------------------------------------------------------------
    def advance(self, to_ms: int) -> None:
        super().advance(to_ms)
        self._now_ms = to_ms

    def outputs(self, column_id: str) -> ColumnOutputs:
        col = self._column(column_id)
        if col.powered:
            self._check_alive(col)
            line = self._line(col)
            if "cp" in line:
                self._taps[column_id].take(self._now_ms, line)
                out = outputs_from_tap(line)
                col.last_energy_wh = out.energy_wh
                return out
        return outputs_from(None, None, col.last_energy_wh)   # off, or booting

    def gateway_writes(self, column_id: str) -> Iterable[GatewayWrite]:
        tap = self._taps.get(column_id)
        if tap is None:
            return []
        writes, tap.writes = tap.writes, []
        return writes

    def _power_on(self, col: Column) -> None:
        tap = self._taps.get(col.column_id)
        if tap is not None and not col.powered:
            tap.restart()
        super()._power_on(col)
