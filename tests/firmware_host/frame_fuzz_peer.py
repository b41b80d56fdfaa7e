# Fuzzes firmware.frames + firmware.cbor_link with random, mutated and hostile frames,
# deterministically per seed. MicroPython-compatible: test_frame_fuzz.py imports run() in
# process and also runs this file under CPython and the MicroPython unix port.
# Usage: frame_fuzz_peer.py SEED ROUNDS   -> one JSON line: the counters of the run.
# Any broken property raises AssertionError (exit code 1 with a traceback).
import json
import sys

from firmware import cbor
from firmware.cbor_link import Link
from firmware.frames import SYNC, FrameReader, encode_frame


class Rng:
    """xorshift32: the same sequence under both interpreters."""

    def __init__(self, seed):
        self.s = (seed & 0xFFFFFFFF) or 0x9E3779B9

    def next(self):
        x = self.s
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self.s = x
        return x

    def below(self, n):
        return self.next() % n

    def data(self, n):
        return bytes([self.next() & 0xFF for _ in range(n)])


# Reference CRC-16/MODBUS, table-driven (written independently of firmware.crc).
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = ((_c >> 1) ^ 0xA001) if _c & 1 else (_c >> 1)
    _TABLE.append(_c)


def ref_crc(data):
    c = 0xFFFF
    for b in data:
        c = (c >> 8) ^ _TABLE[(c ^ b) & 0xFF]
    return c


def ref_frame(payload):
    n = len(payload)
    body = bytes([n >> 8, n & 0xFF]) + bytes(payload)
    c = ref_crc(body)
    return bytes([SYNC]) + body + bytes([c & 0xFF, c >> 8])


def random_call(rng, msg_id):
    k = rng.below(5)
    if k == 0:
        return [2, msg_id, "Reset", {"type": ("Soft", "Hard")[rng.below(2)]}]
    if k == 1:
        payload = {"limitA": rng.below(81), "validityS": rng.below(86401)}
        if rng.below(2):
            payload["failsafeA"] = rng.below(801) / 10
        return [2, msg_id, "SetChargingLimit", payload]
    if k == 2:
        return [2, msg_id, "GetConfiguration", {"keys": ["k%d" % rng.below(9) for _ in range(rng.below(4))]}]
    if k == 3:
        return [2, msg_id, "ChangeConfiguration", {"key": "failsafeA", "value": rng.below(100)}]
    return [2, msg_id, "TriggerMessage", {"requestedMessage": "Heartbeat"}]


def random_bad_message(rng, msg_id):
    k = rng.below(8)
    if k == 0:
        return [2, msg_id, "Fly", {}]
    if k == 1:
        return [2, msg_id, "SetChargingLimit", {"limitA": 81 + rng.below(100), "validityS": 1}]
    if k == 2:
        return [2, msg_id, "Reset", {"type": "Soft", "extra": True}]
    if k == 3:
        return [2, msg_id, "Heartbeat", {}]  # a column action: not served by the column
    if k == 4:
        return [3, rng.below(1000), {}]
    if k == 5:
        return [4, rng.below(1000), "GenericError", "x", {}]
    if k == 6:
        return [rng.below(9), msg_id]
    return {"not": "a frame"}


def mutate(rng, wire):
    b = bytearray(wire)
    k = rng.below(5)
    i = rng.below(len(b))
    if k == 0:
        b[i] ^= 1 << rng.below(8)
    elif k == 1:
        b[i] ^= 1 + rng.below(255)
    elif k == 2:
        b = b[:i]
    elif k == 3:
        b = b[:i] + b[i + 1:]
    else:
        b = b[:i] + bytes([rng.next() & 0xFF]) + b[i:]
    return bytes(b)


class Fuzz:
    def __init__(self, seed):
        self.rng = Rng(seed)
        self.now = 0
        self.out_reader = FrameReader()
        self.written = 0
        handlers = {}
        for action in ("Reset", "SetChargingLimit", "GetConfiguration", "ChangeConfiguration",
                       "TriggerMessage"):
            handlers[action] = self.handler
        self.link = Link(self.write, handlers, call_timeout_ms=3000, frame_gap_ms=200)
        # Watch every frame the reader hands to the link.
        self.reader_next = self.link.reader.next_frame
        self.link.reader.next_frame = self.next_frame
        self.window = bytearray()   # bytes fed since the end of the last good frame
        self.last = None            # the frame being dispatched, decoded
        self.last_intact = False    # ... and whether it was inserted intact
        self.clean = []             # valid calls inserted intact, not served yet, in order
        self.clean_count = 0
        self.intact = []            # payloads of frames inserted intact, not read back yet
        self.dispatched = 0
        self.accidental = 0         # good-CRC frames that were never inserted intact
        self.answers = 0
        self.calls_sent = 0
        self.kinds = [0] * 10
        self.next_id = 1

    def next_frame(self):
        frame = self.reader_next()
        if frame is None:
            return None
        payload = bytes(frame)
        wire = ref_frame(payload)
        at = self.window.find(wire)
        assert at >= 0, "frame returned that is not on the wire with a good CRC: %s" % payload
        self.window = self.window[at + len(wire):]
        self.last_intact = payload in self.intact
        if self.last_intact:
            self.intact.remove(payload)
        else:
            self.accidental += 1
        try:
            self.last = cbor.loads(payload)
        except cbor.CBORError:
            self.last = None
        return frame

    def handler(self, payload, now_ms):
        last = self.last
        assert isinstance(last, list) and len(last) == 4 and last[0] == 2, "dispatch without a call frame"
        assert last[3] == payload and now_ms == self.now, "dispatched payload differs from the frame"
        action = last[2]
        self.dispatched += 1
        if self.last_intact:
            assert self.clean.pop(0) == [action, payload], "intact calls served out of order"
        if action == "SetChargingLimit":
            return {"status": "Accepted", "appliedA": payload["limitA"]}
        if action == "GetConfiguration":
            return {"configuration": {}, "unknownKeys": payload.get("keys", [])}
        return {"status": "Accepted"}

    def answer(self, value):
        self.answers += 1

    def segment(self):
        rng = self.rng
        k = rng.below(10)
        self.kinds[k] += 1
        msg_id = self.next_id
        self.next_id += 1
        if k <= 3:  # a valid call, intact or (k == 3) mutated on the wire
            msg = random_call(rng, msg_id)
            payload = cbor.dumps(msg)
            wire = encode_frame(payload)
            if k == 3:
                wire, good = mutate(rng, wire), wire
                if wire.find(good) < 0:
                    return wire
                # A byte added in front or behind (or doubled at an edge) leaves it whole.
            self.clean.append([msg[2], msg[3]])
            self.clean_count += 1
            self.intact.append(payload)
            return wire
        if k == 4:  # line noise, with SYNC bytes now and then
            noise = bytearray(rng.data(1 + rng.below(40)))
            for _ in range(rng.below(3)):
                noise[rng.below(len(noise))] = SYNC
            return bytes(noise)
        if k == 5:  # a false header with a plausible length
            return bytes([SYNC, rng.below(4), rng.next() & 0xFF]) + rng.data(rng.below(8))
        if k == 6:  # good CRC around bytes that are no CBOR message
            payload = rng.data(1 + rng.below(30))
            self.intact.append(payload)
            return encode_frame(payload)
        if k == 7:  # good frame, bad message
            payload = cbor.dumps(random_bad_message(rng, msg_id))
            self.intact.append(payload)
            return encode_frame(payload)
        if k == 8:  # an answer to one of our calls, or to nothing
            if rng.below(2):
                sent = self.link.call("Heartbeat", {}, self.now, self.answer)
                if sent is not None:
                    msg_id = sent
                    self.calls_sent += 1
            msg = [3, msg_id, {"currentTimeMs": rng.below(1 << 20)}]
            if rng.below(3) == 0:
                msg = [4, msg_id, "InternalError", "busy", {}]
            payload = cbor.dumps(msg)
            self.intact.append(payload)
            return encode_frame(payload)
        return bytes([SYNC, 0xFF, 0xFF]) if rng.below(2) else bytes([SYNC, 0, 0])

    def round(self):
        rng = self.rng
        data = b"".join([self.segment() for _ in range(1 + rng.below(6))])
        pos = 0
        while pos < len(data):
            n = 1 + rng.below(64)
            chunk = data[pos:pos + n]
            pos += n
            self.now += 1
            self.window.extend(chunk)
            self.link.on_bytes(chunk, self.now)
            if rng.below(4) == 0:
                self.link.poll(self.now)
        # The line goes quiet between rounds: stale partial frames are given up.
        self.now += 250
        self.link.poll(self.now)

    def write(self, data):
        """The link's transport: every write must be exactly one good frame."""
        reader = self.out_reader
        reader.feed(data)
        frame = reader.next_frame()
        assert frame is not None and reader.next_frame() is None, "write is not one whole frame"
        msg = cbor.loads(frame)
        assert isinstance(msg, list) and msg[0] in (2, 3, 4), "link wrote %r" % (msg,)
        assert reader.garbage_bytes == 0 and reader.bad_crc == 0 and reader.pending == 0
        self.written += 1


def run(seed, rounds):
    fz = Fuzz(seed)
    for _ in range(rounds):
        fz.round()
    fz.now += 10000
    fz.link.poll(fz.now)
    assert fz.link.reader.pending == 0
    assert fz.link.pending_calls() == 0
    assert fz.answers == fz.calls_sent, "every call we sent is answered exactly once"
    if fz.accidental == 0:
        # Nothing but our own good frames came through, so every intact call was served.
        assert not fz.clean, "%d intact calls never served" % len(fz.clean)
    summary = fz.link.stats()
    summary["dispatched"] = fz.dispatched
    summary["clean"] = fz.clean_count
    summary["accidental"] = fz.accidental
    summary["answers"] = fz.answers
    summary["written_frames"] = fz.written
    summary["kinds"] = fz.kinds
    assert summary["written_frames"] == summary["tx_frames"]
    return summary


if __name__ == "__main__":
    print(json.dumps(run(int(sys.argv[1]), int(sys.argv[2]))))
