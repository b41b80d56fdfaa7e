"""trace: the HIL trace reader (hil/trace/format.py TraceReader, summarise) on damaged traces.

Input: the bytes of a trace file (a CBOR sequence written by TraceWriter). Properties:
reading it through (and `summarise`, what `hil info` prints) either succeeds or raises
TraceError whose message names the byte offset it carries; nothing else escapes
(truncation, corrupt CBOR, lengths claiming gigabytes, nesting, absurd timestamps); the
records read are declared channels with non-decreasing times; no input hangs the reader.
"""

from __future__ import annotations

import io
import json
import random
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cbor2

from fuzz import mutate
from fuzz.engine import Finding, Harness, Target
from hil.cli_trace import info_text
from hil.trace import TraceError, TraceReader, TraceWriter, declare, make_header, summarise

START = 1_702_819_500_000


def _trace(records: Sequence[tuple[int, str, Any]], *, layout: bool = True, close: bool = True,
           channels: Sequence[tuple[str, str | None]] | None = None) -> bytes:
    chans = dict(declare(base, col) for base, col in (channels or (
        ("pilot.offered_a", "c1"), ("meter.current_a", "c1"), ("ev.state", "c1"), ("ev.event", "c1"),
        ("dno.limit", None), ("site.power_w", None), ("power.cut", "c2"), ("link.fault", None),
        ("meter.energy_wh", "c2"))))
    lay = {"site": {"name": "fuzz"}, "columns": [{"id": "c1", "phases": 3}, {"id": "c2", "phases": 1}]}
    buf = io.BytesIO()
    w = TraceWriter(buf, make_header("fuzz seed", START, chans, layout=lay if layout else None,
                                     meta={"by": "fuzz"}))
    for rec in records:
        w.write(*rec)
    if close:
        w.close()
    else:
        w.abort()
    return buf.getvalue()


RECORDS = [
    (0, "c1/ev.state", "A"), (0, "c1/pilot.offered_a", 16.0),
    (500, "c1/ev.event", {"type": "plug", "energy_wh": 1.5e4}),
    (1000, "c1/ev.state", "C"), (1000, "c1/meter.current_a", [15.5, 15.25, 0.0]),
    (2000, "dno.limit", {"limit_kw": 11.0, "validity_s": 900, "id": "cmd-1"}),
    (2000, "site.power_w", 10_750.5), (3500, "c2/power.cut", {"duration_ms": 2000}),
    (3600, "link.fault", {"kind": "corrupt", "duration_ms": 50}),
    (4000, "c1/pilot.offered_a", 6), (2**40, "c2/meter.energy_wh", 123456.0),
]


def _items(data: bytes) -> list[Any] | None:
    """The trace's CBOR items, or None if it does not decode."""
    out = []
    fp = io.BytesIO(data)
    dec = cbor2.CBORDecoder(fp)
    try:
        while fp.tell() < len(data):
            out.append(dec.decode())
    except Exception:
        return None
    return out


def _encode(items: Sequence[Any], fix_end: bool) -> bytes:
    """Items back to bytes; with fix_end the end marker's count and CRC are made right again,
    so a change inside gets past the checksum and reaches the checks behind it."""
    body = bytearray()
    for item in items:
        out = item
        if fix_end and isinstance(item, dict) and "end" in item:
            out = {"end": True, "records": len(items) - 2, "crc32": zlib.crc32(bytes(body))}
        body += cbor2.dumps(out, canonical=True)
    return bytes(body)


def mutate_items(rng: random.Random, data: bytes) -> bytes:
    items = _items(data)
    if not items:
        return mutate.mutate_bytes(rng, data)
    k = rng.randrange(6)
    i = rng.randrange(len(items))
    if k == 0:
        keys = ("format", "version", "channels", "start_utc_ms", "kind", "unit", "column", "layout", "end",
                "records", "crc32")
        items[i] = mutate.mutate_tree(rng, items[i], keys)
    elif k == 1 and len(items) > 2:   # records swapped (time goes backwards)
        j = rng.randrange(1, len(items))
        items[i], items[j] = items[j], items[i]
    elif k == 2:
        del items[i]
    elif k == 3:
        items.insert(i, mutate.hostile_value(rng) if rng.random() < 0.5 else items[i])
    elif k == 4 and isinstance(items[0], dict):   # a header field at an edge
        start = rng.choice((-1, 0, 2**31, 2**53, 2**62, 2**64, 10**30, -(10**20)))
        items[0] = dict(items[0], start_utc_ms=start)
    else:
        items.append(mutate.deep(rng, rng.choice((10, 100, 1000))) if rng.random() < 0.5
                     else [rng.choice((0, 10**20, -5)), "c1/ev.state", "B"])
    try:
        return _encode(items, fix_end=rng.random() < 0.7)
    except Exception:   # cbor2 refuses to encode some of what it decoded (recursion)
        return data


# Heads claiming huge lengths (byte and text strings, arrays, maps), indefinite ones, tags.
HUGE_HEADS = (b"\x5b\x7f\xff\xff\xff\xff\xff\xff\xff", b"\x7a\xff\xff\xff\xff",
              b"\x9b\x00\x00\x00\x10\x00\x00\x00\x00", b"\xbb\x7f\xff\xff\xff\xff\xff\xff\xff", b"\x9f",
              b"\xbf", b"\x5f", b"\xc2\x5a\x7f\xff\xff\xff", b"\xd9\xd9\xf7", b"\xff", b"\xf7", b"\xfc",
              b"\x1f")


class TraceHarness(Harness[bytes]):
    def run(self, value: bytes) -> str | None:
        try:
            with TraceReader(io.BytesIO(value)) as reader:
                last = 0
                for rec in reader:
                    if rec.channel not in reader.channels or not isinstance(rec.t_ms, int) or rec.t_ms < last:
                        raise Finding("reader yielded %r after t=%d" % (rec, last))
                    last = rec.t_ms
            summary = summarise(io.BytesIO(value))
            info_text(summary)                      # what `hil info` prints ...
            json.dumps(summary, default=str)        # ... and `hil info --json`
        except TraceError as exc:
            message = str(exc)
            if exc.offset is None or "byte offset %d" % exc.offset not in message:
                raise Finding("TraceError without its byte offset: %s" % message[:300]) from None
            return message
        return None


class TraceTarget(Target[bytes]):
    name = "trace"
    about = "hil/trace/format.py TraceReader and summarise on corrupt and truncated traces"

    def seeds(self) -> list[bytes]:
        whole = _trace(RECORDS)
        return [whole, _trace(RECORDS[:3], layout=False), _trace([]), _trace(RECORDS[:5], close=False),
                _trace([(t, "c1/pilot.offered_a", float(t % 33)) for t in range(0, 2000, 10)])]

    def mutate(self, rng: random.Random, value: bytes, corpus: Sequence[bytes]) -> bytes:
        r = rng.random()
        if r < 0.4:
            return mutate_items(rng, value)
        if r < 0.8:
            return mutate.mutate_bytes(rng, value, max_len=1 << 16)
        if r < 0.88:
            return value[:rng.randrange(len(value) + 1)]   # a recording cut off
        if r < 0.96:
            i = rng.randrange(len(value) + 1)
            return value[:i] + rng.choice(HUGE_HEADS) + value[i:]
        return mutate.splice(rng, value, rng.choice(corpus))

    def harness(self, workdir: Path) -> Harness[bytes]:
        return TraceHarness()


TARGET = TraceTarget()
