"""The contract between the replay engine and whatever runs the columns under test.

The engine owns the world: it reads the trace, runs the EV models (hil.models.ev), the
meters and the gateway's site allocation, and at every step hands each column its
analogue inputs and reads back what the firmware decided. A target owns the columns:

- `sim`: the firmware core (firmware.controller.Controller) in this process, stepped on
  a virtual clock, as fast as the CPU allows;
- `mpy`: the whole firmware app in the MicroPython unix port (hil.rig.vcolumn), with
  the board's world over serial line pairs, in real time;
- `serial:PORT`: a real board (or a pty standing in for one) over a real serial port.

Times are trace times in ms (starting at 0). A realtime target paces `advance()` to the
wall clock scaled by `speed`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ColumnInputs:
    """What the world presents to a column at one instant."""

    cp_high_mv: int  # EV side of the control pilot: 12000 A, 9000 B, 6000 C, 3000 D
    diode: bool  # the EV's diode (False: a misbehaving car)
    pp_ohms: int  # cable resistor; -1 = no cable
    current_a: tuple[float, float, float]  # what the meter measures per phase
    voltage_v: tuple[float, float, float]
    energy_wh: float  # the meter's import register
    rcd_tripped: bool = False
    meter_ok: bool = True  # False: the meter stops answering


@dataclass(frozen=True)
class ColumnOutputs:
    """What the column's firmware decided, as observed at the column's edge."""

    duty: int  # pilot duty in 0.01 % (10000 = no current offered)
    offered_a: float  # current signalled on the pilot (0 = none)
    contactor: bool
    status: str  # firmware.status_names.STATUS_NAMES
    cp_state: str  # firmware.status_names.CP_NAMES
    limit_source: str  # firmware.status_names.LIMIT_SOURCE_NAMES
    failsafe_active: bool
    energy_wh: int  # the firmware's own energy register
    error: str  # firmware.status_names.ERROR_NAMES


class Target(Protocol):
    """A set of columns under test. `start` brings them up from their column configs
    (the dicts firmware/config.py validates), keyed by column id."""

    realtime: bool

    def start(self, columns: dict[str, dict[str, object]]) -> None: ...

    def set_inputs(self, column_id: str, now_ms: int, inputs: ColumnInputs) -> None: ...

    def advance(self, to_ms: int) -> None:
        """Let the columns run until trace time `to_ms` (virtual or paced real time)."""

    def outputs(self, column_id: str) -> ColumnOutputs: ...

    def assign_limit(
        self, column_id: str, now_ms: int, limit_a: float, validity_s: int, failsafe_a: float | None = None
    ) -> None:
        """The gateway's assignment to one column, over the column's own link."""

    def gateway_silent(self, column_id: str, now_ms: int, silent: bool) -> None:
        """A link fault: while silent, nothing from the gateway reaches the column."""

    def power_cut(self, column_id: str, now_ms: int, duration_ms: int) -> None:
        """The column loses power now and boots again after duration_ms."""

    def close(self) -> None: ...


# ---- Optional extensions (added with the replay engine; a target may ignore all of them) ----
#
# - `assign_limit` may return False when the assignment did not reach the column (a silent
#   or noisy link); the engine's gateway model then retries, as a real gateway does after a
#   failed write. None or True count as delivered.
# - `link_fault(column_id, now_ms, kind, duration_ms, params) -> bool`: a target that injects
#   bus faults itself (a manipulator on its serial pipe) returns True; otherwise, or when the
#   method is missing, the engine models the fault by dropping or delaying assignments.
#   `column_id` None means every column; `params` is the trace's link.fault map.
# - `telemetry_sequences() -> Mapping[str, Sequence[int]] | None`: the sequence numbers an
#   MQTT consumer received, per publisher, in arrival order, redeliveries included; feeds the
#   telemetry oracle. `telemetry_conflicts() -> Mapping[str, int]`: per publisher, how many
#   seqs arrived again with a different payload (a target without it reports none).
# - `stats() -> Mapping[str, object]`: target figures copied into the run summary.
# - The real gateway in the loop (hil.replay.site_target): a target with `gateway_in_loop = True`
#   runs a real gateway between the trace and the columns. The engine then tells it the site
#   before `start` (`set_site(site, settings)`: the gateway.core.site.Site of the layout and
#   the layout's hil.replay.gateway_model.GatewaySettings), each DNO limit as it comes
#   (`dno_command(column_id | None, now_ms, value)`: the trace's dno.limit map) and the DNO's
#   broker link going down and up (`dno_link(now_ms, up)`); it sends no assignment itself
#   (its gateway model only says what the DNO demands, for the site checks) and feeds the
#   column checks with what the real gateway handed each column: `gateway_writes(column_id)
#   -> Iterable[GatewayWrite]`, drained after each `outputs()`.
# - What each firmware received (hil.replay.tap: the `mpy` and `site` targets): a target with
#   `reports_writes = True` reports every assignment and sign of life its columns' links
#   actually handed the firmware as `gateway_writes(column_id)` (as above), stamped with the
#   step at which it saw them. The engine then feeds the column checks (limit.offer,
#   limit.car, failsafe) from those only, so a write that waited for the link, needed
#   retries or reached a rebooted column counts from its arrival. Where the harness is the
#   gateway (mpy) the model's assignments still go out through `assign_limit`; only where
#   the checks learn of them changes. gateway_in_loop implies reports_writes. Without it
#   (`sim`, `serial:`: no tap on a real board) an assignment counts from its delivery by
#   `assign_limit`.
# - Errors: a target that cannot start or stops answering raises `TargetError` (or an
#   OSError/TimeoutError); `python -m hil replay` prints it as one line and exits 2.


@dataclass(frozen=True)
class GatewayWrite:
    """What a column's link handed its firmware (reports_writes targets): an assignment
    (limit_a, validity_s, and the failsafe in force), or with limit_a None a sign of life
    without one (a heartbeat, maybe with a new failsafe_a)."""

    t_ms: int
    limit_a: float | None
    validity_s: int = 0
    failsafe_a: float | None = None


class TargetError(RuntimeError):
    """The target cannot start, or a column stopped answering; the message names which and why."""
