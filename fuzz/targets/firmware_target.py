"""What the firmware fuzz targets share: inputs are bursts of segments (fuzz.fw.common),
mutated one to three rounds at a time, and run through a MicroPython-compatible harness
from fuzz/fw/ whose own Finding is turned into the engine's."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from fuzz.engine import Finding, Harness, Target
from fuzz.fw import common


class FirmwareSide(Protocol):
    def run(self, value: bytes) -> str | None: ...


class FirmwareHarness(Harness[bytes]):
    """A MicroPython-compatible firmware harness run in process; its Finding becomes ours."""

    def __init__(self, inner: FirmwareSide) -> None:
        self.inner = inner

    def run(self, value: bytes) -> str | None:
        try:
            return self.inner.run(value)
        except common.Finding as exc:
            raise Finding(str(exc)) from None


class FirmwareTarget(Target[bytes]):
    """A subclass names its seeds, its segment mutation and its fuzz/fw harness."""

    micropython = True
    seed_inputs: Callable[[], list[bytes]]
    mutate_segments: Callable[[random.Random, bytes, Sequence[bytes]], bytes]
    make_side: Callable[[str], FirmwareSide]

    def seeds(self) -> list[bytes]:
        return type(self).seed_inputs()

    def mutate(self, rng: random.Random, value: bytes, corpus: Sequence[bytes]) -> bytes:
        step = type(self).mutate_segments
        for _ in range(1 + int(rng.random() ** 2 * 3)):
            value = step(rng, value, corpus)
        return value

    def harness(self, workdir: Path) -> Harness[bytes]:
        return FirmwareHarness(type(self).make_side(str(workdir)))
