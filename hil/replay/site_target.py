"""`site`: the real gateway between the trace and the columns, in real time (hil.replay.target).

What runs, all on loopback and stopped at close: a private mosquitto (persistence on, so a
clean restart keeps its sessions), a consumer in the control room's place
(hil.replay.telemetry_consumer), and a hil.rig.site.SiteRig with a site file written from
the trace's layout: one hil.rig.vcolumn.VirtualColumn per trace column, running the real
firmware app (CPython by default, MicroPython with `site:micropython`) with the trace's
firmware config, and `python -m gateway run`. Links: what each column's firmware config
says (the layout's default: Modbus RTU, every such column on one RS-485 bus), or with
`site:mixed` Modbus RTU, Modbus TCP, CBOR over TCP and CBOR over serial in turn. Every
serial link runs through a stretch of faulty wire (hil.bus_faults.BusFaults), clean until
the trace says otherwise.

The trace, mapped onto the site:
- cars, meters, meter faults and power cuts: as on `mpy` (hil.replay.realtime): each
  virtual column's board inputs and meter model; a cut kills its firmware process.
- `dno.limit`: a command signed with the site's key and published at QoS 1 by a
  hil.rig.dno_client.DnoClient at the record's time (limit_a or limit_kw, validity_s, id;
  to the column's topic for a column record). The MQTT API has no withdrawal: a record
  with validity 0 is not sent (noted in the run's figures); the real gateway keeps that
  limit until it expires, which is on the safe side of what the checks allow.
- `link.fault` with link "dno" (the DNO's broker link): the broker is stopped (SIGTERM:
  it saves its sessions) and started again on the same port when the window ends.
- `link.fault` silent on every column (the gateway is lost): the gateway is SIGKILLed, as
  a crash or its box losing power would stop it: no hand-over, the columns find out by
  their heartbeat timeout. When the window ends it is started again from the same site
  file and outbox (so its sequence numbers go on). `site:hang` SIGSTOPs it instead (a hung
  gateway, its connections open) and SIGCONTs it. A silence of some columns only drops
  every byte on their wire (a cut stub); a column on TCP cannot have one (error).
- `link.fault` drop / corrupt / delay: damaged bytes on the serial links' wires, as on
  `mpy`; a TCP link gets none (noted).

What is observed: the column's edge, through the virtual board's I/O line with its tap on
(hil.replay.tap, shared with `mpy`): the pilot, contactor, status, CP state, limit source, failsafe,
energy register and error, and what the gateway's link handed the firmware (assignments,
heartbeats, failsafe limits) as `gateway_writes()`, which the engine turns into the
column's limit in force for limit.offer, limit.car and failsafe. The gateway's own
decisions are judged end to end: the measured site current against the DNO's limits
(limit.site, limit.dno), the columns' failsafe when the gateway is lost, and every
sequence number the consumer received (`telemetry_sequences()`: the telemetry check).
Times are the trace times of the step at which the harness saw a change (100 ms steps).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

from firmware.controller import DEFAULTS as FW_DEFAULTS
from gateway.core.site import PHASE_NAMES, SITE_NODE, Site
from gateway.north import payloads, topics
from hil.bus_faults import BusFaults
from hil.replay.column_link import TargetError
from hil.replay.gateway_model import GatewaySettings
from hil.replay.realtime import Column
from hil.replay.tap import TapColumns
from hil.replay.telemetry_consumer import TelemetryConsumer
from hil.rig.broker import Broker, Listener
from hil.rig.dno_client import DnoClient
from hil.rig.firmware_proc import INTERPRETERS
from hil.rig.ports import LOOPBACK
from hil.rig.site import LINKS, ColumnSpec, ColumnTuning, RigError, SiteRig
from hil.rig.vcolumn import SERIAL_LINKS, VirtualColumn

__all__ = ["SiteTarget", "TargetError", "make_target"]

OPTIONS = ("cpython", "micropython", "mixed", "hang")
_NOISE = ("drop", "corrupt", "delay")
_CUT = (1 << 62, "drop", 1.0, 0)   # a noise window that drops every byte until removed
# The firmware's own timings unless the trace's config says otherwise (the checks assume them).
_TUNING = ColumnTuning(failsafe_a=FW_DEFAULTS["failsafe_a"],
                       heartbeat_timeout_s=FW_DEFAULTS["heartbeat_timeout_s"],
                       min_pause_s=FW_DEFAULTS["min_pause_s"],
                       pwm_min_change_interval_s=FW_DEFAULTS["pwm_min_change_interval_s"])


def make_target(arg: str | None, *, speed: float | None = 1.0) -> SiteTarget:
    """`--target site[:OPTION,...]`: cpython (default) or micropython firmware, `mixed`
    links, `hang` (a lost gateway is SIGSTOPped rather than SIGKILLed). ValueError for an
    option it does not know."""
    opts = [o for o in (arg or "").split(",") if o]
    unknown = [o for o in opts if o not in OPTIONS]
    if unknown:
        raise ValueError("unknown site option %r (choose from %s)" % (unknown[0], ", ".join(OPTIONS)))
    interp = "micropython" if "micropython" in opts else "cpython"
    return SiteTarget(interp, speed, links="mixed" if "mixed" in opts else "layout",
                      gateway_loss="stop" if "hang" in opts else "kill")


def site_tables(site: Site, settings: GatewaySettings, configs: Mapping[str, Mapping[str, Any]],
                telemetry_interval_s: float) -> dict[str, Any]:
    """The site file's [site], [circuits], [allocation], [gateway] and [mqtt] extras."""
    table: dict[str, Any] = {"capacity_a": list(site.capacity_a), "voltage_v": site.voltage_v}
    if site.dno_failsafe_a is not None:
        table["dno_failsafe_a"] = site.dno_failsafe_a
    if site.dno_failsafe_duration_s is not None:
        table["dno_failsafe_duration_s"] = site.dno_failsafe_duration_s
    heartbeat_s = min(int(c.get("heartbeat_timeout_s", FW_DEFAULTS["heartbeat_timeout_s"]))
                      for c in configs.values())
    return {
        "site": table,
        "circuits": {cid: {"rating_a": list(c.rating_a), "parent": c.parent}
                     for cid, c in site.circuits.items()},
        "allocation": asdict(site.allocation),
        # The layout's validity; heartbeats well inside the shortest heartbeat timeout.
        "gateway": {"limit_validity_s": max(10, settings.validity_s),
                    "telemetry_interval_s": telemetry_interval_s,
                    "heartbeat_period_s": max(1, min(10, heartbeat_s // 4))},
        # Back within seconds after a broker outage, not after a minute of backoff.
        "mqtt": {"reconnect_min_s": 0.5, "reconnect_max_s": 5.0},
    }


class SiteTarget(TapColumns):
    """The `site` target. Real time only: the gateway and the broker keep their own clocks
    (ValueError for another speed or an unknown option)."""

    gateway_in_loop = True

    def __init__(self, interp: str = "cpython", speed: float | str | None = 1.0, *, links: str = "layout",
                 gateway_loss: str = "kill", workdir: Path | None = None, telemetry_interval_s: float = 2.0,
                 boot_timeout_s: float = 90.0) -> None:
        if speed != 1.0:
            raise ValueError("the site target runs in real time only (--speed 1): the gateway, the "
                             "broker and the firmware keep their own clocks")
        if interp not in INTERPRETERS:
            raise ValueError("unknown interpreter %r; choose from %s" % (interp, ", ".join(INTERPRETERS)))
        if links not in ("layout", "mixed") or gateway_loss not in ("kill", "stop"):
            raise ValueError("links must be layout or mixed, gateway_loss kill or stop")
        super().__init__(1.0, boot_timeout_s)
        self.interp = interp
        self.links = links
        self.gateway_loss = gateway_loss
        self.workdir = Path(workdir) if workdir is not None else None
        self.telemetry_interval_s = telemetry_interval_s
        self.site: Site | None = None
        self.settings = GatewaySettings()
        self.broker: Broker | None = None
        self.consumer: TelemetryConsumer | None = None
        self.rig: SiteRig | None = None
        self.dno: DnoClient | None = None
        self.notes: list[str] = []
        self.counts = {"dno_commands": 0, "broker_stops": 0, "gateway_losses": 0}
        self._stack = ExitStack()
        self._pending: list[Callable[[], None]] = []
        self._silent: set[str] = set()
        self._gateway_down = False
        self._cut: set[str] = set()
        self._vcols: dict[str, VirtualColumn] = {}

    # -- the engine's hooks --------------------------------------------------------------------
    def set_site(self, site: Site, settings: GatewaySettings) -> None:
        self.site = site
        self.settings = settings

    def start(self, columns: dict[str, dict[str, object]]) -> None:
        if self.site is None:
            raise TargetError("the site target needs the trace's site (the replay engine's set_site)")
        if not columns:
            raise TargetError("no columns to start")
        try:
            self._start(self.site, columns)
        except RigError as exc:
            self.close()
            raise TargetError(str(exc)) from None
        except BaseException:
            self.close()
            raise

    def dno_command(self, column_id: str | None, now_ms: int, value: Mapping[str, Any]) -> None:
        validity = value.get("validity_s")
        if not isinstance(validity, (int, float)) or validity <= 0:
            self.notes.append("%.1f s: DNO withdrawal of %r not sent (the MQTT API has none)"
                              % (now_ms / 1000, value.get("id")))
            return
        if "priority" in value:
            self.notes.append("%.1f s: DNO limit %r: priority not sent (not in the MQTT API)"
                              % (now_ms / 1000, value.get("id")))
        body: dict[str, Any] = {"id": str(value["id"]), "validity_s": validity}
        for key in ("limit_a", "limit_kw"):
            if key in value:
                body[key] = value[key]
        assert self.site is not None
        topic = (topics.cmd_column_limit(self.site.id, column_id) if column_id is not None
                 else topics.cmd_site_limit(self.site.id))
        self._pending.append(lambda: self._publish(topic, body))

    def dno_link(self, now_ms: int, up: bool) -> None:
        self._pending.append(self._broker_up if up else self._broker_down)

    def gateway_silent(self, column_id: str, now_ms: int, silent: bool) -> None:
        self._column(column_id)
        (self._silent.add if silent else self._silent.discard)(column_id)
        if self._reconcile_silence not in self._pending:
            self._pending.append(self._reconcile_silence)

    def telemetry_sequences(self) -> dict[str, list[int]] | None:
        return self.consumer.sequences() if self.consumer is not None else None

    def telemetry_conflicts(self) -> dict[str, int]:
        return self.consumer.conflicts() if self.consumer is not None else {}

    def assign_limit(self, column_id: str, now_ms: int, limit_a: float, validity_s: int,
                     failsafe_a: float | None = None) -> bool:
        return False   # the real gateway assigns; the harness is not on the link

    def link_fault(self, column_id: str | None, now_ms: int, kind: str, duration_ms: int,
                   value: Mapping[str, Any]) -> bool:
        """Bus noise on the wire of each serial link concerned (as on mpy); a TCP link has
        none, which is noted. True for every noise kind: the engine's model has nothing to do."""
        if kind not in _NOISE:
            return False
        for cid in [column_id] if column_id is not None else list(self.columns):
            if self._column(cid).faults is None:
                self.notes.append("%.1f s: %s on %s not injected: no faulty wire on a TCP link"
                                  % (now_ms / 1000, kind, cid))
            else:
                super().link_fault(cid, now_ms, kind, duration_ms, value)
        return True

    # -- start -----------------------------------------------------------------------------------
    def _start(self, site: Site, columns: Mapping[str, Mapping[str, Any]]) -> None:
        stack = self._stack
        if self.workdir is not None:
            root = self.workdir
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = Path(tempfile.mkdtemp(prefix="hil-site-"))
            stack.callback(shutil.rmtree, root, True)
        (root / "broker-db").mkdir(exist_ok=True)
        self.broker = broker = Broker([Listener("plain")], workdir=root / "broker",
                                      persistence_dir=root / "broker-db")
        stack.callback(broker.stop)
        broker.start()
        port = broker.port("plain")
        self.consumer = self._consumer(port, site.id)
        stack.callback(self.consumer.close)
        specs = self._specs(site, columns)
        faults = {s.id: BusFaults(seed=i) for i, s in enumerate(specs) if s.link in SERIAL_LINKS}
        tables = site_tables(site, self.settings, columns, self.telemetry_interval_s)
        self.rig = rig = SiteRig(root / "site", site.id, specs, tables, broker=(LOOPBACK, port),
                                 tuning=_TUNING, key_id="dno-hil", link_faults=faults)
        stack.callback(rig.close)
        rig.start()
        self.dno = rig.dno_client()
        stack.callback(self.dno.close)
        for spec in specs:
            vcol = rig.columns[spec.id]
            self._vcols[spec.id] = vcol
            col = Column(spec.id, dict(columns[spec.id]), None, board=vcol, meter=vcol.meter,
                         power=rig.outputs[spec.id], faults=faults.get(spec.id))
            self.columns[spec.id] = col
            self._tap_on(col, vcol)
        self._wait_ready()

    def _consumer(self, port: int, site_id: str) -> TelemetryConsumer:
        """The control room's consumer (a subclass may record differently)."""
        return TelemetryConsumer(LOOPBACK, port, site_id).start()

    def _specs(self, site: Site, columns: Mapping[str, Mapping[str, Any]]) -> list[ColumnSpec]:
        specs = []
        for i, (cid, cfg) in enumerate(columns.items()):
            col = site.column(cid)
            if col is None or cfg.get("column_id") != cid or not topics.valid_id(cid):
                raise TargetError("column %r: its id must be a valid gateway and firmware column id" % cid)
            link = cfg.get("link") if isinstance(cfg.get("link"), dict) else {}
            mode = LINKS[i % len(LINKS)] if self.links == "mixed" else str(link.get("mode", "modbus-rtu"))
            if mode not in LINKS:
                raise TargetError("column %s: link %r is not one a site has (%s)"
                                  % (cid, mode, ", ".join(LINKS)))
            specs.append(ColumnSpec(cid, mode, self.interp, int(cfg["bus_address"]), col.phases,
                                    "".join(PHASE_NAMES[p] for p in col.rotation), col.hardware_a,
                                    col.installation_a, None if col.circuit == SITE_NODE else col.circuit,
                                    config=cfg))
        return specs

    def _wait_ready(self) -> None:
        """Until the gateway is online and reports every column online, and every column's
        board line carries the tap; trace time 0 is then."""
        consumer, rig = self.consumer, self.rig
        assert consumer is not None and rig is not None

        def ready() -> bool:
            if not rig.gateway_alive():
                raise TargetError("the gateway stopped at start; its log ends:\n" + self._gateway_log())
            for col in self.columns.values():
                self._check_alive(col)
            return (consumer.gateway_state == "online"
                    and all(consumer.online.get(cid) for cid in self.columns)
                    and all("cp" in self._line(col) for col in self.columns.values()))

        try:
            consumer.wait("gateway online with every column", ready, self.boot_timeout_s)
        except TimeoutError as exc:
            raise TargetError("%s not reached (gateway %s, columns online %s); the gateway's log ends:\n%s"
                              % (exc, consumer.gateway_state, consumer.online, self._gateway_log())) from None
        self._t0 = time.monotonic()

    # -- stepping ----------------------------------------------------------------------------------
    def advance(self, to_ms: int) -> None:
        super().advance(to_ms)   # sets _now_ms
        pending, self._pending = self._pending, []
        for action in pending:
            action()
        rig = self.rig
        if rig is not None and not self._gateway_down and not rig.gateway_alive():
            raise TargetError("the gateway stopped on its own at %.1f s; its log ends:\n%s"
                              % (to_ms / 1000, self._gateway_log()))

    def _check_alive(self, col: Column) -> None:
        proc = self._vcols[col.column_id].proc
        code = proc.poll() if proc is not None else None
        if code is not None and self.rig is not None:
            tail = self.rig.outputs[col.column_id].output(wait_s=1.0)[-2000:]
            raise TargetError("column %s: its firmware stopped (exit %s); its last output:\n%s"
                              % (col.column_id, code, tail))

    # -- the site's parts ---------------------------------------------------------------------
    def _publish(self, topic: str, body: dict[str, Any]) -> None:
        """Sign at the moment of sending; paho queues it while the broker is away."""
        assert self.dno is not None
        signed = self.dno.command(topic, {**body, "issued_ms": payloads.utc_ms()})
        self.dno.client.publish(topic, json.dumps(signed).encode(), qos=1)
        self.counts["dno_commands"] += 1

    def _broker_down(self) -> None:
        if self.broker is not None:
            self.broker.stop()
            self.counts["broker_stops"] += 1

    def _broker_up(self) -> None:
        if self.broker is not None and self.broker.proc is None:
            self.broker.start()

    def _reconcile_silence(self) -> None:
        """All columns silent: the gateway is lost; some: their wires drop every byte."""
        rig = self.rig
        assert rig is not None
        lost = self._silent == set(self.columns)
        if lost and not self._gateway_down:
            if self.gateway_loss == "kill":
                rig.kill_gateway()
            else:
                rig.pause_gateway(True)
            self._gateway_down = True
            self.counts["gateway_losses"] += 1
        elif not lost and self._gateway_down:
            if self.gateway_loss == "kill":
                rig.start_gateway()
            else:
                rig.pause_gateway(False)
            self._gateway_down = False
        cut = set() if lost else set(self._silent)
        for cid in cut ^ self._cut:
            col = self.columns[cid]
            if col.faults is None:
                raise TargetError("column %s: a silent link of one column needs a serial link "
                                  "(this one is on TCP)" % cid)
            if cid in cut:
                col.noise.append(_CUT)
            else:
                col.noise.remove(_CUT)
            self._apply_noise(col, self._now_ms)
        self._cut = cut

    def _gateway_log(self) -> str:
        gw = self.rig.gateway if self.rig is not None else None
        if gw is None:
            return "(no gateway)"
        try:
            return gw.log_path.read_text(errors="replace")[-3000:]
        except OSError as exc:
            return "(cannot read %s: %s)" % (gw.log_path, exc)

    # -- results ---------------------------------------------------------------------------------
    def stats(self, column_id: str | None = None) -> Any:
        if column_id is not None:
            return {}
        rig = self.rig
        return {
            "interp": self.interp,
            "links": {cid: s.link for cid, s in (rig.specs.items() if rig else ())},
            "gateway": {"starts": rig.gateway_starts if rig else 0, "loss": self.gateway_loss},
            **self.counts,
            "telemetry": self.consumer.stats() if self.consumer is not None else {},
            "max_lag_ms": self.max_lag_ms,
            "notes": list(self.notes),
        }

    def close(self) -> None:
        self._stack.close()
