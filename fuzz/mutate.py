"""Byte and value mutators shared by the targets: cheap, deterministic per random.Random.

Nothing here knows a format; targets stack these on their own structure-aware steps (a
CRC fixed after the change, a value swapped inside a JSON object) so that mutants get past
the first check often enough to reach the code behind it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

# Values at the edges of the ranges the code under test checks (registers, amps, lengths).
INTERESTING_U8 = (0x00, 0x01, 0x02, 0x03, 0x04, 0x06, 0x10, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1F, 0x20,
                  0x3F, 0x40, 0x7D, 0x7E, 0x7F, 0x80, 0x81, 0x83, 0x84, 0x90, 0x9F, 0xA0, 0xBF, 0xC5,
                  0xD9, 0xF4, 0xF5, 0xF6, 0xF7, 0xF9, 0xFA, 0xFB, 0xFE, 0xFF)
INTERESTING_U16 = (0, 1, 2, 5, 6, 7, 8, 9, 59, 60, 100, 122, 123, 124, 125, 126, 247, 248, 255, 256,
                   0x0100, 0x01F7, 0x01F8, 799, 800, 801, 1024, 1025, 0x7FFF, 0x8000, 0xA5A5, 0xFFFE,
                   0xFFFF, 86400 & 0xFFFF)
INTERESTING_NUMBERS: tuple[Any, ...] = (
    0, 1, -1, 5, 6, 6.0, 7.5, 16, 32, 32.5, 80, 80.0, 80.1, 81, 100, 247, 248, 65535, 65536, 86400, 86401,
    2**31 - 1, 2**31, 2**53, 2**53 + 1, 2**63, 2**64, 10**30, 10**400, -(10**400), -(2**63), 1e308, -1e308,
    1e-320, 0.1, 1e16,
    1e-5, -0.0, float("nan"), float("inf"), float("-inf"), True, False, None, "", "16", "NaN", [], {},
)


def flip_bit(rng: random.Random, b: bytearray) -> None:
    if b:
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)


def set_byte(rng: random.Random, b: bytearray) -> None:
    if b:
        b[rng.randrange(len(b))] = rng.choice(INTERESTING_U8) if rng.random() < 0.5 else rng.randrange(256)


def set_u16(rng: random.Random, b: bytearray) -> None:
    if len(b) >= 2:
        i = rng.randrange(len(b) - 1)
        v = rng.choice(INTERESTING_U16)
        if rng.random() < 0.5:
            b[i], b[i + 1] = v >> 8, v & 0xFF
        else:
            b[i], b[i + 1] = v & 0xFF, v >> 8


def insert_bytes(rng: random.Random, b: bytearray) -> None:
    i = rng.randrange(len(b) + 1)
    n = rng.choice((1, 1, 1, 2, 3, 4, 8, 16))
    b[i:i] = bytes(rng.choice(INTERESTING_U8) if rng.random() < 0.3 else rng.randrange(256) for _ in range(n))


def delete_bytes(rng: random.Random, b: bytearray) -> None:
    if b:
        i = rng.randrange(len(b))
        del b[i:i + rng.choice((1, 1, 2, 3, 4, 8))]


def duplicate_range(rng: random.Random, b: bytearray) -> None:
    if b:
        i = rng.randrange(len(b))
        j = min(len(b), i + rng.randrange(1, 17))
        k = rng.randrange(len(b) + 1)
        b[k:k] = b[i:j]


def truncate(rng: random.Random, b: bytearray) -> None:
    if b:
        del b[rng.randrange(len(b)):]


def swap_bytes(rng: random.Random, b: bytearray) -> None:
    if len(b) >= 2:
        i, j = rng.randrange(len(b)), rng.randrange(len(b))
        b[i], b[j] = b[j], b[i]


BYTE_OPS: tuple[Callable[[random.Random, bytearray], None], ...] = (
    flip_bit, flip_bit, set_byte, set_byte, set_u16, insert_bytes, delete_bytes, duplicate_range, truncate,
    swap_bytes)


def mutate_bytes(rng: random.Random, data: bytes, max_ops: int = 4, max_len: int = 4096) -> bytes:
    """1..max_ops stacked byte-level changes (more small ones than big ones)."""
    b = bytearray(data)
    for _ in range(1 + int(rng.random() ** 2 * max_ops)):
        rng.choice(BYTE_OPS)(rng, b)
    return bytes(b[:max_len])


def splice(rng: random.Random, a: bytes, b: bytes) -> bytes:
    """The head of one input and the tail of another."""
    return a[:rng.randrange(len(a) + 1)] + b[rng.randrange(len(b) + 1):]


# -- JSON-like values ---------------------------------------------------------------------

def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    """A value of any JSON-ish type, biased to the edges: wrong types, huge, NaN, nested."""
    r = rng.random()
    if r < 0.55:
        return rng.choice(INTERESTING_NUMBERS)
    if r < 0.7:
        return rng.uniform(-1e3, 1e3) if rng.random() < 0.5 else rng.randint(-(10**6), 10**6)
    if r < 0.8:
        return rng.choice(("", "x", "sdm630", "modbus-rtu", "cbor-tcp", "A" * 300, "\u00e9\u20ac\U0001f600",
                           "\x00", "0x10", "1e3", "c01", "../x", "evedge/v1"))
    if depth >= 3:
        return None
    if r < 0.9:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(("a", "limit_a", "id", "", "x" * 70)): hostile_value(rng, depth + 1)
            for _ in range(rng.randrange(3))}


def deep(rng: random.Random, depth: int) -> Any:
    """Nesting far beyond anything legitimate (recursion and memory bounds)."""
    value: Any = rng.choice((0, "x", None))
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


def deep_json(rng: random.Random, depth: int) -> str:
    """JSON text nested `depth` levels (built as text: the encoder would recurse)."""
    kind = rng.randrange(3)
    if kind == 0:
        return "[" * depth + "0" + "]" * depth
    if kind == 1:
        return '{"k":' * depth + "0" + "}" * depth
    return '[{"k":' * (depth // 2) + "0" + "}]" * (depth // 2)


def mutate_tree(rng: random.Random, value: Any, keys: Sequence[str] = ()) -> Any:
    """A copy of a JSON-like tree with one change: a value replaced, a key dropped or added."""
    if isinstance(value, dict):
        out = dict(value)
        r = rng.random()
        if not out or r < 0.15:
            out[rng.choice(keys) if keys and rng.random() < 0.7 else rng.choice(("x", "", "ID", "extra"))] = \
                hostile_value(rng)
            return out
        key = rng.choice(list(out))
        if r < 0.3:
            del out[key]
        elif r < 0.75 or not isinstance(out[key], dict | list):
            out[key] = hostile_value(rng)
        else:
            out[key] = mutate_tree(rng, out[key], keys)
        return out
    if isinstance(value, list):
        out_list = list(value)
        if not out_list or rng.random() < 0.3:
            out_list.insert(rng.randrange(len(out_list) + 1), hostile_value(rng))
        else:
            i = rng.randrange(len(out_list))
            out_list[i] = mutate_tree(rng, out_list[i], keys) if rng.random() < 0.5 else hostile_value(rng)
        return out_list
    return hostile_value(rng)
