"""A whole charging site on this machine: broker, virtual columns, RS-485 bus, gateway.

`SiteRig` starts, in order: a private mosquitto on a free loopback port (or uses a broker
it is given), the firmware's .mpy bundle when a column runs on MicroPython, one
`VirtualColumn` per `ColumnSpec` (the real firmware app with a simulated meter; its link
is a serial line pair or a loopback TCP port), a `BusRelay` joining every Modbus RTU
column's line into one RS-485 bus, the site file with fresh DNO secrets, and the gateway
(`python -m gateway run`). `close()` stops exactly those, in reverse order, each by its
own handle: the gateway first (SIGTERM: it hands the columns their failsafes), then the
columns, the bus and the broker. Used by the site demo (`python -m hil demo`).
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig, load_config
from gateway.core.site import Site
from hil.rig.broker import Broker, Listener
from hil.rig.bus_relay import BusRelay
from hil.rig.dno_client import DnoClient
from hil.rig.gateway_proc import GatewayProcess
from hil.rig.ports import LOOPBACK, free_port
from hil.rig.serial_pair import Manipulator, SerialPair
from hil.rig.site_files import new_key, toml_text, write_secrets
from hil.rig.vcolumn import VirtualColumn

LINKS = ("modbus-rtu", "modbus-tcp", "cbor-tcp", "cbor-serial")
BUS_NAME = "rs485-a"
RTU_BAUD = 19200
CBOR_BAUD = 115200
BOOT_TIMEOUT_S = 30.0


class RigStopped(Exception):
    """The caller asked to stop while the site was starting."""


class RigError(Exception):
    """A part of the site did not start; the message says which and why."""


@dataclass(frozen=True)
class ColumnSpec:
    """One column: its link to the gateway, the interpreter its firmware runs on, and its
    electrical data as the site file states it (rotation: site phases of its L1/L2/L3)."""

    id: str
    link: str
    interp: str = "cpython"
    address: int = 1
    phases: int = 3
    rotation: str | None = None
    hardware_a: float = 32
    installation_a: float | None = None
    circuit: str | None = None
    config: Mapping[str, Any] | None = None   # firmware config keys over the rig's (not its link)

    @property
    def rating_a(self) -> float:
        return min(self.hardware_a, self.installation_a or self.hardware_a)


@dataclass(frozen=True)
class ColumnTuning:
    """Firmware config keys every column gets (firmware/config.py)."""

    failsafe_a: float = 6
    heartbeat_timeout_s: int = 10
    min_pause_s: int = 10
    pwm_min_change_interval_s: int = 2


def firmware_config(spec: ColumnSpec, tuning: ColumnTuning, tcp_port: int | None) -> dict[str, Any]:
    """The column's commissioning config (column.json)."""
    link: dict[str, Any] = {"mode": spec.link}
    if spec.link == "modbus-rtu":
        link["baud"] = RTU_BAUD
    elif spec.link == "cbor-serial":
        link["baud"] = CBOR_BAUD
    else:
        link.update(tcp_port=tcp_port, host=LOOPBACK)
    cfg = {"column_id": spec.id, "bus_address": spec.address, "phases": spec.phases,
           "hardware_rating_a": spec.hardware_a, "installation_rating_a": spec.rating_a,
           "failsafe_a": tuning.failsafe_a,
           "meter": {"type": "sdm630" if spec.phases == 3 else "sdm120", "address": 1, "baud": 9600},
           "link": link, "heartbeat_timeout_s": tuning.heartbeat_timeout_s,
           "min_pause_s": tuning.min_pause_s, "pwm_min_change_interval_s": tuning.pwm_min_change_interval_s}
    for key, value in (spec.config or {}).items():
        if key not in ("link", "column_id", "bus_address"):   # the rig's wiring stays
            cfg[key] = value
    return cfg


def gateway_column(spec: ColumnSpec, col: VirtualColumn, device: str | None = None) -> dict[str, Any]:
    """The column's [[columns]] entry in the site file (`device`: the gateway's end of a
    serial link when it is not the column's own, e.g. behind a faulty wire)."""
    entry: dict[str, Any] = {"id": spec.id}
    if spec.circuit:
        entry["circuit"] = spec.circuit
    entry["phases"] = spec.phases
    if spec.rotation:
        entry["rotation"] = spec.rotation
    entry["hardware_a"] = spec.hardware_a
    if spec.installation_a is not None:
        entry["installation_a"] = spec.installation_a
    entry["link"] = spec.link
    link = col.config["link"]
    if spec.link == "modbus-rtu":
        entry.update(bus=BUS_NAME, address=spec.address)
    elif spec.link == "modbus-tcp":
        entry.update(host=LOOPBACK, port=link["tcp_port"], unit=spec.address)
    elif spec.link == "cbor-tcp":
        entry.update(host=LOOPBACK, port=link["tcp_port"])
    else:
        entry.update(device=device or col.link_path or "", baud=CBOR_BAUD)
    return entry


class SiteRig:
    """Start with `start()`, stop with `close()` (or use as a context manager).

    `tables` holds the site file's [site], [circuits], [allocation] and [gateway] tables;
    the rig adds [buses], [[columns]], [mqtt] and [dno] (keys in tables["mqtt"] other than
    the broker's address are added to it). `broker`: (host, port) of a broker to use instead
    of starting one. `link_faults`: column id -> a manipulator (hil.bus_faults.BusFaults)
    on a stretch of wire between that column's serial link and the bus or the gateway."""

    def __init__(self, workdir: Path, site_id: str, specs: Sequence[ColumnSpec], tables: Mapping[str, Any], *,
                 broker: tuple[str, int] | None = None, tuning: ColumnTuning = ColumnTuning(),
                 key_id: str = "dno-demo", link_faults: Mapping[str, Manipulator] | None = None) -> None:
        for spec in specs:
            if spec.link not in LINKS:
                raise ValueError(f"column {spec.id}: unknown link {spec.link!r}")
        self.workdir = workdir
        self.site_id = site_id
        self.specs = {s.id: s for s in specs}
        self.tables = tables
        self.tuning = tuning
        self.key_id = key_id
        self.key = new_key()
        self.embedded_broker = broker is None
        self.broker_host, self.broker_port = broker or (LOOPBACK, 0)
        self.columns: dict[str, VirtualColumn] = {}
        self.outputs: dict[str, Any] = {}      # column id -> hil.replay.mpy.ColumnPower (output tail)
        self.bus: BusRelay | None = None
        self.link_faults = dict(link_faults or {})
        self.link_paths: dict[str, str] = {}   # column id -> the gateway's end of a serial link
        self.gateway: GatewayProcess | None = None
        self.gateway_starts = 0
        self.config_path = workdir / "site.toml"
        self.config: GatewayConfig | None = None
        self._stack = ExitStack()

    # -- start -----------------------------------------------------------------------------
    def start(self, should_stop: Callable[[], bool] = lambda: False,
              progress: Callable[[str], None] = lambda _msg: None) -> None:
        """Start every part; RigStopped when should_stop() turns true between steps, RigError
        when a part fails. On any exception what was started is stopped again."""
        try:
            self._start(should_stop, progress)
        except BaseException:
            self.close()
            raise

    def _start(self, should_stop: Callable[[], bool], progress: Callable[[str], None]) -> None:
        from hil.replay.mpy import ColumnPower

        def check() -> None:
            if should_stop():
                raise RigStopped("stopped while starting")

        self.workdir.mkdir(parents=True, exist_ok=True)
        stack = self._stack
        if self.embedded_broker:
            broker = Broker([Listener("plain")], workdir=self.workdir / "broker")
            stack.callback(broker.stop)
            broker.start()
            self.broker_port = broker.port("plain")
            pid = broker.proc.pid if broker.proc else "?"
            progress(f"broker: mosquitto on {self.broker_host}:{self.broker_port} (pid {pid})")
        elif not _reachable(self.broker_host, self.broker_port):
            raise RigError(f"cannot reach the broker at {self.broker_host}:{self.broker_port}")
        check()
        bundle = None
        if any(s.interp == "micropython" for s in self.specs.values()):
            from tools.firmware_build import BuildError, build

            try:
                bundle = build(out=self.workdir / "bundle").root
            except BuildError as exc:
                raise RigError(f"cannot build the firmware: {exc}") from None
            progress(f"firmware: .mpy bundle built in {bundle}")
        for spec in self.specs.values():
            check()
            tcp = free_port() if spec.link.endswith("-tcp") else None
            col = VirtualColumn(spec.interp, self.workdir / spec.id, firmware_config(spec, self.tuning, tcp),
                                bundle=bundle)
            stack.enter_context(col)
            col.meter.set_load([0.0] * spec.phases)
            self.columns[spec.id] = col
            self.outputs[spec.id] = ColumnPower(col)
        self._wait_columns(check)
        progress("columns: " + ", ".join(f"{s.id} ({s.link}, {s.interp})" for s in self.specs.values()))
        self._wire_links()
        rtu = [self.link_paths[s.id] for s in self.specs.values() if s.link == "modbus-rtu"]
        if rtu:
            self.bus = stack.enter_context(BusRelay(rtu))
            progress(f"bus: {len(rtu)} Modbus RTU columns on one RS-485 line, gateway end {self.bus.path}")
        write_secrets(self.workdir, self.key, key_id=self.key_id)
        self.config_path.write_text(toml_text(self._site_doc()))
        self.config = load_config(self.config_path)
        check()
        self.start_gateway()
        stack.callback(self._stop_gateway)
        assert self.gateway is not None
        progress(f"gateway: python -m gateway run --config {self.config_path} (pid {self.gateway.proc.pid})")

    def _wire_links(self) -> None:
        """The gateway's end of each serial link: the column's own, or a faulty wire's."""
        from hil.bus_faults import LineSplice

        for cid, col in self.columns.items():
            if col.link_path is None:
                continue
            path = col.link_path
            faults = self.link_faults.get(cid)
            if faults is not None:
                wire = self._stack.enter_context(SerialPair(manipulator=faults))
                self._stack.enter_context(LineSplice(wire.b_path, path))
                path = wire.a_path
            self.link_paths[cid] = path

    def _wait_columns(self, check: Callable[[], None]) -> None:
        """Until every firmware reports its board outputs and every TCP link listens."""
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        waiting = set(self.columns)
        while waiting:
            check()
            for cid in sorted(waiting):
                col = self.columns[cid]
                if col.proc is None or col.proc.poll() is not None:
                    raise RigError(f"column {cid}: the firmware stopped at boot:\n"
                                   + self.outputs[cid].output(0.5)[-2000:])
                link = col.config["link"]
                if col.outputs() and (not link["mode"].endswith("-tcp")
                                      or _reachable(LOOPBACK, int(link["tcp_port"]))):
                    waiting.discard(cid)
            if time.monotonic() > deadline:
                raise RigError(f"columns {sorted(waiting)} did not come up within {BOOT_TIMEOUT_S:.0f} s")
            time.sleep(0.05)

    def _site_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"site": {**self.tables.get("site", {}), "id": self.site_id}}
        if self.tables.get("circuits"):
            doc["circuits"] = dict(self.tables["circuits"])
        if self.bus is not None:
            doc["buses"] = {BUS_NAME: {"device": self.bus.path, "baud": RTU_BAUD}}
        if self.tables.get("allocation"):
            doc["allocation"] = dict(self.tables["allocation"])
        doc["columns"] = [gateway_column(spec, self.columns[cid], self.link_paths.get(cid))
                          for cid, spec in self.specs.items()]
        doc["mqtt"] = {"protocol": "5", "client_id": f"evedge-{self.site_id}", "keepalive_s": 10,
                       "outbox": {"path": str(self.workdir / "outbox.sqlite3"), "durability": "normal"},
                       **self.tables.get("mqtt", {}), "host": self.broker_host, "port": self.broker_port}
        doc["dno"] = {"keys_file": "secrets/dno-keys", "audit_path": str(self.workdir / "dno-audit.jsonl")}
        if self.tables.get("gateway"):
            doc["gateway"] = dict(self.tables["gateway"])
        return doc

    # -- use -------------------------------------------------------------------------------
    @property
    def site(self) -> Site:
        """The site as the gateway reads it from the site file (after start())."""
        if self.config is None:
            raise RuntimeError("the site is not started")
        return self.config.site

    def dno_client(self) -> DnoClient:
        """A control-room client on the site's broker holding the site's DNO key."""
        return DnoClient(self.broker_host, self.broker_port, self.site_id, self.key, key_id=self.key_id)

    def gateway_alive(self) -> bool:
        return self.gateway is not None and self.gateway.proc.poll() is None

    def dead_columns(self) -> list[str]:
        return [cid for cid, col in self.columns.items() if col.proc is None or col.proc.poll() is not None]

    def start_gateway(self) -> None:
        """Start the gateway process (again, after kill_gateway: the same site file and
        outbox; each start logs to its own file, gateway.log, gateway-2.log, ...)."""
        if self.gateway_alive():
            raise RigError("the gateway is already running")
        if self.gateway is not None:
            self.gateway.close()
        self.gateway_starts += 1
        n = self.gateway_starts
        log = self.workdir / ("gateway.log" if n == 1 else f"gateway-{n}.log")
        self.gateway = GatewayProcess(self.config_path, log)

    def kill_gateway(self) -> None:
        """SIGKILL the gateway, as a crash or its box losing power would: no hand-over."""
        if self.gateway is not None and self.gateway.proc.poll() is None:
            self.gateway.proc.kill()
            self.gateway.proc.wait(timeout=10)

    def pause_gateway(self, paused: bool) -> None:
        """SIGSTOP / SIGCONT the gateway: a hung process, its sockets and ports still open."""
        if self.gateway is not None and self.gateway.proc.poll() is None:
            self.gateway.proc.send_signal(signal.SIGSTOP if paused else signal.SIGCONT)

    def stop_gateway(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM the gateway and wait (it hands the columns their failsafes); its exit code."""
        if self.gateway is None:
            return None
        try:
            return self.gateway.terminate(timeout_s)
        except Exception:
            return None

    def _stop_gateway(self) -> None:
        if self.gateway is not None:
            self.pause_gateway(False)
            self.stop_gateway()
            self.gateway.close()

    def close(self) -> None:
        """Stop everything this rig started, in reverse order."""
        self._stack.close()

    def __enter__(self) -> SiteRig:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False
