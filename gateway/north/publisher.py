"""The MQTT connection: drains the outbox to the broker and hands commands to the service.

All asyncio, on the gateway's own client (gateway/north/mqtt_client.py, packets in
mqtt_packets.py): connecting (TCP, TLS handshake, CONNECT/CONNACK) and every read and
write happen in the event loop, which never blocks, and there is no thread. paho-mqtt
cost ~126 µs of CPU per QoS 1 message (publish + PUBACK); this client costs a few µs,
which is what lets one core serve thousands of columns. The client's callbacks (PUBACK,
inbound message, connection lost) run in the loop, so all state here (the outbox, the
packet id map) is touched by the event loop only.

This module reconnects, with jittered exponential backoff, and each new connection
starts clean and re-sends every row still in the outbox, oldest first. The broker may
so see a message twice (PUBACK lost with the connection); consumers drop duplicates by
`seq`.

Per connection: TCP_NODELAY on the socket (Nagle costs ~10 ms per message at low rates),
the will `gateway/state = offline` (retained), the birth `online` (retained) published
before the backlog, the command subscriptions (max QoS 1), then at most `inflight_max`
outbox rows awaiting PUBACK at a time (of which the client puts at most the broker's
MQTT 5 Receive Maximum on the wire, holding the rest), and none while the transport's
write buffer is over its mark (a slow broker cannot make memory grow). Rows are read
from the outbox READ_AHEAD at a time. A PUBACK deletes its row (deletes are batched:
ACK_BATCH rows, or at most `ack_flush_s` late). A PUBACK with an MQTT 5 failure code
(e.g. not authorized) drops the row (Outbox.drop: counted, logged, reported): retrying a
message the broker refuses would block the queue forever. (An MQTT 3.1.1 broker drops
such a message without telling anyone: use MQTT 5.) A row whose topic cannot be
published (wildcards, empty, too long, NUL) or that is over the broker's Maximum Packet
Size is dropped the same way (`invalid_rows`). A broker that sends bytes that are not
MQTT is disconnected (`protocol_errors`) and reconnected to like any lost connection.
While connected, unreported outbox drops are published as an `outbox_dropped` event on
<site>/events, at once after connecting and then at most every `drop_report_interval_s`.
On stop(): in-flight rows get a short grace period, then `offline` (cause "shutdown") is
published and the client disconnects; whatever is left stays in the outbox for the next
start.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.north import mqtt_client, mqtt_packets, payloads, topics
from gateway.north.mqtt_client import ClientListener, ConnectRefused, MqttConnection
from gateway.north.mqtt_packets import ProtocolError, Publish
from gateway.north.outbox import Outbox, OutboxRow
from gateway.north.payloads import encode, utc_ms
from gateway.north.settings import MqttSettings

__all__ = ["Backoff", "ConnectRefused", "InboundMessage", "Publisher", "PublisherStats"]

log = logging.getLogger(__name__)

READ_AHEAD = 256   # outbox rows read at once (a row dropped from the outbox meanwhile may still go out)
DROP_CHECK_S = 0.05  # how often the outbox is asked for unreported drops
ACK_BATCH = 256    # acknowledged rows deleted in one transaction (or after ack_flush_s, if sooner)


@dataclass(frozen=True)
class InboundMessage:
    """A message received on a subscription (commands), with its MQTT 5 reply details."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    response_topic: str | None = None
    correlation_data: bytes | None = None


@dataclass
class PublisherStats:
    connects: int = 0
    connect_failures: int = 0
    disconnects: int = 0      # connections lost (not counting our own disconnect at stop)
    published: int = 0        # outbox rows sent, re-sends included
    acked: int = 0            # PUBACKs for outbox rows
    broker_rejected: int = 0  # PUBACKs with a failure reason code (row deleted)
    invalid_rows: int = 0     # rows that cannot be published (bad topic, too large): deleted
    inbound: int = 0
    protocol_errors: int = 0  # connections closed because the broker broke the protocol


class Backoff:
    """Exponential backoff with jitter: attempt n waits uniform(min, min(max, min * 2**(n+1)))."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.min_s, self.max_s = min_s, max_s
        self._rng = rng or random.Random()
        self.attempt = 0

    def next(self) -> float:
        cap = min(self.max_s, self.min_s * 2.0 ** min(self.attempt + 1, 60))
        self.attempt += 1
        return self._rng.uniform(self.min_s, cap)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(eq=False)
class _Session(ClientListener):
    """One connection and what is in flight on it; the connection reports to it."""

    publisher: Publisher
    conn: MqttConnection | None = None
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: dict[int, int] = field(default_factory=dict)  # packet id -> outbox row id
    specials: dict[int, asyncio.Future[None]] = field(default_factory=dict)  # birth/offline ids
    cursor: int = 0  # last outbox row id read on this connection (sent, or in `ahead`)
    ahead: deque[OutboxRow] = field(default_factory=deque)  # rows read, not yet sent
    ready: bool = False
    retain_warned: bool = False

    def on_puback(self, packet_id: int, reason_code: int) -> None:
        self.publisher._on_puback(self, packet_id, reason_code)

    def on_message(self, message: Publish) -> None:
        self.publisher._on_inbound(InboundMessage(
            topic=message.topic, payload=message.payload, qos=message.qos, retain=message.retain,
            response_topic=message.response_topic, correlation_data=message.correlation_data))

    def on_suback(self, packet_id: int, reason_codes: list[int]) -> None:
        failed = [mqtt_packets.reason_name(rc, self.publisher._protocol, mqtt_packets.SUBACK)
                  for rc in reason_codes if rc >= 0x80]
        if failed:
            log.error("mqtt: subscription refused: %s", ", ".join(failed))

    def on_writable(self) -> None:
        self.publisher.wake()

    def on_received(self) -> None:
        self.publisher._after_read(self)

    def on_lost(self, reason: str, error: ProtocolError | None) -> None:
        self.publisher._on_lost(self, reason, error)


class Publisher:
    """Run with `await publisher.run()` (or `async with publisher:`); end with stop()."""

    def __init__(self, settings: MqttSettings, outbox: Outbox, *, site_id: str,
                 subscriptions: Sequence[str] = (),
                 on_message: Callable[[InboundMessage], None] | None = None,
                 clock_ms: Callable[[], int] = utc_ms, rng: random.Random | None = None,
                 ack_flush_s: float = 0.05, drain_timeout_s: float = 2.0,
                 drop_report_interval_s: float = 10.0) -> None:
        self.settings = settings
        self.outbox = outbox
        self.site_id = site_id
        self.state_topic = topics.gateway_state(site_id)
        self.events_topic = topics.site_events(site_id)
        self.subscriptions = tuple(subscriptions)
        self.on_message = on_message
        self.stats = PublisherStats()
        self._protocol = mqtt_packets.MQTT5 if settings.protocol == "5" else mqtt_packets.MQTT311
        self._clock_ms = clock_ms
        self._rng = rng or random.Random()
        self._ack_flush_s = ack_flush_s
        self._drain_timeout_s = drain_timeout_s
        self._drop_report_interval_s = drop_report_interval_s
        self._next_drop_report = 0.0
        self._next_drop_check = 0.0
        self._ack_timer: asyncio.TimerHandle | None = None
        self._session: _Session | None = None
        self._acked: list[int] = []
        self._acked_since = 0.0
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    # -- public ----------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._session is not None and self._session.ready and not self._session.lost.is_set()

    def wake(self) -> None:
        """Something was queued (the outbox calls this) or changed: look again."""
        if self._wake is not None:
            self._wake.set()

    def tcp_nodelay(self) -> bool | None:
        """Whether the live socket has TCP_NODELAY (None when not connected)."""
        session = self._session
        if session is None or session.conn is None:
            return None
        return session.conn.tcp_nodelay()

    async def run(self) -> None:
        """Connect, publish, reconnect, until stop()."""
        self._wake, self._done = asyncio.Event(), asyncio.Event()
        self.outbox.on_enqueue = self.wake
        backoff = Backoff(self.settings.reconnect_min_s, self.settings.reconnect_max_s, self._rng)
        try:
            while not self._stopping:
                session = await self._connect()
                if session is not None:
                    backoff.reset()
                    try:
                        await self._pump(session)
                    finally:
                        await self._close(session)
                if not self._stopping:
                    delay = backoff.next()
                    log.info("mqtt: reconnecting in %.2f s", delay)
                    await self._sleep(delay)
        finally:
            if self._ack_timer is not None:
                self._ack_timer.cancel()
                self._ack_timer = None
            self.outbox.on_enqueue = None
            self._done.set()

    async def stop(self) -> None:
        """Let in-flight rows finish (briefly), say offline, disconnect; returns when done."""
        self._stopping = True
        self.wake()
        if self._done is not None:
            await self._done.wait()
        if self._task is not None:
            await self._task

    async def __aenter__(self) -> Publisher:
        self._task = asyncio.create_task(self.run(), name="mqtt-publisher")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def drained(self, timeout_s: float) -> bool:
        """Wait until the outbox is empty and every delete is committed (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.outbox) == 0 and not self._acked:
                return True
            await asyncio.sleep(0.01)
        return len(self.outbox) == 0 and not self._acked

    # -- connection ------------------------------------------------------------------------
    def _options(self) -> mqtt_client.ConnectOptions:
        s = self.settings
        will = payloads.gateway_state("offline", ts_ms=self._clock_ms(), cause="will")
        password = s.password()
        context = None
        if s.tls is not None:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(s.tls.cafile))
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if s.tls.certfile is not None:
                context.load_cert_chain(str(s.tls.certfile), str(s.tls.keyfile))
        return mqtt_client.ConnectOptions(
            host=s.host, port=s.port, client_id=s.client_id, protocol=self._protocol,
            keepalive_s=s.keepalive_s, clean_start=True, username=s.username,
            password=password.encode("utf-8") if password is not None else None,
            will=mqtt_packets.Will(self.state_topic, encode(will), qos=1, retain=True),
            ssl=context, connect_timeout_s=s.connect_timeout_s)

    async def _connect(self) -> _Session | None:
        s = self.settings
        try:
            options = self._options()
        except (OSError, ValueError) as exc:
            self.stats.connect_failures += 1
            log.error("mqtt: cannot set up the client: %s", exc)
            return None
        session = _Session(self)
        try:
            session.conn = await mqtt_client.connect(options, session)
        except (OSError, TimeoutError, ValueError) as exc:
            self.stats.connect_failures += 1
            log.warning("mqtt: connect to %s:%d failed: %s", s.host, s.port, exc or type(exc).__name__)
            return None
        conn = session.conn
        if not conn.is_open:   # lost between CONNACK and here
            self.stats.connect_failures += 1
            return None
        self._session = session
        session.ready = True
        self._next_drop_report = self._next_drop_check = 0.0  # report pending drops at once
        self.stats.connects += 1
        log.info("mqtt: connected to %s:%d", s.host, s.port)
        birth = payloads.gateway_state("online", ts_ms=self._clock_ms())
        mid = conn.publish(self.state_topic, encode(birth), qos=min(1, conn.maximum_qos),
                           retain=conn.retain_available)
        if mid:
            session.specials[mid] = asyncio.get_running_loop().create_future()
        if self.subscriptions:
            conn.subscribe([(f, 1) for f in self.subscriptions])
        return session

    def _on_lost(self, session: _Session, reason: str, error: ProtocolError | None) -> None:
        if error is not None:
            self.stats.protocol_errors += 1
        if not session.lost.is_set():
            session.lost.set()
            if session.ready:
                if self._stopping:
                    log.info("mqtt: disconnected: %s", reason)
                else:
                    self.stats.disconnects += 1
                    log.warning("mqtt: connection lost: %s", reason)
        for fut in session.specials.values():
            if not fut.done():
                fut.cancel()
        self.wake()

    def _on_puback(self, session: _Session, mid: int, reason_code: int) -> None:
        row_id = session.inflight.pop(mid, None)
        if row_id is None:
            special = session.specials.pop(mid, None)
            if special is not None and not special.done():
                special.set_result(None)
            return
        self.stats.acked += 1
        if reason_code >= 0x80:
            self.stats.broker_rejected += 1
            log.error("mqtt: broker refused outbox row %d: %s (dropped, will be reported)", row_id,
                      mqtt_packets.reason_name(reason_code))
            self.outbox.drop([row_id])
        else:
            if not self._acked:
                self._acked_since = time.monotonic()
            self._acked.append(row_id)
        if self._stopping:
            self.wake()   # the goodbye waits for the last PUBACKs

    def _after_read(self, session: _Session) -> None:
        """PUBACKs came in: refill the window right here, inside the connection's read
        (no task switch for each read: at thousands of messages a second, that counts)."""
        if self._stopping or not session.ready or session.lost.is_set() or self._session is not session:
            self.wake()
            return
        self._flush_acks(force=False)
        self._fill(session)
        self._arm_ack_timer()

    def _on_inbound(self, message: InboundMessage) -> None:
        self.stats.inbound += 1
        if self.on_message is None:
            return
        try:
            self.on_message(message)
        except Exception:  # a handler bug must not take the connection down
            log.exception("mqtt: message handler failed for %s", message.topic[:256])

    # -- the pump --------------------------------------------------------------------------
    async def _pump(self, session: _Session) -> None:
        assert self._wake is not None
        while True:
            self._wake.clear()
            if session.lost.is_set():
                return
            if self._stopping:
                await self._say_goodbye(session)
                return
            self._flush_acks(force=False)
            self._report_drops()
            self._fill(session)
            self._arm_ack_timer()
            await self._wake.wait()

    def _arm_ack_timer(self) -> None:
        """Deletes are due ack_flush_s after the first PUBACK of a batch: one timer per batch."""
        if self._acked and self._ack_timer is None:
            delay = max(0.0, self._acked_since + self._ack_flush_s - time.monotonic())
            self._ack_timer = asyncio.get_running_loop().call_later(delay, self._ack_timer_fired)

    def _ack_timer_fired(self) -> None:
        self._ack_timer = None
        self.wake()

    def _report_drops(self) -> None:
        """Queue an outbox_dropped event, only while connected (a report queued while the
        broker is away would only crowd the queue) and at most every drop_report_interval_s."""
        now = time.monotonic()
        if now < self._next_drop_report or now < self._next_drop_check:
            return
        if self.outbox.drop_report() is None:
            self._next_drop_check = now + DROP_CHECK_S   # not on every wake-up: thousands a second
            return
        self._next_drop_report = now + self._drop_report_interval_s
        self.outbox.enqueue_drop_report(self.events_topic, ts_ms=self._clock_ms())

    def _window(self, conn: MqttConnection, session: _Session) -> int:
        """How many more outbox rows may go out now (the client holds those over the broker's
        Receive Maximum until PUBACKs make room)."""
        if conn.writing_paused:
            return 0
        return self.settings.inflight_max - len(session.inflight)

    def _fill(self, session: _Session) -> None:
        conn = session.conn
        assert conn is not None
        room = self._window(conn, session)
        if room <= 0:
            return
        ahead = session.ahead
        if len(ahead) < room:   # read ahead: one outbox query for several refills
            more = self.outbox.peek(session.cursor, max(room, READ_AHEAD))
            if more:
                ahead.extend(more)
                session.cursor = more[-1].row_id
        v5 = self._protocol == mqtt_packets.MQTT5
        max_qos = conn.maximum_qos
        while room > 0 and ahead:
            row = ahead.popleft()
            qos = row.qos if row.qos <= max_qos else max_qos
            retain = row.retain
            if retain and not conn.retain_available:
                retain = False
                if not session.retain_warned:
                    session.retain_warned = True
                    log.warning("mqtt: the broker does not take retained messages: sent without retain")
            try:
                mid = conn.publish(row.topic, row.payload, qos, retain,
                                   correlation_data=row.correlation if v5 else None)
            except ValueError as exc:
                self.stats.invalid_rows += 1
                log.error("mqtt: outbox row %d cannot be sent (%s): dropped", row.row_id, exc)
                self.outbox.drop([row.row_id])
                continue
            except ConnectionError:
                return  # connection gone: on_lost follows
            room -= 1
            self.stats.published += 1
            if qos == 0:
                if not self._acked:
                    self._acked_since = time.monotonic()
                self._acked.append(row.row_id)  # nothing to wait for
            else:
                session.inflight[mid] = row.row_id
        conn.flush()

    def _flush_acks(self, *, force: bool) -> None:
        if not self._acked:
            return
        due = time.monotonic() - self._acked_since >= self._ack_flush_s
        if force or due or len(self._acked) >= ACK_BATCH:
            ids, self._acked = self._acked, []
            self.outbox.ack(ids)

    async def _wait(self, timeout: float | None) -> None:
        assert self._wake is not None
        if timeout is None:
            await self._wake.wait()
            return
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def _sleep(self, delay: float) -> None:
        """Sleep, but return at once when stop() is called."""
        deadline = time.monotonic() + delay
        while not self._stopping and time.monotonic() < deadline:
            assert self._wake is not None
            self._wake.clear()
            await self._wait(max(0.0, deadline - time.monotonic()))

    async def _say_goodbye(self, session: _Session) -> None:
        deadline = time.monotonic() + self._drain_timeout_s
        while session.inflight and not session.lost.is_set() and time.monotonic() < deadline:
            assert self._wake is not None
            self._wake.clear()
            await self._wait(max(0.0, deadline - time.monotonic()))
        self._flush_acks(force=True)
        conn = session.conn
        if session.lost.is_set() or conn is None or not conn.is_open:
            return
        bye = payloads.gateway_state("offline", ts_ms=self._clock_ms(), cause="shutdown")
        mid = conn.publish(self.state_topic, encode(bye), qos=min(1, conn.maximum_qos),
                           retain=conn.retain_available)
        if not mid:
            return
        fut = asyncio.get_running_loop().create_future()
        session.specials[mid] = fut
        await asyncio.wait({fut}, timeout=1.0)
        if not fut.done() or fut.cancelled():
            log.warning("mqtt: offline state not acknowledged before disconnect")

    async def _close(self, session: _Session) -> None:
        """End a connection, whatever state it is in."""
        self._flush_acks(force=True)
        if session.conn is not None:
            await session.conn.disconnect()
        session.inflight.clear()
        if self._session is session:
            self._session = None
