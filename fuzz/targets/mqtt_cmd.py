"""mqtt-cmd: DNO command messages (topic + payload) into the gateway's command entry point,
GatewayService.handle_command: topic parsing, JSON decoding, HMAC check, field and range
checks, replay and time window (gateway/north/auth.py, payloads.py, topics.py), then the
LimitBook / site settings, the audit log and the ack.

The service runs without a broker or columns (no southbound adapters); its authenticator is
made as the service makes it, its audit log is the real one (in a scratch folder), its
outbox a recorder. Input (JSON): the gateway clock and up to a few messages, each a topic,
a body, how the harness signs it (with the site's key, a wrong key, an unknown key id, for
another topic, or not at all), optional raw payload text instead, byte flips after signing
and an MQTT 5 response topic.

Properties: handle_command never raises; every message gets exactly one ack whose reason is
a Reason and one audit line; a rejected message changes no limit or setting; an accepted one
was signed with the site's key for that very topic (its JSON unchanged by any flip), is
inside the time window, unexpired, not a replay, and its limit is a finite number within
the capacity of what it targets; the control step never fails.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fuzz import mutate
from fuzz.engine import REPO, Finding, Harness, Target
from gateway import service as service_module
from gateway.config import load_config
from gateway.north import payloads, topics
from gateway.north.audit import AuditLog
from gateway.north.auth import CanonicalError, CommandAuthenticator, sign_command
from gateway.north.outbox import MessageKind
from gateway.north.payloads import Reason
from gateway.north.publisher import InboundMessage
from gateway.service import GatewayService, South
from hil.rig.site_files import KEY_ID, write_secrets

KEY = bytes(range(100, 132))
OTHER_KEY = bytes(range(1, 33))
NOW_MS = 1_767_225_600_000
SITE = "depot-1"   # examples/site.toml
KEYS = ("id", "issued_ms", "valid_until_ms", "validity_s", "limit_a", "limit_kw", "duration_s", "config",
        "key_id", "sig", "random_delay_max_s", "telemetry_interval_s", "failsafe_duration_s")
SIGN_MODES = ("good", "good", "good", "none", "badkey", "unknown", "othertopic")
HOSTILE_TOPICS = ("", "/", "evedge", "evedge/v1", "evedge/v1/depot-1", "evedge/v1/depot-1/cmd",
                  "evedge/v1/depot-1/cmd/site", "evedge/v1/depot-1/cmd/site/limit/x",
                  "evedge/v2/depot-1/cmd/site/limit",
                  "evedge/v1/depot-2/cmd/site/limit", "evedge/v1/+/cmd/site/limit", "evedge/v1/#",
                  "evedge/v1/depot-1/cmd/columns/c99/limit", "evedge/v1/depot-1/cmd/columns//limit",
                  "evedge/v1/depot-1/cmd/columns/c01/status", "evedge/v1/depot-1/telemetry", "$SYS/x",
                  "evedge/v1/depot-1/cmd/columns/" + "c" * 70 + "/limit",
                  "evedge/v1/de\u0000pot/cmd/site/limit",
                  "evedge/v1/d\u00e9p\u00f4t/cmd/site/limit", "x" * 300, "evedge/v1/depot-1/cmd/config/")


def _topic(kind: str, column: str | None = None) -> str:
    if kind == "limit":
        return topics.cmd_site_limit(SITE)
    if kind == "failsafe":
        return topics.cmd_site_failsafe(SITE)
    if kind == "config":
        return topics.cmd_config(SITE)
    return topics.cmd_column_limit(SITE, column or "c01")


class _Outbox:
    """Records what the service queues (the real outbox is SQLite: tested on its own)."""

    def __init__(self) -> None:
        self.messages: list[Any] = []

    def enqueue_many(self, messages: Sequence[Any]) -> list[int]:
        self.messages.extend(messages)
        return list(range(len(messages)))


def payload_of(msg: dict[str, Any]) -> tuple[bytes, dict[str, Any] | None]:
    """The bytes sent and, when they carry a command signed with the site's key for this
    topic, that command (what the gateway may accept)."""
    topic = str(msg.get("topic", ""))
    genuine = None
    if isinstance(msg.get("raw"), str):
        data = msg["raw"].encode("utf-8", "surrogatepass")
    else:
        body = msg.get("body")
        mode = msg.get("sign", "none")
        if isinstance(body, dict) and mode != "none":
            key_id, key, where = KEY_ID, KEY, topic
            if mode == "badkey":
                key = OTHER_KEY
            elif mode == "unknown":
                key_id = "nobody"
            elif mode == "othertopic":
                where = _topic("limit") if topic != _topic("limit") else _topic("column", "c02")
            try:
                body = sign_command(body, where, key_id, key)
                if mode == "good":
                    genuine = body
            except CanonicalError:
                pass
        try:
            data = json.dumps(body).encode()
        except (ValueError, TypeError, RecursionError):
            data = b"{}"
    flips = msg.get("flip")
    if isinstance(flips, list) and data:
        b = bytearray(data)
        for f in flips:
            if isinstance(f, list) and len(f) == 2 and all(type(x) is int for x in f):
                b[f[0] % len(b)] = f[1] & 0xFF
        data = bytes(b)
    if genuine is not None:
        try:
            sent = json.loads(data)
        except (ValueError, RecursionError):
            sent = None
        if isinstance(sent, dict) and isinstance(sent.get("sig"), str):
            sent["sig"] = sent["sig"].lower()   # hex: the same MAC in either case (auth.py lowers it)
        if sent != genuine:
            genuine = None
    return data, genuine


class MqttCommandHarness(Harness[Any]):
    def __init__(self, workdir: Path) -> None:
        logging.getLogger("gateway").setLevel(logging.CRITICAL + 1)
        folder = workdir / "site"
        write_secrets(folder, KEY, password="fuzz", key_id=KEY_ID)
        text = (REPO / "examples" / "site.toml").read_text()
        text = text.replace('"/var/lib/evedge/outbox.sqlite3"', '"outbox.sqlite3"').replace(
            '"/var/lib/evedge/dno-audit.jsonl"', '"audit.jsonl"')
        (folder / "site.toml").write_text(text)
        self.config = load_config(folder / "site.toml")
        self.keys = self.config.dno.load_keys()
        self.audit = AuditLog(folder / "audit.jsonl", max_bytes=1 << 20, backups=2, fsync=False,
                              clock_ms=lambda: self.now)
        self.now = NOW_MS
        self.loop = asyncio.new_event_loop()
        # Every input starts a new service on the same site: its failsafe plan (a pure function
        # of the site, a third of the start-up cost) is computed once for that site object.
        self._plan = plan = service_module.plan_failsafe
        base, base_plan = self.config.site, plan(self.config.site)
        service_module.plan_failsafe = lambda site: base_plan if site is base else plan(site)  # type: ignore

    def close(self) -> None:
        service_module.plan_failsafe = self._plan  # type: ignore
        self.audit.close()
        self.loop.close()

    def run(self, value: Any) -> str | None:
        return self.loop.run_until_complete(self._run(value))

    def _service(self) -> GatewayService:
        svc = GatewayService(self.config, now_ms=lambda: self.now, south=South({}, {}, {}, {}))
        dno = self.config.dno
        # As GatewayService._open_north makes them (its outbox and publisher need a broker).
        svc.auth = CommandAuthenticator(self.keys, site_id=svc.site_id, window_s=dno.window_s,
                                        max_validity_s=dno.max_validity_s,
                                        replay_capacity=dno.replay_capacity,
                                        context=svc._limit_context, clock_ms=lambda: self.now,
                                        not_before_ms=svc.started_ms)
        svc.outbox = _Outbox()   # type: ignore[assignment]
        svc.audit = self.audit
        return svc

    @staticmethod
    def _state(svc: GatewayService) -> Any:
        ov = svc._overrides
        return (svc.book.limits(), ov.failsafe, dict(ov.config), svc.site.dno_failsafe_a,
                svc.site.dno_failsafe_duration_s, svc.telemetry_interval_s)

    async def _run(self, value: Any) -> str | None:
        if not isinstance(value, dict) or not isinstance(value.get("messages"), list):
            return "not an input"
        offset = value.get("clock_ms", 0)
        self.now = NOW_MS   # the gateway started then; the messages arrive clock_ms later
        svc = self._service()
        self.now = NOW_MS + (offset if type(offset) is int and abs(offset) < 10**12 else 0)
        outbox = svc.outbox
        assert isinstance(outbox, _Outbox)
        accepted: set[tuple[str, str]] = set()
        labels = []
        for msg in value["messages"][:8]:
            if not isinstance(msg, dict):
                continue
            topic = msg.get("topic")
            if not isinstance(topic, str):
                continue
            data, genuine = payload_of(msg)
            rt = msg.get("rt")
            inbound = InboundMessage(topic, data, 1, False, rt if isinstance(rt, str) else None,
                                     b"corr" if isinstance(rt, str) else None)
            before = self._state(svc)
            lines, queued = self.audit.lines_written, len(outbox.messages)
            decision = await svc.handle_command(inbound)
            acks = [m.payload for m in outbox.messages[queued:] if m.kind is MessageKind.ACK]
            if len(acks) != 1 or self.audit.lines_written != lines + 1:
                raise Finding("%d acks and %d audit lines for one message"
                              % (len(acks), self.audit.lines_written - lines))
            ack = acks[0]
            if not isinstance(decision.reason, Reason) or ack.get("reason") != str(decision.reason):
                raise Finding("ack reason %r for decision %r" % (ack.get("reason"), decision.reason))
            payloads.validate("ack", ack, stamped=False)
            if not decision.accepted:
                if self._state(svc) != before:
                    raise Finding("rejected command (%s) changed the limits or settings" % decision.reason)
                labels.append("%s: %s" % (decision.reason, decision.detail[:80]))
                continue
            self._check_accepted(svc, topic, genuine, decision, accepted)
        if svc.stats.step_errors:
            raise Finding("the control step failed %d times" % svc.stats.step_errors)
        return "\n".join(labels) or None

    def _check_accepted(self, svc: GatewayService, topic: str, genuine: dict[str, Any] | None, decision: Any,
                        accepted: set[tuple[str, str]]) -> None:
        """What an accepted command must be, checked from the raw command (not the decision)."""
        if genuine is None:
            raise Finding("accepted a command that was not signed with the site key for %r" % topic)
        cmd_id = str(genuine.get("id"))
        if (KEY_ID, cmd_id) in accepted:
            raise Finding("accepted the replay of %r" % cmd_id)
        accepted.add((KEY_ID, cmd_id))
        window = self.config.dno.window_s * 1000
        issued = genuine.get("issued_ms")
        if type(issued) is not int or abs(issued - self.now) > window or issued < svc.started_ms:
            raise Finding("accepted issued_ms %r at %d" % (issued, self.now))
        until = genuine.get("valid_until_ms")
        if until is None:
            v = genuine.get("validity_s")
            until = issued + round(v * 1000) if type(v) in (int, float) and math.isfinite(v) else None
        if type(until) is not int or until <= self.now:
            raise Finding("accepted an expired command (valid until %r)" % (until,))
        target = topics.parse(topic)
        cap = max(svc.site.capacity_a) if target.column_id is None else \
            svc.site.column(target.column_id).max_a   # type: ignore[union-attr]
        cmd = decision.command
        if cmd.limit_a is not None and not (math.isfinite(cmd.limit_a) and 0 <= cmd.limit_a <= cap + 1e-9):
            raise Finding("accepted limit %r A for %s (capacity %r A)" % (cmd.limit_a, topic, cap))
        for raw in ("limit_a", "limit_kw"):
            v = genuine.get(raw)
            if v is not None and (type(v) not in (int, float) or not math.isfinite(v) or v < 0):
                raise Finding("accepted %s = %r" % (raw, v))


def seed_inputs() -> list[dict[str, Any]]:
    """Commands as the DNO console (tools/dno.py) builds them, signed by the harness."""
    t0 = NOW_MS
    site = {"id": "dno-1", "issued_ms": t0, "validity_s": 900, "limit_a": 40}
    return [
        {"clock_ms": 0, "messages": [{"topic": _topic("limit"), "body": site, "sign": "good"}]},
        {"clock_ms": 500, "messages": [
            {"topic": _topic("column", "c01"), "sign": "good", "rt": "dno/replies/1",
             "body": {"id": "dno-2", "issued_ms": t0, "valid_until_ms": t0 + 60000, "limit_kw": 7.4}}]},
        {"clock_ms": 0, "messages": [
            {"topic": _topic("failsafe"), "sign": "good",
             "body": {"id": "dno-3", "issued_ms": t0, "validity_s": 3600, "limit_a": 25,
                      "duration_s": 7200}}]},
        {"clock_ms": 0, "messages": [
            {"topic": _topic("config"), "sign": "good",
             "body": {"id": "dno-4", "issued_ms": t0, "validity_s": 86400,
                      "config": {"random_delay_max_s": 0, "telemetry_interval_s": 5}}}]},
        {"clock_ms": 0, "messages": [{"topic": _topic("limit"), "body": site, "sign": "good"},
                                     {"topic": _topic("limit"), "body": site, "sign": "good"}]},  # replay
        {"clock_ms": 0, "messages": [{"topic": _topic("limit"), "body": site, "sign": "badkey"},
                                     {"topic": _topic("limit"), "body": site, "sign": "none"},
                                     {"topic": _topic("limit"), "body": site, "sign": "othertopic"}]},
        {"clock_ms": 400_000,   # stale
         "messages": [{"topic": _topic("limit"), "body": site, "sign": "good"}]},
    ]


class MqttCommandTarget(Target[Any]):
    name = "mqtt-cmd"
    ext = "json"
    about = "gateway command handling (topic, JSON, HMAC, ranges, replay, LimitBook, audit, ack)"

    def seeds(self) -> list[Any]:
        return seed_inputs()

    def encode(self, value: Any) -> bytes:
        return json.dumps(value, sort_keys=True).encode()

    def decode(self, data: bytes) -> Any:
        return json.loads(data)

    def mutate(self, rng: random.Random, value: Any, corpus: Sequence[Any]) -> Any:
        value = json.loads(json.dumps(value))   # a deep copy (NaN survives: Python's json writes it)
        msgs = value.setdefault("messages", [])
        if not msgs:
            msgs.append(rng.choice(seed_inputs())["messages"][0])
        for _ in range(1 + int(rng.random() ** 2 * 3)):
            m = rng.choice(msgs)
            r = rng.random()
            if r < 0.35 and isinstance(m.get("body"), dict):
                m["body"] = mutate.mutate_tree(rng, m["body"], KEYS)
            elif r < 0.45:
                m["sign"] = rng.choice(SIGN_MODES)
            elif r < 0.55:
                col = rng.choice(("c01", "c06", "c99", "C01", "c01 ", "-x", "a.b", "c0\u00e91"))
                m["topic"] = rng.choice(HOSTILE_TOPICS) if rng.random() < 0.5 else rng.choice((
                    _topic("limit"), _topic("failsafe"), _topic("config"), "%s/%s/cmd/columns/%s/limit"
                    % (topics.PREFIX, SITE, col)))
            elif r < 0.65:
                m["flip"] = [[rng.randrange(400), rng.randrange(256)] for _ in range(rng.randrange(1, 3))]
            elif r < 0.72:
                m["raw"] = rng.choice((mutate.deep_json(rng, rng.choice((10, 1000, 3000))), '{"a":1,"a":2}',
                                       '{"limit_a": NaN}', '{"limit_a": 1e999}', "[]", "null", '"x"',
                                       "\udcff", "{" * 5000, '{"id":"x"}', "\ufeff{}", ""))
            elif r < 0.8 and len(msgs) < 8:
                msgs.append(json.loads(json.dumps(m)))   # the same again: a replay
            elif r < 0.88:
                value["clock_ms"] = rng.choice((0, 1, -1, 299_999, 300_001, -300_001, 900_000, 86_400_000 * 2,
                                                rng.randrange(-10**6, 10**6)))
            elif r < 0.94:
                m.pop("raw", None)
                m.pop("flip", None)
            else:
                other = rng.choice(corpus)
                if isinstance(other, dict) and other.get("messages"):
                    msgs.append(json.loads(json.dumps(rng.choice(other["messages"]))))
        value["messages"] = msgs[:8]
        return value

    def harness(self, workdir: Path) -> Harness[Any]:
        return MqttCommandHarness(workdir)


TARGET = MqttCommandTarget()
