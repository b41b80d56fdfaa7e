"""One MQTT connection as an asyncio Protocol: the gateway's client, no thread, no paho.

`await connect(options, listener)` opens TCP (TLS when options.ssl is set, with the host
name checked), sets TCP_NODELAY, sends CONNECT and waits for CONNACK, all within
connect_timeout_s; a refusal raises ConnectRefused. The returned MqttConnection
publishes (QoS 0/1) and subscribes; what comes back is handed to the listener from the
event loop, inside data_received: PUBACKs (packet id, reason code), inbound messages
(QoS 1 answered with PUBACK, QoS 2 handled with PUBREC/PUBCOMP, though subscriptions
ask for QoS 1 at most), SUBACKs, and the end of the connection with its reason.

Writes are gathered and handed to the transport once per event-loop iteration (a
window of 64 publishes costs one send() instead of 64). pause_writing/resume_writing
are passed on (writing_paused, listener.on_writable) so the caller stops feeding a
slow broker. Keepalive: PINGREQ once nothing was sent for keepalive seconds (the
broker's Server Keep Alive wins), and no PINGRESP within half of that more ends the
connection. Bytes that are not MQTT end it too, with the ProtocolError kept in
`protocol_error`; nothing raised by a listener escapes into the event loop.

At most the broker's Receive Maximum of QoS 1 publishes are on the wire unacknowledged;
publishes over it are held (encoded, with their packet id) and go out as PUBACKs come
back, so the caller bounds memory with its own window. Packet ids go 1..65535 and wrap,
skipping ids still in flight.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.north import mqtt_packets as mp
from gateway.north.mqtt_packets import ProtocolError, PubAck, Publish
from gateway.recv_into import RecvIntoProtocol

log = logging.getLogger(__name__)


class ConnectRefused(ConnectionError):
    """The broker answered CONNECT with a failure code."""

    def __init__(self, reason_code: int, reason: str) -> None:
        super().__init__(f"broker refused the connection: {reason}")
        self.reason_code = reason_code


class ClientListener:
    """What a connection reports. Methods run in the event loop, inside the connection's
    data_received; an exception is logged and dropped. Override what you need."""

    def on_puback(self, packet_id: int, reason_code: int) -> None:
        """A QoS 1 publish was acknowledged; reason_code >= 0x80 is a refusal (MQTT 5)."""

    def on_message(self, message: Publish) -> None:
        """A message on a subscription (already acknowledged to the broker)."""

    def on_suback(self, packet_id: int, reason_codes: list[int]) -> None:
        """Granted QoS per filter; >= 0x80 is a refusal."""

    def on_writable(self) -> None:
        """The transport's buffer drained below its low mark after writing_paused."""

    def on_received(self) -> None:
        """The packets of one read were all handled (a good moment to send more)."""

    def on_lost(self, reason: str, error: ProtocolError | None) -> None:
        """The connection ended (once per connection); error when the peer broke the protocol."""


@dataclass(frozen=True)
class ConnectOptions:
    host: str
    port: int
    client_id: str
    protocol: int = mp.MQTT5
    keepalive_s: int = 60
    clean_start: bool = True
    username: str | None = None
    password: bytes | None = None
    will: mp.Will | None = None
    ssl: ssl.SSLContext | None = None
    connect_timeout_s: float = 10.0
    max_packet_size: int = mp.DEFAULT_MAX_PACKET_SIZE   # the largest packet we accept
    write_high_water: int = 256 * 1024                   # pause_writing above this many bytes


async def connect(options: ConnectOptions, listener: ClientListener | None = None) -> MqttConnection:
    """A connected MqttConnection (CONNACK received), or OSError / TimeoutError / ConnectRefused."""
    loop = asyncio.get_running_loop()
    conn = MqttConnection(options, listener or ClientListener(), loop)
    try:
        async with asyncio.timeout(options.connect_timeout_s):
            await loop.create_connection(lambda: conn, options.host, options.port, ssl=options.ssl,
                                         server_hostname=options.host if options.ssl else None)
            await conn.connack
    except BaseException:
        conn.abort("connect failed")
        if conn.connack.done() and not conn.connack.cancelled():
            conn.connack.exception()   # retrieved: the caller gets the exception raised here
        raise
    return conn


_READ_SIZE = 65536   # bytes taken from the broker's stream at a time (a batch of PUBACKs: 4 each)


class MqttConnection(RecvIntoProtocol):
    """One connection; made by connect()."""

    def __init__(self, options: ConnectOptions, listener: ClientListener,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.init_reads(_READ_SIZE)
        self.options = options
        self.listener = listener
        self.protocol = options.protocol
        self.connack: asyncio.Future[mp.ConnAck] = loop.create_future()
        self.closed: asyncio.Future[str] = loop.create_future()   # the reason, once lost
        self.protocol_error: ProtocolError | None = None
        self.close_reason: str | None = None
        self.receive_maximum = 65535     # MQTT 5 CONNACK may lower these
        self.maximum_qos = 2
        self.retain_available = True
        self.broker_max_packet_size: int | None = None
        self.assigned_client_id: str | None = None
        self.keepalive_s = options.keepalive_s
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._decoder = mp.StreamDecoder(options.protocol, options.max_packet_size)
        self._wbuf: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._paused = False
        self._lost = False
        self._inflight: set[int] = set()       # our QoS 1 publishes awaiting PUBACK (held ones too)
        self._held: deque[bytes] = deque()      # QoS 1 publishes over the broker's Receive Maximum
        self._unacked = 0                       # QoS 1 publishes on the wire awaiting PUBACK
        self._subscribing: set[int] = set()    # our SUBSCRIBEs awaiting SUBACK
        self._qos2_in: set[int] = set()        # inbound QoS 2 ids between PUBREC and PUBREL
        self._next_id = 0
        self._last_sent = loop.time()
        self._ping_deadline: float | None = None
        self._ka_handle: asyncio.TimerHandle | None = None

    # -- state -------------------------------------------------------------------------
    @property
    def is_open(self) -> bool:
        return self._transport is not None and not self._lost and self.close_reason is None

    @property
    def writing_paused(self) -> bool:
        return self._paused

    @property
    def inflight(self) -> int:
        """QoS 1 publishes awaiting their PUBACK (those held back included)."""
        return len(self._inflight)

    @property
    def held(self) -> int:
        """QoS 1 publishes held back until the broker's Receive Maximum lets them go."""
        return len(self._held)

    def tcp_nodelay(self) -> bool | None:
        sock = self._transport.get_extra_info("socket") if self._transport is not None else None
        if sock is None or self._lost:
            return None
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    # -- sending -----------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, *,
                correlation_data: bytes | None = None, response_topic: str | None = None) -> int:
        """Queue a PUBLISH; returns its packet id (0 for QoS 0). ValueError for a topic or
        packet the broker must not get; ConnectionError once the connection is closing."""
        if not self.is_open:
            raise ConnectionError(self.close_reason or "not connected")
        if qos not in {0, 1}:
            raise ValueError(f"QoS {qos} publishing is not supported")
        props = None
        if self.protocol == mp.MQTT5 and (correlation_data is not None or response_topic is not None):
            props = {}
            if response_topic is not None:
                props[mp.P_RESPONSE_TOPIC] = response_topic
            if correlation_data is not None:
                props[mp.P_CORRELATION_DATA] = correlation_data
        packet_id = self._new_id() if qos else 0
        data = mp.encode_publish(topic, payload, qos, retain=retain, packet_id=packet_id,
                                 protocol=self.protocol, properties=props)
        if self.broker_max_packet_size is not None and len(data) > self.broker_max_packet_size:
            raise ValueError(f"packet of {len(data)} bytes is over the broker's maximum packet size "
                             f"{self.broker_max_packet_size}")
        if qos:
            self._inflight.add(packet_id)
            if self._unacked >= self.receive_maximum:
                self._held.append(data)
                return packet_id
            self._unacked += 1
        self._send(data)
        return packet_id

    def subscribe(self, filters: Sequence[tuple[str, int]]) -> int:
        """SUBSCRIBE (filter, max QoS) pairs; returns the packet id the SUBACK will carry."""
        if not self.is_open:
            raise ConnectionError(self.close_reason or "not connected")
        packet_id = self._new_id()
        data = mp.encode_subscribe(mp.Subscribe(packet_id, list(filters)), self.protocol)
        self._subscribing.add(packet_id)
        self._send(data)
        return packet_id

    async def disconnect(self, reason_code: int = 0, timeout_s: float = 1.0) -> None:
        """DISCONNECT, let the transport flush, close; abort if it has not closed in time."""
        if self.is_open and self._transport is not None:
            self._send(mp.encode_disconnect(mp.Disconnect(reason_code), self.protocol))
            self.flush()
            self.close_reason = "disconnected by the client"
            self._transport.close()
        if not self._lost:
            try:
                await asyncio.wait_for(asyncio.shield(self.closed), timeout_s)
            except TimeoutError:
                self.abort("disconnect timed out")

    def abort(self, reason: str) -> None:
        """Drop the connection now (buffered bytes are lost)."""
        if self.close_reason is None:
            self.close_reason = reason
        if self._transport is not None and not self._lost:
            self._transport.abort()
        elif not self._lost:   # never connected: nothing will call connection_lost
            self._lost = True
            self._finish(reason)

    def _new_id(self) -> int:
        busy_a, busy_b = self._inflight, self._subscribing
        if len(busy_a) + len(busy_b) >= 65535:
            raise RuntimeError("every MQTT packet id is in flight")
        n = self._next_id
        while True:
            n = n + 1 if n < 65535 else 1
            if n not in busy_a and n not in busy_b:
                self._next_id = n
                return n

    def _send(self, data: bytes) -> None:
        self._wbuf.append(data)
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand what was queued to the transport now (otherwise: at the next loop iteration)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._wbuf or self._transport is None or self._lost:
            self._wbuf.clear()
            return
        data = self._wbuf[0] if len(self._wbuf) == 1 else b"".join(self._wbuf)
        self._wbuf.clear()
        self._transport.write(data)
        self._last_sent = self._loop.time()

    # -- asyncio.Protocol --------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                log.warning("mqtt: cannot set TCP_NODELAY: %s", exc)
        transport.set_write_buffer_limits(high=self.options.write_high_water)
        o = self.options
        props: mp.Properties = {}
        if o.protocol == mp.MQTT5:
            props[mp.P_MAXIMUM_PACKET_SIZE] = o.max_packet_size
        packet = mp.Connect(o.client_id, o.protocol, o.keepalive_s, o.clean_start, o.username, o.password,
                            o.will, props)
        try:
            transport.write(mp.encode_connect(packet))
        except ValueError as exc:   # a client id, will or user name MQTT cannot carry
            self._fail_connect(str(exc))
            return
        self._last_sent = self._loop.time()

    def _fail_connect(self, reason: str) -> None:
        if not self.connack.done():
            self.connack.set_exception(ValueError(reason))
        self.abort(reason)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        try:
            self.listener.on_writable()
        except Exception:
            log.exception("mqtt: on_writable failed")

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        reason = self.close_reason or (f"connection lost: {exc}" if exc else "closed by the broker")
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        for handle in (self._ka_handle, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._ka_handle = self._flush_handle = None
        self._wbuf.clear()
        self._held.clear()
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(reason))
        if not self.closed.done():
            self.closed.set_result(reason)
        try:
            self.listener.on_lost(reason, self.protocol_error)
        except Exception:
            log.exception("mqtt: on_lost failed")

    def data_received(self, data: bytes) -> None:
        try:
            packets = self._decoder.feed(data)
        except ProtocolError as exc:
            self._handle(exc.packets)   # what came before the bad bytes still counts
            if self.close_reason is None:
                self._protocol_failure(exc)
            return
        self._handle(packets)

    def _handle(self, packets: list[mp.Packet]) -> None:
        listener = self.listener
        for packet in packets:
            if self.close_reason is not None:
                return
            try:
                if packet.__class__ is PubAck:   # the hot path
                    packet_id = packet.packet_id  # type: ignore[union-attr]
                    if packet_id in self._inflight:
                        self._inflight.discard(packet_id)
                        if self._held:
                            self._send(self._held.popleft())   # its quota passes on
                        else:
                            self._unacked -= 1
                        listener.on_puback(packet_id, packet.reason_code)  # type: ignore[union-attr]
                    continue
                self._dispatch(packet)
            except ProtocolError as exc:
                self._protocol_failure(exc)
                return
            except Exception:
                log.exception("mqtt: handling %s failed", type(packet).__name__)
        if packets and self.close_reason is None:
            try:
                listener.on_received()
            except Exception:
                log.exception("mqtt: on_received failed")

    def _dispatch(self, packet: mp.Packet) -> None:
        if not self.connack.done():
            if not isinstance(packet, mp.ConnAck):
                raise ProtocolError(f"{type(packet).__name__} before CONNACK", 0x82)
            self._on_connack(packet)
        elif isinstance(packet, Publish):
            self._on_publish(packet)
        elif isinstance(packet, mp.PubRel):
            self._qos2_in.discard(packet.packet_id)
            self._send(mp.encode_ack(mp.PubComp(packet.packet_id), self.protocol))
        elif isinstance(packet, mp.SubAck):
            if packet.packet_id in self._subscribing:
                self._subscribing.discard(packet.packet_id)
                self.listener.on_suback(packet.packet_id, packet.reason_codes)
        elif isinstance(packet, mp.PingResp):
            self._ping_deadline = None
        elif isinstance(packet, mp.Disconnect):
            reason = f"broker disconnected: {mp.reason_name(packet.reason_code)}"
            if packet.reason_string:
                reason += f" ({packet.reason_string[:200]})"
            self.abort(reason)
        else:   # a second CONNACK, a PUBREC/PUBCOMP for QoS 2 we never sent, a client's packet
            raise ProtocolError(f"unexpected {type(packet).__name__} from the broker", 0x82)

    def _on_connack(self, ack: mp.ConnAck) -> None:
        failed = ack.reason_code >= 0x80 if self.protocol == mp.MQTT5 else ack.reason_code != 0
        if failed:
            reason = mp.reason_name(ack.reason_code, self.protocol, mp.CONNACK)
            if ack.reason_string:
                reason += f" ({ack.reason_string[:200]})"
            self.connack.set_exception(ConnectRefused(ack.reason_code, reason))
            self.abort(f"refused: {reason}")
            return
        if self.protocol == mp.MQTT5:
            self.receive_maximum = ack.receive_maximum
            self.maximum_qos = ack.maximum_qos
            self.retain_available = ack.retain_available
            self.broker_max_packet_size = ack.maximum_packet_size
            self.assigned_client_id = ack.assigned_client_id
            if ack.server_keep_alive is not None:
                self.keepalive_s = ack.server_keep_alive
            if self.receive_maximum == 0:
                raise ProtocolError("Receive Maximum of 0", 0x82)
        self.connack.set_result(ack)
        self._arm_keepalive(self._last_sent + self.keepalive_s)

    def _on_publish(self, message: Publish) -> None:
        if mp.P_TOPIC_ALIAS in message.properties:
            raise ProtocolError("topic alias sent, none allowed", 0x94)
        if message.qos == 1:
            self._send(mp.encode_puback(message.packet_id, 0, self.protocol))
        elif message.qos == 2:
            fresh = message.packet_id not in self._qos2_in
            self._qos2_in.add(message.packet_id)
            self._send(mp.encode_ack(mp.PubRec(message.packet_id), self.protocol))
            if not fresh:   # a re-send before our PUBREC arrived: delivered once already
                return
        self.listener.on_message(message)

    def _protocol_failure(self, exc: ProtocolError) -> None:
        self.protocol_error = exc
        o = self.options
        log.warning("mqtt: protocol error from %s:%d: %s (closing)", o.host, o.port, exc)
        if self.protocol == mp.MQTT5 and self.connack.done() and self._transport is not None:
            self._transport.write(mp.encode_disconnect(mp.Disconnect(exc.code), self.protocol))
        self.abort(f"protocol error: {exc}")

    # -- keepalive ---------------------------------------------------------------------
    def _arm_keepalive(self, when: float) -> None:
        if self.keepalive_s > 0 and not self._lost:
            self._ka_handle = self._loop.call_at(when, self._keepalive)

    def _keepalive(self) -> None:
        self._ka_handle = None
        if not self.is_open:
            return
        now = self._loop.time()
        if self._ping_deadline is not None:
            if now >= self._ping_deadline:
                self.abort(f"no PINGRESP within {self.keepalive_s * 0.5:g} s (keepalive)")
                return
            self._arm_keepalive(self._ping_deadline)
            return
        due = self._last_sent + self.keepalive_s
        if now < due:
            self._arm_keepalive(due)
            return
        self._send(mp.PINGREQ_BYTES)
        self.flush()
        self._ping_deadline = now + max(0.5, self.keepalive_s * 0.5)
        self._arm_keepalive(self._ping_deadline)

    def __repr__(self) -> str:
        state: Any = "open" if self.is_open else self.close_reason
        return f"<MqttConnection {self.options.host}:{self.options.port} {state}>"
