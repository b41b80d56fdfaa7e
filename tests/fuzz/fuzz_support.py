"""Shared by the tests/fuzz tests: a target's harness per test module, and inputs that are
a target's seeds with hypothesis-chosen damage."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hypothesis import strategies as st

from fuzz import targets
from fuzz.engine import Harness, Target, scratch_dir

EXAMPLES = 250   # per hypothesis test: a few hundred, the whole folder well under a minute
Fuzzed = tuple[Target[Any], Harness[Any]]   # what each module's fixture gives


def open_harness(name: str) -> Iterator[Fuzzed]:
    """(target, harness) with a scratch folder, closed after the module."""
    target = targets.get(name)
    folder = Path(tempfile.mkdtemp(prefix="fuzz-test-", dir=scratch_dir()))
    harness = target.harness(folder)
    try:
        yield target, harness
    finally:
        harness.close()
        shutil.rmtree(folder, ignore_errors=True)


@st.composite
def damaged(draw: st.DrawFn, seeds: list[bytes], max_ops: int = 4) -> bytes:
    """A seed with a few bytes flipped, inserted, deleted or the tail cut."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, max_ops))):
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "cut")))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete" and data:
            del data[i:i + draw(st.integers(1, 4))]
        elif op == "cut":
            del data[i:]
    return bytes(data)
