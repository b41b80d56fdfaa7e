# One end of the CBOR message link (the column's, or the gateway's with side=FROM_GATEWAY).
# Pure: bytes and time come in through on_bytes()/poll(), bytes leave through write().
# Incoming calls go to handlers[action](payload, now_ms), which return the result payload
# (or raise MessageError for an error reply); calls we send are matched to their results
# by id and expire after call_timeout_ms. Bad input never raises: it is counted in
# `counters` and answered with an error frame when the call's id can be read, else dropped.
from . import cbor, messages
from .cbor import CBORError
from .clock import elapsed_ms as _elapsed
from .frames import MAX_PAYLOAD, FrameReader, encode_frame
from .messages import CALL, MAX_ID, RESULT, MessageError

if 0:  # never runs: names the counters longer than 10 characters, so that mpy-cross makes
    # them interned qstrs rather than heap string objects (see firmware/messages.py)
    bad_messages = unknown_actions = unsupported = handler_errors = errors_sent = 0
    tx_failures = calls_refused = callback_errors = internal_errors = garbage_bytes = 0

COUNTERS = (
    "rx_frames",        # frames with a good CRC (bad ones: reader.bad_crc, .oversize, ...)
    "rx_calls",         # valid calls dispatched to a handler
    "rx_results",       # results matched to a pending call
    "rx_errors",        # error frames matched to a pending call
    "bad_cbor",         # frames whose payload is not one CBOR item
    "bad_messages",     # CBOR that is not a valid frame, or a call with a bad payload
    "unknown_actions",  # calls naming an action outside the contract
    "unsupported",      # calls this side does not serve (no handler, wrong direction)
    "unmatched",        # results/errors for no pending call (late, duplicate, foreign)
    "handler_errors",   # handlers that crashed or returned an invalid result
    "errors_sent",      # error frames we sent
    "tx_frames",        # frames written
    "tx_failures",      # frames we could not encode or write
    "calls_refused",    # call() refused: invalid payload, wrong direction, too many pending
    "timeouts",         # our calls that got no answer in time
    "callback_errors",  # on_result callbacks that raised
    "rx_stale",         # partial frames given up after the line went quiet
    "internal_errors",  # anything unexpected, caught so the link keeps running
)


class Link:
    """write(frame_bytes) sends; handlers maps action -> fn(payload, now_ms) -> result payload.

    A handler that wants to send a call itself (TriggerMessage) should do it after it has
    returned (e.g. from the app's next poll), so that its result goes out first."""

    def __init__(self, write, handlers, call_timeout_ms=10000, max_pending=4, *,
                 side=messages.FROM_COLUMN, max_payload=MAX_PAYLOAD, frame_gap_ms=500):
        self._write = write
        self.handlers = handlers
        self.call_timeout_ms = call_timeout_ms
        self.frame_gap_ms = frame_gap_ms  # quiet time after which a partial frame is stale
        self.side = side
        self.reader = FrameReader(max_payload)  # its max_payload bounds what we send too
        self._pending = [None] * max_pending  # slots: [id, action, sent_ms, on_result]
        self._next_id = 1
        self._rx_ms = 0
        self.counters = dict.fromkeys(COUNTERS, 0)  # sized once (a dict grown key by key is larger)

    def reset(self):
        """A new connection: forget any partial frame (pending calls run to their timeout)."""
        self.reader.reset()

    def pending_calls(self):
        return len(self._pending) - self._pending.count(None)

    def stats(self):
        """Link counters plus the frame reader's, in one new dict (for reporting)."""
        out = dict(self.counters)
        r = self.reader
        out["frames"] = r.frames
        out["bad_crc"] = r.bad_crc
        out["oversize"] = r.oversize
        out["garbage_bytes"] = r.garbage_bytes
        out["dropped"] = r.dropped
        return out

    # --- receiving ------------------------------------------------------------------

    def on_bytes(self, chunk, now_ms):
        """Bytes from the transport, in order; dispatches every complete frame."""
        self._rx_ms = now_ms
        self.reader.feed(chunk)
        self._drain(now_ms)

    def poll(self, now_ms):
        """Expire calls past their timeout and give up on a partial frame gone quiet."""
        for i in range(len(self._pending)):
            slot = self._pending[i]
            if slot is not None and _elapsed(now_ms, slot[2]) >= self.call_timeout_ms:
                self.counters["timeouts"] += 1
                self._resolve(i, None)
        reader = self.reader
        if reader.pending and _elapsed(now_ms, self._rx_ms) >= self.frame_gap_ms:
            self.counters["rx_stale"] += 1
            while reader.pending:
                reader.abort()
                self._drain(now_ms)

    def _drain(self, now_ms):
        while True:
            frame = self.reader.next_frame()
            if frame is None:
                return
            self.counters["rx_frames"] += 1
            try:
                self._on_frame(frame, now_ms)
            except Exception:  # a bug here must not stop the link
                self.counters["internal_errors"] += 1

    def _on_frame(self, frame, now_ms):
        try:
            msg = cbor.loads(frame)
        except CBORError as exc:
            self.counters["bad_cbor"] += 1
            msg_id = _call_id(frame)
            if msg_id is not None:
                self._send_error(msg_id, messages.FORMATION_VIOLATION, "malformed CBOR: %s" % exc)
            return
        try:
            messages.parse(msg)
        except MessageError as exc:
            self.counters["unknown_actions" if exc.code == messages.NOT_IMPLEMENTED else "bad_messages"] += 1
            if exc.frame_type == CALL:
                self._send_error(exc.msg_id, exc.code, exc.description)
            elif exc.frame_type is not None:
                # A malformed answer still ends the call it answers.
                i = self._slot(exc.msg_id)
                if i >= 0:
                    self._resolve(i, exc)
            return
        kind = msg[0]
        if kind == CALL:  # serve it and answer
            msg_id = msg[1]
            action = msg[2]
            handler = self.handlers.get(action)
            if handler is None or messages.direction(action) == self.side:
                self.counters["unsupported"] += 1
                self._send_error(msg_id, messages.NOT_SUPPORTED, "%s is not served here" % action)
                return
            self.counters["rx_calls"] += 1
            try:
                res = handler(msg[3], now_ms)
            except MessageError as exc:
                self._send_error(msg_id, exc.code, exc.description)
                return
            except Exception as exc:
                self.counters["handler_errors"] += 1
                self._send_error(msg_id, messages.INTERNAL_ERROR,
                                 "%s failed: %s" % (action, type(exc).__name__))
                return
            if res is None:
                res = {}
            try:
                messages.validate_payload(action, res, True)
            except MessageError as exc:
                self.counters["handler_errors"] += 1
                self._send_error(msg_id, messages.INTERNAL_ERROR,
                                 "invalid %s result: %s" % (action, exc.description))
                return
            if not self._send(messages.result(msg_id, res)):
                self._send_error(msg_id, messages.INTERNAL_ERROR,
                                 "%s result could not be sent" % action)
            return
        i = self._slot(msg[1])
        if i < 0:
            self.counters["unmatched"] += 1
        elif kind == RESULT:
            try:
                messages.validate_payload(self._pending[i][1], msg[2], True)
            except MessageError as exc:
                self.counters["bad_messages"] += 1
                self._resolve(i, exc)
                return
            self.counters["rx_results"] += 1
            self._resolve(i, msg[2])
        else:
            self.counters["rx_errors"] += 1
            exc = MessageError(msg[2], msg[3])
            exc.msg_id = msg[1]
            exc.frame_type = kind
            exc.details = msg[4]
            self._resolve(i, exc)

    # --- sending --------------------------------------------------------------------

    def call(self, action, payload, now_ms, on_result=None):
        """Send a call; return its id, or None if refused (counted in calls_refused).

        on_result(answer) runs once: answer is the valid result payload, a MessageError
        (an error frame, or an invalid result), or None when the call timed out."""
        i = self._pending.index(None) if None in self._pending else -1
        if i < 0 or messages.direction(action) != self.side:
            self.counters["calls_refused"] += 1
            return None
        msg_id = self._next_id
        while self._slot(msg_id) >= 0:
            msg_id = 0 if msg_id >= MAX_ID else msg_id + 1
        self._next_id = 0 if msg_id >= MAX_ID else msg_id + 1
        try:
            msg = messages.call(msg_id, action, payload)
        except MessageError:
            self.counters["calls_refused"] += 1
            return None
        if not self._send(msg):
            self.counters["calls_refused"] += 1
            return None
        self._pending[i] = [msg_id, action, now_ms, on_result]
        return msg_id

    def _send(self, msg):
        try:
            frame = encode_frame(cbor.dumps(msg), self.reader.max_payload)
            self._write(frame)
        except Exception:  # unencodable, too long, or the transport failed
            self.counters["tx_failures"] += 1
            return False
        self.counters["tx_frames"] += 1
        return True

    def _send_error(self, msg_id, code, description):
        if code not in messages.ERROR_CODES:  # a handler's own code: not in the contract
            code = messages.GENERIC_ERROR
        self.counters["errors_sent"] += 1
        self._send(messages.error(msg_id, code, str(description)[:200]))

    # --- pending calls --------------------------------------------------------------

    def forget(self, msg_id):
        """Stop waiting for a call's answer (its slot frees, no callback). A late answer then
        counts as unmatched. True if the call was pending."""
        i = self._slot(msg_id) if msg_id is not None else -1
        if i < 0:
            return False
        self._pending[i] = None
        return True

    def _slot(self, msg_id):
        for i in range(len(self._pending)):
            slot = self._pending[i]
            if slot is not None and slot[0] == msg_id:
                return i
        return -1

    def _resolve(self, i, answer):
        callback = self._pending[i][3]
        self._pending[i] = None
        if callback is not None:
            try:
                callback(answer)
            except Exception:
                self.counters["callback_errors"] += 1


def _call_id(frame):
    """The id of a call whose CBOR breaks only after its id, else None."""
    if len(frame) < 3 or frame[0] not in (0x84, 0x9F):  # array(4) or indefinite array
        return None
    try:
        kind, pos = cbor.loads_from(frame, 1)
        msg_id, pos = cbor.loads_from(frame, pos)
    except CBORError:
        return None
    if type(kind) is not int or kind != CALL:
        return None
    if type(msg_id) is not int or not 0 <= msg_id <= MAX_ID:
        return None
    return msg_id
