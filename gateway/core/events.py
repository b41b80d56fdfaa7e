"""What the southbound adapters tell the core, and what the core asks them to do.

Plain frozen records, no behaviour: adapters turn the wire (Modbus registers, CBOR messages) into
these events and turn the commands into the wire. Times are UTC ms, currents per phase in the
column's own phase order (the site model maps them through the rotation). Status and CP state
names are the shared vocabulary of ``firmware.status_names`` (STATUS_NAMES, CP_NAMES, ERROR_NAMES).
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.core.site import PhaseCurrents


@dataclass(frozen=True)
class ColumnOnline:
    column_id: str
    at_ms: int
    firmware: str = ""          # version reported at boot, if known


@dataclass(frozen=True)
class ColumnOffline:
    column_id: str
    at_ms: int
    reason: str = "timeout"     # "timeout", "garbage", "link_down"


@dataclass(frozen=True)
class ColumnSample:
    """One reading of a column (status poll or meter values message)."""

    column_id: str
    at_ms: int
    status: str                 # "Available", "Charging", ... (firmware.status_names.STATUS_NAMES)
    cp_state: str               # "A".."F"
    current_a: tuple[float, ...]  # per column phase
    voltage_v: tuple[float, ...] = ()
    power_w: float = 0.0
    energy_wh: float = 0.0      # meter register (total import)
    offered_a: float = 0.0      # what the column offers right now (PWM)
    limit_a: float = 0.0        # the limit the column applies
    limit_source: str = ""      # firmware.status_names.LIMIT_SOURCE_NAMES
    error: str = "NoError"


@dataclass(frozen=True)
class SessionStarted:
    column_id: str
    at_ms: int
    meter_start_wh: float


@dataclass(frozen=True)
class SessionStopped:
    column_id: str
    at_ms: int
    meter_stop_wh: float
    reason: str = "EVDisconnected"  # OCPP stop reasons: Local, Remote, EVDisconnected, PowerLoss, ...


@dataclass(frozen=True)
class SiteMeterSample:
    at_ms: int
    current_a: PhaseCurrents
    voltage_v: PhaseCurrents
    power_w: float
    energy_wh: float


Event = ColumnOnline | ColumnOffline | ColumnSample | SessionStarted | SessionStopped | SiteMeterSample


@dataclass(frozen=True)
class SetColumnLimit:
    """Give a column its current and its failsafe. The column holds ``limit_a`` until
    ``valid_until_ms`` and falls back to ``failsafe_a`` after that or when the gateway is silent."""

    column_id: str
    limit_a: float
    failsafe_a: float
    valid_until_ms: int


Command = SetColumnLimit
