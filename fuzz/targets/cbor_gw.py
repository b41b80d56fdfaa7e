"""cbor-gw: the gateway's CBOR column channel (gateway/south/cbor_columns.py) on mutated
column traffic.

One CborColumns adapter with one column, set up as its connection loop sets up each
connection (a firmware.cbor_link.Link on the gateway side, the adapter's handlers) but with
an in-memory connection and a virtual clock: bytes from the column go in through the
adapter's receive path, the link's timeouts run on the virtual clock, and a flag in the
input starts a SetChargingLimit from the gateway mid-stream.

Input: bursts (fuzz/fw/common.py); flags bit 0: a quiet line after (a partial frame is
given up), bit 1: the gateway sends a limit before the burst, bit 2: time passes (the
gateway's calls time out).

Properties: nothing escapes and nothing is counted as an internal, handler or callback
error; everything the gateway writes is good frames of valid messages; every event has the
types and ranges a ColumnReading, ColumnSession or ColumnBooted promises (finite numbers,
known status names); a limit is reported applied only when the column answered that very
call with Accepted and a valid appliedA, and then as the limit it said.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import cbor2

from firmware import cbor, messages, status_names
from firmware.cbor_link import Link
from firmware.frames import encode_frame
from fuzz import segments
from fuzz.engine import Finding, Harness, Target
from fuzz.fw import cbor_harness, common
from fuzz.fw.common import LATER, PERIODIC, QUIET
from fuzz.targets.cbor_fw import HOSTILE_CBOR, mutate_burst
from gateway.south.cbor_columns import (
    CborColumns,
    CborConfig,
    CborTcpColumn,
    ColumnBooted,
    ColumnSession,
)
from gateway.south.types import (
    FAILURE_REASONS,
    REASON_OK,
    ColumnLink,
    ColumnReading,
    LimitCommand,
    LimitResult,
)

COLUMN = "col-1"
CONFIG = CborConfig(heartbeat_interval_s=20, call_timeout_s=5.0, tick_s=0.1, max_pending=4)
NOW_MS = 1_700_000_000_000
LIMITS = (LimitCommand(COLUMN, 16.0, 120, 6.0), LimitCommand(COLUMN, 7.5, 0),
          LimitCommand(COLUMN, 80.0, 86400))
CALL = PERIODIC   # flag: the gateway sends a limit before the burst
REASONS = (*FAILURE_REASONS, REASON_OK, "rejected", "bad_request", "none", "unknown_column")
STATUS = set(status_names.STATUS_NAMES) | {"Faulted"}


class _Conn:
    """The connection the adapter writes to."""

    def __init__(self, sink: list[bytes]) -> None:
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.sink = sink

    def write(self, data: bytes) -> None:
        self.sink.append(bytes(data))

    def close(self) -> None:
        if not self.closed.done():
            self.closed.set_result("closed")


def _finite(x: Any, lo: float = -math.inf, hi: float = math.inf) -> bool:
    return isinstance(x, float) and math.isfinite(x) and lo <= x <= hi


def check_event(event: Any) -> None:
    """The types and ranges each event promises to the service."""
    if isinstance(event, ColumnReading):
        ok = (event.status in STATUS and event.error in status_names.ERROR_NAMES
              and event.cp_state in status_names.CP_NAMES
              and event.limit_source in (*status_names.LIMIT_SOURCE_NAMES, "safety")
              and _finite(event.offered_a, 0, 80) and _finite(event.failsafe_a, 0, 80)
              and len(event.current_a) == 3 and all(_finite(a) for a in event.current_a)
              and len(event.voltage_v) == 3 and all(_finite(v) for v in event.voltage_v)
              and type(event.power_w) is int and type(event.energy_wh) is int and event.energy_wh >= 0
              and type(event.session_energy_wh) is int and event.session_energy_wh >= 0
              and type(event.session_id) is int and type(event.boots) is int)
    elif isinstance(event, ColumnSession):
        ok = (type(event.session_id) is int and type(event.meter_wh) is int and event.meter_wh >= 0
              and (event.session_energy_wh is None or (type(event.session_energy_wh) is int
                                                       and event.session_energy_wh >= 0))
              and event.reason in ("", *messages.STOP_REASONS))
    elif isinstance(event, ColumnBooted):
        ok = (isinstance(event.reported_id, str) and event.phases in (1, 3)
              and _finite(event.hardware_a, 0, 80) and type(event.bus_address) is int
              and isinstance(event.config_error, str))
    else:
        ok = isinstance(event, ColumnLink)
    if not ok:
        raise Finding("event with a value outside its type: %r" % (event,))


def _answers(frames: list[bytes]) -> dict[int, Any]:
    """Result and error frames in the column's bytes, by id (what it answered)."""
    out: dict[int, Any] = {}
    for f in frames:
        try:
            msg = cbor2.loads(f)
        except Exception:   # cbor2 raises several kinds on garbage; the link's decoder may differ
            try:
                msg = cbor.loads(f)
            except cbor.CBORError:
                continue
        if isinstance(msg, list) and len(msg) >= 3 and msg[0] in (3, 4) and type(msg[1]) is int:
            out.setdefault(msg[1], []).append(msg)
    return out


class CborGatewayHarness(Harness[bytes]):
    def __init__(self) -> None:
        logging.getLogger("gateway").setLevel(logging.CRITICAL + 1)   # warnings about bad columns
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        self.loop.close()

    def run(self, value: bytes) -> str | None:
        return self.loop.run_until_complete(self._run(value))

    async def _run(self, value: bytes) -> str | None:
        clock = [0]
        cols = CborColumns([CborTcpColumn(COLUMN, "fuzz.invalid", 7301)], CONFIG,
                           clock_ms=lambda: clock[0], now_ms=lambda: NOW_MS + clock[0])
        events: list[Any] = []
        cols.subscribe(events.append)
        ch = cols._channels[COLUMN]
        sent: list[bytes] = []
        # What CborColumns._run does for each connection.
        ch.link = Link(partial(cols._write, ch), cols._handlers(ch), int(CONFIG.call_timeout_s * 1000),
                       CONFIG.max_pending, side=messages.FROM_GATEWAY)
        ch.conn = _Conn(sent)
        received = bytearray()
        calls: list[tuple[LimitCommand, asyncio.Task[list[LimitResult]]]] = []
        for flags, body in common.segments(value):
            if flags & LATER:
                clock[0] += 6000
                ch.link.poll(clock[0])
            if flags & CALL and ch.link is not None:
                cmd = LIMITS[len(calls) % len(LIMITS)]
                calls.append((cmd, asyncio.ensure_future(cols.set_limits([cmd]))))
                for _ in range(3):   # let the call go out (set_limits gathers a task of its own)
                    await asyncio.sleep(0)
            for chunk in common.chunks(flags, body):
                received += chunk
                cols._on_data(ch, chunk)
                clock[0] += 1
            if calls or cols._aux:   # tasks waiting on an answer run between bursts
                await asyncio.sleep(0)
            if flags & QUIET:
                clock[0] += 600
                ch.link.poll(clock[0])
        for _ in range(12):   # the rest times out: every call gets its result
            if all(t.done() for _, t in calls) and not cols._aux:
                break
            clock[0] += 6000
            if ch.link is not None:
                ch.link.poll(clock[0])
            for _ in range(4):
                await asyncio.sleep(0)
        left = [t for _, t in calls if not t.done()] + list(cols._aux)
        for t in left:
            t.cancel()
        if left:
            await asyncio.gather(*left, return_exceptions=True)
            raise Finding("%d gateway call(s) never ended" % len(left))
        return self._judge(cols, ch, events, sent, bytes(received), calls=calls)

    def _judge(self, cols: CborColumns, ch: Any, events: list[Any], sent: list[bytes], received: bytes, *,
               calls: list[tuple[LimitCommand, asyncio.Task[list[LimitResult]]]]) -> str | None:
        stats = cols.link_stats(COLUMN)
        for name in ("internal_errors", "handler_errors", "callback_errors", "tx_failures"):
            if stats.get(name):
                raise Finding("link counted %s: %d" % (name, stats[name]))
        if cols.stats.internal_errors or cols.stats.callback_errors:
            raise Finding("adapter counted internal errors %d, callback errors %d"
                          % (cols.stats.internal_errors, cols.stats.callback_errors))
        for event in events:
            check_event(event)
        limit_ids = []   # the SetChargingLimit calls sent, in order (one per set_limits task)
        for frame in sent:
            payloads = cbor_harness.parse_frames(frame)
            if payloads is None or len(payloads) != 1:
                raise Finding("the gateway wrote something that is not one good frame: %s" % frame.hex())
            try:
                msg = messages.parse(cbor2.loads(payloads[0]))
            except Exception as exc:
                raise Finding("the gateway sent an invalid message (%s): %s"
                              % (exc, payloads[0].hex())) from None
            if msg[0] == messages.CALL and msg[2] == "SetChargingLimit":
                limit_ids.append(msg[1])
        answers = _answers(cbor_harness.parse_frames_lenient(received))
        labels = []
        for k, (cmd, task) in enumerate(calls):
            msg_id = limit_ids[k] if k < len(limit_ids) else -1
            (res,) = task.result()
            if res.reason not in REASONS:
                raise Finding("limit result with an undocumented reason %r" % res.reason)
            if not res.ok:
                labels.append("limit " + res.reason)
                continue
            said = [m for m in answers.get(msg_id, []) if m[0] == 3 and isinstance(m[2], dict)
                    and m[2].get("status") == "Accepted" and type(m[2].get("appliedA")) in (int, float)
                    and 0 <= m[2]["appliedA"] <= 80 and round(m[2]["appliedA"] * 10) == res.limit_da]
            if not said:
                raise Finding("limit %r reported applied as %r without an Accepted answer to call %d"
                              % (cmd, res, msg_id))
        for name in ("bad_crc", "oversize", "bad_cbor", "bad_messages", "unknown_actions", "unsupported",
                     "unmatched", "rx_stale", "errors_sent"):
            if stats.get(name):
                labels.append("link: " + name)
        if ch.info is not None and ch.info.fault:
            labels.append("column fault: " + ch.info.fault[:60])
        seen: list[str] = []
        for label in labels:
            if label not in seen:
                seen.append(label)
        return "\n".join(seen) or None


def _column_frames() -> dict[str, bytes]:
    """What the firmware's column link sends (its own encoder), captured from a
    firmware.gw_cbor.CborLink with a real controller."""
    import tempfile

    from firmware.gw_cbor import CborLink

    out: list[bytes] = []
    with tempfile.TemporaryDirectory() as tmp:
        app = cbor_harness.App(tmp + "/column.json")
        app.cfg = dict(app.cfg, column_id=COLUMN)
        link = CborLink(app)
        link.connected(out.append, 1000)
        link.refresh(1000)                                   # BootNotification (id 1)
        link.link.on_bytes(encode_frame(cbor.dumps([3, 1, {"status": "Accepted", "heartbeatIntervalS": 20,
                                                           "currentTimeMs": 5}])), 1001)
        link.refresh(70000)                                  # Heartbeat, StatusNotification, MeterValues
    frames = {}
    for f in out:
        msg = cbor2.loads(cbor_harness.parse_frames(f)[0])
        frames.setdefault(msg[2], f)
    return frames


def seed_inputs() -> list[bytes]:
    f = _column_frames()
    boot, status_, meter, hb = (f["BootNotification"], f["StatusNotification"], f["MeterValues"],
                                f["Heartbeat"])
    start = encode_frame(cbor.dumps(messages.call(9, "StartTransaction", {"sessionId": 3,
                                                                          "meterStartWh": 1000})))
    stop = encode_frame(cbor.dumps(messages.call(10, "StopTransaction", {"sessionId": 3, "meterStopWh": 1250,
                                                                          "reason": "EVDisconnected"})))

    def result(msg_id: int, payload: dict[str, Any]) -> bytes:
        return encode_frame(cbor.dumps(messages.result(msg_id, payload)))

    accepted = result(1, {"status": "Accepted", "appliedA": 16})
    inputs = [   # short ones: an input's cost is mostly the CRC of its frames
        [(QUIET, boot), (QUIET, status_)],
        [(QUIET, status_), (QUIET, meter)],
        [(QUIET, boot), (QUIET | CALL, accepted), (QUIET, hb)],
        [(QUIET, status_), (QUIET, result(1, {"status": "Accepted"}))],   # answers a trigger
        [(QUIET, start), (QUIET, stop), (QUIET, stop)],
        [(QUIET, boot), (QUIET | CALL, result(1, {"status": "Rejected", "appliedA": 0}))],
        [(QUIET, boot), (QUIET | CALL, encode_frame(cbor.dumps(messages.error(1, "GenericError", "no"))))],
        [(QUIET, boot), (CALL, b""), (QUIET | LATER, accepted)],   # too late: timed out
        [(QUIET | 3 << 3, boot + status_ + meter)],
    ]
    return [common.encode(parts) for parts in inputs]


class CborGatewayTarget(Target[bytes]):
    name = "cbor-gw"
    about = "gateway CBOR column channel (gateway/south/cbor_columns.py) on mutated column traffic"

    def seeds(self) -> list[bytes]:
        return seed_inputs()

    def mutate(self, rng: random.Random, value: bytes, corpus: Sequence[bytes]) -> bytes:
        for _ in range(1 + int(rng.random() ** 2 * 3)):
            parts = common.segments(value)
            if not parts:
                parts = common.segments(rng.choice(corpus))
            r = rng.random()
            i = rng.randrange(len(parts))
            flags, body = parts[i]
            if r < 0.55:
                parts[i] = (flags, mutate_burst(rng, body))
            elif r < 0.65:
                parts[i] = (segments.flip_flags(rng, flags), body)
            elif r < 0.75 and len(parts) > 1:
                del parts[i]
            elif r < 0.85:
                parts.insert(i, parts[i])
            elif r < 0.95:
                segments.splice(rng, parts, corpus)
            else:
                parts.insert(i, (QUIET, encode_frame(rng.choice(HOSTILE_CBOR))))
            value = common.encode(parts[:6])
        return value

    def harness(self, workdir: Path) -> Harness[bytes]:
        return CborGatewayHarness()


TARGET = CborGatewayTarget()
