# firmware.cbor_link: dispatch, call matching, timeouts, and bad input that never raises.
from fwtest import hexbytes

from firmware import cbor, messages
from firmware.cbor_link import COUNTERS, Link
from firmware.frames import FrameReader, encode_frame
from firmware.messages import MessageError

HEARTBEAT_CALL = hexbytes("c5 00 0e 84 02 01 69 48 65 61 72 74 62 65 61 74 a0 84 f5")
RESET_CALL = hexbytes("c5 00 14 84 02 05 65 52 65 73 65 74 a1 64 74 79 70 65 64 53 6f 66 74 30 53")
RESET_ACCEPTED = hexbytes("c5 00 14 83 03 05 a1 66 73 74 61 74 75 73 68 41 63 63 65 70 74 65 64 d0 69")


class Wire:
    """Collects what a link writes; decodes it back to messages for the asserts."""

    def __init__(self):
        self.data = bytearray()
        self.fail = False

    def write(self, frame):
        if self.fail:
            raise OSError(5)
        self.data.extend(frame)

    def take(self):
        reader = FrameReader()
        reader.feed(bytes(self.data))
        out = []
        while True:
            frame = reader.next_frame()
            if frame is None:
                break
            out.append(cbor.loads(frame))
        assert reader.pending == 0 and reader.garbage_bytes == 0
        self.data = bytearray()
        return out


def frame(msg):
    return encode_frame(cbor.dumps(msg))


class Column:
    """A column-side link with recording handlers."""

    def __init__(self, **kwargs):
        self.wire = Wire()
        self.seen = []
        self.answers = []
        handlers = {"Reset": self.reset, "SetChargingLimit": self.limit,
                    "GetConfiguration": self.get_config, "BootNotification": self.reset}
        self.link = Link(self.wire.write, handlers, **kwargs)
        self.reply = {"status": "Accepted"}

    def reset(self, payload, now_ms):
        self.seen.append(("Reset", payload, now_ms))
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply

    def limit(self, payload, now_ms):
        self.seen.append(("SetChargingLimit", payload, now_ms))
        return {"status": "Accepted", "appliedA": min(payload["limitA"], 16)}

    def get_config(self, payload, now_ms):
        return {"configuration": {"columnId": "x" * 2000}, "unknownKeys": []}

    def answer(self, value):
        self.answers.append(value)


def test_a_call_from_the_column_has_exact_wire_bytes():
    c = Column()
    assert c.link.call("Heartbeat", {}, 0, c.answer) == 1
    assert bytes(c.wire.data) == HEARTBEAT_CALL
    assert c.link.pending_calls() == 1 and c.link.counters["tx_frames"] == 1


def test_result_is_matched_validated_and_delivered_once():
    c = Column()
    msg_id = c.link.call("Heartbeat", {}, 0, c.answer)
    c.link.on_bytes(frame([3, msg_id, {"currentTimeMs": 1000}]), 5)
    assert c.answers == [{"currentTimeMs": 1000}]
    assert c.link.pending_calls() == 0 and c.link.counters["rx_results"] == 1
    c.link.on_bytes(frame([3, msg_id, {"currentTimeMs": 1000}]), 6)  # duplicate
    assert len(c.answers) == 1 and c.link.counters["unmatched"] == 1


def test_error_frame_ends_the_call_with_a_message_error():
    c = Column()
    msg_id = c.link.call("Heartbeat", {}, 0, c.answer)
    c.link.on_bytes(frame([4, msg_id, "InternalError", "boom", {"why": 1}]), 5)
    exc = c.answers[0]
    assert isinstance(exc, MessageError)
    assert (exc.code, exc.description, exc.details) == ("InternalError", "boom", {"why": 1})
    assert exc.msg_id == msg_id
    assert c.link.counters["rx_errors"] == 1 and c.link.pending_calls() == 0


def test_invalid_result_ends_the_call_with_a_message_error():
    c = Column()
    msg_id = c.link.call("Heartbeat", {}, 0, c.answer)
    c.link.on_bytes(frame([3, msg_id, {"currentTimeMs": -5}]), 5)
    assert c.answers[0].code == messages.PROPERTY_CONSTRAINT_VIOLATION
    msg_id = c.link.call("Heartbeat", {}, 0, c.answer)
    c.link.on_bytes(frame([3, msg_id, ["not", "a", "map"]]), 5)
    assert c.answers[1].code == messages.FORMATION_VIOLATION
    assert c.link.counters["bad_messages"] == 2 and c.link.pending_calls() == 0
    assert c.wire.take() == [[2, 1, "Heartbeat", {}], [2, 2, "Heartbeat", {}]]  # no replies to answers


def test_calls_time_out_through_poll():
    c = Column(call_timeout_ms=1000)
    msg_id = c.link.call("Heartbeat", {}, 100, c.answer)
    c.link.poll(1099)
    assert c.answers == [] and c.link.pending_calls() == 1
    c.link.poll(1100)
    assert c.answers == [None] and c.link.counters["timeouts"] == 1
    c.link.on_bytes(frame([3, msg_id, {"currentTimeMs": 1}]), 1200)  # too late
    assert c.answers == [None] and c.link.counters["unmatched"] == 1


def test_calls_are_refused_when_full_invalid_or_from_the_wrong_side():
    c = Column(max_pending=2)
    assert c.link.call("Heartbeat", {}, 0) == 1
    assert c.link.call("Heartbeat", {}, 0) == 2
    assert c.link.call("Heartbeat", {}, 0) is None
    c.wire.take()
    c = Column()
    assert c.link.call("Reset", {"type": "Soft"}, 0) is None            # a gateway action
    assert c.link.call("Heartbeat", {"extra": 1}, 0) is None            # invalid payload
    assert c.link.call("Fly", {}, 0) is None
    assert c.link.counters["calls_refused"] == 3 and c.wire.data == bytearray()


def test_ids_count_up_wrap_and_skip_ids_still_pending():
    c = Column()
    c.link._next_id = messages.MAX_ID
    assert c.link.call("Heartbeat", {}, 0) == messages.MAX_ID
    assert c.link.call("Heartbeat", {}, 0) == 0
    assert c.link.call("Heartbeat", {}, 0) == 1
    c.link._next_id = messages.MAX_ID
    assert c.link.call("Heartbeat", {}, 0) == 2  # MAX_ID, 0 and 1 are still waiting


def test_incoming_call_is_dispatched_and_answered_exactly():
    c = Column()
    c.link.on_bytes(RESET_CALL, 1234)
    assert c.seen == [("Reset", {"type": "Soft"}, 1234)]
    assert bytes(c.wire.data) == RESET_ACCEPTED
    assert c.link.counters["rx_calls"] == 1 and c.link.counters["rx_frames"] == 1


def test_calls_split_across_chunks_and_wrapped_in_garbage():
    c = Column()
    stream = b"\x00\xc5\x00" + RESET_CALL + b"\xff" + frame([2, 6, "SetChargingLimit", {"limitA": 20,
                                                                                       "validityS": 60}])
    for i in range(len(stream)):
        c.link.on_bytes(stream[i:i + 1], i)
    # "c5 00" + the real SYNC read as LEN 0x00c5: the reader waits for that many bytes
    # until the line has been quiet for frame_gap_ms, then finds the real frames.
    assert c.seen == []
    c.link.poll(len(stream) + 500)
    assert [s[0] for s in c.seen] == ["Reset", "SetChargingLimit"]
    assert c.wire.take() == [[3, 5, {"status": "Accepted"}], [3, 6, {"status": "Accepted", "appliedA": 16}]]


def error_reply(c, incoming, code, words, msg_id=5):
    c.link.on_bytes(incoming, 0)
    out = c.wire.take()
    assert len(out) == 1, out
    assert out[0][:3] == [4, msg_id, code], out
    assert words in out[0][3], out[0][3]
    assert out[0][4] == {}


def test_unknown_action_gets_not_implemented_with_exact_bytes():
    c = Column()
    c.link.on_bytes(frame([2, 5, "Fly", {}]), 0)
    assert bytes(c.wire.data) == hexbytes(
        "c5 00 28 85 04 05 6e 4e 6f 74 49 6d 70 6c 65 6d 65 6e 74 65 64 74 75 6e 6b 6e 6f 77 6e"
        " 20 61 63 74 69 6f 6e 20 27 46 6c 79 27 a0 0f 99")
    assert c.link.counters["unknown_actions"] == 1 and c.link.counters["errors_sent"] == 1


def test_bad_payloads_get_the_validation_error():
    c = Column()
    error_reply(c, frame([2, 5, "SetChargingLimit", {"limitA": 81, "validityS": 60}]),
                messages.PROPERTY_CONSTRAINT_VIOLATION, "limitA must be num 0..80")
    error_reply(c, frame([2, 5, "SetChargingLimit", {"limitA": float("nan"), "validityS": 60}]),
                messages.PROPERTY_CONSTRAINT_VIOLATION, "finite")
    error_reply(c, frame([2, 5, "Reset", {}]), messages.OCCURRENCE_CONSTRAINT_VIOLATION, "needs field type")
    error_reply(c, frame([2, 5, "Reset", {"type": "Soft"}, 9]), messages.FORMATION_VIOLATION, "call must be")
    assert c.seen == [] and c.link.counters["bad_messages"] == 4


def test_calls_this_side_does_not_serve_get_not_supported():
    c = Column()
    error_reply(c, frame([2, 5, "TriggerMessage", {"requestedMessage": "Heartbeat"}]),
                messages.NOT_SUPPORTED, "TriggerMessage is not served here")
    boot = {"columnId": "c", "firmwareVersion": "1", "model": "m", "phases": 1, "hardwareRatingA": 16,
            "busAddress": 1}
    error_reply(c, frame([2, 5, "BootNotification", boot]), messages.NOT_SUPPORTED, "not served")
    assert c.seen == [] and c.link.counters["unsupported"] == 2


def test_handler_failures_become_error_frames():
    c = Column()
    c.reply = MessageError(messages.PROPERTY_CONSTRAINT_VIOLATION, "cannot reset while charging")
    error_reply(c, RESET_CALL, messages.PROPERTY_CONSTRAINT_VIOLATION, "cannot reset while charging")
    c.reply = MessageError("MadeUp", "own code")
    error_reply(c, RESET_CALL, messages.GENERIC_ERROR, "own code")
    c.reply = ZeroDivisionError()
    error_reply(c, RESET_CALL, messages.INTERNAL_ERROR, "Reset failed: ZeroDivisionError")
    c.reply = {"status": "Perhaps"}
    error_reply(c, RESET_CALL, messages.INTERNAL_ERROR, "invalid Reset result: status must be one of")
    c.reply = None
    error_reply(c, RESET_CALL, messages.INTERNAL_ERROR, "invalid Reset result: Reset needs field status")
    assert c.link.counters["handler_errors"] == 3


def test_result_too_long_for_a_frame_becomes_an_error():
    c = Column()
    error_reply(c, frame([2, 5, "GetConfiguration", {}]), messages.INTERNAL_ERROR,
                "GetConfiguration result could not be sent")
    assert c.link.counters["tx_failures"] == 1


def test_malformed_cbor_is_answered_when_the_call_id_survives():
    c = Column()
    broken = hexbytes("84 02 05 65") + b"Reset" + hexbytes("a1 64") + b"type" + hexbytes("64") + b"So"
    error_reply(c, encode_frame(broken), messages.FORMATION_VIOLATION, "malformed CBOR: declared length 4")
    indefinite = hexbytes("9f 02 07 65") + b"Reset" + hexbytes("ff ff")
    error_reply(c, encode_frame(indefinite), messages.FORMATION_VIOLATION, "malformed CBOR", msg_id=7)
    assert c.link.counters["bad_cbor"] == 2 and c.seen == []


def test_cbor_the_contract_never_carries_is_answered_as_malformed():
    # A bignum (what a gateway's codec writes for an int beyond 64 bits), a tag, an
    # indefinite-length payload: refused, answered, counted; the handler never runs.
    c = Column()
    error_reply(c, frame([2, 8, "Reset", {"type": 1 << 70}]), messages.FORMATION_VIOLATION,
                "malformed CBOR: unsupported tag", msg_id=8)
    tagged = hexbytes("84 02 09 65") + b"Reset" + hexbytes("c1 a1 64") + b"type" + hexbytes("64") + b"Soft"
    error_reply(c, encode_frame(tagged), messages.FORMATION_VIOLATION, "malformed CBOR: unsupported tag",
                msg_id=9)
    indefinite = (hexbytes("84 02 0a 65") + b"Reset" + hexbytes("bf 64") + b"type" + hexbytes("64") + b"Soft"
                  + hexbytes("ff"))
    error_reply(c, encode_frame(indefinite), messages.FORMATION_VIOLATION,
                "malformed CBOR: indefinite length not supported", msg_id=10)
    assert c.link.counters["bad_cbor"] == 3 and c.seen == []


def test_input_without_a_recoverable_call_id_is_dropped_and_counted():
    c = Column()
    for payload in (hexbytes("ff"), hexbytes("84 02"), hexbytes("84 03 05 a0"), hexbytes("84 02 3a 01"),
                    hexbytes("84 02 1b 00 00 00 01 00 00 00 00 a0"), hexbytes("83 03 01 a0 00"),
                    hexbytes("f6 f6"), b"\x1c\x00\x00"):
        c.link.on_bytes(encode_frame(payload), 0)
    for msg in ("hello", [], [3, -1, {}], [9, 1, {}], [4, 1, "NoSuchCode", "x", {}], [2, "1", "Reset", {}]):
        c.link.on_bytes(frame(msg), 0)
    counters = c.link.counters
    assert counters["bad_cbor"] == 8 and counters["bad_messages"] == 6
    assert c.wire.data == bytearray() and c.seen == []


def test_bad_crc_and_oversized_frames_are_never_dispatched():
    c = Column()
    bad = bytearray(RESET_CALL)
    bad[-1] ^= 0x10
    c.link.on_bytes(bytes(bad), 0)
    c.link.on_bytes(hexbytes("c5 ff ff") + bytes(40), 0)
    assert c.seen == [] and c.wire.data == bytearray()
    assert c.link.reader.bad_crc == 1 and c.link.reader.oversize == 1
    stats = c.link.stats()
    assert stats["bad_crc"] == 1 and stats["oversize"] == 1 and stats["rx_frames"] == 0
    for name in COUNTERS:
        assert name in stats


def test_a_stale_partial_frame_is_given_up_when_the_line_goes_quiet():
    c = Column(frame_gap_ms=500)
    c.link.on_bytes(hexbytes("c5 03 ff") + RESET_CALL, 1000)
    assert c.seen == []
    c.link.poll(1499)
    assert c.seen == []
    c.link.poll(1500)
    assert c.seen == [("Reset", {"type": "Soft"}, 1500)] and c.link.counters["rx_stale"] == 1
    assert c.link.reader.pending == 0


def test_reset_drops_a_partial_frame_of_a_closed_connection():
    c = Column()
    c.link.on_bytes(RESET_CALL[:10], 0)
    c.link.reader.reset()
    c.link.on_bytes(RESET_CALL, 1)
    assert c.seen == [("Reset", {"type": "Soft"}, 1)] and c.link.reader.bad_crc == 0


def test_transport_and_callback_failures_never_raise():
    c = Column()
    c.wire.fail = True
    assert c.link.call("Heartbeat", {}, 0) is None
    c.link.on_bytes(RESET_CALL, 0)
    assert c.link.counters["tx_failures"] == 3  # the call, the result, the error about the result
    c.wire.fail = False

    def crash(answer):
        raise RuntimeError("callback bug")

    msg_id = c.link.call("Heartbeat", {}, 0, crash)
    c.link.on_bytes(frame([3, msg_id, {"currentTimeMs": 1}]), 1)
    c.link.call("Heartbeat", {}, 0, crash)
    c.link.poll(10 ** 6)
    assert c.link.counters["callback_errors"] == 2


def test_gateway_and_column_links_talk_to_each_other():
    col = Column()
    booted = []
    gw_handlers = {"BootNotification": lambda p, now: {"status": "Accepted", "heartbeatIntervalS": 30,
                                                       "currentTimeMs": now}}
    gw_wire = Wire()
    gw = Link(gw_wire.write, gw_handlers, side=messages.FROM_GATEWAY)
    boot = {"columnId": "c1", "firmwareVersion": "1.0", "model": "m", "phases": 3, "hardwareRatingA": 32,
            "busAddress": 3}
    col.link.call("BootNotification", boot, 10, booted.append)
    gw.on_bytes(bytes(col.wire.data), 20)
    col.wire.data = bytearray()
    col.link.on_bytes(bytes(gw_wire.data), 30)
    gw_wire.data = bytearray()
    assert booted == [{"status": "Accepted", "heartbeatIntervalS": 30, "currentTimeMs": 20}]
    applied = []
    limit = {"limitA": 32, "validityS": 60, "failsafeA": 6}
    assert gw.call("SetChargingLimit", limit, 40, applied.append) == 1
    col.link.on_bytes(bytes(gw_wire.data), 50)
    gw.on_bytes(bytes(col.wire.data), 60)
    assert applied == [{"status": "Accepted", "appliedA": 16}]
    assert col.seen == [("SetChargingLimit", {"limitA": 32, "validityS": 60, "failsafeA": 6}, 50)]
    assert gw.call("Heartbeat", {}, 0) is None  # a column action: not the gateway's to send
