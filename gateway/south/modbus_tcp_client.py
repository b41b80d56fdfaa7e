"""A lean Modbus TCP client for the columns: one connection, one request at a time.

Why not pymodbus here: a site polls thousands of columns every second, and pymodbus's
per-request machinery (transaction manager, framer and PDU objects, trace hooks, a timeout
context per call) cost more CPU per poll than everything else the gateway does for a column
(bench/columns_per_core.py measures it). A column needs three requests: FC04 (the poll),
FC06 (the heartbeat) and FC16 (limits); this module builds their MBAP frames with one
struct each (the poll's frame is built once per connection, only the transaction id
changes) and parses the replies in the protocol's `data_received`. The RTU bus and the site
meter keep pymodbus.

:class:`TcpRequester` has the interface of :class:`gateway.south.modbus_bus.Requester` and
fails a request with the same :class:`ExchangeError` classes: ``disconnected`` (no
connection, refused, reset), ``timeout`` (nothing came back), ``garbled`` (bytes came back
but no frame for this request, or an invalid MBAP header: then the connection is dropped,
the stream cannot be resynchronised), ``exception`` (a Modbus exception reply) and
``wrong_length`` (a well-formed reply of the wrong size or echo). A reply that arrives after
its request timed out carries the old transaction id and is ignored.

A request is either awaited (read_input, write_single, write_multiple: a future and a timeout
each) or sent with a callback (send_read_input, send_write_single: the outcome is handed to
the callback from the connection's `data_received`, from :meth:`TcpRequester.expire` at the
caller's deadline, or when the connection is lost). The callback form is the adapter's poll
path: no future, no task woken, no timer of its own (the adapter checks a whole slot of
columns' deadlines at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import struct
from collections.abc import Callable, Sequence
from typing import Any

from firmware.modbus_tcp import MBAP_LEN, TCP_MAX
from gateway.recv_into import RecvIntoProtocol
from gateway.south.coarse_timer import CoarseTimer
from gateway.south.modbus_bus import ExchangeError
from gateway.south.types import (
    REASON_DISCONNECTED,
    REASON_EXCEPTION,
    REASON_GARBLED,
    REASON_TIMEOUT,
    REASON_WRONG_LENGTH,
)

log = logging.getLogger(__name__)

FC_READ_INPUT = 4
FC_WRITE_SINGLE = 6
FC_WRITE_MULTIPLE = 16
_HEADER = struct.Struct(">HHHB")          # transaction id, protocol 0, length, unit
_READ = struct.Struct(">BHH")              # fc, start, count (FC06: fc, address, value)
_ECHO = struct.Struct(">HH")               # FC06 (address, value) / FC16 (start, count) echo
_REQUEST = struct.Struct(">HHHBBHH")      # a whole FC04/FC06 request: MBAP header, fc, two words
_MAX_LENGTH = TCP_MAX - 6                  # MBAP length field: unit + PDU

# A sent request's outcome: done(arg, value, None) or done(arg, None, error).
Done = Callable[[Any, Any, "ExchangeError | None"], None]


@functools.lru_cache(maxsize=16)
def _registers(count: int) -> struct.Struct:
    """The data of an FC03/FC04 reply of `count` registers (one compiled format per count)."""
    return struct.Struct(">%dH" % count)


class _Link(RecvIntoProtocol):
    """The connection: frames in, the pending request settled (its future, or its callback)."""

    __slots__ = ("buf", "done", "fc", "future", "rx", "tid", "transport", "unit")

    def __init__(self) -> None:
        self.init_reads(2 * TCP_MAX)   # a reply, and a late one before it
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.tid = 0                      # transaction id of the pending request
        self.fc = 0
        self.unit = 0
        self.future: asyncio.Future[bytes] | None = None
        self.done: Callable[[bytes | None, ExchangeError | None], None] | None = None   # or this
        self.rx = False                   # bytes of a frame for the pending request came back

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._settle_error(ExchangeError(REASON_DISCONNECTED, str(exc) if exc else "connection closed"))

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        while len(buf) >= MBAP_LEN:
            tid, proto, length, unit = _HEADER.unpack_from(buf)
            if proto != 0 or length < 2 or length > _MAX_LENGTH:
                self.buf = b""
                self._settle_error(ExchangeError(REASON_GARBLED, "invalid MBAP header"))
                if self.transport is not None:
                    self.transport.abort()   # no way to find the next frame in a TCP stream
                return
            end = 6 + length
            if len(buf) < end:
                break
            if tid == self.tid and (self.future is not None or self.done is not None):
                self.rx = True
                if unit != self.unit:
                    self._settle_error(ExchangeError(REASON_GARBLED, "reply from unit %d" % unit))
                else:
                    pdu = buf[MBAP_LEN:end]
                    fc = pdu[0]
                    if fc == self.fc | 0x80:
                        code = pdu[1] if len(pdu) > 1 else 0
                        self._settle_error(ExchangeError(REASON_EXCEPTION, "exception code %d" % code))
                    elif fc != self.fc:
                        self._settle_error(ExchangeError(REASON_GARBLED, "reply with function %d" % fc))
                    elif self.future is not None:
                        self._settle(pdu)
                    else:   # a request sent with a callback (cleared first: it may send the next)
                        done, self.done = self.done, None
                        assert done is not None
                        done(pdu, None)
            buf = buf[end:]
        if buf:
            if self.future is not None or self.done is not None:
                self.rx = True
            self.buf = buf
        else:
            self.buf = b""

    @property
    def pending(self) -> bool:
        return self.future is not None or self.done is not None

    def _settle(self, pdu: bytes | None, exc: ExchangeError | None = None) -> None:
        """The pending request's outcome, to its future or its callback."""
        fut = self.future
        if fut is not None:
            self.future = None
            if not fut.done():
                if exc is None:
                    fut.set_result(pdu)
                else:
                    fut.set_exception(exc)
            return
        done = self.done
        if done is not None:   # cleared first: the callback may send the next request
            self.done = None
            done(pdu, exc)

    def _settle_error(self, exc: ExchangeError) -> None:
        self._settle(None, exc)


class TcpRequester:
    """One column's connection. `await connect()`, then read_input / write_single /
    write_multiple or send_read_input / send_write_single, one request at a time (the adapter
    serialises them: the column's task, or its poll slot)."""

    def __init__(self, host: str, port: int, timer: CoarseTimer | None = None) -> None:
        self.host = host
        self.port = port
        self._timer = timer   # reply timeouts on the adapter's shared grid (None: a loop timer each)
        self._link: _Link | None = None
        self._tid = 0
        self._reads: dict[tuple[int, int], bytes] = {}   # (address, count) -> the request's PDU
        self.exchanges = 0
        self.failures: dict[str, int] = {}
        # The request sent with a callback (one at a time): its callback, argument, check.
        self._done: Done | None = None
        self._arg: Any = None
        self._expect = 0          # FC04: registers; FC06: the value written
        self._address = 0         # FC06: the address written
        self._on_read = self._read_settled          # bound once: the link calls them per request
        self._on_write = self._write_settled

    @property
    def connected(self) -> bool:
        link = self._link
        return link is not None and link.transport is not None

    async def connect(self) -> bool:
        self.close()
        loop = asyncio.get_running_loop()
        try:
            _transport, link = await loop.create_connection(_Link, self.host, self.port)
        except OSError as exc:
            log.debug("connect to %s:%d failed: %s", self.host, self.port, exc)
            return False
        self._link = link
        return True

    def close(self) -> None:
        link, self._link = self._link, None
        if link is not None and link.transport is not None:
            with contextlib.suppress(Exception):
                link.transport.abort()
            link.connection_lost(None)

    def _fail(self, reason: str, detail: str = "") -> ExchangeError:
        self.failures[reason] = self.failures.get(reason, 0) + 1
        return ExchangeError(reason, detail)

    async def _exchange(self, unit: int, fc: int, frame_tail: bytes, timeout_s: float) -> bytes:
        """Send one request (MBAP header + `frame_tail` = fc and the rest) and return the
        reply's PDU; raises ExchangeError."""
        link = self._link
        if link is None or link.transport is None:
            raise self._fail(REASON_DISCONNECTED)
        if link.pending:
            raise RuntimeError("a request is already pending on this connection")
        self.exchanges += 1
        self._tid = tid = (self._tid + 1) & 0xFFFF
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bytes] = loop.create_future()
        link.tid, link.fc, link.unit, link.future, link.rx = tid, fc, unit, fut, False
        link.transport.write(_HEADER.pack(tid, 0, len(frame_tail) + 1, unit) + frame_tail)
        shared = self._timer
        timer = None
        if shared is not None:
            shared.call_later(loop, timeout_s, _expire, fut)   # a no-op once the reply is in
        else:
            timer = loop.call_later(timeout_s, _expire, fut)
        try:
            return await fut
        except _Expired:
            link.future = None
            raise self._fail(REASON_GARBLED if link.rx else REASON_TIMEOUT) from None
        except ExchangeError as exc:
            raise self._fail(exc.reason, exc.detail) from None
        finally:
            if link.future is fut:   # cancelled while waiting: the next request starts clean
                link.future = None
            if timer is not None:
                timer.cancel()

    # -- requests with a callback ---------------------------------------------------------
    def send_read_input(self, unit: int, address: int, count: int, done: Done, arg: Any) -> int:
        """FC04, not awaited: `done(arg, registers, None)` or `done(arg, None, error)` later (at
        once when there is no connection). Returns the transaction id for :meth:`expire` (-1:
        not sent)."""
        return self._send(unit, FC_READ_INPUT, address, count, settled=self._on_read, done=done, arg=arg)

    def send_write_single(self, unit: int, address: int, value: int, done: Done, arg: Any) -> int:
        """FC06, not awaited, confirmed by its echo: `done(arg, None, None)` or `done(arg, None, error)`."""
        self._address = address
        return self._send(unit, FC_WRITE_SINGLE, address, value, settled=self._on_write, done=done,
                          arg=arg)

    def expire(self, tid: int) -> None:
        """The deadline of the request `tid` sent with a callback: if it is still pending, it
        failed (timeout, or garbled when part of a frame came back); a reply after this is ignored."""
        link = self._link
        if link is not None and link.done is not None and link.tid == tid:
            settled, link.done = link.done, None
            settled(None, ExchangeError(REASON_GARBLED if link.rx else REASON_TIMEOUT))

    def _send(self, unit: int, fc: int, word1: int, word2: int, *,
              settled: Callable[[bytes | None, ExchangeError | None], None], done: Done, arg: Any) -> int:
        link = self._link
        if link is None or link.transport is None:
            done(arg, None, self._fail(REASON_DISCONNECTED))
            return -1
        if link.future is not None or link.done is not None:
            raise RuntimeError("a request is already pending on this connection")
        self.exchanges += 1
        self._tid = tid = (self._tid + 1) & 0xFFFF
        self._done, self._arg, self._expect = done, arg, word2
        link.tid, link.fc, link.unit, link.done, link.rx = tid, fc, unit, settled, False
        link.transport.write(_REQUEST.pack(tid, 0, 6, unit, fc, word1, word2))
        return tid

    def _take_done(self, exc: ExchangeError | None) -> tuple[Done, Any, ExchangeError | None]:
        """The sent request's callback and argument, cleared (the callback may send the next
        request), and its failure counted."""
        done, arg = self._done, self._arg
        self._done = self._arg = None
        assert done is not None
        return done, arg, None if exc is None else self._fail(exc.reason, exc.detail)

    def _read_settled(self, pdu: bytes | None, exc: ExchangeError | None) -> None:
        done, arg, failure = self._take_done(exc)
        if pdu is None:
            done(arg, None, failure)
            return
        count = self._expect
        if len(pdu) != 2 + 2 * count or pdu[1] != 2 * count:
            detail = "%d bytes for %d registers" % (len(pdu) - 2, count)
            done(arg, None, self._fail(REASON_WRONG_LENGTH, detail))
            return
        done(arg, _registers(count).unpack_from(pdu, 2), None)

    def _write_settled(self, pdu: bytes | None, exc: ExchangeError | None) -> None:
        done, arg, failure = self._take_done(exc)
        if pdu is None:
            done(arg, None, failure)
        elif len(pdu) != 5 or _ECHO.unpack_from(pdu, 1) != (self._address, self._expect):
            done(arg, None, self._fail(REASON_WRONG_LENGTH, "echo %s" % pdu[1:].hex()))
        else:
            done(arg, None, None)

    # -- awaited requests ------------------------------------------------------------------
    async def read_input(self, unit: int, address: int, count: int, timeout_s: float) -> tuple[int, ...]:
        """FC04: `count` input registers from `address`."""
        request = self._reads.get((address, count))
        if request is None:   # the poll asks the same every time: built once
            request = self._reads[(address, count)] = _READ.pack(FC_READ_INPUT, address, count)
        pdu = await self._exchange(unit, FC_READ_INPUT, request, timeout_s)
        if len(pdu) < 2 or pdu[1] != 2 * count or len(pdu) != 2 + 2 * count:
            raise self._fail(REASON_WRONG_LENGTH, "%d bytes for %d registers" % (len(pdu) - 2, count))
        return _registers(count).unpack_from(pdu, 2)

    async def write_single(self, unit: int, address: int, value: int, timeout_s: float) -> None:
        """FC06, confirmed by its echo of address and value."""
        request = _READ.pack(FC_WRITE_SINGLE, address, value)   # same shape as a read request
        pdu = await self._exchange(unit, FC_WRITE_SINGLE, request, timeout_s)
        if len(pdu) != 5 or _ECHO.unpack_from(pdu, 1) != (address, value):
            raise self._fail(REASON_WRONG_LENGTH, "echo %s" % pdu[1:].hex())

    async def write_multiple(self, unit: int, address: int, values: Sequence[int], timeout_s: float) -> None:
        """FC16, confirmed by its echo of start and count."""
        n = len(values)
        body = struct.pack(">BHHB%dH" % n, FC_WRITE_MULTIPLE, address, n, 2 * n, *values)
        pdu = await self._exchange(unit, FC_WRITE_MULTIPLE, body, timeout_s)
        if len(pdu) != 5 or _ECHO.unpack_from(pdu, 1) != (address, n):
            raise self._fail(REASON_WRONG_LENGTH, "echo %s" % pdu[1:].hex())


class _Expired(Exception):
    pass


def _expire(fut: asyncio.Future[bytes]) -> None:
    if not fut.done():
        fut.set_exception(_Expired())
