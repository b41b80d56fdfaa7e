"""The DNO console's MQTT connection, with every way of failing turned into one clear line.

paho runs its network loop in its own thread once connected; its callbacks only put events
on a queue, which the command's thread reads (`next_message`, and the waits for SUBACK and
PUBACK). The first connection is made in the caller's thread so that a refused, unreachable
or TLS-broken broker is reported before anything else happens. A connection lost later is
re-made by paho (the subscriptions are renewed) and said on stderr.
"""

from __future__ import annotations

import queue
import re
import socket
import ssl
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.north import payloads

EXIT_USAGE = 2


class ConsoleError(Exception):
    """A failure the user can act on: printed as one line on stderr, exit status `code`."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ConnectOptions:
    host: str
    port: int
    protocol: str = "5"                 # "5" or "3.1.1"
    client_id: str = "dno-console"
    username: str | None = None
    password_file: Path | None = None
    tls: bool = False
    tls_ca: Path | None = None          # None with tls: the system's CAs
    tls_cert: Path | None = None
    tls_key: Path | None = None
    connect_timeout_s: float = 10.0
    keepalive_s: int = 30

    @property
    def where(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class Message:
    topic: str
    raw: bytes
    payload: dict[str, Any] | None      # None: not a JSON object (bridge/state is "1"/"0")
    retain: bool
    correlation: bytes | None
    at: float                           # time.monotonic() on arrival


def read_password(path: Path) -> str:
    """The first line of a password file that only its owner can read."""
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise ConsoleError(f"password file {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise ConsoleError(f"password file {path}: readable by group/others (mode {mode & 0o777:o}); "
                           "chmod 600")
    password = text.splitlines()[0] if text.strip() else ""
    if not password:
        raise ConsoleError(f"password file {path}: empty")
    return password


def tls_context(opts: ConnectOptions) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(opts.tls_ca) if opts.tls_ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConsoleError(f"TLS: cannot load the CA file {opts.tls_ca}: {_why(exc)}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if opts.tls_cert is not None:
        try:
            ctx.load_cert_chain(str(opts.tls_cert), str(opts.tls_key) if opts.tls_key else None)
        except (OSError, ssl.SSLError) as exc:
            key = f" / key {opts.tls_key}" if opts.tls_key else ""
            raise ConsoleError(f"TLS: cannot load the client certificate {opts.tls_cert}{key}: {_why(exc)} "
                               "(a PEM certificate, and --tls-key its PEM private key?)") from None
    return ctx


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc.verify_message or str(exc.reason)
    if isinstance(exc, ssl.SSLError):
        return _clean(str(exc.reason or exc.strerror or exc))
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    return str(exc) or type(exc).__name__


def _clean(text: str) -> str:
    """An OpenSSL or paho error text without its source location and log prefix."""
    text = re.sub(r"\s*\(_ssl\.c:\d+\)", "", text)
    return text.removeprefix("failed to receive on socket: ").strip()


class Link:
    """One connection to the broker. Use as a context manager; `connect()` first."""

    def __init__(self, opts: ConnectOptions, notice: Callable[[str], None] | None = None) -> None:
        self.opts = opts
        self.v5 = opts.protocol == "5"
        self._notice = notice or (lambda text: print(f"dno: {text}", file=sys.stderr, flush=True))
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._pending: deque[Message] = deque()
        self._filters: list[str] = []
        self._closing = False
        self._last_error = ""
        self._threaded = False
        self.connected = False
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=opts.client_id,
                                  protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
                                  clean_session=None if self.v5 else True)
        self.client.connect_timeout = opts.connect_timeout_s
        self.client.reconnect_delay_set(1, 10)
        c = self.client
        c.on_connect = lambda _c, _u, _f, rc, _p: self._events.put(("connect", rc))
        c.on_disconnect = lambda _c, _u, _f, rc, _p: self._events.put(("disconnect", rc))
        c.on_subscribe = lambda _c, _u, mid, rcs, _p: self._events.put(("subscribe", mid, rcs))
        c.on_publish = lambda _c, _u, mid, rc, _p: self._events.put(("publish", mid, rc))
        c.on_message = lambda _c, _u, msg: self._events.put(("message", self._message(msg)))
        c.on_log = self._on_log

    def _on_log(self, _c: Any, _u: Any, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and not self._last_error:   # the first error is the cause
            self._last_error = text

    @staticmethod
    def _message(msg: mqtt.MQTTMessage) -> Message:
        raw = bytes(msg.payload)
        try:
            body: dict[str, Any] | None = payloads.decode(raw)
        except ValueError:
            body = None
        props = getattr(msg, "properties", None)
        return Message(msg.topic, raw, body, bool(msg.retain), getattr(props, "CorrelationData", None),
                       time.monotonic())

    # -- connecting ----------------------------------------------------------------------------
    def connect(self) -> None:
        """Connect and wait for the broker's CONNACK; ConsoleError saying why it failed."""
        o, where = self.opts, self.opts.where
        if o.username is not None:
            password = read_password(o.password_file) if o.password_file else None
            self.client.username_pw_set(o.username, password)
        if o.tls:
            self.client.tls_set_context(tls_context(o))
        try:
            kwargs: dict[str, Any] = {"clean_start": True} if self.v5 else {}
            self.client.connect(o.host, o.port, o.keepalive_s, **kwargs)
        except ssl.SSLCertVerificationError as exc:
            raise ConsoleError(f"TLS: the broker at {where} is not trusted: {_why(exc)} "
                               f"(is --tls-ca the CA that signed the broker's certificate?)") from None
        except ssl.SSLError as exc:
            raise ConsoleError(f"TLS handshake with {where} failed: {_why(exc)} "
                               f"(is that port a TLS listener?)") from None
        except (ConnectionResetError, BrokenPipeError) as exc:
            if o.tls:
                raise ConsoleError(f"TLS handshake with {where} failed: the broker reset the connection "
                                   f"(is that port a TLS listener?)") from None
            raise ConsoleError(self._closed_early(_why(exc))) from None
        except ConnectionRefusedError:
            raise ConsoleError(f"cannot reach the broker at {where}: connection refused "
                               f"(nothing listens there: check --broker HOST:PORT)") from None
        except socket.gaierror as exc:
            raise ConsoleError(f"cannot resolve the broker host {o.host!r}: {exc.strerror}") from None
        except TimeoutError:
            raise ConsoleError(f"cannot reach the broker at {where}: no answer within "
                               f"{o.connect_timeout_s:g} s") from None
        except OSError as exc:
            raise ConsoleError(f"cannot reach the broker at {where}: {_why(exc)}") from None
        deadline = time.monotonic() + o.connect_timeout_s
        while not self.connected:
            try:
                rc = self.client.loop(timeout=0.1)
            except OSError as exc:
                self._last_error = self._last_error or _why(exc)
                rc = mqtt.MQTT_ERR_CONN_LOST
            self._drain_connect_events()
            if self.connected:
                break
            if rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
                raise ConsoleError(self._closed_early())
            if time.monotonic() > deadline:
                self._close_socket()
                raise ConsoleError(f"the broker at {where} did not answer the MQTT connect within "
                                   f"{o.connect_timeout_s:g} s (is it an MQTT port?)")
        self.client.loop_start()
        self._threaded = True

    def _drain_connect_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if event[0] == "connect":
                rc: ReasonCode = event[1]
                if rc.is_failure:
                    self._close_socket()
                    raise ConsoleError(self._refused(rc))
                self.connected = True
            elif event[0] == "disconnect" and not self.connected:
                self._close_socket()
                raise ConsoleError(self._closed_early(str(event[1])))
            else:
                self._events.put(event)   # not ours: keep for later (cannot happen before CONNACK)
                return

    def _refused(self, rc: ReasonCode) -> str:
        hint = ("check --username and --password-file" if self.opts.username is not None
                else "this broker wants credentials: --username/--password-file or a client certificate")
        if self.opts.tls_cert is not None:
            hint = "check the client certificate (its CN is the username) and the broker's ACL"
        return f"the broker at {self.opts.where} refused the connection: {rc} ({hint})"

    def _closed_early(self, reason: str = "") -> str:
        why = _clean(self._last_error or reason or "connection closed")
        if "CERTIFICATE_REQUIRED" in why:
            return (f"the broker at {self.opts.where} wants a client certificate: give --tls-cert and "
                    f"--tls-key")
        if not self.opts.tls:
            hint = "a TLS port spoken to without --tls/--tls-ca?"
        elif self.opts.tls_cert is None:
            hint = "does it want a client certificate? give --tls-cert and --tls-key"
        else:
            hint = "a client certificate the broker does not accept?"
        return f"the broker at {self.opts.where} closed the connection before accepting it: {why} ({hint})"

    def _close_socket(self) -> None:
        try:
            self.client.disconnect()
        except Exception:
            pass

    # -- subscribing and publishing ------------------------------------------------------------
    def subscribe(self, filters: Sequence[str], timeout_s: float = 10.0) -> None:
        """Subscribe at QoS 1 and wait for the SUBACK; ConsoleError naming refused filters."""
        self._filters = list(filters)
        mid = self._send_subscribe()
        event = self._wait_control("subscribe", mid, timeout_s)
        if event is None:
            raise ConsoleError(f"the broker at {self.opts.where} did not confirm the subscription within "
                               f"{timeout_s:g} s", 1)
        refused = [f for f, rc in zip(self._filters, event[2], strict=False) if rc.is_failure]
        if refused:
            raise ConsoleError(f"the broker does not let this user read {', '.join(refused)} "
                               f"(the broker's ACL: a DNO user needs read access to the site's topics)")

    def _send_subscribe(self) -> int:
        if self.v5:
            rc, mid = self.client.subscribe([(f, SubscribeOptions(qos=1)) for f in self._filters])
        else:
            rc, mid = self.client.subscribe([(f, 1) for f in self._filters])
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConsoleError(f"cannot subscribe: {mqtt.error_string(rc)}", 1)
        return int(mid or 0)

    def publish(self, topic: str, body: bytes, *, response_topic: str | None = None,
                correlation: bytes | None = None, timeout_s: float = 10.0) -> None:
        """Publish at QoS 1 and wait for the PUBACK; ConsoleError when the broker refuses it."""
        props = None
        if self.v5 and response_topic is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            props.ResponseTopic = response_topic
            if correlation is not None:
                props.CorrelationData = correlation
        info = self.client.publish(topic, body, qos=1, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise ConsoleError(f"cannot publish on {topic}: {mqtt.error_string(info.rc)}", 1)
        event = self._wait_control("publish", info.mid, timeout_s)
        if event is None:
            raise ConsoleError(f"the broker did not confirm the command within {timeout_s:g} s", 1)
        rc: ReasonCode = event[2]
        if rc.is_failure:
            raise ConsoleError(f"the broker refused the command on {topic}: {rc} "
                               f"(the broker's ACL must let this user write the site's cmd/ topics)")

    # -- reading -------------------------------------------------------------------------------
    def next_message(self, timeout_s: float) -> Message | None:
        """The next message, or None when none came within timeout_s."""
        if self._pending:
            return self._pending.popleft()
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            try:
                event = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if event[0] == "message":
                return event[1]  # type: ignore[no-any-return]
            self._control(event)

    def _wait_control(self, kind: str, mid: int, timeout_s: float) -> tuple[Any, ...] | None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                event = self._events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if event[0] == kind and event[1] == mid:
                return event
            if event[0] == "message":
                self._pending.append(event[1])
            else:
                self._control(event)

    def _control(self, event: tuple[Any, ...]) -> None:
        """Connection events after the first connect: say them, and subscribe again."""
        if self._closing:
            return
        if event[0] == "disconnect":
            if self.connected:
                self.connected = False
                self._notice(f"connection to {self.opts.where} lost ({event[1]}); reconnecting")
        elif event[0] == "connect":
            rc: ReasonCode = event[1]
            if rc.is_failure:
                self._notice(f"reconnect refused by the broker: {rc}")
            elif not self.connected:
                self.connected = True
                self._notice(f"reconnected to {self.opts.where}")
                if self._filters:
                    self._send_subscribe()

    def close(self) -> None:
        self._closing = True
        try:
            self.client.disconnect()
        except Exception:
            pass
        if self._threaded:
            self.client.loop_stop()
            self._threaded = False

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
