"""What the southbound adapters hand to the core and take from it.

The column side of every field is the register map in ``firmware/regmap.py`` and the code
-> name vocabulary in ``firmware/status.py``; :func:`decode_inputs` is the one place that
turns an input-register image into a :class:`ColumnReading`. Currents, voltages and
energies leave here in A, V, W and Wh; the deci-units stay on the wire.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from firmware import regmap, regmap_tables, status

# Why a column is offline (or was, last time a request failed): the failure classes the
# Modbus adapters count.
REASON_OK = "ok"
REASON_NOT_POLLED = "not_polled"          # no reply seen yet
REASON_TIMEOUT = "timeout"                # no byte came back
REASON_CRC = "crc"                        # bytes came back, CRC wrong
REASON_GARBLED = "garbled"                # bytes came back, no frame (truncated, wrong unit)
REASON_EXCEPTION = "exception"            # a Modbus exception reply
REASON_WRONG_LENGTH = "wrong_length"      # a well-formed reply of the wrong size
REASON_DISCONNECTED = "disconnected"      # TCP: no connection (refused, reset)
FAILURE_REASONS = (REASON_TIMEOUT, REASON_CRC, REASON_GARBLED, REASON_EXCEPTION,
                   REASON_WRONG_LENGTH, REASON_DISCONNECTED)


def _name(names: Sequence[str], code: int) -> str:
    """Vocabulary name of a code; a code newer than this gateway is named, not dropped."""
    return names[code] if 0 <= code < len(names) else "Unknown(" + str(code) + ")"


def flag_names(flags: int) -> tuple[str, ...]:
    return tuple(n for bit, n in enumerate(regmap.FLAG_NAMES) if flags & (1 << bit))


@dataclass(frozen=True)
class ColumnReading:
    """One poll of one column, in engineering units."""

    column_id: str
    ts_ms: int                       # UTC ms when the reply arrived
    status: str                      # status.STATUS_NAMES
    error: str                       # status.ERROR_NAMES
    cp_state: str                    # "A".."F"
    offered_a: float
    current_a: tuple[float, float, float]
    voltage_v: tuple[float, float, float]
    power_w: int
    energy_wh: int                   # lifetime register
    session_energy_wh: int
    session_id: int
    limit_source: str                # status.LIMIT_SOURCE_NAMES
    flags: tuple[str, ...]           # regmap.FLAG_NAMES of the set bits
    failsafe_a: float                # failsafe limit in force on the column
    online: bool = True
    flags_raw: int = 0
    assigned_remaining_s: int = 0    # validity left of the gateway's limit, 0 = none
    phases: int = 0
    hardware_a: float = 0.0
    cable_a: float = 0.0
    fw_version: str = ""
    bad_frames: int = 0
    boots: int = 0
    uptime_s: int = 0


@dataclass(frozen=True)
class ColumnLink:
    """Whether a column answers, and why not when it does not."""

    column_id: str
    online: bool = False
    reason: str = REASON_NOT_POLLED  # REASON_OK while online, else the last failure class
    consecutive_failures: int = 0
    last_ok_ms: int | None = None    # UTC ms of the last good reply
    since_ms: int = 0                # UTC ms of the last online/offline change
    detail: str = ""                 # e.g. the exception code, for logs


@dataclass(frozen=True)
class LimitCommand:
    """A limit for one column: amps per phase, valid for validity_s (0 clears the
    assignment), optionally with a new failsafe limit."""

    column_id: str
    limit_a: float
    validity_s: int
    failsafe_a: float | None = None


@dataclass(frozen=True)
class LimitResult:
    """What became of one LimitCommand. A broadcast is unconfirmed by nature (`ok` means
    sent); a unicast write is confirmed by the column's echo."""

    column_id: str
    ok: bool
    via: str                         # "broadcast", "unicast" or "none" (rejected here)
    reason: str = REASON_OK
    limit_da: int = 0
    validity_s: int = 0


ColumnEvent = ColumnReading | ColumnLink


def amps_to_da(amps: float) -> int | None:
    """Limit in A -> register deci-amps, rounded down (never offer more than asked);
    None for NaN, infinite, negative or above the map's maximum."""
    if not isinstance(amps, int | float) or not math.isfinite(amps) or amps < 0:
        return None
    da = math.floor(amps * 10 + 1e-6)
    return da if da <= regmap.MAX_LIMIT_DA else None


def validity_reg(validity_s: float) -> int | None:
    """Validity in s -> the 16-bit register; None when out of range."""
    if not isinstance(validity_s, int | float) or not math.isfinite(validity_s):
        return None
    v = int(validity_s)
    return v if 0 <= v <= 0xFFFF else None


def decode_image(image: Sequence[int]) -> dict[str, int]:
    """Every numeric input register of ``regmap_tables.input_map()`` by name (32-bit fields joined)."""
    out: dict[str, int] = {}
    for name, addr, words, enc, _desc in regmap_tables.input_map():
        if enc == "ascii" or addr + words > len(image):  # text (the column id): not a number
            continue
        out[name] = regmap.get_u32(image, addr) if words == 2 else int(image[addr])
    return out


def decode_inputs(column_id: str, image: Sequence[int], ts_ms: int) -> ColumnReading:
    """An FC04 image of the column's input registers (from address 0) as a reading."""
    f = decode_image(image)
    g = f.get
    version = g("fw_version", 0)
    return ColumnReading(
        column_id=column_id,
        ts_ms=ts_ms,
        status=_name(status.STATUS_NAMES, g("status_code", 0)),
        error=_name(status.ERROR_NAMES, g("error_code", 0)),
        cp_state=_name(status.CP_NAMES, g("cp_state", 0)),
        offered_a=g("offered_current_da", 0) / 10,
        current_a=(g("current_l1_da", 0) / 10, g("current_l2_da", 0) / 10, g("current_l3_da", 0) / 10),
        voltage_v=(g("voltage_l1_dv", 0) / 10, g("voltage_l2_dv", 0) / 10, g("voltage_l3_dv", 0) / 10),
        power_w=g("power_w", 0),
        energy_wh=g("energy_wh", 0),
        session_energy_wh=g("session_energy_wh", 0),
        session_id=g("session_id", 0),
        limit_source=_name(status.LIMIT_SOURCE_NAMES, g("limit_source", 0)),
        flags=flag_names(g("error_flags", 0)),
        failsafe_a=g("failsafe_limit_da", 0) / 10,
        online=True,
        flags_raw=g("error_flags", 0),
        assigned_remaining_s=g("assigned_limit_remaining_s", 0),
        phases=g("phases", 0),
        hardware_a=g("hardware_rating_da", 0) / 10,
        cable_a=g("cable_rating_da", 0) / 10,
        fw_version="%d.%d.%d" % (version >> 8, version & 0xFF, g("fw_patch", 0)),
        bad_frames=g("bad_frames", 0),
        boots=g("boots", 0),
        uptime_s=g("uptime_s", 0),
    )


@dataclass
class LinkTracker:
    """Online/offline bookkeeping for one column: offline after `offline_after`
    consecutive failed requests, online again on the first good reply. `ok`/`fail`
    return the new ColumnLink when the online state changed, else None."""

    column_id: str
    offline_after: int = 3
    link: ColumnLink = field(init=False)
    failures_by_reason: dict[str, int] = field(default_factory=dict)

    _reported: bool = field(default=False, init=False)   # the state in `link` was announced

    def __post_init__(self) -> None:
        self.link = ColumnLink(self.column_id)

    def ok(self, now_ms: int) -> ColumnLink | None:
        changed = not (self.link.online and self._reported)
        self.link = replace(self.link, online=True, reason=REASON_OK, consecutive_failures=0,
                            last_ok_ms=now_ms, detail="",
                            since_ms=now_ms if changed else self.link.since_ms)
        self._reported = True
        return self.link if changed else None

    def fail(self, reason: str, now_ms: int, detail: str = "") -> ColumnLink | None:
        self.failures_by_reason[reason] = self.failures_by_reason.get(reason, 0) + 1
        n = self.link.consecutive_failures + 1
        # Offline after N failures in a row; a column never seen is announced offline then too.
        changed = n >= self.offline_after and (self.link.online or not self._reported)
        self.link = replace(self.link, reason=reason, consecutive_failures=n, detail=detail,
                            online=False if changed else self.link.online,
                            since_ms=now_ms if changed else self.link.since_ms)
        if changed:
            self._reported = True
        return self.link if changed else None
