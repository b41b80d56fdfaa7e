"""A soak run: the site under its fault schedule, watched from every side, recorded for the judge.

`SoakRun` starts (in order) a mosquitto of its own that keeps its state across restarts
(persistence, saved at every clean stop, no per-client queue limit: the broker must not
be where messages get lost), the site (hil.rig.site.SiteRig: virtual columns running the
real firmware, every serial column behind a stretch of faulty wire, the RS-485 bus, the
gateway process), the control room's consumer (hil.soak.observer) and the DNO's command
sender (hil.rig.dno_client.DnoClient, in a thread of its own). Then, every STEP_S until
the run's end, it: applies the faults and car visits that are due, steps every car
(hil.rig.cars.CarPort: the board's pilot and contactor in, the car's current out into
the column's meter) and records what each car draws and each pilot offers. The firmware's
own view comes from the board's I/O line with the "tap" on (hil/vcolumn_main.py): every
line carries the failsafe state, the failsafe held and the last assignment received.

At the end it stops the gateway cleanly (SIGTERM: the hand-over), keeps sampling for a
heartbeat timeout (the columns must fall back to their failsafes then too), lets the
consumer catch up, reads the outbox file and the audit log, and stops everything it
started, each by its own handle, in reverse order. `Recording` holds what the judge needs.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.core.site import Site
from gateway.north import topics
from gateway.north.audit import read_decisions
from gateway.north.outbox import Outbox
from gateway.north.payloads import utc_ms
from hil.bus_faults import BusFaults
from hil.rig.broker import Broker, Listener
from hil.rig.cars import CarPort, car_schedule
from hil.rig.dno_client import DnoClient
from hil.rig.site import SiteRig
from hil.soak.observer import Observer, Seen
from hil.soak.plan import HEARTBEAT_TIMEOUT_S, NOISE_CORRUPT_RATE, Fault, SoakPlan

STEP_S = 0.1
ONLINE_WAIT_S = 40.0  # the gateway's birth and every column online before the clock starts
CATCH_UP_S = 20.0  # at the end, for the consumer to receive what is still on its way
QUIET_S = 2.0
CAUGHT_UP_S = 2.5  # a telemetry round (1 s) and its way through the broker
OFF_LINE = {"duty": 10000, "contactor": 0, "offered_da": 0, "status": -1, "off": 1}


class SoakBroker(Broker):
    """mosquitto that saves its state at every clean stop and never drops a consumer's queue."""

    def _config_text(self) -> str:
        return "max_queued_messages 0\n" + super()._config_text()


@dataclass
class FaultRecord:
    fault: Fault
    started_ms: int | None = None
    ended_ms: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class GatewayDown:
    """The gateway was not running from `from_ms` (SIGKILL or the final SIGTERM) until
    `until_ms` (started again; None: the end of the run)."""

    from_ms: int
    until_ms: int | None
    cause: str  # "kill" | "stop"
    outbox_next_seq: int = 0  # the outbox right after the kill: seqs below were committed
    outbox_pending: tuple[int, ...] = ()


@dataclass
class SentCommand:
    at_ms: int
    id: str
    topic: str
    column: str | None
    limit_a: float
    validity_s: int
    error: str = ""


@dataclass
class Recording:
    """Everything a run saw. Times are ms of the monotonic clock from the run's start (t0)."""

    plan: SoakPlan
    site: Site
    site_id: str
    t0_mono_ms: int
    utc_offset_ms: int  # utc_ms - monotonic ms
    samples: dict[str, list[tuple[int, float, float, float, float]]]  # (t, i1, i2, i3, offer)
    sample_times: list[int]
    board: dict[str, list[dict[str, Any]]]  # every board line, "t" made run-relative
    faults: list[FaultRecord]
    gateway_down: list[GatewayDown]
    messages: list[Seen]
    commands: list[SentCommand]
    audit: list[dict[str, Any]]
    outbox_next_seq: int
    outbox_pending: tuple[int, ...]
    wire_counts: dict[str, dict[str, int]]
    failures: list[str]
    gateway_exit: int | None
    observer_sessions_lost: int
    ended_ms: int
    stopped_early: str = ""

    def mono_of_utc(self, utc: int) -> int:
        return utc - self.utc_offset_ms - self.t0_mono_ms


class DnoSender(threading.Thread):
    """Sends the plan's DNO commands on time, signed, without a response topic (acks go to
    the site's ack topic, where the consumer sees them with their seq)."""

    def __init__(self, dno: DnoClient, plan: SoakPlan, t0: float) -> None:
        super().__init__(name="soak-dno", daemon=True)
        self.dno = dno
        self.plan = plan
        self.t0 = t0
        self.sent: list[SentCommand] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        for n, cmd in enumerate(self.plan.commands, 1):
            if self.stop_event.wait(max(0.0, self.t0 + cmd.at_s - time.monotonic())):
                return
            if cmd.column is None:
                topic, body = self.dno.site_limit(
                    cmd.limit_a, validity_s=cmd.validity_s, cmd_id="soak-%d-%s" % (n, secrets.token_hex(3))
                )
            else:
                topic = topics.cmd_column_limit(self.dno.site_id, cmd.column)
                body = self.dno.command(
                    topic,
                    {
                        "id": "soak-%d-%s" % (n, secrets.token_hex(3)),
                        "issued_ms": utc_ms(),
                        "validity_s": cmd.validity_s,
                        "limit_a": cmd.limit_a,
                    },
                )
            at = int((time.monotonic() - self.t0) * 1000)
            record = SentCommand(at, body["id"], topic, cmd.column, cmd.limit_a, cmd.validity_s)
            try:
                self.dno.publish(topic, body)
            except Exception as exc:  # broker away: paho keeps it and may send it later
                record.error = "%s: %s" % (type(exc).__name__, exc)
            self.sent.append(record)


class SoakRun:
    def __init__(
        self,
        plan: SoakPlan,
        workdir: Path,
        *,
        log: Callable[[str], None] = print,
        should_stop: Callable[[], bool] = lambda: False,
        site_id: str = "soak",
    ) -> None:
        self.plan = plan
        self.workdir = workdir
        self.log = log
        self.should_stop = should_stop
        self.site_id = site_id
        self.broker = SoakBroker(
            [Listener("plain")], workdir=workdir / "broker", persistence_dir=workdir / "broker" / "db"
        )
        self.wires = {
            s.id: BusFaults(seed=plan.seed * 1000 + k, column_side="b")
            for k, s in enumerate(plan.specs)
            if s.link in ("modbus-rtu", "cbor-serial")
        }
        self.rtu = [s.id for s in plan.specs if s.link == "modbus-rtu"]
        self.rig: SiteRig | None = None
        self.observer: Observer | None = None
        self.dno: DnoClient | None = None
        self.sender: DnoSender | None = None
        self.ports: dict[str, CarPort] = {}
        self.t0 = 0.0
        self.utc_offset_ms = 0
        self.samples: dict[str, list[tuple[int, float, float, float, float]]] = {s.id: [] for s in plan.specs}
        self.sample_times: list[int] = []
        self.records: list[FaultRecord] = []
        self.down: list[GatewayDown] = []
        self.killed: set[str] = set()  # columns whose process we killed (until restarted)
        self.failures: list[str] = []
        self.gateway_exit: int | None = None
        self.ended_ms = 0
        self.stopped_early = ""

    # -- start ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Broker, site, consumer, DNO client; waits for the gateway's birth and the columns."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "broker" / "db").mkdir(parents=True, exist_ok=True)
        self.broker.start()
        self.log(
            "  broker: mosquitto on 127.0.0.1:%d (persistent, pid %s)"
            % (self.broker.port(), self.broker.proc.pid if self.broker.proc else "?")
        )
        # The consumer first: it must see the gateway's very first message (seq 1).
        self.observer = Observer(
            self.broker.host, self.broker.port(), self.site_id, "soak-observer-" + secrets.token_hex(3)
        )
        self.observer.start()
        rig = SiteRig(
            self.workdir / "site",
            self.site_id,
            list(self.plan.specs),
            self.plan.tables,
            broker=(self.broker.host, self.broker.port()),
            link_faults=self.wires,
        )
        self.rig = rig
        rig.start(self.should_stop, progress=lambda line: self.log("  " + line))
        self.dno = rig.dno_client()
        for spec in self.plan.specs:
            vcol = rig.columns[spec.id]
            vcol.board(tap=1)
            self.ports[spec.id] = CarPort(vcol, spec.phases)
        self._wait_online()

    def _wait_online(self) -> None:
        assert self.observer is not None and self.rig is not None
        state = topics.gateway_state(self.site_id)
        wanted = {topics.column_status(self.site_id, s.id): s.id for s in self.plan.specs}
        deadline = time.monotonic() + ONLINE_WAIT_S
        while time.monotonic() < deadline and not self.should_stop():
            seen = self.observer.snapshot()
            online = any(m.topic == state and m.body().get("state") == "online" for m in seen)
            cols = {wanted[m.topic] for m in seen if m.topic in wanted and m.body().get("online")}
            if online and len(cols) == len(wanted):
                return
            if not self.rig.gateway_alive():
                raise RuntimeError("the gateway stopped at its start")
            self._step_cars(0, record=False)
            time.sleep(STEP_S)
        self.log("  not every column was online after %.0f s; the run goes on" % ONLINE_WAIT_S)

    # -- the run -------------------------------------------------------------------------------
    def run(self) -> None:
        assert self.rig is not None and self.dno is not None
        plan = self.plan
        self.t0 = time.monotonic()
        self.utc_offset_ms = int(time.time() * 1000) - int(self.t0 * 1000)
        self.sender = DnoSender(self.dno, plan, self.t0)
        self.sender.start()
        visits = car_schedule([(s.id, s.phases) for s in plan.specs], plan.duration_s, plan.seed)
        actions: list[tuple[float, int, str, Any]] = []
        for n, v in enumerate(visits):
            actions.append((v.arrive_s, n, "arrive", v))
            if v.leave_s is not None:
                actions.append((v.leave_s, n, "leave", v))
        for n, f in enumerate(plan.faults):
            self.records.append(FaultRecord(f))
            actions.append((f.at_s, n, "fault", self.records[-1]))
            actions.append((f.end_s, n, "heal", self.records[-1]))
        actions.sort(key=lambda a: (a[0], a[1]))
        self.log(
            "running %.0f s: %d faults, %d DNO commands, %d car visits"
            % (plan.duration_s, len(plan.faults), len(plan.commands), len(visits))
        )
        self._loop(plan.duration_s, actions)
        self.ended_ms = self._now_ms()
        self.sender.stop_event.set()
        self.sender.join(timeout=10)

    def _loop(self, until_s: float, actions: list[tuple[float, int, str, Any]]) -> None:
        next_t = time.monotonic()
        last_health = last_note = 0.0
        while not self.should_stop():
            t_s = time.monotonic() - self.t0
            if t_s >= until_s:
                break
            while actions and actions[0][0] <= t_s:
                self._act(actions.pop(0), int(t_s * 1000))
            self._step_cars(int(t_s * 1000))
            if t_s - last_health >= 1.0:
                last_health = t_s
                self._health(t_s)
            if t_s - last_note >= 30.0:
                last_note = t_s
                self._note(t_s)
            next_t += STEP_S
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_t = time.monotonic()
        else:
            self.stopped_early = "signal"
        for _at, _n, kind, rec in actions:  # stopped early: heal what is still broken
            if kind == "heal" and rec.started_ms is not None and rec.ended_ms is None:
                self._heal(rec)

    def _step_cars(self, t_ms: int, record: bool = True) -> None:
        if record:
            self.sample_times.append(t_ms)
        for cid, port in self.ports.items():
            port.step(t_ms)
            if record:
                i = port.currents_a
                self.samples[cid].append((t_ms, i[0], i[1], i[2], port.offered_a))

    def _act(self, action: tuple[float, int, str, Any], t_ms: int) -> None:
        _at, _n, kind, item = action
        if kind == "arrive":
            self.ports[item.column].arrive(t_ms, item.profile, item.soc)
        elif kind == "leave":
            self.ports[item.column].leave(t_ms)
        elif kind == "fault":
            self._fault(item)
        else:
            self._heal(item)

    def _now_ms(self) -> int:
        return int((time.monotonic() - self.t0) * 1000)

    def _fault(self, rec: FaultRecord) -> None:
        assert self.rig is not None
        f = rec.fault
        rig = self.rig
        rec.started_ms = self._now_ms()
        if f.kind == "broker_restart":
            self.broker.stop()
        elif f.kind == "gateway_kill":
            rig.kill_gateway()
            at = self._now_ms()
            nxt, pending = outbox_state(rig.workdir / "outbox.sqlite3")
            self.down.append(GatewayDown(at, None, "kill", nxt, pending))
            rec.detail.update(outbox_next_seq=nxt, outbox_pending=len(pending))
        elif f.kind == "column_kill":
            assert f.target is not None
            rig.outputs[f.target].off()
            self.killed.add(f.target)
            vcol = rig.columns[f.target]
            vcol.outputs()  # what the dead process wrote last, before its board goes dark
            vcol.board_log.append({"t": int(time.monotonic() * 1000), **OFF_LINE})
        elif f.kind == "bus_noise":
            rec.detail.update(self._wire_totals("at_start_"))
            for cid in self.rtu:
                self.wires[cid].set(corrupt_rate=NOISE_CORRUPT_RATE)
        elif f.kind == "column_silent":
            assert f.target is not None
            self.wires[f.target].silence(True)
        elif f.kind == "meter_fail":
            assert f.target is not None
            rig.columns[f.target].meter.set_fault("no_reply")
        queued = rec.detail.get("outbox_pending")
        note = "" if queued is None else " (outbox: %d queued)" % queued
        self.log("  %6.1f s  %s%s" % (rec.started_ms / 1000.0, f.describe().split(" at ")[0], note))

    def _heal(self, rec: FaultRecord) -> None:
        assert self.rig is not None
        f = rec.fault
        rig = self.rig
        if f.kind == "broker_restart":
            self.broker.start()
        elif f.kind == "gateway_kill":
            rig.start_gateway()
            self.down[-1].until_ms = self._now_ms()
        elif f.kind == "column_kill":
            assert f.target is not None
            rig.outputs[f.target].on()
            self.ports[f.target].reset_board()
            rig.columns[f.target].board(tap=1)
            self.killed.discard(f.target)
        elif f.kind == "bus_noise":
            for cid in self.rtu:
                self.wires[cid].set(corrupt_rate=0.0)
            for key, value in self._wire_totals("").items():  # what moved during the noise
                rec.detail[key] = value - rec.detail.pop("at_start_" + key, 0)
        elif f.kind == "column_silent":
            assert f.target is not None
            self.wires[f.target].silence(False)
        elif f.kind == "meter_fail":
            assert f.target is not None
            rig.columns[f.target].meter.set_fault(None)
        rec.ended_ms = self._now_ms()
        self.log("  %6.1f s  %s: over" % (rec.ended_ms / 1000.0, f.describe().split(" at ")[0]))

    def _wire_totals(self, prefix: str) -> dict[str, int]:
        """Bytes and corrupted bytes on the RTU columns' wires so far."""
        counts = [self.wires[cid].counts() for cid in self.rtu]
        return {
            prefix + "bytes": sum(c.bytes_in for c in counts),
            prefix + "corrupted": sum(c.corrupted for c in counts),
        }

    def _health(self, t_s: float) -> None:
        assert self.rig is not None
        rig = self.rig
        gateway_expected = not self.down or self.down[-1].until_ms is not None
        if gateway_expected and not rig.gateway_alive() and not any("gateway" in f for f in self.failures):
            self.failures.append("the gateway stopped by itself at %.1f s" % t_s)
            self.log("  %6.1f s  the gateway stopped by itself" % t_s)
        for cid in rig.dead_columns():
            if cid not in self.killed and not any(f.startswith("column %s " % cid) for f in self.failures):
                tail = rig.outputs[cid].output(0.5)[-800:]
                self.failures.append("column %s stopped by itself at %.1f s: %s" % (cid, t_s, tail))
                self.log("  %6.1f s  column %s stopped by itself" % (t_s, cid))

    def _note(self, t_s: float) -> None:
        assert self.observer is not None
        seen = len(self.observer)
        charging = sum(1 for p in self.ports.values() if p.offered_a > 0)
        self.log(
            "  %6.1f s  %d messages received, %d pilots offering, %d DNO commands sent"
            % (t_s, seen, charging, len(self.sender.sent) if self.sender else 0)
        )

    # -- the end -------------------------------------------------------------------------------
    def _wait_caught_up(self) -> None:
        """Until the consumer has a site telemetry message made in the last CAUGHT_UP_S: the
        outbox goes out oldest first, so then its backlog (from the last broker restart or
        gateway kill) has been delivered and the clean stop has only its last round to drain.
        The cars keep going meanwhile; at most CATCH_UP_S."""
        assert self.observer is not None
        topic = topics.site_telemetry(self.site_id)
        deadline = time.monotonic() + CATCH_UP_S
        start = len(self.observer)
        while time.monotonic() < deadline and not self.should_stop():
            fresh = [m.body().get("ts_ms") for m in self.observer.snapshot(start) if m.topic == topic]
            newest = max((t for t in fresh if isinstance(t, int)), default=0)
            if utc_ms() - newest <= CAUGHT_UP_S * 1000:
                return
            self._step_cars(self._now_ms())
            time.sleep(STEP_S)
        self.log("  the control room did not catch up within %.0f s" % CATCH_UP_S)

    def finish(self) -> Recording:
        """Clean gateway stop, a heartbeat timeout of sampling, the consumer's catch-up, the
        outbox and the audit log; then everything this run started is stopped."""
        assert self.rig is not None and self.observer is not None
        rig = self.rig
        if self.sender is not None:
            self.sender.stop_event.set()
            self.sender.join(timeout=10)
        if not self.should_stop():
            self._wait_caught_up()
        self.gateway_exit = rig.stop_gateway()
        stop_ms = self._now_ms()  # its hand-over done, the gateway is gone: no more heartbeats
        self.down.append(GatewayDown(stop_ms, None, "stop"))
        if not self.should_stop():
            self._loop(stop_ms / 1000.0 + HEARTBEAT_TIMEOUT_S + 2.0, [])
        deadline = time.monotonic() + CATCH_UP_S
        while time.monotonic() < deadline and not self.observer.quiet_for(QUIET_S):
            time.sleep(0.1)
        next_seq, pending = outbox_state(rig.workdir / "outbox.sqlite3")
        board = {
            cid: sorted(
                (dict(line, t=int(line.get("t", 0)) - int(self.t0 * 1000)) for line in vcol.board_log),
                key=lambda x: x["t"],
            )
            for cid, vcol in rig.columns.items()
        }
        audit = read_decisions(rig.workdir / "dno-audit.jsonl")
        return Recording(
            plan=self.plan,
            site=rig.site,
            site_id=self.site_id,
            t0_mono_ms=int(self.t0 * 1000),
            utc_offset_ms=self.utc_offset_ms,
            samples=self.samples,
            sample_times=self.sample_times,
            board=board,
            faults=self.records,
            gateway_down=self.down,
            messages=self.observer.snapshot(),
            commands=list(self.sender.sent) if self.sender else [],
            audit=audit,
            outbox_next_seq=next_seq,
            outbox_pending=pending,
            wire_counts={cid: vars(w.counts()) for cid, w in self.wires.items()},
            failures=list(self.failures),
            gateway_exit=self.gateway_exit,
            observer_sessions_lost=self.observer.sessions_lost,
            ended_ms=self.ended_ms,
            stopped_early=self.stopped_early,
        )

    def close(self) -> None:
        """Stop everything started, in reverse order, each by its own handle."""
        if self.sender is not None:
            self.sender.stop_event.set()
        for part in (self.observer, self.dno):
            if part is not None:
                try:
                    part.close()
                except Exception:
                    pass
        self.observer = self.dno = None
        if self.rig is not None:
            self.rig.close()
        self.broker.stop()

    def keep_files(self, folder: Path) -> list[str]:
        """Copy the site file, the gateway's logs, the audit log and the broker's log."""
        import shutil

        folder.mkdir(parents=True, exist_ok=True)
        site = self.workdir / "site"
        copied = []
        for path in [
            site / "site.toml",
            site / "dno-audit.jsonl",
            *sorted(site.glob("gateway*.log")),
            self.workdir / "broker" / "mosquitto.log",
        ]:
            if path.exists():
                shutil.copyfile(path, folder / path.name)
                copied.append(path.name)
        return copied


def outbox_state(path: Path) -> tuple[int, tuple[int, ...]]:
    """(next seq, seqs still queued) of a gateway's outbox file that no process holds."""
    with Outbox(path) as box:
        pending = tuple(row.seq for row in box.peek(0, 1_000_000))
        return box.next_seq, pending
