"""MQTT 3.1.1 and 5 packets: exact bytes for the ones the gateway sends most, round trips for
every packet it speaks in both versions, the stream decoder fed byte by byte and in bursts,
and malformed input always ending in ProtocolError (never another exception)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.north import mqtt_packets as mp
from gateway.north.mqtt_packets import MQTT5, MQTT311, ProtocolError, StreamDecoder

BOTH = pytest.mark.parametrize("protocol", [MQTT311, MQTT5])


def _roundtrip(packet: Any, protocol: int) -> Any:
    (out,) = StreamDecoder(protocol).feed(mp.encode(packet, protocol))
    return out


def test_publish_bytes_are_exact() -> None:
    # v3.1.1 QoS 1: 0x32, remaining 2+3+2+2, topic "a/b", id 10, payload "hi"
    assert mp.encode_publish("a/b", b"hi", 1, packet_id=10, protocol=MQTT311) == \
        bytes.fromhex("3209 0003 612f62 000a 6869")
    # v5 QoS 0 retained: no packet id, an empty property block
    assert mp.encode_publish("a/b", b"hi", 0, retain=True, protocol=MQTT5) == \
        bytes.fromhex("3108 0003 612f62 00 6869")
    # v5 with correlation data (0x09) and response topic (0x08)
    raw = mp.encode_publish("t", b"", 1, packet_id=1, protocol=MQTT5,
                            properties={mp.P_RESPONSE_TOPIC: "r", mp.P_CORRELATION_DATA: b"\x01"})
    assert raw == bytes.fromhex("320e 000174 0001 08 08000172 09000101")
    big = mp.encode_publish("t", b"x" * 200, 0, protocol=MQTT311)
    assert big[:3] == bytes((0x30, (203 & 0x7F) | 0x80, 203 >> 7))


def test_puback_and_ping_bytes() -> None:
    assert mp.encode_puback(0x1234, 0, MQTT311) == bytes.fromhex("40021234")
    assert mp.encode_puback(0x1234, 0, MQTT5) == bytes.fromhex("40021234")
    assert mp.encode_puback(7, 0x87, MQTT5) == bytes.fromhex("4003000787")
    assert mp.encode(mp.PingReq()) == b"\xc0\x00" and mp.encode(mp.PingResp()) == b"\xd0\x00"
    assert mp.encode_disconnect(mp.Disconnect(0x8E), MQTT311) == b"\xe0\x00"
    assert mp.encode_disconnect(mp.Disconnect(0x8E), MQTT5) == b"\xe0\x02\x8e\x00"


@BOTH
def test_connect_round_trips(protocol: int) -> None:
    will_props = {mp.P_WILL_DELAY: 5} if protocol == MQTT5 else {}
    props = {mp.P_MAXIMUM_PACKET_SIZE: 1 << 20, mp.P_SESSION_EXPIRY: 0} if protocol == MQTT5 else {}
    for packet in (
        mp.Connect("gw-1", protocol, 30, True, "user", b"p\x00w",
                   mp.Will("s/state", b"off", 1, True, will_props), props),
        mp.Connect("", protocol, 0, False),
        mp.Connect("ü-id", protocol, 65535, True, username="only-user"),
    ):
        assert _roundtrip(packet, protocol) == packet


@BOTH
def test_connack_round_trips_and_v5_properties(protocol: int) -> None:
    assert _roundtrip(mp.ConnAck(0, True), protocol) == mp.ConnAck(0, True)
    assert _roundtrip(mp.ConnAck(5), protocol).reason_code == 5
    if protocol == MQTT5:
        props = {mp.P_RECEIVE_MAXIMUM: 20, mp.P_MAXIMUM_QOS: 1, mp.P_RETAIN_AVAILABLE: 0,
                 mp.P_MAXIMUM_PACKET_SIZE: 4096, mp.P_TOPIC_ALIAS_MAXIMUM: 10,
                 mp.P_ASSIGNED_CLIENT_ID: "auto-1", mp.P_SERVER_KEEP_ALIVE: 15,
                 mp.P_REASON_STRING: "welcome", mp.P_USER_PROPERTY: [("a", "1"), ("a", "2")],
                 mp.P_WILDCARD_SUB_AVAILABLE: 1, mp.P_SHARED_SUB_AVAILABLE: 0}
        ack = _roundtrip(mp.ConnAck(0, False, props), MQTT5)
        assert ack.properties == props
        assert (ack.receive_maximum, ack.maximum_qos, ack.retain_available, ack.maximum_packet_size,
                ack.assigned_client_id, ack.server_keep_alive, ack.reason_string) == \
            (20, 1, False, 4096, "auto-1", 15, "welcome")
        plain = mp.ConnAck()
        assert (plain.receive_maximum, plain.maximum_qos, plain.retain_available) == (65535, 2, True)


@BOTH
def test_publish_round_trips(protocol: int) -> None:
    props = {mp.P_RESPONSE_TOPIC: "dno/replies/7", mp.P_CORRELATION_DATA: b"\x00\xffc",
             mp.P_MESSAGE_EXPIRY: 60, mp.P_CONTENT_TYPE: "application/json", mp.P_PAYLOAD_FORMAT: 1,
             mp.P_USER_PROPERTY: [("k", "v")], mp.P_SUBSCRIPTION_ID: [3, 300000]} \
        if protocol == MQTT5 else {}
    for packet in (mp.Publish("a/b", b"", 0), mp.Publish("évé/ü", b"x" * 70000, 1, True, True, 65535, props),
                   mp.Publish("q2", b"\x00", 2, False, False, 9)):
        got = _roundtrip(packet, protocol)
        assert got == packet
    if protocol == MQTT5:
        got = _roundtrip(mp.Publish("t", b"p", 1, packet_id=3, properties=props), MQTT5)
        assert (got.response_topic, got.correlation_data) == ("dno/replies/7", b"\x00\xffc")


@BOTH
def test_acks_subscribe_suback_disconnect_round_trip(protocol: int) -> None:
    v5 = protocol == MQTT5
    for cls in (mp.PubAck, mp.PubRec, mp.PubRel, mp.PubComp):
        assert _roundtrip(cls(513), protocol) == cls(513)
        if v5:
            failed = cls(1, 0x87, {mp.P_REASON_STRING: "no"})
            assert _roundtrip(failed, MQTT5) == failed
            assert _roundtrip(cls(1, 0x10), MQTT5).reason_code == 0x10
    sub = mp.Subscribe(77, [("evedge/v1/+/cmd/#", 1), ("a", 0)], {mp.P_SUBSCRIPTION_ID: [5]} if v5 else {})
    assert _roundtrip(sub, protocol) == sub
    suback = mp.SubAck(77, [1, 0x80] if not v5 else [1, 0x87], {mp.P_REASON_STRING: "acl"} if v5 else {})
    assert _roundtrip(suback, protocol) == suback
    bye = mp.Disconnect(0x8E, {mp.P_REASON_STRING: "taken over"}) if v5 else mp.Disconnect()
    got = _roundtrip(bye, protocol)
    assert got == bye and (not v5 or got.reason_string == "taken over")
    assert _roundtrip(mp.PingReq(), protocol) == mp.PingReq()
    assert _roundtrip(mp.PingResp(), protocol) == mp.PingResp()


def test_reason_names() -> None:
    assert mp.reason_name(0x87) == "Not authorized (0x87)"
    assert mp.reason_name(0x8E) == "Session taken over (0x8E)"
    assert mp.reason_name(5, MQTT311, mp.CONNACK) == "Not authorized (0x05)"
    assert mp.reason_name(0x80, MQTT311, mp.SUBACK) == "Failure (0x80)"


# -- the stream decoder ----------------------------------------------------------------------

def _stream(protocol: int) -> tuple[bytes, list[Any]]:
    packets: list[Any] = [mp.ConnAck(0, False, {mp.P_RECEIVE_MAXIMUM: 5} if protocol == MQTT5 else {}),
                          mp.PubAck(1), mp.PubAck(2, 0x10 if protocol == MQTT5 else 0),
                          mp.Publish("cmd/x", b"y" * 300, 1, packet_id=4),
                          mp.SubAck(3, [1]), mp.PingResp(), mp.PubRel(4), mp.Disconnect()]
    return b"".join(mp.encode(p, protocol) for p in packets), packets


@BOTH
def test_stream_decoder_byte_by_byte_and_in_bursts(protocol: int) -> None:
    data, packets = _stream(protocol)
    dec = StreamDecoder(protocol)
    got = []
    for i in range(len(data)):
        got += dec.feed(data[i:i + 1])
    assert got == packets and dec.buffered == 0
    for size in (2, 3, 7, 64, len(data)):
        dec, got = StreamDecoder(protocol), []
        for i in range(0, len(data) * 2, size):
            got += dec.feed((data + data)[i:i + size])
        assert got == packets + packets


MALFORMED = [
    ("remaining length over 4 bytes", b"\x30\xff\xff\xff\xff\x01"),
    ("over the size limit", b"\x30\xff\xff\x7f"),
    ("unknown packet type 0", b"\x00\x00"),
    ("AUTH is not for 3.1.1 / unsupported", b"\xf0\x00"),
    ("reserved flags on PUBACK", b"\x42\x02\x00\x01"),
    ("SUBSCRIBE flags must be 0b0010", b"\x80\x06\x00\x01\x00\x01a\x01"),
    ("PUBLISH QoS 3", b"\x36\x05\x00\x01a\x00\x01"),
    ("topic not UTF-8", b"\x30\x04\x00\x02\xff\xfe"),
    ("topic with a wildcard", b"\x30\x05\x00\x03a/#"),
    ("topic longer than the packet", b"\x30\x03\x00\x09a"),
    ("QoS 1 without packet id", b"\x32\x03\x00\x01a"),
    ("packet id 0", b"\x32\x05\x00\x01a\x00\x00"),
    ("PINGRESP with a body", b"\xd0\x01\x00"),
    ("CONNACK reserved flags", b"\x20\x02\x02\x00"),
    ("UNSUBACK unsupported", b"\xb0\x02\x00\x01"),
    ("SUBSCRIBE with a bad filter", b"\x82\x07\x00\x01\x00\x02#a\x01"),
]
MALFORMED_V5 = [
    ("truncated properties", b"\x20\x05\x00\x00\x05\x21\x00"),
    ("unknown property", b"\x20\x05\x00\x00\x02\x7f\x00"),
    ("property twice", b"\x20\x09\x00\x00\x06\x21\x00\x01\x21\x00\x02"),
    ("string property not UTF-8", b"\x20\x08\x00\x00\x05\x1f\x00\x02\xc3\x28"),
    ("property runs past its block", b"\x20\x07\x00\x00\x02\x1f\x00\x02ab"),
    ("PUBACK props truncated", b"\x40\x05\x00\x01\x87\x04\x1f"),
    ("AUTH unsupported", b"\xf0\x00"),
]


@pytest.mark.parametrize(("what", "data"), MALFORMED + [(w, d) for w, d in MALFORMED_V5])
def test_malformed_input_is_a_protocol_error(what: str, data: bytes) -> None:
    for protocol in (MQTT311, MQTT5) if (what, data) in MALFORMED else (MQTT5,):
        dec = StreamDecoder(protocol, max_packet_size=65536)
        with pytest.raises(ProtocolError):
            dec.feed(mp.encode_puback(1, 0, protocol) + data)
        with pytest.raises(ProtocolError):   # and it stays failed: the connection must go
            dec.feed(mp.PINGRESP_BYTES)


def test_a_too_large_packet_is_refused_before_it_is_buffered() -> None:
    dec = StreamDecoder(MQTT5, max_packet_size=1000)
    with pytest.raises(ProtocolError) as err:
        dec.feed(b"\x30\xe8\x07")   # 1000 bytes announced: over the limit with its header
    assert err.value.code == 0x95
    assert StreamDecoder(MQTT5, max_packet_size=1003).feed(b"\x30\xe8\x07") == []


@settings(max_examples=400, deadline=None)
@given(chunks=st.lists(st.binary(max_size=40), max_size=8), protocol=st.sampled_from([MQTT311, MQTT5]))
def test_arbitrary_bytes_give_packets_or_a_protocol_error(chunks: list[bytes], protocol: int) -> None:
    dec = StreamDecoder(protocol, max_packet_size=4096)
    try:
        for chunk in chunks:
            for packet in dec.feed(chunk):
                if not (isinstance(packet, mp.Publish) and not packet.topic):   # a topic alias
                    assert mp.encode(packet, protocol)   # whatever decodes, encodes again
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(prefix=st.binary(min_size=1, max_size=30), protocol=st.sampled_from([MQTT311, MQTT5]))
def test_valid_stream_with_garbage_spliced_in(prefix: bytes, protocol: int) -> None:
    data, _ = _stream(protocol)
    dec = StreamDecoder(protocol, max_packet_size=4096)
    try:
        dec.feed(data[:10] + prefix + data[10:])
    except ProtocolError:
        pass


# -- topics --------------------------------------------------------------------------------

@pytest.mark.parametrize("topic", ["", "a/+/b", "a/#", "#", "a\x00b", "x" * 65536, "\ud800"])
def test_publish_topics_that_cannot_be_sent_raise_value_error(topic: str) -> None:
    with pytest.raises(ValueError):
        mp.encode_publish(topic, b"", 1, packet_id=1)


def test_valid_topics_and_filters() -> None:
    assert mp.topic_bytes("evedge/v1/site-1/telemetry") == b"\x00\x1aevedge/v1/site-1/telemetry"
    assert len(mp.topic_bytes("é" * 32767)) == 2 + 65534
    for good in ("a/+/b", "#", "a/#", "+", "$share/g/a"):
        mp.validate_filter(good)
    for bad in ("", "a/#/b", "a+/b", "a/b#"):
        with pytest.raises(ValueError):
            mp.validate_filter(bad)
    with pytest.raises(ValueError):
        mp.encode_publish("t", b"", 3)
    with pytest.raises(ValueError):
        mp.encode_publish("t", b"", 1, packet_id=0)
