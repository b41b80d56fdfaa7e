"""Segment-level mutation steps the segment-input targets share (modbus-fw, cbor-fw, cbor-gw):
an input is a list of bursts (fuzz.fw.common); each target picks among these with its own
odds and adds its protocol's own steps."""

from __future__ import annotations

import random
from collections.abc import Sequence

from fuzz.fw import common
from fuzz.fw.common import QUIET

Part = tuple[int, bytes]


def flip_flags(rng: random.Random, flags: int) -> int:
    """Any flags at all, or one flag bit changed."""
    return rng.randrange(256) if rng.random() < 0.3 else flags ^ (1 << rng.randrange(6))


def split(rng: random.Random, parts: list[Part], i: int) -> None:
    """One burst in two with no quiet between: a frame across reads (len(body) > 1)."""
    flags, body = parts[i]
    k = rng.randrange(1, len(body))
    parts[i:i + 1] = [(flags & ~QUIET, body[:k]), (flags, body[k:])]


def splice(rng: random.Random, parts: list[Part], corpus: Sequence[bytes]) -> None:
    """A burst of another input, anywhere."""
    other = common.segments(rng.choice(corpus))
    if other:
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(other))
