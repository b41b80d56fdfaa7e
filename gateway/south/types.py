"""What the southbound adapters hand to the core and take from it.

The column side of every field is the register map in ``firmware/regmap.py`` and the code
-> name vocabulary in ``firmware/status.py``; :func:`decode_inputs` is the one place that
turns an input-register image into a :class:`ColumnReading`. Currents, voltages and
energies leave here in A, V, W and Wh; the deci-units stay on the wire.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Self

from firmware import regmap, regmap_tables, status_names

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
    return tuple(n for bit, n in enumerate(regmap_tables.FLAG_NAMES) if flags & (1 << bit))


class ColumnReading(NamedTuple):
    """One poll of one column, in engineering units. (This and ColumnLink are NamedTuples:
    one of each is built for every poll of every column; a frozen dataclass costs 4x to build.)"""

    column_id: str
    ts_ms: int                       # UTC ms when the reply arrived
    status: str                      # status_names.STATUS_NAMES
    error: str                       # status_names.ERROR_NAMES
    cp_state: str                    # "A".."F"
    offered_a: float
    current_a: tuple[float, float, float]
    voltage_v: tuple[float, float, float]
    power_w: int
    energy_wh: int                   # lifetime register
    session_energy_wh: int
    session_id: int
    limit_source: str                # status_names.LIMIT_SOURCE_NAMES
    flags: tuple[str, ...]           # regmap_tables.FLAG_NAMES of the set bits
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


class ColumnLink(NamedTuple):
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


# (name, address, words) of every numeric input register, from the map, once at import.
_NUMERIC_INPUTS = tuple((name, addr, words) for name, addr, words, enc, _desc in regmap_tables.input_map()
                        if enc != "ascii")   # text (the column id) is not a number
_INPUT_AT = {name: addr for name, addr, _words in _NUMERIC_INPUTS}
# The registers a reading is made of, in the order decode_inputs takes them.
_READING_U16 = ("status_code", "error_code", "cp_state", "offered_current_da", "current_l1_da",
                "current_l2_da", "current_l3_da", "voltage_l1_dv", "voltage_l2_dv", "voltage_l3_dv",
                "session_id", "limit_source", "error_flags", "failsafe_limit_da",
                "assigned_limit_remaining_s", "phases", "hardware_rating_da", "cable_rating_da",
                "fw_version", "fw_patch", "bad_frames", "boots")
_READING_U32 = ("power_w", "energy_wh", "session_energy_wh", "uptime_s")
_U16_GET = operator.itemgetter(*(_INPUT_AT[n] for n in _READING_U16))
_U32_GET = operator.itemgetter(*(i for n in _READING_U32 for i in (_INPUT_AT[n], _INPUT_AT[n] + 1)))
_READING_END = 1 + max(a + w - 1 for n, a, w in _NUMERIC_INPUTS if n in _READING_U16 + _READING_U32)


def decode_image(image: Sequence[int]) -> dict[str, int]:
    """Every numeric input register of ``regmap_tables.input_map()`` by name (32-bit fields joined)."""
    n = len(image)
    return {name: (image[addr] << 16 | image[addr + 1]) if words == 2 else int(image[addr])
            for name, addr, words in _NUMERIC_INPUTS if addr + words <= n}


@functools.lru_cache(maxsize=256)
def _fw_version(version: int, patch: int) -> str:
    return "%d.%d.%d" % (version >> 8, version & 0xFF, patch)


_flag_names = functools.lru_cache(maxsize=256)(flag_names)
# The vocabularies, bound once.
_STATUS_NAMES, _ERROR_NAMES = status_names.STATUS_NAMES, status_names.ERROR_NAMES
_CP_NAMES, _SOURCE_NAMES = status_names.CP_NAMES, status_names.LIMIT_SOURCE_NAMES


def decode_inputs(column_id: str, image: Sequence[int], ts_ms: int) -> ColumnReading:
    """An FC04 image of the column's input registers (from address 0) as a reading. Runs for
    every poll of every column: the registers are taken with itemgetters built from the map."""
    if len(image) >= _READING_END:
        (st, err, cp, offered, l1, l2, l3, v1, v2, v3, session_id, src, flags, failsafe, remaining, phases,
         hardware, cable, version, patch, bad_frames, boots) = _U16_GET(image)
        p_hi, p_lo, e_hi, e_lo, s_hi, s_lo, u_hi, u_lo = _U32_GET(image)
    else:   # an older, shorter map: what is missing reads 0
        g = decode_image(image).get
        (st, err, cp, offered, l1, l2, l3, v1, v2, v3, session_id, src, flags, failsafe, remaining, phases,
         hardware, cable, version, patch, bad_frames, boots) = (g(n, 0) for n in _READING_U16)
        p_hi, e_hi, s_hi, u_hi = 0, 0, 0, 0
        p_lo, e_lo, s_lo, u_lo = (g(n, 0) for n in _READING_U32)
    return ColumnReading(
        column_id, ts_ms, _name(_STATUS_NAMES, st), _name(_ERROR_NAMES, err),
        _name(_CP_NAMES, cp), offered / 10, (l1 / 10, l2 / 10, l3 / 10), (v1 / 10, v2 / 10, v3 / 10),
        p_hi << 16 | p_lo, e_hi << 16 | e_lo, s_hi << 16 | s_lo, session_id,
        _name(_SOURCE_NAMES, src), _flag_names(flags), failsafe / 10,
        online=True, flags_raw=flags, assigned_remaining_s=remaining, phases=phases,
        hardware_a=hardware / 10, cable_a=cable / 10, fw_version=_fw_version(version, patch),
        bad_frames=bad_frames, boots=boots, uptime_s=u_hi << 16 | u_lo)


class ColumnAdapterBase:
    """What every southbound adapter (RS-485 bus, Modbus TCP, CBOR) shares: it runs as an async
    context (start/stop), and answers for each column's link from the column's LinkTracker."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def _tracker(self, column_id: str) -> LinkTracker:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def link(self, column_id: str) -> ColumnLink:
        return self._tracker(column_id).link

    def column_failures(self, column_id: str) -> dict[str, int]:
        return dict(self._tracker(column_id).failures_by_reason)


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
        # Every good reply of every column comes here: built directly, _replace() costs more.
        self.link = ColumnLink(self.column_id, True, REASON_OK, 0, now_ms,
                               now_ms if changed else self.link.since_ms, "")
        self._reported = True
        return self.link if changed else None

    def fail(self, reason: str, now_ms: int, detail: str = "") -> ColumnLink | None:
        self.failures_by_reason[reason] = self.failures_by_reason.get(reason, 0) + 1
        n = self.link.consecutive_failures + 1
        # Offline after N failures in a row; a column never seen is announced offline then too.
        changed = n >= self.offline_after and (self.link.online or not self._reported)
        self.link = self.link._replace(reason=reason, consecutive_failures=n, detail=detail,
                                       online=False if changed else self.link.online,
                                       since_ms=now_ms if changed else self.link.since_ms)
        if changed:
            self._reported = True
        return self.link if changed else None
