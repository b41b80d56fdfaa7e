"""Northbound settings: the [mqtt] and [dno] tables of the site file, checked at start.

Every error names the key (`mqtt.tls.cafile: file not found: ...`). Secrets never sit
in the site file: the broker password and the DNO keys come from a file (mode 600) or
an environment variable named here, and are read when needed, not stored in these
objects. Relative paths are relative to the site file's folder (`base_dir`).

    [mqtt]
    host = "broker.dno.example"      # required
    port = 8883                      # default 8883 with [mqtt.tls], else 1883
    client_id = "evedge-site-1"      # default: the caller's (e.g. from the site id)
    protocol = "5"                   # "5" or "3.1.1"
    keepalive_s = 30
    connect_timeout_s = 10
    reconnect_min_s = 0.5            # jittered exponential backoff between these
    reconnect_max_s = 60
    inflight_max = 64                # QoS 1 messages awaiting PUBACK at once
    username = "site-1"              # optional; password from one of:
    password_file = "secrets/mqtt-password"
    # password_env = "EVEDGE_MQTT_PASSWORD"
    [mqtt.tls]
    cafile = "ca.pem"                # the broker's CA (required with TLS)
    certfile = "client.pem"          # client certificate and key (both or neither)
    keyfile = "client.key"
    [mqtt.outbox]
    path = "/var/lib/evedge/outbox.sqlite3"
    max_rows = 100000
    max_bytes = 67108864
    durability = "full"              # "full" or "normal" (see gateway/north/outbox.py)

    [dno]
    keys_file = "secrets/dno-keys"   # or keys_env = "EVEDGE_DNO_KEYS" (format: auth.KeyStore.parse)
    window_s = 300                   # issued_ms must be within +- this of the gateway clock
    max_validity_s = 86400
    replay_capacity = 10000
    audit_path = "/var/lib/evedge/dno-audit.jsonl"
    audit_max_bytes = 1000000
    audit_backups = 5
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.north.auth import KeyStore, KeyTableError

PROTOCOLS = ("5", "3.1.1")
_REQUIRED: Any = object()


class SettingsError(ValueError):
    """A bad setting: `key` is its dotted name, `problem` says what is wrong."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class _Table:
    """Reads one TOML table, remembering which keys were used to report the rest."""

    def __init__(self, data: Any, prefix: str, base_dir: Path) -> None:
        if not isinstance(data, Mapping):
            raise SettingsError(prefix, "must be a table")
        self.data, self.prefix, self.base_dir = data, prefix, base_dir
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def raw(self, name: str, default: Any) -> Any:
        self.used.add(name)
        if name in self.data:
            return self.data[name]
        if default is _REQUIRED:
            raise SettingsError(self.key(name), "is required")
        return default

    def string(self, name: str, default: Any = _REQUIRED) -> Any:
        value = self.raw(name, default)
        if value is not default and (not isinstance(value, str) or not value.strip()):
            raise SettingsError(self.key(name), f"must be a non-empty string, got {value!r}")
        return value

    def integer(self, name: str, default: Any, lo: int, hi: int) -> int:
        value = self.raw(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise SettingsError(self.key(name), f"must be an integer {lo}..{hi}, got {value!r}")
        return value

    def number(self, name: str, default: Any, lo: float, hi: float) -> float:
        value = self.raw(name, default)
        if not isinstance(value, int | float) or isinstance(value, bool) or not lo <= value <= hi:
            raise SettingsError(self.key(name), f"must be a number {lo}..{hi}, got {value!r}")
        return float(value)

    def path(self, name: str, default: Any = _REQUIRED, *, must_exist: bool = False) -> Any:
        value = self.string(name, default)
        if value is None:
            return None
        path = Path(value)
        path = path if path.is_absolute() else self.base_dir / path
        try:
            missing = must_exist and not path.is_file()
        except OSError as exc:   # a name too long for the file system, a folder we may not read
            problem = exc.strerror or str(exc)
            raise SettingsError(self.key(name), f"cannot check {str(path)[:200]}: {problem}") from None
        if missing:
            raise SettingsError(self.key(name), f"file not found: {path}")
        return path

    def sub(self, name: str) -> _Table | None:
        value = self.raw(name, None)
        return None if value is None else _Table(value, self.key(name), self.base_dir)

    def finish(self) -> None:
        for name in self.data:
            if name not in self.used:
                close = difflib.get_close_matches(str(name), sorted(self.used), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise SettingsError(self.key(str(name)), f"unknown key{hint}")


def _no_inline_secret(table: _Table, name: str, instead: str) -> None:
    if name in table.data:
        raise SettingsError(table.key(name), f"secrets do not belong in the site file: use {instead}")


@dataclass(frozen=True)
class TlsSettings:
    cafile: Path
    certfile: Path | None = None
    keyfile: Path | None = None


@dataclass(frozen=True)
class OutboxSettings:
    path: Path
    max_rows: int = 100_000
    max_bytes: int = 64 << 20
    durability: str = "full"


@dataclass(frozen=True)
class MqttSettings:
    host: str
    port: int
    client_id: str
    outbox: OutboxSettings
    protocol: str = "5"
    keepalive_s: int = 30
    connect_timeout_s: float = 10.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    inflight_max: int = 64
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    tls: TlsSettings | None = None

    def password(self, environ: Mapping[str, str] | None = None) -> str | None:
        """Read the broker password now (from its file or variable); None when not set."""
        if self.password_file is not None:
            return self.password_file.read_text().rstrip("\r\n")
        if self.password_env is not None:
            env = os.environ if environ is None else environ
            if self.password_env not in env:
                raise SettingsError("mqtt.password_env", f"variable {self.password_env} is not set")
            return env[self.password_env]
        return None


@dataclass(frozen=True)
class DnoSettings:
    audit_path: Path
    keys_file: Path | None = None
    keys_env: str | None = None
    window_s: int = 300
    max_validity_s: int = 86_400
    replay_capacity: int = 10_000
    audit_max_bytes: int = 1_000_000
    audit_backups: int = 5

    def load_keys(self, environ: Mapping[str, str] | None = None) -> KeyStore:
        """The key table, read now; SettingsError names the setting on any problem."""
        try:
            if self.keys_file is not None:
                return KeyStore.from_file(self.keys_file)
            assert self.keys_env is not None
            return KeyStore.from_env(self.keys_env, environ)
        except (KeyTableError, OSError) as exc:
            key = "dno.keys_file" if self.keys_file is not None else "dno.keys_env"
            raise SettingsError(key, str(exc)) from None


def parse_mqtt(data: Mapping[str, Any], *, base_dir: Path | None = None,
               default_client_id: str | None = None, prefix: str = "mqtt") -> MqttSettings:
    t = _Table(data, prefix, base_dir or Path.cwd())
    host = t.string("host")
    tls = None
    tls_table = t.sub("tls")
    if tls_table is not None:
        certfile = tls_table.path("certfile", None, must_exist=True)
        keyfile = tls_table.path("keyfile", None, must_exist=True)
        if (certfile is None) != (keyfile is None):
            raise SettingsError(tls_table.key("keyfile" if keyfile is None else "certfile"),
                                "certfile and keyfile go together")
        tls = TlsSettings(tls_table.path("cafile", must_exist=True), certfile, keyfile)
        tls_table.finish()
    protocol = t.raw("protocol", "5")
    protocol = str(protocol) if isinstance(protocol, int | str) and not isinstance(protocol, bool) else None
    if protocol not in PROTOCOLS:
        raise SettingsError(t.key("protocol"), f"must be one of {', '.join(PROTOCOLS)}")
    client_id = t.string("client_id", default_client_id)
    if client_id is None:
        raise SettingsError(t.key("client_id"), "is required")
    _no_inline_secret(t, "password", "password_file or password_env")
    password_file = t.path("password_file", None, must_exist=True)
    password_env = t.string("password_env", None)
    if password_file is not None and password_env is not None:
        raise SettingsError(t.key("password_env"), "set password_file or password_env, not both")
    username = t.string("username", None)
    if username is None and (password_file or password_env):
        raise SettingsError(t.key("username"), "is required with a password")
    ob = t.sub("outbox")
    if ob is None:
        raise SettingsError(t.key("outbox"), "is required (a table with at least path)")
    outbox = OutboxSettings(path=ob.path("path"),
                            max_rows=ob.integer("max_rows", 100_000, 10, 100_000_000),
                            max_bytes=ob.integer("max_bytes", 64 << 20, 64 << 10, 1 << 40),
                            durability=ob.string("durability", "full"))
    if outbox.durability not in ("full", "normal"):
        raise SettingsError(ob.key("durability"), "must be \"full\" or \"normal\"")
    ob.finish()
    settings = MqttSettings(
        host=host, port=t.integer("port", 8883 if tls else 1883, 1, 65535), client_id=client_id,
        outbox=outbox, protocol=protocol, keepalive_s=t.integer("keepalive_s", 30, 5, 3600),
        connect_timeout_s=t.number("connect_timeout_s", 10.0, 0.5, 300),
        reconnect_min_s=t.number("reconnect_min_s", 0.5, 0.01, 3600),
        reconnect_max_s=t.number("reconnect_max_s", 60.0, 0.01, 86_400),
        inflight_max=t.integer("inflight_max", 64, 1, 65_535), username=username,
        password_file=password_file, password_env=password_env, tls=tls)
    if settings.reconnect_max_s < settings.reconnect_min_s:
        raise SettingsError(t.key("reconnect_max_s"), "must be >= reconnect_min_s")
    t.finish()
    return settings


def parse_dno(data: Mapping[str, Any], *, base_dir: Path | None = None, prefix: str = "dno") -> DnoSettings:
    t = _Table(data, prefix, base_dir or Path.cwd())
    _no_inline_secret(t, "keys", "keys_file or keys_env")
    keys_file = t.path("keys_file", None, must_exist=True)
    keys_env = t.string("keys_env", None)
    if (keys_file is None) == (keys_env is None):
        raise SettingsError(t.key("keys_file"), "set exactly one of keys_file or keys_env")
    settings = DnoSettings(
        audit_path=t.path("audit_path"), keys_file=keys_file, keys_env=keys_env,
        window_s=t.integer("window_s", 300, 1, 3600),
        max_validity_s=t.integer("max_validity_s", 86_400, 1, 7 * 86_400),
        replay_capacity=t.integer("replay_capacity", 10_000, 1, 10_000_000),
        audit_max_bytes=t.integer("audit_max_bytes", 1_000_000, 4096, 1 << 34),
        audit_backups=t.integer("audit_backups", 5, 1, 1000))
    t.finish()
    return settings
