"""The site model: connection, nested circuits, columns and how each column reaches the site's phases.

Pure data, built by ``site_config`` from the TOML file and read by the limits, allocation and
failsafe code. Every current is in amps per phase; site phases are indexed 0, 1, 2 (L1, L2, L3).
Circuits carry all three site phases unchanged; a column's ``rotation`` says which site phase each
of its own phases is wired to.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

PHASE_NAMES = ("L1", "L2", "L3")
MIN_CURRENT_A = 6.0  # IEC 61851: below 6 A a column must stop offering (pause)
SITE_NODE = "site"   # the root of the circuit tree, a reserved circuit id

PhaseCurrents = tuple[float, float, float]


def to_da(amps: float) -> int:
    """Amps to whole deci-amps, rounded down: allocation works in ints so sums are exact.
    Anything not finite counts as 0 (fail closed)."""
    if not math.isfinite(amps):
        return 0
    return math.floor(amps * 10 + 1e-6)


def site_phase_key(node: str, phase: int) -> str:
    """Name of one node/phase constraint: 'site:L1' or 'circuit:feeder1:L2'."""
    if node == SITE_NODE:
        return "site:" + PHASE_NAMES[phase]
    return "circuit:" + node + ":" + PHASE_NAMES[phase]


@dataclass(frozen=True)
class ModbusRtuLink:
    bus: str
    address: int
    kind: str = "modbus-rtu"


@dataclass(frozen=True)
class ModbusTcpLink:
    host: str
    port: int = 502
    unit: int = 1
    kind: str = "modbus-tcp"


@dataclass(frozen=True)
class CborSerialLink:
    device: str
    baud: int = 115200
    kind: str = "cbor-serial"


@dataclass(frozen=True)
class CborTcpLink:
    host: str
    port: int
    kind: str = "cbor-tcp"


Link = ModbusRtuLink | ModbusTcpLink | CborSerialLink | CborTcpLink


@dataclass(frozen=True)
class SerialBus:
    """One RS-485 line with its serial settings; Modbus RTU columns and meters name it."""

    name: str
    device: str
    baud: int = 9600
    parity: str = "N"
    stopbits: int = 1


@dataclass(frozen=True)
class Circuit:
    """A feeder with its own per-phase rating, hanging off the site or off another circuit."""

    id: str
    rating_a: PhaseCurrents
    parent: str = SITE_NODE


@dataclass(frozen=True)
class Column:
    id: str
    circuit: str            # circuit id, or SITE_NODE when wired straight to the connection
    phases: int             # 1 or 3
    rotation: tuple[int, ...]  # site phase index of each column phase (len == phases)
    hardware_a: float
    installation_a: float
    link: Link

    @property
    def max_a(self) -> float:
        """The most this column may ever offer (hardware and installation rating)."""
        return min(self.hardware_a, self.installation_a)

    def site_phases(self, draw_phases: tuple[int, ...] | None = None) -> frozenset[int]:
        """Site phases loaded when the car draws on ``draw_phases`` (column phase indices).

        None (unknown) or anything invalid means every phase of the column: the safe assumption.
        """
        if draw_phases:
            picked = {self.rotation[i] for i in draw_phases if 0 <= i < self.phases}
            if picked:
                return frozenset(picked)
        return self._all_site_phases

    @functools.cached_property
    def _all_site_phases(self) -> frozenset[int]:
        return frozenset(self.rotation)


@dataclass(frozen=True)
class SiteMeter:
    """The energy meter at the connection point (measures the whole site, EVs included)."""

    kind: str
    link: ModbusRtuLink | ModbusTcpLink
    stale_s: float = 10.0


@dataclass(frozen=True)
class AllocationSettings:
    """Tuning of the allocator; defaults follow DESIGN-NOTES / the UK smart charge point rules."""

    increase_delay_max_s: float = 600.0   # randomised delay before any increase (0..1800)
    dno_restore_without_delay: bool = False  # a DNO-ordered restore applies at once
    min_pause_s: float = 300.0            # a paused session stays paused at least this long
    rotation_s: float = 900.0             # a charging session is protected from rotation this long
    reclaim_margin_a: float = 2.0         # offer measured + margin to cars drawing clearly less
    reclaim_settle_s: float = 60.0        # offer unchanged this long before reclaiming
    overdraw_grace_s: float = 10.0        # measured above allowed this long before it is reported


@dataclass(frozen=True)
class Site:
    id: str
    capacity_a: PhaseCurrents
    circuits: Mapping[str, Circuit]
    columns: tuple[Column, ...]
    voltage_v: float = 230.0
    dno_failsafe_a: float | None = None          # site limit once DNO limits expire with the link down
    dno_failsafe_duration_s: float | None = None  # how long that failsafe holds (None: until link up)
    buses: Mapping[str, SerialBus] = field(default_factory=dict)
    meter: SiteMeter | None = None
    allocation: AllocationSettings = field(default_factory=AllocationSettings)

    def column(self, column_id: str) -> Column | None:
        return self._column_index.get(column_id)

    @functools.cached_property
    def _column_index(self) -> dict[str, Column]:
        """Columns by id, built at the first lookup (the allocation looks up every column at
        every step: a scan made that O(N^2)). The first of a duplicated id wins, as before."""
        index: dict[str, Column] = {}
        for col in self.columns:
            index.setdefault(col.id, col)
        return index

    def node_path(self, circuit: str) -> tuple[str, ...]:
        """Nodes from ``circuit`` up to the site, inclusive: ('f1a', 'f1', 'site')."""
        path: list[str] = []
        node = circuit
        while node != SITE_NODE and node in self.circuits and node not in path:
            path.append(node)
            node = self.circuits[node].parent
        path.append(SITE_NODE)
        return tuple(path)

    def node_rating_a(self, node: str) -> PhaseCurrents:
        return self.capacity_a if node == SITE_NODE else self.circuits[node].rating_a

    def constraint_keys(self, column: Column, phases: frozenset[int]) -> tuple[str, ...]:
        """Every node/phase constraint a current on ``phases`` of this column passes through
        (the allocation asks for every session at every step: kept once per circuit and phases)."""
        known = self._constraint_keys
        keys = known.get((column.circuit, phases))
        if keys is None:
            keys = known[(column.circuit, phases)] = tuple(
                site_phase_key(node, p) for node in self.node_path(column.circuit) for p in sorted(phases))
        return keys

    @functools.cached_property
    def _constraint_keys(self) -> dict[tuple[str, frozenset[int]], tuple[str, ...]]:
        return {}

    def phase_paths(self, column: Column) -> tuple[tuple[str, ...], ...]:
        """Per column phase, the node/phase constraints its current passes through, from the
        column's circuit up to the site (the load check sums every column's currents on them)."""
        key = (column.circuit, column.rotation)
        paths = self._phase_paths.get(key)
        if paths is None:
            nodes = self.node_path(column.circuit)
            paths = self._phase_paths[key] = tuple(tuple(site_phase_key(node, p) for node in nodes)
                                                   for p in column.rotation)
        return paths

    @functools.cached_property
    def _phase_paths(self) -> dict[tuple[str, tuple[int, ...]], tuple[tuple[str, ...], ...]]:
        return {}

    def constraint_limits_da(self, site_limit_a: PhaseCurrents | None = None) -> dict[str, int]:
        """Rating of each node/phase in deci-amps; the site nodes take the tighter of the
        capacity and ``site_limit_a`` (the effective site limit)."""
        limits: dict[str, int] = {}
        for p in range(3):
            site_a = self.capacity_a[p]
            if site_limit_a is not None:  # a limit that is not a number fails closed
                lim = site_limit_a[p]
                site_a = min(site_a, lim) if math.isfinite(lim) else 0.0
            limits[site_phase_key(SITE_NODE, p)] = to_da(max(site_a, 0.0))
            for cid, circuit in self.circuits.items():
                limits[site_phase_key(cid, p)] = to_da(circuit.rating_a[p])
        return limits

    def kw_to_a(self, kw: float, phases: int = 3) -> float:
        """Power to current per phase: I = P / (V x phases)."""
        return kw * 1000.0 / (self.voltage_v * phases)
