"""The gateway service: southbound adapters -> site model and allocation -> columns, and MQTT.

One asyncio TaskGroup with named tasks:

- ``south:<adapter>`` / ``site-meter``: turn adapter events (readings, link changes, boots,
  sessions, meter readings) into the per-column view, retained column status and events
  (session start/stop with energy, faults, column online/offline).
- ``control``: one allocation step every ``control_interval_s`` and at once after a command, a
  session change or a column coming or going: DNO link state -> ``LimitBook.effective`` ->
  ``allocate`` -> limits for every column under control, each with its pre-assigned failsafe
  (``plan_failsafe``) until the column has confirmed it. The allocator applies decreases at once
  and delays increases; the step only sends what it decides. Measured load is checked against
  the limits (``check_load``) and new violations become events. From ``SLICE_MIN_COLUMNS``
  columns the periodic step runs in slices with the loop free in between (the allocation in
  stages, ``AllocationStep``); a step that began later (a command's, run at once on the loop)
  supersedes it.
- ``limits:<writer>``: one writer per RS-485 bus and per TCP/CBOR column, so a slow column never
  holds back a decrease for another; commands queued while a write runs are merged (the latest
  limit per column wins, a pending failsafe is kept).
- ``telemetry``: column and site telemetry every ``telemetry_interval_s``, in slices of
  ``TELEMETRY_SLICE`` columns (one outbox transaction each) with the loop free between them, so a
  round for thousands of columns never holds up the polls.
- ``commands``: DNO commands: ``CommandAuthenticator.check`` -> ``LimitBook.add`` (site and
  column limits) or the site settings (failsafe, config) -> ``AuditLog.record`` (every decision,
  before anything reaches a column) -> control step and the columns' writes (at most
  ``ACK_WAIT_S``) -> ack on the MQTT 5 response topic with the correlation data when the sender
  gave a valid one, else on the ack topic, carrying the limit actually in force. A limit the
  LimitBook refuses is rejected with its reason (``out_of_range``, ``expired``, ...).
- ``mqtt``: the Publisher draining the outbox (birth/will, reconnects).

The DNO link is the gateway's MQTT connection: up while the publisher is connected. (Through a
site-local bridged broker that is the link to the local broker, not the bridge's.)

Which columns are "under control": online and read at least once since they came online.
The others are reserved at what they may still draw (their failsafe, or the last limit sent
while it may still be valid), so the allocation never counts on capacity they might use.

Site failsafe and config commands change the site settings until their validity ends, then
the values from the site file come back. An expiry that would change the DNO failsafe is held
while the DNO link is down: the LimitBook is rebuilt on such a change and only keeps the limits
still valid, which is exact only while the link is up (see ``_apply_site``).

At start the DNO commands accepted and still valid are taken back from the audit log
(``read_decisions``): a restart after a crash or a power cut must not undo a curtailment the
DNO was told was applied.

Shutdown (``request_stop``, SIGTERM): every online column gets its current limit again with its
failsafe, confirmed where the link confirms writes; the outbox is drained while the broker is
there (what is left stays on disk for the next start); the publisher says offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from firmware.status_names import CP_NAMES, ERROR_NAMES, STATUS_NAMES
from gateway.config import GatewayConfig
from gateway.core.allocation import (
    Allocation,
    AllocationStep,
    AllocatorState,
    ColumnMemory,
    Session,
    allocate,
)
from gateway.core.failsafe import FailsafePlan, plan_failsafe
from gateway.core.limits import (
    R_ABOVE_CAPACITY,
    R_ABOVE_RATING,
    R_EXPIRED,
    R_NEGATIVE,
    R_NOT_FINITE,
    R_UNKNOWN_COLUMN,
    SOURCE_CAPACITY,
    SOURCE_DNO,
    SOURCE_DNO_FAILSAFE,
    EffectiveLimit,
    Limit,
    LimitBook,
    LoadCheck,
    LoadCheckState,
    check_load,
)
from gateway.core.site import PHASE_NAMES, CborSerialLink, CborTcpLink, Column, ModbusRtuLink, Site, to_da
from gateway.north import payloads, topics
from gateway.north.audit import AuditLog, read_decisions
from gateway.north.auth import CommandAuthenticator, Decision
from gateway.north.outbox import MessageKind, Outbox, Outgoing
from gateway.north.payloads import Command, CommandKind, LimitContext, Reason, utc_ms
from gateway.north.publisher import InboundMessage, Publisher
from gateway.south.cbor_columns import (
    CborColumn,
    CborColumns,
    CborConfig,
    CborSerialColumn,
    CborTcpColumn,
    ColumnBooted,
    ColumnSession,
)
from gateway.south.modbus_bus import ModbusRtuBus, RtuBusConfig, RtuColumn
from gateway.south.modbus_tcp import ModbusTcpColumns, TcpColumn, TcpConfig
from gateway.south.site_meter import ClientReader, MeterReading, MeterState, RegisterReader, SiteMeter
from gateway.south.types import ColumnLink, ColumnReading, LimitCommand, LimitResult

log = logging.getLogger(__name__)

SESSION_CP_STATES = ("B", "C", "D")               # a car is plugged in
NO_SESSION_STATUSES = ("Faulted", "Unavailable", "Finishing")
SITE_SOURCE_NAMES = {SOURCE_CAPACITY: "connection", SOURCE_DNO: "dno", SOURCE_DNO_FAILSAFE: "failsafe"}
_BOOK_REASONS = {R_NOT_FINITE: Reason.NOT_FINITE, R_NEGATIVE: Reason.OUT_OF_RANGE,
                 R_ABOVE_CAPACITY: Reason.OUT_OF_RANGE, R_ABOVE_RATING: Reason.OUT_OF_RANGE,
                 R_EXPIRED: Reason.EXPIRED, R_UNKNOWN_COLUMN: Reason.UNKNOWN_COLUMN}
_FAILSAFE_TOLERANCE_A = 0.05
_CONFIRM_GRACE_MS = 3000      # a reading may predate a write by this much
_VALIDITY_SLACK_S = 5.0       # a column's validity left may trail ours by this much (rounding, delays)
_READBACK_SLACK_S = 2.0       # validity read back after a broadcast: whole seconds + the poll's age
_MIN_STEP_GAP_S = 0.05        # event-driven steps at most this often
SLICE_MIN_COLUMNS = 500       # from this many columns the periodic step runs in slices ...
STEP_SLICE = 500              # ... of this many columns each (a few ms of the loop each)
ACK_WAIT_S = 2.0              # a command's ack waits this long for the columns' writes
TELEMETRY_SLICE = 250         # columns per slice of a telemetry round (~8 ms of the loop each)
SHUTDOWN_WAIT_S = 5.0         # final limit writes at shutdown
DRAIN_WAIT_S = 3.0            # outbox drain at shutdown while the broker is connected


class ColumnAdapter(Protocol):
    events: asyncio.Queue[Any]

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def set_limits(self, commands: Sequence[LimitCommand]) -> list[LimitResult]: ...


# -- southbound wiring ---------------------------------------------------------------------

@dataclass
class South:
    adapters: dict[str, ColumnAdapter]
    writer_of: dict[str, str]                # column id -> writer name
    adapter_of_writer: dict[str, str]        # writer name -> adapter name
    kind_of: dict[str, str]                  # column id -> "modbus" | "cbor"
    meter: SiteMeter | None = None


def build_south(config: GatewayConfig) -> South:
    """The adapters the site file asks for: one bus master per RS-485 line, one Modbus TCP
    adapter, one CBOR adapter, and the site meter (sharing a bus master when on its line)."""
    site, svc = config.site, config.service
    rtu: dict[str, list[RtuColumn]] = {}
    tcp: list[TcpColumn] = []
    cbor: list[CborColumn] = []
    south = South({}, {}, {}, {})
    for col in site.columns:
        link = col.link
        if isinstance(link, ModbusRtuLink):
            rtu.setdefault(link.bus, []).append(RtuColumn(col.id, link.address,
                                                          poll_period_s=svc.poll_period_s))
            south.writer_of[col.id] = "rtu:" + link.bus
            south.adapter_of_writer["rtu:" + link.bus] = "rtu:" + link.bus
            south.kind_of[col.id] = "modbus"
        elif isinstance(link, CborSerialLink | CborTcpLink):
            cbor.append(CborSerialColumn(col.id, link.device, link.baud) if isinstance(link, CborSerialLink)
                        else CborTcpColumn(col.id, link.host, link.port))
            south.writer_of[col.id] = "col:" + col.id
            south.adapter_of_writer["col:" + col.id] = "cbor"
            south.kind_of[col.id] = "cbor"
        else:
            tcp.append(TcpColumn(col.id, link.host, link.port, link.unit, poll_period_s=svc.poll_period_s))
            south.writer_of[col.id] = "col:" + col.id
            south.adapter_of_writer["col:" + col.id] = "modbus-tcp"
            south.kind_of[col.id] = "modbus"
    buses: dict[str, ModbusRtuBus] = {}
    for name, columns in rtu.items():
        bus = site.buses[name]
        buses[name] = ModbusRtuBus(RtuBusConfig(
            bus.device, baud=bus.baud, parity=bus.parity, stopbits=bus.stopbits,
            heartbeat_period_s=float(svc.heartbeat_period_s), response_margin_s=svc.response_timeout_s),
            columns)
        south.adapters["rtu:" + name] = buses[name]
    if tcp:
        south.adapters["modbus-tcp"] = ModbusTcpColumns(tcp, TcpConfig(heartbeat_period_s=float(
            svc.heartbeat_period_s)))
    if cbor:
        south.adapters["cbor"] = CborColumns(cbor, CborConfig(heartbeat_interval_s=svc.heartbeat_period_s))
    meter = site.meter
    if meter is not None:
        reader: RegisterReader
        if isinstance(meter.link, ModbusRtuLink):
            unit = meter.link.address
            shared = buses.get(meter.link.bus)
            if shared is not None:
                reader = shared
            else:
                line = site.buses[meter.link.bus]
                reader = ClientReader.rtu(line.device, baud=line.baud, parity=line.parity,
                                          stopbits=line.stopbits)
        else:
            unit = meter.link.unit
            reader = ClientReader.tcp(meter.link.host, meter.link.port)
        south.meter = SiteMeter(reader, kind=meter.kind, unit=unit, period_s=svc.poll_period_s,
                                stale_s=meter.stale_s)
    return south


class LimitWriter:
    """Sends limits through one adapter, one batch at a time; submissions made while a batch
    is on its way are merged into the next one (latest limit per column, failsafe kept)."""

    def __init__(self, name: str, adapter: ColumnAdapter,
                 on_results: Callable[[Sequence[LimitCommand], Sequence[LimitResult]], None]) -> None:
        self.name = name
        self.adapter = adapter
        self.on_results = on_results
        self.pending: dict[str, LimitCommand] = {}
        self.busy = False
        self._wake = asyncio.Event()

    def submit(self, commands: Sequence[LimitCommand]) -> None:
        for cmd in commands:
            old = self.pending.get(cmd.column_id)
            keep = old is not None and cmd.failsafe_a is None and old.failsafe_a is not None
            self.pending[cmd.column_id] = replace(cmd, failsafe_a=old.failsafe_a) if keep and old else cmd
        if commands:
            self._wake.set()

    @property
    def idle(self) -> bool:
        return not self.pending and not self.busy

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self.pending:
                continue
            batch = list(self.pending.values())
            self.pending.clear()
            self.busy = True
            try:
                results = await self.adapter.set_limits(batch)
            except Exception as exc:  # an adapter bug must not stop the writer
                log.exception("limit writer %s: set_limits failed", self.name)
                results = [LimitResult(c.column_id, False, "none", "internal: " + type(exc).__name__)
                           for c in batch]
            finally:
                self.busy = False
            try:
                self.on_results(batch, results)
            except Exception:
                log.exception("limit writer %s: result handling failed", self.name)


# -- per-column view -----------------------------------------------------------------------

@dataclass
class ColumnView:
    """What the service knows about one column (mutable; the event loop owns it)."""

    column: Column
    kind: str                               # "modbus" | "cbor"
    reading: ColumnReading | None = None
    online: bool = False
    seeded: bool = False                    # allocator memory set from a reading since online
    in_session: bool = False                # a car is plugged in (from the readings)
    session_started_ms: int | None = None
    session_id: int = 0
    session_start_wh: int | None = None
    session_energy_wh: int = 0
    error: str = "NoError"
    status_key: tuple[str, str, str, bool] | None = None
    need_sync: bool = True                  # (re)send limit and failsafe at the next step
    inflight: bool = False
    requested_a: float | None = None
    requested_fs: float | None = None
    requested_ms: int = 0
    applied_a: float | None = None          # what the column took from the last good write
    written_ms: int = 0
    valid_until_ms: int = 0
    failsafe_ok_a: float | None = None      # failsafe the column confirmed (None: unknown)
    unconfirmed_ms: int = 0                 # a broadcast decrease not yet seen in a reading (0: none)
    write_failure: str = ""
    warned: set[str] = field(default_factory=set)

    @property
    def controlled(self) -> bool:
        return self.online and self.seeded and self.reading is not None

    def session_present(self) -> bool:
        r = self.reading
        return (r is not None and r.cp_state in SESSION_CP_STATES and r.error == "NoError"
                and r.status not in NO_SESSION_STATUSES)


@dataclass
class ServiceStats:
    steps: int = 0
    step_errors: int = 0
    commands: int = 0
    commands_accepted: int = 0
    commands_dropped: int = 0          # inbox full
    enqueue_errors: int = 0
    bad_messages: int = 0              # telemetry/status that did not validate (vocabulary)
    event_errors: int = 0


@dataclass
class _Picked:
    """What a step reads of the columns (filled slice by slice on a large site)."""

    sessions: list[Session] = field(default_factory=list)
    reserved: dict[str, float] = field(default_factory=dict)     # columns not under control
    offered: dict[str, float] = field(default_factory=dict)      # fresh readings: offer ...
    measured: dict[str, tuple[float, ...]] = field(default_factory=dict)   # ... and currents


@dataclass(frozen=True)
class _Opened:
    generation: int
    now: int
    effective: EffectiveLimit


@dataclass(frozen=True)
class _Step:
    """A control step's inputs, taken on the event loop; run() and check() are pure."""

    generation: int
    now: int
    site: Site
    effective: EffectiveLimit
    picked: _Picked
    meter_a: tuple[float, float, float] | None
    base_load_a: tuple[float, float, float] | None
    state: AllocatorState
    load_state: LoadCheckState

    def run(self) -> tuple[Allocation, LoadCheck]:
        p = self.picked
        allocation = allocate(self.site, p.sessions, self.effective, self.now, self.state,
                              reserved_a=p.reserved, base_load_a=self.base_load_a)
        return allocation, self.check()

    def check(self) -> LoadCheck:
        p = self.picked
        return check_load(self.site, self.effective, p.offered, p.measured, self.now, state=self.load_state,
                          site_meter_a=self.meter_a)


@dataclass
class _Overrides:
    """Site settings changed by DNO commands, each with its expiry (UTC ms)."""

    failsafe: tuple[float, int | None, int] | None = None   # (limit A, duration s, until)
    config: dict[str, tuple[int, int]] = field(default_factory=dict)   # name -> (value, until)


class GatewayService:
    """``await GatewayService(config).run()``; ``request_stop()`` ends it cleanly."""

    def __init__(self, config: GatewayConfig, *, now_ms: Callable[[], int] = utc_ms,
                 south: South | None = None) -> None:
        self.config = config
        self.svc = config.service
        self._now_ms = now_ms
        self._base_site = config.site
        self.site = config.site
        self.site_id = config.site.id
        self.stats = ServiceStats()
        self.south = south if south is not None else build_south(config)
        self.views = {c.id: ColumnView(c, self.south.kind_of.get(c.id, "modbus")) for c in self.site.columns}
        start = now_ms()
        self.book = LimitBook(self.site, dno_link_up=False, now_ms=start)
        self.plan: FailsafePlan = plan_failsafe(self.site)
        self.alloc_state = AllocatorState()
        self.allocation: Allocation | None = None
        self._step_generation = 0               # steps begun; a sliced step overtaken is dropped
        self.slice_min_columns = SLICE_MIN_COLUMNS
        self._load_state = LoadCheckState()
        self._overrides = _Overrides()
        self._telemetry_s = self.svc.telemetry_interval_s
        self._telemetry_topics: dict[str, str] = {}   # column id -> its telemetry topic (built once)
        self._last_effective: tuple[str, tuple[float, float, float]] | None = None
        self._writers: dict[str, LimitWriter] = {}
        self._meter_ok = True               # no meter fault announced
        self._stop = asyncio.Event()
        self._control_wake = asyncio.Event()
        self._inbox: asyncio.Queue[InboundMessage] = asyncio.Queue(256)
        self.started_ms = start
        self.outbox: Outbox | None = None
        self.audit: AuditLog | None = None
        self.publisher: Publisher | None = None
        self.auth: CommandAuthenticator | None = None
        self.ready = asyncio.Event()            # set once the tasks run (tests)

    def all_columns_online(self) -> bool:
        """Every column has come online (the start is over: gateway.collector)."""
        return all(v.online for v in self.views.values())

    @property
    def telemetry_interval_s(self) -> float:
        """The file's value, or the DNO's while its config command is valid."""
        return self._telemetry_s

    # -- lifetime ----------------------------------------------------------------------------
    def request_stop(self) -> None:
        if not self._stop.is_set():
            log.info("stop requested")
        self._stop.set()

    def _open_north(self) -> None:
        mqtt, dno = self.config.mqtt, self.config.dno
        keys = dno.load_keys()
        mqtt.outbox.path.parent.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(mqtt.outbox.path, max_rows=mqtt.outbox.max_rows, max_bytes=mqtt.outbox.max_bytes,
                             durability=mqtt.outbox.durability, clock_ms=self._now_ms)
        self.audit = AuditLog(dno.audit_path, max_bytes=dno.audit_max_bytes, backups=dno.audit_backups,
                              clock_ms=self._now_ms)
        self._restore_commands(read_decisions(dno.audit_path, dno.audit_backups))
        self.auth = CommandAuthenticator(keys, site_id=self.site_id, window_s=dno.window_s,
                                         max_validity_s=dno.max_validity_s,
                                         replay_capacity=dno.replay_capacity,
                                         context=self._limit_context, clock_ms=self._now_ms,
                                         not_before_ms=self.started_ms)
        self.publisher = Publisher(mqtt, self.outbox, site_id=self.site_id,
                                   subscriptions=topics.gateway_subscriptions(self.site_id),
                                   on_message=self._on_inbound, clock_ms=self._now_ms)

    def _restore_commands(self, decisions: Sequence[dict[str, Any]]) -> None:
        """The DNO's accepted commands still valid, from the audit log: a gateway restarted after
        a crash or a power cut goes on obeying the limits it acknowledged (in the order accepted)."""
        now = self._now_ms()
        restored = 0
        for d in decisions:
            until, limit, kind = d.get("valid_until_ms"), d.get("limit_a"), d.get("kind")
            if d.get("decision") != "accepted" or not isinstance(until, int) or until <= now:
                continue
            try:
                target = topics.parse(str(d.get("topic")))
            except topics.TopicError:
                continue
            if kind in (CommandKind.SITE_LIMIT, CommandKind.COLUMN_LIMIT) and isinstance(limit, int | float):
                lim = Limit(SOURCE_DNO, float(limit), until, column=target.column_id, id=str(d.get("id")))
                restored += self.book.add(lim, now) is None
            elif kind == CommandKind.SITE_FAILSAFE and isinstance(limit, int | float):
                duration = d.get("duration_s")
                self._overrides.failsafe = (min(float(limit), max(self.site.capacity_a)),
                                            duration if isinstance(duration, int) else None, until)
                restored += 1
            elif kind == CommandKind.CONFIG and isinstance(d.get("config"), dict):
                for name, value in d["config"].items():
                    if isinstance(value, int):
                        self._overrides.config[name] = (value, until)
                restored += 1
        if restored:
            log.info("restored %d DNO commands still valid from the audit log", restored)
            self._apply_site(now)

    async def run(self) -> None:
        started: list[Any] = []
        try:
            self._open_north()
            assert self.publisher is not None
            for name, adapter in self.south.adapters.items():
                await adapter.start()
                started.append(adapter)
                for wname, aname in self.south.adapter_of_writer.items():
                    if aname == name:
                        self._writers[wname] = LimitWriter(wname, adapter, self._on_limit_results)
            if self.south.meter is not None:
                await self.south.meter.start()
                started.append(self.south.meter)
            self._event("gateway_started", columns=len(self.views))
            log.info("gateway started: site %s, %d columns", self.site_id, len(self.views),
                     extra={"site_id": self.site_id})
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._consume(adapter.events), name="south:" + name)
                         for name, adapter in self.south.adapters.items()]
                if self.south.meter is not None:
                    tasks.append(tg.create_task(self._consume(self.south.meter.events), name="site-meter"))
                tasks += [tg.create_task(w.run(), name="limits:" + w.name) for w in self._writers.values()]
                tasks.append(tg.create_task(self._control_loop(), name="control"))
                tasks.append(tg.create_task(self._telemetry_loop(), name="telemetry"))
                commands = tg.create_task(self._command_loop(), name="commands")
                tg.create_task(self.publisher.run(), name="mqtt")
                self.ready.set()
                await self._stop.wait()
                commands.cancel()
                await self._hand_over()
                for task in tasks:
                    task.cancel()
                if self.publisher.connected:
                    await self.publisher.drained(DRAIN_WAIT_S)
                await self.publisher.stop()
        finally:
            for name, adapter in self.south.adapters.items():
                stats = getattr(adapter, "stats", None)
                if stats is not None:
                    log.info("south %s counters", name, extra={"adapter": name, "counters": vars(stats)})
            log.info("service counters", extra={"counters": vars(self.stats)})
            for part in reversed(started):
                with contextlib.suppress(Exception):
                    await part.stop()
            if self.outbox is not None:
                log.info("outbox closed with %d messages queued", len(self.outbox))
                self.outbox.close()
            if self.audit is not None:
                self.audit.close()
            log.info("gateway stopped")

    async def _hand_over(self) -> None:
        """Every online column gets its limit again, with its failsafe: what it falls back to
        once our heartbeats stop."""
        self._event("gateway_stopping")
        for view in self.views.values():
            if view.online:
                view.need_sync = True
                view.inflight = False
        self._safe_step()
        done = await self.flush_limits(SHUTDOWN_WAIT_S)
        ok = sorted(cid for cid, v in self.views.items() if v.online and not v.need_sync)
        confirmed = set(ok)
        left = sorted(cid for cid in self.views if cid not in confirmed)
        log.info("hand-over: failsafe confirmed on %s; not reached: %s%s", _some(ok), _some(left),
                 "" if done else " (writes still running)",
                 extra={"confirmed": len(ok), "not_reached": len(left)})

    async def flush_limits(self, timeout_s: float) -> bool:
        """Wait until every limit writer is idle; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(w.idle for w in self._writers.values()):
                return True
            await asyncio.sleep(0.01)
        return all(w.idle for w in self._writers.values())

    # -- southbound events --------------------------------------------------------------------
    async def _consume(self, queue: asyncio.Queue[Any]) -> None:
        while True:
            event = await queue.get()
            try:
                self._on_south(event)
            except Exception:
                self.stats.event_errors += 1
                log.exception("southbound event %s failed", type(event).__name__)

    def _on_south(self, event: Any) -> None:
        if isinstance(event, ColumnReading):
            self._on_reading(event)
        elif isinstance(event, ColumnLink):
            self._on_link(event)
        elif isinstance(event, ColumnSession):
            self._on_cbor_session(event)
        elif isinstance(event, ColumnBooted):
            self._on_boot(event)
        elif isinstance(event, MeterReading):
            pass   # read through SiteMeter.latest(), which knows when it is stale
        elif isinstance(event, MeterState):
            if event.fresh == self._meter_ok:
                return
            self._meter_ok = event.fresh
            if event.fresh:
                self._event("fault_cleared", device="site_meter")
            else:   # fails safe: the allocation goes on from the columns' own readings
                self._event("fault", device="site_meter", reason=event.reason, detail=event.detail[:200])

    def _on_link(self, link: ColumnLink) -> None:
        view = self.views.get(link.column_id)
        if view is None or (view.online == link.online and view.status_key is not None):
            return
        view.online = link.online
        view.seeded = False
        view.need_sync = True
        view.inflight = False
        view.failsafe_ok_a = None
        if link.online:
            log.info("column %s online", link.column_id, extra={"column_id": link.column_id})
            self._event("column_online", link.column_id)
        else:
            log.warning("column %s offline: %s", link.column_id, link.reason,
                        extra={"column_id": link.column_id, "reason": link.reason})
            self._event("column_offline", link.column_id, reason=link.reason,
                        detail=link.detail[:200] or None)
            self._publish_status(view)   # online: the first reading publishes a fresh status
        self._wake()

    def _on_reading(self, reading: ColumnReading) -> None:
        view = self.views.get(reading.column_id)
        if view is None:
            return
        if not reading.online:
            view.reading = reading
            return
        if not view.online:   # a reading is a sign of life, whatever the link said before
            self._on_link(ColumnLink(reading.column_id, True, "ok", 0, reading.ts_ms, reading.ts_ms))
        view.reading = reading
        now = self._now_ms()
        first = not view.seeded
        if first:
            # What the column offers now is what the allocator starts from (no random delay for
            # a car that was already charging when the gateway (re)started or the link came back).
            mem = ColumnMemory(applied_da=to_da(reading.offered_a), applied_since_ms=now,
                               charging_since_ms=now if reading.offered_a > 0 else None)
            self.alloc_state = replace(self.alloc_state, columns={**self.alloc_state.columns,
                                                                  reading.column_id: mem})
            view.seeded = True
            self._wake()
        self._track_session(view, reading, first)
        self._track_fault(view, reading)
        self._check_column_limits(view, reading, now)
        self._publish_status(view)

    def _track_session(self, view: ColumnView, r: ColumnReading, first: bool) -> None:
        """Sessions for the allocation (both kinds) and the session events: from the readings for
        Modbus columns; CBOR columns send Start/StopTransaction, except for a session already
        running when the link came up (``first``: the first reading since), reported as resumed."""
        present = r.cp_state in SESSION_CP_STATES
        cid = view.column.id
        if present and not view.in_session:
            view.in_session = True
            view.session_started_ms = r.ts_ms
            self._wake()
            if view.kind == "modbus":
                view.session_id = r.session_id
                view.session_start_wh = r.energy_wh - r.session_energy_wh
                self._event("session_started", cid, session_id=r.session_id,
                            meter_start_wh=view.session_start_wh, resumed=first)
            elif first:
                self._event("session_started", cid, session_id=r.session_id or None, meter_start_wh=None,
                            resumed=True)
        elif present and view.kind == "modbus" and r.session_id != view.session_id:
            self._modbus_stop(view, r, "Other")
            view.session_id = r.session_id
            view.session_start_wh = r.energy_wh - r.session_energy_wh
            view.session_started_ms = r.ts_ms
            self._event("session_started", cid, session_id=r.session_id, meter_start_wh=view.session_start_wh,
                        resumed=first)
        elif not present and view.in_session:
            view.in_session = False
            view.session_started_ms = None
            self._wake()
            if view.kind == "modbus":
                self._modbus_stop(view, r, "EVDisconnected")
        if present and r.session_id == view.session_id:
            view.session_energy_wh = r.session_energy_wh

    def _modbus_stop(self, view: ColumnView, r: ColumnReading, reason: str) -> None:
        same = r.session_id == view.session_id
        energy = max(r.session_energy_wh, view.session_energy_wh) if same else view.session_energy_wh
        self._event("session_stopped", view.column.id, session_id=view.session_id, energy_wh=energy,
                    meter_stop_wh=r.energy_wh if same else None, reason=reason)

    def _on_cbor_session(self, s: ColumnSession) -> None:
        view = self.views.get(s.column_id)
        if view is None:
            return
        if s.started:
            view.session_id, view.session_start_wh = s.session_id, s.meter_wh
            if not view.in_session:  # told before the first reading: the reading must not repeat it
                view.in_session = True
                view.session_started_ms = self._now_ms()
                self._wake()
            self._event("session_started", s.column_id, session_id=s.session_id, meter_start_wh=s.meter_wh,
                        resumed=False)
        else:
            self._event("session_stopped", s.column_id, session_id=s.session_id,
                        energy_wh=s.session_energy_wh, meter_stop_wh=s.meter_wh, reason=s.reason or None)
        self._wake()

    def _on_boot(self, boot: ColumnBooted) -> None:
        view = self.views.get(boot.column_id)
        if view is None:
            return
        view.need_sync = True            # a rebooted column has forgotten our limit and failsafe
        view.failsafe_ok_a = None
        view.seeded = False
        if boot.config_error:
            self._event("config_error", boot.column_id, detail=boot.config_error[:200])
        elif not boot.accepted:
            self._event("fault", boot.column_id, error="ConfigError", detail=boot.fault[:200])
        self._wake()

    def _track_fault(self, view: ColumnView, r: ColumnReading) -> None:
        if r.error == view.error:
            return
        if r.error != "NoError":
            log.warning("column %s fault: %s", r.column_id, r.error, extra={"column_id": r.column_id})
            self._event("fault", r.column_id, error=r.error, status=r.status)
        else:
            self._event("fault_cleared", r.column_id, error=view.error)
        view.error = r.error
        self._wake()

    def _check_column_limits(self, view: ColumnView, r: ColumnReading, now: int) -> None:
        """Resend when the column no longer holds what we gave it (it rebooted, a broadcast
        was lost, ...): its failsafe differs, or its assignment is gone while still valid, or it
        offers more than our last limit although our limit binds it (a broadcast is not
        confirmed: a lost decrease must not wait for the next refresh)."""
        if view.inflight:
            return
        if (not view.need_sync and view.applied_a is not None and view.valid_until_ms > now
                and r.ts_ms > view.written_ms and r.limit_source == "gateway"
                and r.offered_a > view.applied_a + _FAILSAFE_TOLERANCE_A):
            self._resync_warning(view, "offers %.1f A, above its limit %.1f A" % (r.offered_a,
                                                                                 view.applied_a))
            view.need_sync = True
            self._wake()
        # A reply stamped after the broadcast's result was polled after its turnaround (one
        # exchange at a time on the line, the broadcast's wait included): the column has had
        # the time to act on it. The bus polls a broadcast's columns first after it.
        if view.unconfirmed_ms and r.ts_ms > view.unconfirmed_ms:
            self._confirm_broadcast(view, r)
        if now - view.written_ms < _CONFIRM_GRACE_MS:
            return
        if view.failsafe_ok_a is not None and abs(r.failsafe_a - view.failsafe_ok_a) > _FAILSAFE_TOLERANCE_A:
            self._resync_warning(view, "holds failsafe %.1f A, expected %.1f A" % (r.failsafe_a,
                                                                                 view.failsafe_ok_a))
            view.failsafe_ok_a = None
            self._wake()
        # Gone, or shorter than our last write left it: that write (a broadcast refresh) was lost.
        expected_s = (view.valid_until_ms - r.ts_ms) / 1000
        lost = view.valid_until_ms > now + _CONFIRM_GRACE_MS and (
            r.assigned_remaining_s == 0
            or (r.ts_ms > view.written_ms and r.assigned_remaining_s < expected_s - _VALIDITY_SLACK_S))
        if lost and not view.need_sync:
            self._resync_warning(view, "lost its limit assignment")
            view.need_sync = True
            self._wake()

    def _confirm_broadcast(self, view: ColumnView, r: ColumnReading) -> None:
        """A broadcast decrease is confirmed by the first reading polled after it: the column
        offers no more than it (checked above) and its assignment restarted with that write.
        A column that shows neither did not hear it, and gets it again, answered."""
        view.unconfirmed_ms = 0
        if view.need_sync:
            return
        expected_s = (view.valid_until_ms - r.ts_ms) / 1000
        if r.assigned_remaining_s == 0 or r.assigned_remaining_s < expected_s - _READBACK_SLACK_S:
            self._resync_warning(view, "missed a broadcast decrease")
            view.need_sync = True
            self._wake()

    def _resync_warning(self, view: ColumnView, what: str) -> None:
        """Once per kind of mismatch and column (a column that keeps refusing, e.g. because its
        own rating is lower than the site file says, would otherwise fill the log)."""
        kind = what.split(" ", maxsplit=1)[0]
        level = logging.DEBUG if kind in view.warned else logging.WARNING
        view.warned.add(kind)
        log.log(level, "column %s %s: resending", view.column.id, what, extra={"column_id": view.column.id})

    # -- the control step ---------------------------------------------------------------------
    def _wake(self) -> None:
        self._control_wake.set()

    async def _control_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._control_wake.wait(), self.svc.control_interval_s)
            gap = _MIN_STEP_GAP_S - (loop.time() - last)
            if gap > 0:
                await asyncio.sleep(gap)
            self._control_wake.clear()
            last = loop.time()
            if len(self.views) < self.slice_min_columns:
                self._safe_step()
            else:
                await self._safe_step_sliced()

    def _safe_step(self) -> None:
        try:
            self._control_step()
        except Exception:   # a bug in one step must not stop the next ones
            self.stats.step_errors += 1
            log.exception("control step failed")

    def _control_step(self) -> None:
        """One step at once, on the loop (small sites; and a command's step: its decreases go
        out now)."""
        opened = self._open_step()
        views = list(self.views.items())
        picked = self._collect(views, opened.now)
        step = self._step_inputs(opened, picked)
        result = step.run()
        self._close_step(step, result)
        self._send_limits(views, result[0], step.now)

    async def _safe_step_sliced(self) -> None:
        """The step of a large site, the event loop free between slices of STEP_SLICE columns:
        the columns are read and their sessions' demands worked out, slice by slice; the
        site-wide part of the allocation and the load check run at once (~15 ms at 5,000
        columns); then the offers are finished and the limits sent, slice by slice. A step that
        begins meanwhile (a command's, at once on the loop) supersedes this one."""
        try:
            opened = self._open_step()
            views = list(self.views.items())
            picked = _Picked()
            allocation = AllocationStep(self.site, opened.effective, opened.now, self.alloc_state)
            if not await self._in_slices(views, opened.generation,
                                         lambda part: self._collect(part, opened.now, picked, allocation)):
                return
            step = self._step_inputs(opened, picked, allocation)
            load = self._solve_step(step, allocation)
            while not self._finish_slice(allocation):
                await asyncio.sleep(0)
                if step.generation != self._step_generation:
                    return
            result = allocation.result()
            self._close_step(step, (result, load))
            await self._in_slices(views, step.generation,
                                  lambda part: self._send_limits(part, result, step.now))
        except Exception:
            self.stats.step_errors += 1
            log.exception("control step failed")

    def _solve_step(self, step: _Step, allocation: AllocationStep) -> LoadCheck:
        """A sliced step's site-wide part: the allocation's solve and the load check."""
        allocation.solve(reserved_a=step.picked.reserved, base_load_a=step.base_load_a)
        return step.check()

    def _finish_slice(self, allocation: AllocationStep) -> bool:
        """The next STEP_SLICE columns' offers; True once every column's is."""
        return allocation.finish(STEP_SLICE)

    async def _in_slices(self, views: Sequence[tuple[str, ColumnView]], generation: int,
                         work: Callable[[Sequence[tuple[str, ColumnView]]], object]) -> bool:
        """work() on STEP_SLICE columns at a time, the loop free in between; False (and the
        rest left undone) once a later step has begun."""
        for start in range(0, len(views), STEP_SLICE):
            if start:
                await asyncio.sleep(0)
                if generation != self._step_generation:
                    return False
            work(views[start:start + STEP_SLICE])
        return True

    def _open_step(self) -> _Opened:
        """The site-wide part of a step: the DNO link, the site settings, the effective limit."""
        now = self._now_ms()
        self.stats.steps += 1
        self._step_generation += 1
        link_up = self.publisher is not None and self.publisher.connected
        if link_up != self.book.dno_link_up:
            log.info("DNO link %s", "up" if link_up else "down")
        self.book.set_dno_link(link_up, now)
        self._apply_site(now)
        self.book.prune(now)
        effective = self.book.effective(now)
        self._note_effective(effective, now)
        return _Opened(self._step_generation, now, effective)

    def _collect(self, views: Sequence[tuple[str, ColumnView]], now: int,
                 into: _Picked | None = None, allocation: AllocationStep | None = None) -> _Picked:
        """What the step needs of these columns: the sessions under control, what the others
        may draw, and the fresh readings the load check compares (the sessions go on to
        ``allocation`` too when given)."""
        picked = into if into is not None else _Picked()
        sessions, reserved = picked.sessions, picked.reserved
        first = len(sessions)
        offered, measured = picked.offered, picked.measured
        stale_before = self._stale_before(now)
        for cid, view in views:
            if not view.controlled:
                reserved[cid] = self._reserve_a(view, now)
                continue
            r = view.reading
            if r is None:
                continue
            fresh = r.ts_ms >= stale_before[view.kind == "cbor"]
            if fresh:
                offered[cid] = r.offered_a
                measured[cid] = r.current_a
            if not view.session_present():
                continue
            started = view.session_started_ms if view.session_started_ms is not None else r.ts_ms
            sessions.append(Session(cid, started, r.current_a if fresh else None, None,
                                    float(r.session_energy_wh)))
        if allocation is not None:
            allocation.add(itertools.islice(sessions, first, None))
        return picked

    def _step_inputs(self, opened: _Opened, picked: _Picked, begun: AllocationStep | None = None) -> _Step:
        """``begun``: a sliced step's allocation, begun on the site and the allocator state of
        the step's start (a column may have been seeded since)."""
        meter_a = self._meter_currents()
        site, state = (self.site, self.alloc_state) if begun is None else (begun.site, begun.state)
        return _Step(opened.generation, opened.now, site, opened.effective, picked, meter_a,
                     self._base_load(meter_a), state, self._load_state)

    def _close_step(self, step: _Step, result: tuple[Allocation, LoadCheck]) -> None:
        """The step's outcome becomes the service's: the allocator's memory, the load check's
        state and its new violations (the limits are sent next, by _send_limits)."""
        allocation, load = result
        state = allocation.state
        if self.alloc_state is not step.state:
            # A column came (back) online while a sliced step ran: the memory it
            # was seeded with stands, as if its reading had arrived just after this step.
            seeded = {cid: mem for cid, mem in self.alloc_state.columns.items()
                      if step.state.columns.get(cid) is not mem}
            state = replace(state, columns={**state.columns, **seeded})
        self.alloc_state = state
        self.allocation = allocation
        self._load_state = load.state
        for v in load.violations:
            if v.new:
                log.warning("limit violation: %s %s %s %.1f A > %.1f A", v.kind, v.target,
                            PHASE_NAMES[v.phase], v.measured_a, v.allowed_a)
                self._event("limit_violation", v.target if v.kind == "column_overdraw" else None,
                            kind=v.kind, target=v.target, phase=PHASE_NAMES[v.phase],
                            measured_a=round(v.measured_a, 2), allowed_a=round(v.allowed_a, 2),
                            since_ms=v.since_ms)

    def _reserve_a(self, view: ColumnView, now: int) -> float:
        """What a column outside our control may draw: its failsafe, or more while a limit we
        sent may still be in force."""
        amps = self.plan.limits_a.get(view.column.id, 0.0)
        if view.reading is not None:
            amps = max(amps, view.reading.failsafe_a)
        if view.applied_a is not None and view.valid_until_ms > now:
            amps = max(amps, view.applied_a)
        return min(amps, view.column.max_a)

    def _stale_before(self, now: int) -> tuple[float, float]:
        """A reading older than this is stale: (Modbus columns, CBOR columns). A CBOR column sends
        meter values every 10 s and its status on change; a Modbus column is polled."""
        modbus_s = 3.0 * self.svc.poll_period_s + 1.0
        cbor_s = max(25.0, 2.0 * self.svc.heartbeat_period_s + 5.0)
        return (now - modbus_s * 1000, now - cbor_s * 1000)

    def _meter_currents(self) -> tuple[float, float, float] | None:
        meter = self.south.meter
        reading = meter.latest() if meter is not None else None
        if reading is None:
            return None
        a = reading.current_a
        return (a[0] or 0.0, a[1] or 0.0, a[2] or 0.0)

    def _column_totals(self, now: int) -> tuple[float, list[float]]:
        """What the online columns' fresh readings add up to: power, and current per site phase."""
        power: float = 0
        load = [0.0, 0.0, 0.0]
        stale_before = self._stale_before(now)
        for view in self.views.values():
            r = view.reading
            if view.online and r is not None and r.ts_ms >= stale_before[view.kind == "cbor"]:
                power += r.power_w
                for amps, phase in zip(r.current_a, view.column.rotation, strict=False):
                    load[phase] += amps
        return power, load

    def _base_load(self, meter_a: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        """Non-EV load at the connection: the meter minus what the columns measure."""
        if meter_a is None:
            return None
        cols = self._column_totals(self._now_ms())[1]
        return (max(0.0, meter_a[0] - cols[0]), max(0.0, meter_a[1] - cols[1]),
                max(0.0, meter_a[2] - cols[2]))

    def _note_effective(self, eff: EffectiveLimit, now: int) -> None:
        key = (eff.source, eff.site_a)
        if key == self._last_effective:
            return
        first = self._last_effective is None
        self._last_effective = key
        limit_a = round(max(eff.site_a), 2)
        until = eff.limit.valid_until_ms if eff.limit is not None else None
        log.info("site limit %.1f A (%s)", limit_a, eff.source,
                 extra={"limit_a": limit_a, "source": eff.source})
        if not first:
            self._event("limit_changed", limit_a=limit_a, limit_valid_until_ms=until,
                        limit_source=SITE_SOURCE_NAMES.get(eff.source, eff.source))

    def _send_limits(self, views: Sequence[tuple[str, ColumnView]], allocation: Allocation, now: int) -> None:
        """The limit writes these columns need now (a change, a failsafe to confirm, a refresh)."""
        validity = self.svc.limit_validity_s
        refresh_ms = validity * 1000 // 3
        batches: dict[str, list[LimitCommand]] = {}
        offers = allocation.columns
        failsafes = self.plan.limits_a
        for cid, view in views:
            if not view.controlled:
                continue
            offer = offers.get(cid)
            if offer is None:
                continue
            target = offer.offered_a
            fs = failsafes.get(cid, 0.0)
            with_fs = view.need_sync or view.failsafe_ok_a is None or \
                abs(view.failsafe_ok_a - fs) > _FAILSAFE_TOLERANCE_A
            due = with_fs or target != view.requested_a or now - view.requested_ms >= refresh_ms
            if not due:
                continue
            if view.inflight and target == view.requested_a and (not with_fs or view.requested_fs == fs):
                continue   # the same write is on its way
            cmd = LimitCommand(cid, target, validity, fs if with_fs else None)
            view.requested_a, view.requested_fs, view.requested_ms = target, cmd.failsafe_a, now
            view.inflight = True
            batches.setdefault(self.south.writer_of[cid], []).append(cmd)
        for writer, commands in batches.items():
            self._writers[writer].submit(commands)

    def _on_limit_results(self, commands: Sequence[LimitCommand], results: Sequence[LimitResult]) -> None:
        now = self._now_ms()
        by_column = {r.column_id: r for r in results}
        for cmd in commands:
            view = self.views.get(cmd.column_id)
            if view is None:
                continue
            view.inflight = False
            result = by_column.get(cmd.column_id)
            if result is not None and result.ok:
                lower = view.applied_a is not None and result.limit_da / 10 < view.applied_a
                view.applied_a = result.limit_da / 10
                view.written_ms = now
                view.valid_until_ms = now + cmd.validity_s * 1000
                if result.via != "broadcast":
                    view.unconfirmed_ms = 0          # answered: the column has it
                elif lower:
                    # Nobody answers a broadcast: the next poll of the column confirms a
                    # decrease (_confirm_broadcast), or it goes again, answered. A lost one must
                    # not leave the column above its share until its next refresh.
                    view.unconfirmed_ms = now
                if cmd.failsafe_a is not None:
                    view.failsafe_ok_a = cmd.failsafe_a
                    view.need_sync = False
                view.write_failure = ""
                continue
            reason = result.reason if result is not None else "no_result"
            view.need_sync = True
            if reason != view.write_failure:
                log.warning("column %s: limit write failed: %s", cmd.column_id, reason,
                            extra={"column_id": cmd.column_id, "reason": reason})
            view.write_failure = reason

    # -- site settings from commands ----------------------------------------------------------
    def _apply_site(self, now: int) -> None:
        """The site as the file says, with the DNO's unexpired overrides; the LimitBook and the
        failsafe plan follow a change of the DNO failsafe."""
        ov = self._overrides
        hold = not self.book.dno_link_up   # see the module docstring
        if ov.failsafe is not None and ov.failsafe[2] <= now and not hold:
            ov.failsafe = None
        for name, (_value, until) in list(ov.config.items()):
            if until <= now and (not hold or name != "failsafe_duration_s"):
                del ov.config[name]
        base = self._base_site
        failsafe_a, duration = base.dno_failsafe_a, base.dno_failsafe_duration_s
        if "failsafe_duration_s" in ov.config:
            duration = float(ov.config["failsafe_duration_s"][0])
        if ov.failsafe is not None:
            failsafe_a = ov.failsafe[0]
            if ov.failsafe[1] is not None:
                duration = float(ov.failsafe[1])
        allocation = base.allocation
        if "random_delay_max_s" in ov.config:
            allocation = replace(allocation, increase_delay_max_s=float(ov.config["random_delay_max_s"][0]))
        telemetry = ov.config.get("telemetry_interval_s")
        self._telemetry_s = float(telemetry[0]) if telemetry else self.svc.telemetry_interval_s
        held = (self.site.dno_failsafe_a, self.site.dno_failsafe_duration_s)
        if (failsafe_a, duration) == held and allocation == self.site.allocation:
            return   # compared field by field: a step must not compare every column
        failsafe_changed = (failsafe_a, duration) != held
        site = replace(base, dno_failsafe_a=failsafe_a, dno_failsafe_duration_s=duration,
                       allocation=allocation)
        self.site = site
        if failsafe_changed:
            book = LimitBook(site, dno_link_up=self.book.dno_link_up, now_ms=now)
            for lim in self.book.limits():
                if lim.valid_until_ms > now:
                    book.add(lim, now)
            self.book = book
            self.plan = plan_failsafe(site)
            log.info("site failsafe %s A for %s s: column failsafes %s", site.dno_failsafe_a,
                     site.dno_failsafe_duration_s, dict(self.plan.limits_a))

    def _limit_context(self, target: topics.Topic) -> LimitContext | None:
        site = self.site
        if target.column_id is None:
            return LimitContext(capacity_a=max(site.capacity_a), phases=3, voltage_v=site.voltage_v)
        col = site.column(target.column_id)
        if col is None:
            return None
        return LimitContext(capacity_a=col.max_a, phases=col.phases, voltage_v=site.voltage_v)

    # -- commands -----------------------------------------------------------------------------
    def _on_inbound(self, message: InboundMessage) -> None:
        try:
            self._inbox.put_nowait(message)
        except asyncio.QueueFull:
            self.stats.commands_dropped += 1
            log.warning("command inbox full: message on %s dropped", message.topic[:128])

    async def _command_loop(self) -> None:
        while True:
            message = await self._inbox.get()
            try:
                await self.handle_command(message)
            except Exception:
                log.exception("command on %s failed", message.topic[:128])

    async def handle_command(self, message: InboundMessage) -> Decision:
        assert self.auth is not None
        self.stats.commands += 1
        decision = self.auth.check(message.topic, message.payload)
        applied: float | None = None
        command, target = decision.command, decision.target
        if decision.accepted and command is not None and target is not None:
            reason, detail = self._apply_command(command, target)
            if reason is not Reason.OK:
                decision = replace(decision, reason=reason, detail=detail)
            else:
                self.stats.commands_accepted += 1
                applied = self._applied(command, target)
        if self.audit is not None:   # before anything reaches a column: the log has every decision
            try:
                self.audit.record(decision, applied_limit_a=applied)
            except (OSError, ValueError):
                log.exception("audit log write failed")
        if decision.accepted:
            self._safe_step()    # decreases go out now, not at the next tick
            await self.flush_limits(ACK_WAIT_S)
        self._ack(message, decision, applied)
        return decision

    def _apply_command(self, cmd: Command, target: topics.Topic) -> tuple[Reason, str]:
        now = self._now_ms()
        if cmd.kind in (CommandKind.SITE_LIMIT, CommandKind.COLUMN_LIMIT):
            assert cmd.limit_a is not None
            limit = Limit(SOURCE_DNO, cmd.limit_a, cmd.valid_until_ms, column=target.column_id, id=cmd.id)
            refused = self.book.add(limit, now)
            if refused is not None:
                return _BOOK_REASONS.get(refused, Reason.BAD_FIELD), refused
            return Reason.OK, ""
        if cmd.kind is CommandKind.SITE_FAILSAFE:
            assert cmd.limit_a is not None
            self._overrides.failsafe = (min(cmd.limit_a, max(self.site.capacity_a)), cmd.duration_s,
                                        cmd.valid_until_ms)
        elif cmd.kind is CommandKind.CONFIG:
            for name, value in (cmd.config or {}).items():
                self._overrides.config[name] = (value, cmd.valid_until_ms)
        self._apply_site(now)
        return Reason.OK, ""

    def _applied(self, cmd: Command, target: topics.Topic) -> float | None:
        """The limit in force after the command: what the ack reports."""
        now = self._now_ms()
        if cmd.kind is CommandKind.SITE_LIMIT:
            return round(max(self.book.effective(now).site_a), 2)
        if cmd.kind is CommandKind.COLUMN_LIMIT and target.column_id is not None:
            col = self.site.column(target.column_id)
            held = self.book.effective(now).columns.get(target.column_id)
            if col is None or held is None:
                return None
            return round(min(held.value_a, col.max_a), 2)
        if cmd.kind is CommandKind.SITE_FAILSAFE:
            return None if self.site.dno_failsafe_a is None else round(self.site.dno_failsafe_a, 2)
        return None

    def _ack(self, message: InboundMessage, decision: Decision, applied: float | None) -> None:
        v5 = self.config.mqtt.protocol == "5"
        if v5 and message.response_topic is not None and topics.valid_response_topic(message.response_topic):
            topic = message.response_topic
        else:
            topic = topics.ack(self.site_id)
        correlation = message.correlation_data if v5 else None
        body = payloads.ack(command_id=decision.command_id, reason=decision.reason, applied_limit_a=applied,
                            ts_ms=self._now_ms(), detail=decision.detail)
        self._enqueue([Outgoing(topic, body, MessageKind.ACK, correlation=correlation)])

    # -- northbound messages ------------------------------------------------------------------
    def _enqueue(self, messages: list[Outgoing]) -> None:
        if self.outbox is None or not messages:
            return
        try:
            self.outbox.enqueue_many(messages)
        except Exception:   # a full disk must not stop the control of the site
            self.stats.enqueue_errors += 1
            log.exception("outbox enqueue failed (%d messages)", len(messages))

    def _event(self, name: str, column_id: str | None = None, **data: Any) -> None:
        topic = (topics.column_events(self.site_id, column_id) if column_id
                 else topics.site_events(self.site_id))
        try:
            body = payloads.event(name, ts_ms=self._now_ms(), column_id=column_id, data=data)
        except ValueError:
            self.stats.bad_messages += 1
            log.exception("event %s does not validate", name)
            return
        self._enqueue([Outgoing(topic, body, MessageKind.EVENT)])

    def _publish_status(self, view: ColumnView) -> None:
        r = view.reading
        status = _vocab(r.status if r else "Unavailable", STATUS_NAMES, "Faulted")
        state = _vocab(r.cp_state if r else "F", CP_NAMES, "F")
        error = _vocab(r.error if r else "NoError", ERROR_NAMES, "InternalError")
        key = (status, state, error, view.online)
        if key == view.status_key:
            return
        view.status_key = key
        cid = view.column.id
        body = payloads.column_status(ts_ms=self._now_ms(), column_id=cid, status=status, state=state,
                                      error=error, online=view.online)
        self._enqueue([Outgoing(topics.column_status(self.site_id, cid), body, MessageKind.STATUS,
                                retain=True)])

    async def _telemetry_loop(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            # Rounds start every interval from the last start, not an interval after the last
            # round ended: a round of thousands of columns takes a while, and would add up.
            due = max(due + self._telemetry_s, loop.time())
            await asyncio.sleep(due - loop.time())
            try:
                await self.telemetry_round()
            except Exception:
                log.exception("telemetry failed")

    async def telemetry_round(self) -> None:
        """One round, queued slice by slice (one transaction of at most TELEMETRY_SLICE column
        messages each, the site's with the last), the event loop free between slices."""
        now = self._now_ms()
        views = list(self.views.items())
        for start in range(0, len(views), TELEMETRY_SLICE):
            if start:
                await asyncio.sleep(0)
            out = self._column_telemetry(views[start:start + TELEMETRY_SLICE], now)
            if start + TELEMETRY_SLICE >= len(views):
                out.append(self._site_message(now))
            self._enqueue(out)
        if not views:
            self._enqueue([self._site_message(now)])

    def telemetry(self) -> list[Outgoing]:
        """One round at once: every online column's telemetry and the site's."""
        now = self._now_ms()
        return [*self._column_telemetry(list(self.views.items()), now), self._site_message(now)]

    def _site_message(self, now: int) -> Outgoing:
        return Outgoing(topics.site_telemetry(self.site_id), self._site_telemetry(now), MessageKind.TELEMETRY)

    def _column_telemetry(self, views: Sequence[tuple[str, ColumnView]], now: int) -> list[Outgoing]:
        out: list[Outgoing] = []
        for cid, view in views:
            r = view.reading
            if not view.online or r is None:
                continue
            applied = view.applied_a if view.valid_until_ms > now else None
            try:
                body, encoded = payloads.column_telemetry_encoded(
                    ts_ms=now, column_id=cid, current_a=r.current_a, voltage_v=r.voltage_v, power_w=r.power_w,
                    energy_wh=r.energy_wh, offered_a=r.offered_a, applied_limit_a=applied,
                    limit_source=r.limit_source, state=r.cp_state, status=r.status)
            except ValueError as exc:
                self.stats.bad_messages += 1
                log.warning("column %s telemetry skipped: %s", cid, exc)
                continue
            topic = self._telemetry_topics.get(cid)
            if topic is None:
                topic = self._telemetry_topics[cid] = topics.column_telemetry(self.site_id, cid)
            out.append(Outgoing(topic, body, MessageKind.TELEMETRY, body=encoded))
        return out

    def _site_telemetry(self, now: int) -> dict[str, Any]:
        eff = self.book.effective(now)
        meter = self.south.meter.latest() if self.south.meter is not None else None
        if meter is not None and meter.total_power_w is not None:
            power = float(meter.total_power_w)
            current = [a or 0.0 for a in meter.current_a]
        else:
            total_w, current = self._column_totals(now)
            power = float(total_w)
        active = sum(1 for c in (self.allocation.columns.values() if self.allocation else ())
                     if c.reason not in ("idle", "reserved"))
        return payloads.site_telemetry(
            ts_ms=now, power_w=power, current_a=[round(a, 2) for a in current],
            limit_a=round(max(eff.site_a), 2),
            limit_source=SITE_SOURCE_NAMES.get(eff.source, "connection"),
            limit_valid_until_ms=eff.limit.valid_until_ms if eff.limit is not None else None,
            active_sessions=active)


def _vocab(value: str, names: Sequence[str], fallback: str) -> str:
    return value if value in names else fallback


def _some(ids: list[str], most: int = 50) -> str:
    """A log line's list of column ids: all of a small site's, the first `most` of a large one."""
    if not ids:
        return "none"
    if len(ids) <= most:
        return str(ids)
    return "%s and %d more" % (str(ids[:most])[:-1] + ", ...]", len(ids) - most)
