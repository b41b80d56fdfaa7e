"""column-config: the firmware's config loader and validator on hypothesis-made column.json.

The harness (fuzz/targets/column_config.py) fails the test when load_config raises, names
no key in an error, keeps a bad value in the cleaned config, or accepts ratings above the
hardware rating (or a failsafe above the installation rating).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import pytest
from fuzz_support import EXAMPLES, Fuzzed, damaged, open_harness
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz.engine import REPO

EXAMPLE = json.loads((REPO / "examples" / "column.json").read_text())
RATINGS = ("hardware_rating_a", "installation_rating_a", "failsafe_a")


@pytest.fixture(scope="module")
def cfg() -> Iterator[Fuzzed]:
    yield from open_harness("column-config")


scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=10)
           | st.sampled_from((0, 5, 6, 6.0, 25, 32, 79.9, 80, 80.0, 80.01, 81, 247, 248)))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=5)


def dumps(data: Any) -> bytes:
    return json.dumps(data).encode()   # NaN and Infinity too: CPython's json reads them back


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.dictionaries(st.sampled_from([*sorted(EXAMPLE), "meter", "link", "x"]), values, max_size=4),
       st.lists(st.sampled_from(sorted(EXAMPLE)), max_size=2))
def test_changed_keys_are_named_or_the_config_is_safe(cfg: Fuzzed, changes: dict[str, Any],
                                                      dropped: list[str]) -> None:
    _target, harness = cfg
    data = dict(EXAMPLE, **changes)
    for key in dropped:
        data.pop(key, None)
    harness.run(dumps(data))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.floats(0, 100) | st.integers(0, 100), st.floats(0, 100) | st.integers(0, 100),
       st.floats(0, 100) | st.integers(0, 100))
def test_ratings_above_the_hardware_rating_are_refused(cfg: Fuzzed, hw: float, inst: float,
                                                       fs: float) -> None:
    _target, harness = cfg
    label = harness.run(dumps(dict(EXAMPLE, hardware_rating_a=hw, installation_rating_a=inst, failsafe_a=fs)))
    ok = 6 <= inst <= hw <= 80 and (fs == 0 or 6 <= fs <= inst) and math.isfinite(hw)
    assert (label is None) == ok, (hw, inst, fs, label)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_damaged_config_files(cfg: Fuzzed, data: st.DataObject) -> None:
    target, harness = cfg
    harness.run(data.draw(damaged(target.seeds())))
