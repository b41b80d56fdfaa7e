"""MQTT 3.1.1 and MQTT 5 control packets: bytes in, packets out, and back. No I/O.

Only what the gateway speaks: CONNECT/CONNACK, PUBLISH with QoS 0, 1 and 2 (QoS 2 only as
a receiver: PUBREC/PUBREL/PUBCOMP), PUBACK, SUBSCRIBE/SUBACK, PINGREQ/PINGRESP and
DISCONNECT. UNSUBSCRIBE, UNSUBACK and AUTH are refused as unsupported. Every packet
decodes for both sides (a test broker decodes CONNECT with the same code).

StreamDecoder takes the bytes of a connection as they come and hands back whole packets;
anything malformed (a remaining length of more than 4 bytes, a packet over the size
limit, reserved flag bits set, a topic that is not UTF-8, truncated properties, an
unknown packet type) raises ProtocolError, after which the connection must be closed:
the decoder stays failed. The publish path is the hot one (thousands a second): topics
are validated and encoded once (a bounded cache) and a PUBACK without properties is
decoded without slicing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar

MQTT311 = 4
MQTT5 = 5

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15
PACKET_NAMES = {1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
                7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
                12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH"}

MAX_REMAINING_LENGTH = 268_435_455
DEFAULT_MAX_PACKET_SIZE = 1 << 20

# MQTT 5 properties (id -> wire type); see the MQTT 5 specification, 2.2.2.2.
P_PAYLOAD_FORMAT, P_MESSAGE_EXPIRY, P_CONTENT_TYPE = 0x01, 0x02, 0x03
P_RESPONSE_TOPIC, P_CORRELATION_DATA, P_SUBSCRIPTION_ID = 0x08, 0x09, 0x0B
P_SESSION_EXPIRY, P_ASSIGNED_CLIENT_ID, P_SERVER_KEEP_ALIVE = 0x11, 0x12, 0x13
P_AUTH_METHOD, P_AUTH_DATA, P_REQUEST_PROBLEM_INFO, P_WILL_DELAY = 0x15, 0x16, 0x17, 0x18
P_REQUEST_RESPONSE_INFO, P_RESPONSE_INFO, P_SERVER_REFERENCE, P_REASON_STRING = 0x19, 0x1A, 0x1C, 0x1F
P_RECEIVE_MAXIMUM, P_TOPIC_ALIAS_MAXIMUM, P_TOPIC_ALIAS, P_MAXIMUM_QOS = 0x21, 0x22, 0x23, 0x24
P_RETAIN_AVAILABLE, P_USER_PROPERTY, P_MAXIMUM_PACKET_SIZE = 0x25, 0x26, 0x27
P_WILDCARD_SUB_AVAILABLE, P_SUB_ID_AVAILABLE, P_SHARED_SUB_AVAILABLE = 0x28, 0x29, 0x2A

_BYTE, _TWO, _FOUR, _VARINT, _STR, _BIN, _PAIR = range(7)
PROPERTY_TYPES = {
    P_PAYLOAD_FORMAT: _BYTE, P_MESSAGE_EXPIRY: _FOUR, P_CONTENT_TYPE: _STR, P_RESPONSE_TOPIC: _STR,
    P_CORRELATION_DATA: _BIN, P_SUBSCRIPTION_ID: _VARINT, P_SESSION_EXPIRY: _FOUR,
    P_ASSIGNED_CLIENT_ID: _STR, P_SERVER_KEEP_ALIVE: _TWO, P_AUTH_METHOD: _STR, P_AUTH_DATA: _BIN,
    P_REQUEST_PROBLEM_INFO: _BYTE, P_WILL_DELAY: _FOUR, P_REQUEST_RESPONSE_INFO: _BYTE,
    P_RESPONSE_INFO: _STR, P_SERVER_REFERENCE: _STR, P_REASON_STRING: _STR, P_RECEIVE_MAXIMUM: _TWO,
    P_TOPIC_ALIAS_MAXIMUM: _TWO, P_TOPIC_ALIAS: _TWO, P_MAXIMUM_QOS: _BYTE, P_RETAIN_AVAILABLE: _BYTE,
    P_USER_PROPERTY: _PAIR, P_MAXIMUM_PACKET_SIZE: _FOUR, P_WILDCARD_SUB_AVAILABLE: _BYTE,
    P_SUB_ID_AVAILABLE: _BYTE, P_SHARED_SUB_AVAILABLE: _BYTE,
}
_REPEATABLE = {P_USER_PROPERTY, P_SUBSCRIPTION_ID}  # decoded as lists

Properties = dict[int, Any]

REASONS = {
    0x00: "Success", 0x01: "Granted QoS 1", 0x02: "Granted QoS 2", 0x04: "Disconnect with Will Message",
    0x10: "No matching subscribers", 0x11: "No subscription existed", 0x18: "Continue authentication",
    0x19: "Re-authenticate", 0x80: "Unspecified error", 0x81: "Malformed Packet", 0x82: "Protocol Error",
    0x83: "Implementation specific error", 0x84: "Unsupported Protocol Version",
    0x85: "Client Identifier not valid", 0x86: "Bad User Name or Password", 0x87: "Not authorized",
    0x88: "Server unavailable", 0x89: "Server busy", 0x8A: "Banned", 0x8B: "Server shutting down",
    0x8C: "Bad authentication method", 0x8D: "Keep Alive timeout", 0x8E: "Session taken over",
    0x8F: "Topic Filter invalid", 0x90: "Topic Name invalid", 0x91: "Packet Identifier in use",
    0x92: "Packet Identifier not found", 0x93: "Receive Maximum exceeded", 0x94: "Topic Alias invalid",
    0x95: "Packet too large", 0x96: "Message rate too high", 0x97: "Quota exceeded",
    0x98: "Administrative action", 0x99: "Payload format invalid", 0x9A: "Retain not supported",
    0x9B: "QoS not supported", 0x9C: "Use another server", 0x9D: "Server moved",
    0x9E: "Shared Subscriptions not supported", 0x9F: "Connection rate exceeded",
    0xA0: "Maximum connect time", 0xA1: "Subscription Identifiers not supported",
    0xA2: "Wildcard Subscriptions not supported",
}
CONNACK_311 = {0: "Connection Accepted", 1: "Unacceptable protocol version", 2: "Identifier rejected",
               3: "Server unavailable", 4: "Bad user name or password", 5: "Not authorized"}


def reason_name(code: int, protocol: int = MQTT5, packet: int = 0) -> str:
    """A reason code as text for logs ("Not authorized (0x87)")."""
    if protocol == MQTT311 and packet == CONNACK:
        name = CONNACK_311.get(code, "Unknown return code")
    elif protocol == MQTT311 and packet == SUBACK:
        name = "Failure" if code == 0x80 else f"Granted QoS {code}"
    else:
        name = REASONS.get(code, "Unknown reason code")
    return f"{name} (0x{code:02X})"


class ProtocolError(ValueError):
    """Bytes that are not valid MQTT (or not what this client supports): close the connection.
    `code` is the MQTT 5 reason code that fits (0x81 malformed, 0x82 protocol error, 0x95 too large)."""

    def __init__(self, message: str, code: int = 0x81) -> None:
        super().__init__(message)
        self.code = code
        self.packets: list[Packet] = []   # StreamDecoder: the whole packets that came before


# -- packets -------------------------------------------------------------------------------
@dataclass(slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class Connect:
    TYPE: ClassVar[int] = CONNECT
    client_id: str
    protocol: int = MQTT5
    keepalive: int = 60
    clean_start: bool = True
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class ConnAck:
    TYPE: ClassVar[int] = CONNACK
    reason_code: int = 0
    session_present: bool = False
    properties: Properties = field(default_factory=dict)

    @property
    def receive_maximum(self) -> int:
        return int(self.properties.get(P_RECEIVE_MAXIMUM, 65535))

    @property
    def maximum_qos(self) -> int:
        return int(self.properties.get(P_MAXIMUM_QOS, 2))

    @property
    def retain_available(self) -> bool:
        return bool(self.properties.get(P_RETAIN_AVAILABLE, 1))

    @property
    def maximum_packet_size(self) -> int | None:
        return self.properties.get(P_MAXIMUM_PACKET_SIZE)

    @property
    def assigned_client_id(self) -> str | None:
        return self.properties.get(P_ASSIGNED_CLIENT_ID)

    @property
    def server_keep_alive(self) -> int | None:
        return self.properties.get(P_SERVER_KEEP_ALIVE)

    @property
    def reason_string(self) -> str | None:
        return self.properties.get(P_REASON_STRING)


@dataclass(slots=True)
class Publish:
    TYPE: ClassVar[int] = PUBLISH
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0
    properties: Properties = field(default_factory=dict)

    @property
    def response_topic(self) -> str | None:
        return self.properties.get(P_RESPONSE_TOPIC)

    @property
    def correlation_data(self) -> bytes | None:
        return self.properties.get(P_CORRELATION_DATA)


@dataclass(slots=True)
class PubAck:
    TYPE: ClassVar[int] = PUBACK
    packet_id: int
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class PubRec(PubAck):
    TYPE: ClassVar[int] = PUBREC


@dataclass(slots=True)
class PubRel(PubAck):
    TYPE: ClassVar[int] = PUBREL


@dataclass(slots=True)
class PubComp(PubAck):
    TYPE: ClassVar[int] = PUBCOMP


@dataclass(slots=True)
class Subscribe:
    TYPE: ClassVar[int] = SUBSCRIBE
    packet_id: int
    filters: list[tuple[str, int]]   # (filter, requested QoS; MQTT 5: the whole options byte)
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class SubAck:
    TYPE: ClassVar[int] = SUBACK
    packet_id: int
    reason_codes: list[int]
    properties: Properties = field(default_factory=dict)


@dataclass(slots=True)
class PingReq:
    TYPE: ClassVar[int] = PINGREQ


@dataclass(slots=True)
class PingResp:
    TYPE: ClassVar[int] = PINGRESP


@dataclass(slots=True)
class Disconnect:
    TYPE: ClassVar[int] = DISCONNECT
    reason_code: int = 0
    properties: Properties = field(default_factory=dict)

    @property
    def reason_string(self) -> str | None:
        return self.properties.get(P_REASON_STRING)


Packet = Connect | ConnAck | Publish | PubAck | Subscribe | SubAck | PingReq | PingResp | Disconnect
_ACKS: dict[int, type[PubAck]] = {PUBACK: PubAck, PUBREC: PubRec, PUBREL: PubRel, PUBCOMP: PubComp}

# -- primitives ----------------------------------------------------------------------------
_H = struct.Struct(">H")
_I = struct.Struct(">I")
PINGREQ_BYTES = b"\xc0\x00"
PINGRESP_BYTES = b"\xd0\x00"


def encode_varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n > MAX_REMAINING_LENGTH:
        raise ValueError(f"{n} does not fit a variable byte integer")
    out = bytearray()
    while True:
        n, byte = n >> 7, n & 0x7F
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _str(s: str) -> bytes:
    raw = s.encode("utf-8")
    if len(raw) > 65535:
        raise ValueError("string longer than 65535 bytes")
    return _H.pack(len(raw)) + raw


def _bin(b: bytes) -> bytes:
    if len(b) > 65535:
        raise ValueError("binary data longer than 65535 bytes")
    return _H.pack(len(b)) + bytes(b)


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + encode_varint(len(body)) + body


def encode_properties(props: Properties | None) -> bytes:
    """MQTT 5 properties with their length prefix (b"\\x00" when there are none)."""
    if not props:
        return b"\x00"
    out = bytearray()
    for pid, value in props.items():
        kind = PROPERTY_TYPES.get(pid)
        if kind is None:
            raise ValueError(f"unknown MQTT 5 property 0x{pid:02X}")
        values = value if pid in _REPEATABLE and isinstance(value, list) else [value]
        for v in values:
            out.append(pid)
            if kind == _BYTE:
                out.append(v)
            elif kind == _TWO:
                out += _H.pack(v)
            elif kind == _FOUR:
                out += _I.pack(v)
            elif kind == _VARINT:
                out += encode_varint(v)
            elif kind == _STR:
                out += _str(v)
            elif kind == _BIN:
                out += _bin(v)
            else:
                out += _str(v[0]) + _str(v[1])
    return encode_varint(len(out)) + bytes(out)


@lru_cache(maxsize=8192)
def topic_bytes(topic: str) -> bytes:
    """A publish topic, checked and encoded with its length prefix (cached: topics repeat).
    ValueError for an empty topic, wildcards, NUL, or more than 65535 bytes of UTF-8."""
    if not isinstance(topic, str) or not topic:
        raise ValueError("Invalid topic.")
    if "+" in topic or "#" in topic:
        raise ValueError("Publish topic cannot contain wildcards.")
    if "\x00" in topic:
        raise ValueError("Publish topic cannot contain NUL.")
    try:
        raw = topic.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("Publish topic is not valid UTF-8.") from None
    if len(raw) > 65535:
        raise ValueError("Publish topic longer than 65535 bytes.")
    return _H.pack(len(raw)) + raw


def validate_filter(topic_filter: str) -> None:
    """A subscription filter: not empty, `#` only last, `+` and `#` only as whole levels."""
    if not topic_filter or "\x00" in topic_filter or len(topic_filter.encode("utf-8")) > 65535:
        raise ValueError(f"invalid topic filter {topic_filter[:80]!r}")
    levels = topic_filter.split("/")
    for n, level in enumerate(levels):
        if ("#" in level and (level != "#" or n != len(levels) - 1)) or ("+" in level and level != "+"):
            raise ValueError(f"invalid topic filter {topic_filter[:80]!r}")


# -- encoders ------------------------------------------------------------------------------
def encode_publish(topic: str, payload: bytes, qos: int = 0, *, retain: bool = False, packet_id: int = 0,
                   protocol: int = MQTT5, dup: bool = False, properties: Properties | None = None) -> bytes:
    """A PUBLISH packet (the hot path: one join, topics cached). ValueError for a bad topic or QoS."""
    head = topic_bytes(topic)
    if qos:
        if qos not in {1, 2}:
            raise ValueError(f"invalid QoS {qos}")
        if not 0 < packet_id <= 65535:
            raise ValueError(f"invalid packet id {packet_id}")
        head += _H.pack(packet_id)
    if protocol == MQTT5:
        props = encode_properties(properties) if properties else b"\x00"
    else:
        props = b""
    length = len(head) + len(props) + len(payload)
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (1 if retain else 0)
    if length < 0x80:
        fixed = bytes((first, length))
    elif length < 0x4000:
        fixed = bytes((first, (length & 0x7F) | 0x80, length >> 7))
    else:
        fixed = bytes((first,)) + encode_varint(length)
    return b"".join((fixed, head, props, payload))


def encode_connect(p: Connect) -> bytes:
    v5 = p.protocol == MQTT5
    flags = 0x02 if p.clean_start else 0
    if p.will is not None:
        flags |= 0x04 | (p.will.qos << 3) | (0x20 if p.will.retain else 0)
    if p.username is not None:
        flags |= 0x80
    if p.password is not None:
        flags |= 0x40
    body = b"\x00\x04MQTT" + bytes((p.protocol, flags)) + _H.pack(p.keepalive)
    if v5:
        body += encode_properties(p.properties)
    body += _str(p.client_id)
    if p.will is not None:
        if v5:
            body += encode_properties(p.will.properties)
        body += topic_bytes(p.will.topic) + _bin(p.will.payload)
    if p.username is not None:
        body += _str(p.username)
    if p.password is not None:
        body += _bin(p.password)
    return _packet(0x10, body)


def encode_connack(p: ConnAck, protocol: int = MQTT5) -> bytes:
    body = bytes((1 if p.session_present else 0, p.reason_code))
    if protocol == MQTT5:
        body += encode_properties(p.properties)
    return _packet(0x20, body)


def encode_ack(p: PubAck, protocol: int = MQTT5) -> bytes:
    """PUBACK, PUBREC, PUBREL or PUBCOMP (by the packet's class)."""
    first = (p.TYPE << 4) | (0x02 if p.TYPE == PUBREL else 0)
    if protocol != MQTT5 or (p.reason_code == 0 and not p.properties):
        return bytes((first, 2)) + _H.pack(p.packet_id)
    body = _H.pack(p.packet_id) + bytes((p.reason_code,))
    if p.properties:
        body += encode_properties(p.properties)
    return _packet(first, body)


def encode_puback(packet_id: int, reason_code: int = 0, protocol: int = MQTT5) -> bytes:
    return encode_ack(PubAck(packet_id, reason_code), protocol)


def encode_subscribe(p: Subscribe, protocol: int = MQTT5) -> bytes:
    if not p.filters:
        raise ValueError("SUBSCRIBE needs at least one filter")
    body = _H.pack(p.packet_id)
    if protocol == MQTT5:
        body += encode_properties(p.properties)
    for topic_filter, options in p.filters:
        validate_filter(topic_filter)
        body += _str(topic_filter) + bytes((options,))
    return _packet(0x82, body)


def encode_suback(p: SubAck, protocol: int = MQTT5) -> bytes:
    body = _H.pack(p.packet_id)
    if protocol == MQTT5:
        body += encode_properties(p.properties)
    return _packet(0x90, body + bytes(p.reason_codes))


def encode_disconnect(p: Disconnect | None = None, protocol: int = MQTT5) -> bytes:
    if protocol != MQTT5 or p is None or (p.reason_code == 0 and not p.properties):
        return b"\xe0\x00"
    return _packet(0xE0, bytes((p.reason_code,)) + encode_properties(p.properties))


def encode(packet: Packet, protocol: int = MQTT5) -> bytes:
    """Any supported packet (tests and test brokers; the client calls the encoders directly)."""
    if isinstance(packet, Connect):
        return encode_connect(packet)
    if isinstance(packet, ConnAck):
        return encode_connack(packet, protocol)
    if isinstance(packet, Publish):
        return encode_publish(packet.topic, packet.payload, packet.qos, retain=packet.retain,
                              packet_id=packet.packet_id, protocol=protocol, dup=packet.dup,
                              properties=packet.properties)
    if isinstance(packet, PubAck):
        return encode_ack(packet, protocol)
    if isinstance(packet, Subscribe):
        return encode_subscribe(packet, protocol)
    if isinstance(packet, SubAck):
        return encode_suback(packet, protocol)
    if isinstance(packet, PingReq):
        return PINGREQ_BYTES
    if isinstance(packet, PingResp):
        return PINGRESP_BYTES
    if isinstance(packet, Disconnect):
        return encode_disconnect(packet, protocol)
    raise TypeError(f"cannot encode {type(packet).__name__}")


# -- decoders ------------------------------------------------------------------------------
class _Reader:
    """Reads one packet's body; any overrun is a ProtocolError (truncated packet)."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.end = data, 0, len(data)

    def left(self) -> int:
        return self.end - self.pos

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise ProtocolError("truncated packet")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def byte(self) -> int:
        if self.pos >= self.end:
            raise ProtocolError("truncated packet")
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return int(_H.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(_I.unpack(self.take(4))[0])

    def varint(self) -> int:
        value, shift = 0, 0
        for _ in range(4):
            b = self.byte()
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7
        raise ProtocolError("variable byte integer longer than 4 bytes")

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self) -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("string is not valid UTF-8") from None
        if "\x00" in text:
            raise ProtocolError("string contains NUL")
        return text

    def properties(self) -> Properties:
        length = self.varint()
        if self.pos + length > self.end:
            raise ProtocolError("truncated properties")
        stop, end = self.pos + length, self.end
        self.end = stop   # a property may not run past the property block
        props: Properties = {}
        try:
            while self.pos < stop:
                pid = self.varint()
                kind = PROPERTY_TYPES.get(pid)
                if kind is None:
                    raise ProtocolError(f"unknown property 0x{pid:02X}")
                if kind == _BYTE:
                    value: Any = self.byte()
                elif kind == _TWO:
                    value = self.u16()
                elif kind == _FOUR:
                    value = self.u32()
                elif kind == _VARINT:
                    value = self.varint()
                elif kind == _STR:
                    value = self.string()
                elif kind == _BIN:
                    value = self.binary()
                else:
                    value = (self.string(), self.string())
                if pid in _REPEATABLE:
                    props.setdefault(pid, []).append(value)
                elif pid in props:
                    raise ProtocolError(f"property 0x{pid:02X} given twice", 0x82)
                else:
                    props[pid] = value
        finally:
            self.end = end
        return props

    def done(self, what: str) -> None:
        if self.pos != self.end:
            raise ProtocolError(f"{what}: {self.end - self.pos} bytes too many")


def _topic_name(r: _Reader) -> str:
    topic = r.string()
    if "+" in topic or "#" in topic:
        raise ProtocolError("PUBLISH topic contains a wildcard", 0x90)
    return topic


def _decode_connect(r: _Reader) -> Connect:
    if r.binary() != b"MQTT":
        raise ProtocolError("not MQTT (protocol name)", 0x84)
    protocol = r.byte()
    if protocol not in (MQTT311, MQTT5):
        raise ProtocolError(f"protocol level {protocol} not supported", 0x84)
    flags = r.byte()
    if flags & 0x01 or (not flags & 0x04 and flags & 0x38) or (flags >> 3) & 3 == 3:
        raise ProtocolError("bad CONNECT flags")
    keepalive = r.u16()
    props = r.properties() if protocol == MQTT5 else {}
    client_id = r.string()
    will = None
    if flags & 0x04:
        will_props = r.properties() if protocol == MQTT5 else {}
        will = Will(_topic_name(r), r.binary(), (flags >> 3) & 3, bool(flags & 0x20), will_props)
    username = r.string() if flags & 0x80 else None
    password = r.binary() if flags & 0x40 else None
    r.done("CONNECT")
    return Connect(client_id, protocol, keepalive, bool(flags & 0x02), username, password, will, props)


def _decode_connack(r: _Reader, protocol: int) -> ConnAck:
    flags = r.byte()
    if flags & 0xFE:
        raise ProtocolError("bad CONNACK flags")
    code = r.byte()
    props = r.properties() if protocol == MQTT5 else {}
    r.done("CONNACK")
    return ConnAck(code, bool(flags & 1), props)


def _decode_publish(r: _Reader, flags: int, protocol: int) -> Publish:
    qos = (flags >> 1) & 3
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    topic = _topic_name(r)
    packet_id = 0
    if qos:
        packet_id = r.u16()
        if packet_id == 0:
            raise ProtocolError("PUBLISH with packet identifier 0")
    props = r.properties() if protocol == MQTT5 else {}
    if not topic and P_TOPIC_ALIAS not in props:
        raise ProtocolError("PUBLISH with an empty topic", 0x90)
    return Publish(topic, r.take(r.left()), qos, bool(flags & 1), bool(flags & 8), packet_id, props)


def _decode_ack(r: _Reader, kind: int, protocol: int) -> PubAck:
    packet_id = r.u16()
    code, props = 0, {}
    if protocol == MQTT5 and r.left():
        code = r.byte()
        if r.left():
            props = r.properties()
    r.done(PACKET_NAMES[kind])
    return _ACKS[kind](packet_id, code, props)


def _decode_subscribe(r: _Reader, protocol: int) -> Subscribe:
    packet_id = r.u16()
    props = r.properties() if protocol == MQTT5 else {}
    filters = []
    while r.left():
        topic_filter = r.string()
        try:
            validate_filter(topic_filter)
        except ValueError as exc:
            raise ProtocolError(str(exc), 0x8F) from None
        options = r.byte()
        if options & (0xC0 if protocol == MQTT5 else 0xFC) or options & 3 == 3:
            raise ProtocolError("bad subscription options")
        filters.append((topic_filter, options))
    if not filters:
        raise ProtocolError("SUBSCRIBE without a filter", 0x82)
    return Subscribe(packet_id, filters, props)


def _decode_suback(r: _Reader, protocol: int) -> SubAck:
    packet_id = r.u16()
    props = r.properties() if protocol == MQTT5 else {}
    return SubAck(packet_id, list(r.take(r.left())), props)


def _decode_disconnect(r: _Reader, protocol: int) -> Disconnect:
    code, props = 0, {}
    if protocol == MQTT5 and r.left():
        code = r.byte()
        if r.left():
            props = r.properties()
    r.done("DISCONNECT")
    return Disconnect(code, props)


_FLAGS = {CONNECT: 0, CONNACK: 0, PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0, SUBSCRIBE: 2, SUBACK: 0,
          PINGREQ: 0, PINGRESP: 0, DISCONNECT: 0}


def decode_packet(first: int, body: bytes, protocol: int = MQTT5) -> Packet:
    """One packet from its first byte and its body (the bytes after the remaining length)."""
    kind, flags = first >> 4, first & 0x0F
    if kind != PUBLISH:
        expected = _FLAGS.get(kind)
        if expected is None:
            name = PACKET_NAMES.get(kind)
            if name is None or (kind == AUTH and protocol != MQTT5):
                raise ProtocolError(f"unknown packet type {kind}")
            raise ProtocolError(f"{name} is not supported", 0x82)
        if flags != expected:
            raise ProtocolError(f"{PACKET_NAMES[kind]} with reserved flags 0x{flags:X}")
    r = _Reader(body)
    if kind == PUBLISH:
        return _decode_publish(r, flags, protocol)
    if kind in _ACKS:
        return _decode_ack(r, kind, protocol)
    if kind == CONNACK:
        return _decode_connack(r, protocol)
    if kind == SUBACK:
        return _decode_suback(r, protocol)
    if kind == DISCONNECT:
        return _decode_disconnect(r, protocol)
    if kind == CONNECT:
        return _decode_connect(r)
    if kind == SUBSCRIBE:
        return _decode_subscribe(r, protocol)
    r.done(PACKET_NAMES[kind])
    return PingReq() if kind == PINGREQ else PingResp()


class StreamDecoder:
    """Feed the bytes of one connection; get whole packets. A ProtocolError is final: the
    decoder keeps raising it, and the connection must be closed (the packets decoded from
    the same feed before the bad one are in its `packets`)."""

    def __init__(self, protocol: int = MQTT5, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE) -> None:
        self.protocol = protocol
        self.max_packet_size = max_packet_size
        self._rest = b""
        self._error: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        return len(self._rest)

    def feed(self, data: bytes) -> list[Packet]:
        if self._error is not None:
            raise self._error
        buf = self._rest + data if self._rest else bytes(data)
        out: list[Packet] = []
        pos, size, protocol = 0, len(buf), self.protocol
        try:
            while size - pos >= 2:
                first = buf[pos]
                length = buf[pos + 1]
                start = pos + 2
                if length & 0x80:   # a longer remaining length
                    length, shift, n = length & 0x7F, 7, 1
                    while True:
                        if start >= size:
                            break
                        b = buf[start]
                        start += 1
                        length |= (b & 0x7F) << shift
                        if not b & 0x80:
                            n = 0
                            break
                        n += 1
                        shift += 7
                        if n == 4:
                            raise ProtocolError("remaining length longer than 4 bytes")
                    if n:        # the length itself is not complete yet
                        break
                end = start + length
                if end - pos > self.max_packet_size:
                    raise ProtocolError(f"packet of {end - pos} bytes is over the limit of "
                                        f"{self.max_packet_size}", 0x95)
                if end > size:
                    break
                if first == 0x40 and length == 2:   # PUBACK, success, no properties: the hot path
                    out.append(PubAck((buf[start] << 8) | buf[start + 1]))
                elif first == 0x40 and length == 3 and protocol == MQTT5:   # with a reason code
                    out.append(PubAck((buf[start] << 8) | buf[start + 1], buf[start + 2]))
                else:
                    out.append(decode_packet(first, buf[start:end], protocol))
                pos = end
        except ProtocolError as exc:
            exc.packets = out
            self._error = exc
            self._rest = b""
            raise
        self._rest = buf[pos:] if pos < size else b""
        return out
