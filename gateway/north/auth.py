"""Authenticating DNO commands: HMAC-SHA256, key ids, a timestamp window, replay memory.

Signature (what a DNO client computes; `sign_command` does it):

    message = topic + "\\n" + canonical_json(command without "sig")
    sig     = lowercase hex of HMAC-SHA256(key, message)

canonical_json is JSON with keys sorted, no whitespace (separators "," and ":"), ASCII
only (non-ASCII escaped as \\uXXXX), integers as integers, a float with an integral value
written as an integer (16.0 -> 16) and other floats in their shortest round-trip form
(16.5, 0.1). That is what Python's json.dumps(sort_keys=True, separators=(",", ":")) and
JavaScript's JSON.stringify (with sorted keys) both produce for every number outside
the exponent ranges (|x| < 1e-4 or >= 1e16, not 0): such numbers are refused. The
topic is part of the message, so a command cannot be moved to another site or column.
`key_id` is inside the signed body.

Checks, in order, each with its own reason code: topic (unknown_topic, wrong_site),
JSON (bad_json, not_finite), key_id and sig present (unauthenticated), key known
(unknown_key), signature (bad_signature), target known (unknown_column), fields and
ranges (missing_field, unknown_field, bad_type, bad_field, out_of_range), issued_ms
within +-window of now (future, stale), validity not over (expired), (key_id, id) not
seen within the window (replayed; busy when the replay memory is full). Only a
command that passes every check is remembered and accepted.

Keys never leave the KeyStore: its repr/str list key ids only, and nothing here logs a
key or a signature.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.north import topics
from gateway.north.payloads import (
    ID_PATTERN,
    Command,
    LimitContext,
    PayloadError,
    Reason,
    command_id_of,
    decode_json,
    parse_command,
    utc_ms,
)

log = logging.getLogger(__name__)

MIN_KEY_BYTES = 16
SIG_HEX_LEN = 64


class KeyTableError(ValueError):
    """A key table that cannot be loaded; the message never contains key material."""


class KeyStore:
    """key_id -> secret. Redacted in repr/str; not picklable or copyable by accident."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        for key_id, secret in keys.items():
            if not ID_PATTERN.fullmatch(key_id):
                raise KeyTableError(f"key id {key_id[:64]!r} must match {ID_PATTERN.pattern}")
            if len(secret) < MIN_KEY_BYTES:
                raise KeyTableError(f"key {key_id!r} is shorter than {MIN_KEY_BYTES} bytes")
        self._keys = dict(keys)

    @classmethod
    def parse(cls, text: str, *, source: str = "key table") -> KeyStore:
        """Entries `key_id:hex` separated by newlines or commas; `#` starts a comment."""
        keys: dict[str, bytes] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            for raw in line.split("#", 1)[0].split(","):
                entry = raw.strip()
                if not entry:
                    continue
                key_id, sep, hexkey = entry.partition(":")
                key_id = key_id.strip()
                where = f"{source} line {lineno}"
                if not sep:
                    raise KeyTableError(f"{where}: expected key_id:hex")
                try:
                    secret = bytes.fromhex(hexkey.strip())
                except ValueError:
                    raise KeyTableError(f"{where}: key {key_id[:64]!r} is not hex") from None
                if key_id in keys:
                    raise KeyTableError(f"{where}: key id {key_id[:64]!r} given twice")
                keys[key_id] = secret
        if not keys:
            raise KeyTableError(f"{source}: no keys")
        return cls(keys)

    @classmethod
    def from_file(cls, path: Path) -> KeyStore:
        """Load a key file; refuse one that group or others can read."""
        mode = path.stat().st_mode
        if mode & 0o077:
            raise KeyTableError(f"{path}: readable by group/others (mode {mode & 0o777:o}); chmod 600")
        return cls.parse(path.read_text(), source=str(path))

    @classmethod
    def from_env(cls, name: str, environ: Mapping[str, str] | None = None) -> KeyStore:
        env = os.environ if environ is None else environ
        if name not in env:
            raise KeyTableError(f"environment variable {name} is not set")
        return cls.parse(env[name], source=f"${name}")

    def get(self, key_id: str) -> bytes | None:
        return self._keys.get(key_id)

    @property
    def key_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._keys))

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"KeyStore(key_ids={list(self.key_ids)!r}, secrets=<redacted>)"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a KeyStore is not serialisable (it holds secrets)")


# -- signature ---------------------------------------------------------------------------

class CanonicalError(ValueError):
    pass


def _normalise(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CanonicalError("non-finite number")
        if value.is_integer() and abs(value) < 2**53:
            return int(value)
        if "e" in repr(value):
            raise CanonicalError("number needs an exponent: no canonical form")
        return value
    if isinstance(value, Mapping):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(v) for v in value]
    raise CanonicalError(f"cannot sign a {type(value).__name__}")


def canonical_message(topic: str, command: Mapping[str, Any]) -> bytes:
    """The bytes the HMAC covers: topic, newline, canonical JSON without "sig"."""
    body = _normalise({k: v for k, v in command.items() if k != "sig"})
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return topic.encode("utf-8") + b"\n" + text.encode("ascii")


def signature(key: bytes, topic: str, command: Mapping[str, Any]) -> str:
    return hmac.new(key, canonical_message(topic, command), hashlib.sha256).hexdigest()


def sign_command(command: Mapping[str, Any], topic: str, key_id: str, key: bytes) -> dict[str, Any]:
    """A copy of `command` with key_id and sig set, ready to publish on `topic`."""
    out = {k: v for k, v in command.items() if k != "sig"}
    out["key_id"] = key_id
    out["sig"] = signature(key, topic, out)
    return out


# -- replay memory -----------------------------------------------------------------------

class ReplayGuard:
    """Remembers (key_id, id) until its issued_ms + window has passed, at most `capacity`.

    After that the timestamp window rejects the command anyway (stale), so memory is
    bounded by the rate of authentic commands. When full it refuses new ones (busy)
    rather than forget one that could then be replayed.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._until: dict[tuple[str, str], int] = {}
        self._heap: list[tuple[int, str, str]] = []

    def prune(self, now_ms: int) -> None:
        while self._heap and self._heap[0][0] < now_ms:
            _, key_id, cmd_id = heapq.heappop(self._heap)
            self._until.pop((key_id, cmd_id), None)

    def seen(self, key_id: str, cmd_id: str) -> bool:
        return (key_id, cmd_id) in self._until

    def remember(self, key_id: str, cmd_id: str, until_ms: int) -> bool:
        if len(self._until) >= self.capacity:
            return False
        self._until[(key_id, cmd_id)] = until_ms
        heapq.heappush(self._heap, (until_ms, key_id, cmd_id))
        return True

    def __len__(self) -> int:
        return len(self._until)


# -- the decision ------------------------------------------------------------------------

@dataclass(frozen=True)
class Decision:
    """The outcome for one received command; everything here is safe to log and audit."""

    reason: Reason
    topic: str
    target: topics.Topic | None = None
    command: Command | None = None
    command_id: str | None = None
    key_id: str | None = None
    detail: str = ""

    @property
    def accepted(self) -> bool:
        return self.reason is Reason.OK


ContextLookup = Callable[[topics.Topic], LimitContext | None]


class CommandAuthenticator:
    """Turns (topic, payload) into a Decision. Holds the keys and the replay memory.

    `context(target)` gives the capacity a limit is checked against, or None for a
    column the site does not have (unknown_column). `not_before_ms` (e.g. the service's
    start time) rejects as stale anything issued before it: the replay memory does not
    survive a restart, so this closes the replay gap across one.
    """

    def __init__(self, keys: KeyStore, *, site_id: str | None = None, window_s: float = 300.0,
                 max_validity_s: int = 86_400, replay_capacity: int = 10_000,
                 context: ContextLookup | None = None, clock_ms: Callable[[], int] = utc_ms,
                 not_before_ms: int | None = None) -> None:
        self._keys = keys
        self.site_id = site_id
        self.window_ms = int(window_s * 1000)
        self.max_validity_s = max_validity_s
        self._replay = ReplayGuard(replay_capacity)
        self._context = context
        self._clock_ms = clock_ms
        self.not_before_ms = not_before_ms

    def __repr__(self) -> str:
        return f"CommandAuthenticator(site_id={self.site_id!r}, keys={self._keys!r})"

    def check(self, topic: str | bytes, payload: bytes) -> Decision:
        decision = self._check(topic, payload)
        log.info("dno command %s: reason=%s id=%s key_id=%s topic=%s %s",
                 "accepted" if decision.accepted else "rejected", decision.reason,
                 decision.command_id, decision.key_id, decision.topic, decision.detail)
        return decision

    def _check(self, raw_topic: str | bytes, payload: bytes) -> Decision:
        shown = _printable(raw_topic)
        try:
            target = topics.parse(raw_topic)
        except topics.TopicError as exc:
            return Decision(exc.reason, shown, detail=exc.detail)
        if target.command_kind is None:
            return Decision(Reason.UNKNOWN_TOPIC, shown, target, detail="not a command topic")
        if self.site_id is not None and target.site_id != self.site_id:
            return Decision(Reason.WRONG_SITE, shown, target, detail="command for another site")
        try:
            obj = decode_json(payload)
        except PayloadError as exc:
            return Decision(exc.reason, shown, target, detail=exc.detail)
        cmd_id = command_id_of(obj)

        def reject(reason: Reason, detail: str, key_id: str | None = None) -> Decision:
            return Decision(reason, shown, target, command_id=cmd_id, key_id=key_id, detail=detail)

        key_id, sig = obj.get("key_id"), obj.get("sig")
        if not isinstance(key_id, str) or not isinstance(sig, str):
            return reject(Reason.UNAUTHENTICATED, "key_id and sig are required strings")
        key = self._keys.get(key_id)
        shown_key = key_id if ID_PATTERN.fullmatch(key_id) else None
        if key is None:
            return reject(Reason.UNKNOWN_KEY, "no such key id", shown_key)
        try:
            expected = signature(key, str(target), obj)
        except CanonicalError as exc:
            return reject(Reason.BAD_SIGNATURE, str(exc), key_id)
        if len(sig) != SIG_HEX_LEN or not sig.isascii() or not hmac.compare_digest(expected, sig.lower()):
            return reject(Reason.BAD_SIGNATURE, "signature does not match", key_id)
        context = LimitContext()
        if self._context is not None:
            found = self._context(target)
            if found is None:
                return reject(Reason.UNKNOWN_COLUMN, "no such column on this site", key_id)
            context = found
        try:
            command = parse_command(obj, target.command_kind, context=context,
                                    max_validity_s=self.max_validity_s)
        except PayloadError as exc:
            return reject(exc.reason, exc.detail, key_id)
        now = self._clock_ms()
        if command.issued_ms > now + self.window_ms:
            return reject(Reason.FUTURE, "issued_ms is ahead of the gateway clock", key_id)
        if command.issued_ms < now - self.window_ms or (
                self.not_before_ms is not None and command.issued_ms < self.not_before_ms):
            return reject(Reason.STALE, "issued_ms is too old", key_id)
        if command.valid_until_ms <= now:
            return reject(Reason.EXPIRED, "validity is over", key_id)
        self._replay.prune(now)
        if self._replay.seen(key_id, command.id):
            return reject(Reason.REPLAYED, "command id already used", key_id)
        if not self._replay.remember(key_id, command.id, command.issued_ms + self.window_ms):
            return reject(Reason.BUSY, "replay memory full", key_id)
        return Decision(Reason.OK, shown, target, command, command.id, key_id)


def _printable(topic: str | bytes) -> str:
    """A hostile topic, made safe and short for logs and the audit."""
    text = topic.decode("utf-8", "replace") if isinstance(topic, bytes | bytearray) else str(topic)
    return text[:topics.MAX_TOPIC_LEN].encode("unicode_escape").decode("ascii")
