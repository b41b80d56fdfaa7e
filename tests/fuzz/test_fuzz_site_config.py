"""site-config: the gateway's site file loader on hypothesis-mutated TOML.

The harness (fuzz/targets/site_config.py) fails the test when load_config (or the site
part's loader) raises anything but ConfigError / SiteConfigError with named problems, or
accepts a column rated outside 6..80 A.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fuzz_support import EXAMPLES, Fuzzed, damaged, open_harness
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz.engine import REPO
from fuzz.targets.site_config import HOSTILE_TOML

EXAMPLE = (REPO / "examples" / "site.toml").read_bytes()
VALUE_LINES = [i for i, line in enumerate(EXAMPLE.split(b"\n")) if re.match(rb"^[a-z_]+ *=", line)]


@pytest.fixture(scope="module")
def site() -> Iterator[Fuzzed]:
    yield from open_harness("site-config")


toml_values = (st.sampled_from(HOSTILE_TOML)
               | st.integers(-(2**70), 2**70).map(lambda i: str(i).encode())
               | st.floats().map(lambda f: repr(f).encode())
               | st.text(max_size=12).map(lambda t: ('"%s"' % t.replace("\\", "").replace('"', "")).encode()))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(VALUE_LINES), toml_values), min_size=1, max_size=4))
def test_any_value_in_any_key_is_a_named_error_or_a_valid_site(site: Fuzzed,
                                                               changes: list[tuple[int, bytes]]) -> None:
    _target, harness = site
    lines = EXAMPLE.split(b"\n")
    for i, value in changes:
        key = lines[i].split(b"=", 1)[0]
        lines[i] = key + b"= " + value
    harness.run(b"\n".join(lines))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_damaged_site_files(site: Fuzzed, data: st.DataObject) -> None:
    target, harness = site
    harness.run(data.draw(damaged(target.seeds(), max_ops=3)))


@pytest.mark.parametrize("text", [EXAMPLE.replace(b"# Example site", b"# Example site \xe9t\xe9"),
                                  EXAMPLE.replace(b'"secrets/dno-keys"', b'"' + b"k" * 300 + b'"')])
def test_unreadable_names_and_bytes_are_config_errors(site: Fuzzed, text: bytes) -> None:
    _target, harness = site
    label = harness.run(text)
    assert label is not None and ("not UTF-8" in label or "cannot check" in label), label
