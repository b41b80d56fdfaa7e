"""Rig for the gateway service tests: an RS-485 bus joining several virtual columns, site files
with generated secrets, the gateway as a subprocess, and a DNO client on the broker.

Everything started here is stopped by the code that started it (by its own handle or PID).
"""

from __future__ import annotations

import json
import os
import pty
import secrets
import select
import signal
import subprocess
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.north import payloads, topics
from gateway.north.auth import sign_command

REPO = Path(__file__).resolve().parents[2]
KEY_ID = "dno-test"


# -- one RS-485 bus over ptys ----------------------------------------------------------------

def _raw(fd: int) -> None:
    tty.setraw(fd)
    attrs = termios.tcgetattr(fd)
    attrs[3] &= ~termios.ECHO
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


class BusRelay:
    """One RS-485 line with several columns on it. The gateway opens ``path``; every byte it
    sends reaches every column's link line, and what any column answers reaches the gateway,
    as on a real two-wire bus (the columns only talk when addressed, so replies never mix)."""

    def __init__(self, column_paths: Sequence[str]) -> None:
        self._master, self._slave = pty.openpty()
        _raw(self._master)
        _raw(self._slave)
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self._columns: list[int] = []
        for p in column_paths:
            fd = os.open(p, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            _raw(fd)
            self._columns.append(fd)
        self.to_columns = 0
        self.to_gateway = 0
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="bus-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self._master, *self._columns, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except (BlockingIOError, OSError):
                    continue
                if not data:
                    continue
                if fd == self._master:
                    self.to_columns += len(data)
                    for col in self._columns:
                        _write_all(col, data)
                else:
                    self.to_gateway += len(data)
                    _write_all(self._master, data)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=2)
        for fd in (self._master, self._slave, *self._columns, self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> BusRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    deadline = time.monotonic() + 0.5
    while view and time.monotonic() < deadline:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            select.select([], [fd], [], 0.05)
        except OSError:
            return


# -- site files ------------------------------------------------------------------------------

def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def toml_text(doc: Mapping[str, Any]) -> str:
    """Enough TOML for a site file: tables, sub-tables, arrays of tables, scalars, lists."""
    lines: list[str] = []

    def table(name: str, body: Mapping[str, Any], header: str) -> None:
        lines.append(header)
        subs = []
        for key, value in body.items():
            if isinstance(value, Mapping):
                subs.append((key, value))
            else:
                lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
        for key, value in subs:
            table(f"{name}.{key}", value, f"[{name}.{key}]")

    for name, body in doc.items():
        if isinstance(body, list):
            for item in body:
                table(name, item, f"[[{name}]]")
        else:
            table(name, body, f"[{name}]")
    return "\n".join(lines) + "\n"


def new_key() -> bytes:
    return secrets.token_bytes(32)


def write_secrets(folder: Path, key: bytes, *, password: str | None = None) -> None:
    """secrets/dno-keys (and secrets/mqtt-password) with mode 600, as the example asks."""
    sec = folder / "secrets"
    sec.mkdir(parents=True, exist_ok=True)
    keys = sec / "dno-keys"
    keys.write_text(f"{KEY_ID}:{key.hex()}\n")
    keys.chmod(0o600)
    if password is not None:
        pw = sec / "mqtt-password"
        pw.write_text(password + "\n")
        pw.chmod(0o600)


# -- the gateway as a process ----------------------------------------------------------------

class GatewayProcess:
    """``python -m gateway run --config FILE`` with its JSON log lines collected."""

    def __init__(self, config: Path, log_path: Path, *, level: str = "info") -> None:
        self.log_path = log_path
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(config),
                                      "--log-level", level], cwd=REPO, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def logs(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"raw": line})
        return out

    def terminate(self, timeout_s: float = 20.0) -> int:
        """SIGTERM to our own process; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self._log.close()


# -- the DNO side ----------------------------------------------------------------------------

@dataclass
class Received:
    topic: str
    payload: dict[str, Any]
    retain: bool
    correlation: bytes | None
    at: float


@dataclass
class DnoClient:
    """An MQTT 5 client in the control room's place: watches a site, sends signed commands."""

    host: str
    port: int
    site_id: str
    key: bytes
    key_id: str = KEY_ID
    messages: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dno-" + secrets.token_hex(4),
                                  protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(1, 1)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        assert self.subscribed.wait(5), "subscription not acknowledged"

    def _on_connect(self, *_args: Any) -> None:
        # Subscribe on every connect: a restarted broker without persistence forgot us.
        base = f"{topics.PREFIX}/{self.site_id}"
        # retainAsPublished: the retain flag of what the gateway publishes shows through.
        opts = SubscribeOptions(qos=1, retainAsPublished=True)
        self.client.subscribe([(base + "/#", opts), ("dno/replies/#", opts)])

    def wait_resubscribed(self, timeout_s: float = 10.0) -> None:
        """After a broker restart: block until we are subscribed again."""
        assert self.subscribed.wait(timeout_s), "DNO client did not resubscribe"

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            body = payloads.decode(bytes(msg.payload))
        except ValueError:
            body = {"_raw": bytes(msg.payload).decode(errors="replace")}
        props = getattr(msg, "properties", None)
        with self._lock:
            self.messages.append(Received(msg.topic, body, bool(msg.retain),
                                          getattr(props, "CorrelationData", None), time.monotonic()))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    # -- commands --------------------------------------------------------------------------
    def command(self, topic: str, body: Mapping[str, Any], *, sign: bool = True) -> dict[str, Any]:
        return sign_command(body, topic, self.key_id, self.key) if sign else dict(body)

    def site_limit(self, limit_a: float, *, validity_s: float = 600, issued_ms: int | None = None,
                   cmd_id: str | None = None) -> tuple[str, dict[str, Any]]:
        self._n += 1
        topic = topics.cmd_site_limit(self.site_id)
        body = {"id": cmd_id or f"cmd-{self._n}-{secrets.token_hex(3)}",
                "issued_ms": issued_ms if issued_ms is not None else payloads.utc_ms(),
                "validity_s": validity_s, "limit_a": limit_a}
        return topic, self.command(topic, body)

    def publish(self, topic: str, body: Mapping[str, Any] | bytes, *, reply_to: str | None = None,
                correlation: bytes | None = None) -> None:
        props = None
        if reply_to is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = reply_to
            if correlation is not None:
                props.CorrelationData = correlation
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.client.publish(topic, data, qos=1, properties=props).wait_for_publish(5)

    # -- what came back --------------------------------------------------------------------
    def snapshot(self) -> list[Received]:
        with self._lock:
            return list(self.messages)

    def wait_for(self, what: str, pred: Callable[[Received], bool], timeout_s: float = 10.0,
                 since: float = 0.0) -> Received:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for m in self.snapshot():
                if m.at >= since and pred(m):
                    return m
            time.sleep(0.02)
        tail = [(m.topic, m.payload) for m in self.snapshot()[-8:]]
        raise AssertionError(f"timed out waiting for {what}; last messages: {tail}")

    def latest(self, topic: str, since: float = 0.0) -> Received | None:
        found = [m for m in self.snapshot() if m.topic == topic and m.at >= since]
        return found[-1] if found else None


def on(topic: str, **fields: Any) -> Callable[[Received], bool]:
    """A predicate: a message on `topic` whose payload has these field values."""
    def match(m: Received) -> bool:
        return m.topic == topic and all(m.payload.get(k) == v for k, v in fields.items())
    return match


def wait_until(what: str, pred: Callable[[], Any], timeout_s: float, poll_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


def offered_da(columns: Iterable[Any]) -> dict[str, int]:
    """Each virtual column's pilot offer in deci-amps, by column id."""
    return {c.config["column_id"]: int(c.outputs().get("offered_da", -1)) for c in columns}
