"""The MQTT connection: drains the outbox to the broker and hands commands to the service.

asyncio on one side, paho-mqtt 2.x on the other. Each connection is a fresh paho
client. Its blocking connect (TCP, TLS handshake, CONNECT) runs in a worker thread; from
then on the event loop serves its socket (paho's "external loop" mode: add_reader /
add_writer, loop_misc once a second for the keepalive), so there is no paho thread: no
select() (which fails once the process holds 1024 file descriptors, as a gateway with a
thousand Modbus TCP columns does) and no hand-over between threads for every message.
paho's callbacks are queued onto the loop (call_soon), so all state here (the outbox, the
mid map) is touched by the event loop only, outside paho's own call stack. paho never
reconnects by itself
(reconnect_on_failure=False): this module does, with jittered exponential backoff, and
each new connection starts clean and re-sends every row still in the outbox, oldest
first. The broker may so see a message twice (PUBACK lost with the connection);
consumers drop duplicates by `seq`.

Per connection: TCP_NODELAY on the socket (paho leaves Nagle on: ~10 ms per message at
low rates), the will `gateway/state = offline` (retained), the birth `online` (retained)
published before the backlog, the command subscriptions, then at most `inflight_max`
outbox rows awaiting PUBACK at a time. A PUBACK deletes its row (deletes are batched,
at most `ack_flush_s` late). A PUBACK with an MQTT 5 failure code (e.g. not authorized)
drops the row (Outbox.drop: counted, logged, reported): retrying a message the broker
refuses would block the queue forever. (An MQTT 3.1.1 broker drops such a message
without telling anyone: use MQTT 5.) While connected, unreported outbox drops are
published as an `outbox_dropped` event on <site>/events, at once after connecting and
then at most every `drop_report_interval_s`. On stop(): in-flight rows get a short
grace period, then `offline` (cause "shutdown") is published and the client
disconnects; whatever is left stays in the outbox for the next start.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.north import payloads, topics
from gateway.north.outbox import Outbox
from gateway.north.payloads import encode, utc_ms
from gateway.north.settings import MqttSettings

log = logging.getLogger(__name__)


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
    invalid_rows: int = 0     # rows paho refused to send (bad topic): deleted
    inbound: int = 0


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


class ConnectRefused(ConnectionError):
    def __init__(self, reason: str) -> None:
        super().__init__(f"broker refused the connection: {reason}")


@dataclass(eq=False)
class _Session:
    """One connection: its paho client and what is in flight on it."""

    client: mqtt.Client
    connack: asyncio.Future[None]
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    inflight: dict[int, int] = field(default_factory=dict)  # mid -> outbox row id
    specials: dict[int, asyncio.Future[None]] = field(default_factory=dict)  # birth/offline mids
    cursor: int = 0  # last outbox row id sent on this connection
    ready: bool = False
    sock: Any = None                              # the socket the loop serves (None: not attached)
    misc: asyncio.TimerHandle | None = None       # the next loop_misc (keepalive) call


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
        self._clock_ms = clock_ms
        self._rng = rng or random.Random()
        self._ack_flush_s = ack_flush_s
        self._drain_timeout_s = drain_timeout_s
        self._drop_report_interval_s = drop_report_interval_s
        self._next_drop_report = 0.0
        self._session: _Session | None = None
        self._acked: list[int] = []
        self._acked_since = 0.0
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

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
        sock = self._session.client.socket() if self._session is not None else None
        if sock is None:
            return None
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    async def run(self) -> None:
        """Connect, publish, reconnect, until stop()."""
        self._loop = asyncio.get_running_loop()
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
    def _make_client(self) -> mqtt.Client:
        s = self.settings
        v5 = s.protocol == "5"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=s.client_id,
                             protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                             clean_session=None if v5 else True, reconnect_on_failure=False)
        client.connect_timeout = s.connect_timeout_s
        client.max_inflight_messages_set(s.inflight_max + 4)  # ours is the window; + birth/offline
        client.max_queued_messages_set(0)
        will = payloads.gateway_state("offline", ts_ms=self._clock_ms(), cause="will")
        client.will_set(self.state_topic, encode(will), qos=1, retain=True)
        if s.username is not None:
            client.username_pw_set(s.username, s.password())
        if s.tls is not None:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(s.tls.cafile))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if s.tls.certfile is not None:
                ctx.load_cert_chain(str(s.tls.certfile), str(s.tls.keyfile))
            client.tls_set_context(ctx)
        return client

    async def _connect(self) -> _Session | None:
        assert self._loop is not None
        loop = self._loop
        try:
            client = self._make_client()
        except (OSError, ValueError) as exc:
            self.stats.connect_failures += 1
            log.error("mqtt: cannot set up the client: %s", exc)
            return None
        session = _Session(client, loop.create_future())
        self._bind(session)
        s = self.settings
        try:
            kwargs: dict[str, Any] = {"clean_start": True} if s.protocol == "5" else {}
            await asyncio.to_thread(client.connect, s.host, s.port, s.keepalive_s, **kwargs)
            self._attach(session)
            await asyncio.wait_for(session.connack, s.connect_timeout_s)
        except (OSError, TimeoutError, ValueError) as exc:
            self.stats.connect_failures += 1
            log.warning("mqtt: connect to %s:%d failed: %s", s.host, s.port, exc or type(exc).__name__)
            await self._close(session)
            return None
        except asyncio.CancelledError:
            await self._close(session)
            raise
        self._session = session
        session.ready = True
        self._next_drop_report = 0.0  # report pending drops at once
        self.stats.connects += 1
        log.info("mqtt: connected to %s:%d", s.host, s.port)
        birth = payloads.gateway_state("online", ts_ms=self._clock_ms())
        info = client.publish(self.state_topic, encode(birth), qos=1, retain=True)
        session.specials[info.mid] = loop.create_future()
        if self.subscriptions:
            client.subscribe([(f, 1) for f in self.subscriptions])
        return session

    def _attach(self, session: _Session) -> None:
        """Serve the connected client's socket from the event loop."""
        loop = self._loop
        assert loop is not None
        client = session.client
        sock = client.socket()
        if sock is None:
            raise OSError("connection closed")
        session.sock = sock
        client.on_socket_register_write = lambda _c, _u, s: loop.add_writer(s, client.loop_write)
        client.on_socket_unregister_write = lambda _c, _u, s: loop.remove_writer(s)
        client.on_socket_close = lambda _c, _u, _s: self._detach(session)
        loop.add_reader(sock, self._readable, session)
        session.misc = loop.call_later(1.0, self._misc, session)
        if client.want_write():   # the rest of CONNECT, if the thread could not write it all
            client.loop_write()

    def _readable(self, session: _Session) -> None:
        client = session.client
        while client.loop_read() == mqtt.MQTT_ERR_SUCCESS:
            sock = client.socket()
            pending = getattr(sock, "pending", None)   # TLS: bytes already decrypted, no event for them
            if pending is None or not pending():
                break

    def _misc(self, session: _Session) -> None:
        session.misc = None
        client = session.client
        if client.socket() is None:
            return
        client.loop_misc()   # PINGREQ when due; a missing PINGRESP ends the connection
        if client.socket() is not None and self._loop is not None:
            session.misc = self._loop.call_later(1.0, self._misc, session)

    def _detach(self, session: _Session) -> None:
        """The socket is closing (paho says so, or we close it): the loop lets go of it."""
        loop = self._loop
        if session.sock is not None and loop is not None:
            loop.remove_reader(session.sock)
            loop.remove_writer(session.sock)
        session.sock = None
        if session.misc is not None:
            session.misc.cancel()
            session.misc = None

    def _bind(self, session: _Session) -> None:
        """paho callbacks -> event loop, tagged with their session. They come from paho's calls
        in the loop's thread (loop_read/loop_write/loop_misc), or, while connecting, from the
        worker thread: queued either way, never run inside paho's call stack."""
        loop = self._loop
        assert loop is not None
        client = session.client
        loop_thread = threading.get_ident()

        def post(callback: Callable[..., None], *args: Any) -> None:
            if threading.get_ident() == loop_thread:
                loop.call_soon(callback, *args)
            else:
                loop.call_soon_threadsafe(callback, *args)

        def on_socket_open(_c: mqtt.Client, _u: Any, sock: Any) -> None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                log.warning("mqtt: cannot set TCP_NODELAY: %s", exc)

        def on_connect(_c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
            post(self._on_connack, session, rc.is_failure, str(rc))

        def on_disconnect(_c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
            post(self._on_lost, session, str(rc))

        # PUBACKs come by the thousand a second: queued, and handled in one batch per read.
        pubacks: deque[tuple[int, ReasonCode]] = deque()
        scheduled = [False]

        def drain_pubacks() -> None:
            scheduled[0] = False   # before draining: a PUBACK queued from now on schedules again
            while pubacks:
                mid, rc = pubacks.popleft()
                failed = rc.is_failure
                self._on_puback(session, mid, failed, str(rc) if failed else "")
            self.wake()

        def on_publish(_c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
            pubacks.append((mid, rc))
            if not scheduled[0]:
                scheduled[0] = True
                post(drain_pubacks)

        def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, rcs: list[ReasonCode], _p: Any) -> None:
            failed = [str(rc) for rc in rcs if rc.is_failure]
            if failed:
                log.error("mqtt: subscription refused: %s", ", ".join(failed))

        def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
            props = getattr(msg, "properties", None)
            inbound = InboundMessage(
                topic=bytes(msg._topic).decode("utf-8", "replace"), payload=bytes(msg.payload),
                qos=msg.qos, retain=bool(msg.retain),
                response_topic=getattr(props, "ResponseTopic", None),
                correlation_data=getattr(props, "CorrelationData", None))
            post(self._on_inbound, inbound)

        client.on_socket_open = on_socket_open
        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        client.on_subscribe = on_subscribe
        client.on_message = on_message

    def _on_connack(self, session: _Session, failed: bool, reason: str) -> None:
        if session.connack.done():
            return
        if failed:
            session.connack.set_exception(ConnectRefused(reason))
        else:
            session.connack.set_result(None)

    def _on_lost(self, session: _Session, reason: str) -> None:
        if not session.connack.done():
            session.connack.set_exception(ConnectionError(f"connection lost: {reason}"))
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

    def _on_puback(self, session: _Session, mid: int, failed: bool, reason: str) -> None:
        special = session.specials.pop(mid, None)
        if special is not None:
            if not special.done():
                special.set_result(None)
            return
        row_id = session.inflight.pop(mid, None)
        if row_id is None:
            return
        self.stats.acked += 1
        if failed:
            self.stats.broker_rejected += 1
            log.error("mqtt: broker refused outbox row %d: %s (dropped, will be reported)", row_id, reason)
            self.outbox.drop([row_id])
            return
        if not self._acked:
            self._acked_since = time.monotonic()
        self._acked.append(row_id)

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
            timeout = None
            if self._acked:
                timeout = max(0.0, self._acked_since + self._ack_flush_s - time.monotonic())
            await self._wait(timeout)

    def _report_drops(self) -> None:
        """Queue an outbox_dropped event, only while connected (a report queued while the
        broker is away would only crowd the queue) and at most every drop_report_interval_s."""
        now = time.monotonic()
        if now < self._next_drop_report or self.outbox.drop_report() is None:
            return
        self._next_drop_report = now + self._drop_report_interval_s
        self.outbox.enqueue_drop_report(self.events_topic, ts_ms=self._clock_ms())

    def _fill(self, session: _Session) -> None:
        room = self.settings.inflight_max - len(session.inflight)
        if room <= 0:
            return
        for row in self.outbox.peek(session.cursor, room):
            props = None
            if row.correlation is not None and self.settings.protocol == "5":
                props = Properties(PacketTypes.PUBLISH)
                props.CorrelationData = row.correlation
            try:
                info = session.client.publish(row.topic, row.payload, qos=row.qos, retain=row.retain,
                                              properties=props)
            except ValueError as exc:
                self.stats.invalid_rows += 1
                log.error("mqtt: outbox row %d cannot be sent (%s): dropped", row.row_id, exc)
                self.outbox.drop([row.row_id])
                continue
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                return  # connection gone: on_disconnect follows
            session.cursor = row.row_id
            self.stats.published += 1
            if row.qos == 0:
                self._acked.append(row.row_id)  # nothing to wait for
            else:
                session.inflight[info.mid] = row.row_id

    def _flush_acks(self, *, force: bool) -> None:
        if not self._acked:
            return
        due = time.monotonic() - self._acked_since >= self._ack_flush_s
        if force or due or len(self._acked) >= self.settings.inflight_max:
            ids, self._acked = self._acked, []
            self.outbox.ack(ids)

    async def _wait(self, timeout: float | None) -> None:
        assert self._wake is not None
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
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
        if session.lost.is_set():
            return
        assert self._loop is not None
        bye = payloads.gateway_state("offline", ts_ms=self._clock_ms(), cause="shutdown")
        info = session.client.publish(self.state_topic, encode(bye), qos=1, retain=True)
        fut = self._loop.create_future()
        session.specials[info.mid] = fut
        await asyncio.wait({fut}, timeout=1.0)
        if not fut.done() or fut.cancelled():
            log.warning("mqtt: offline state not acknowledged before disconnect")

    async def _close(self, session: _Session) -> None:
        """End a connection, whatever state it is in."""
        self._flush_acks(force=True)
        client = session.client
        if session.sock is not None and client.socket() is not None:
            client.disconnect()
            client.loop_write()   # DISCONNECT now; paho closes the socket once it is out
            deadline = time.monotonic() + 1.0
            while client.socket() is not None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        self._detach(session)
        sock = client.socket()
        if sock is not None:   # never attached, or the DISCONNECT could not get out
            sock.close()
        session.inflight.clear()
        if self._session is session:
            self._session = None
