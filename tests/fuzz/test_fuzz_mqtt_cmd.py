"""mqtt-cmd: hostile DNO command messages into GatewayService.handle_command.

The harness (fuzz/targets/mqtt_cmd.py) fails the test when handle_command raises, when a
message gets other than exactly one ack with a reason code and one audit line, when a
rejected message changes a limit or a setting, or when an accepted one was not signed with
the site's key for its topic, is outside the time window, expired, replayed or out of range.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
from fuzz_support import EXAMPLES, Fuzzed, open_harness
from hypothesis import given, settings
from hypothesis import strategies as st

from fuzz.targets.mqtt_cmd import HOSTILE_TOPICS, NOW_MS, SIGN_MODES, _topic


@pytest.fixture(scope="module")
def cmd() -> Iterator[Fuzzed]:
    yield from open_harness("mqtt-cmd")


scalars = (st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.integers(-(10**400), 10**400)
           | st.floats() | st.text(max_size=10)
           | st.sampled_from((NOW_MS, NOW_MS + 60_000, 0, 40, 100, 100.01, 7.4, 900, 86400, 86401, "dno-1")))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=12), inner, max_size=3), max_leaves=5)
bodies = st.fixed_dictionaries(
    {"id": st.just("dno-1") | values, "issued_ms": st.just(NOW_MS) | values},
    optional={"validity_s": st.just(600) | values, "valid_until_ms": st.just(NOW_MS + 60_000) | values,
              "limit_a": st.floats(0, 120) | values, "limit_kw": values, "duration_s": values,
              "config": st.dictionaries(st.sampled_from(("random_delay_max_s", "telemetry_interval_s",
                                                         "failsafe_duration_s", "x")), values, max_size=3),
              "key_id": values, "sig": values, "extra": values})
topics_ = (st.sampled_from([_topic("limit"), _topic("failsafe"), _topic("config"), _topic("column", "c01"),
                            _topic("column", "c06")])
           | st.sampled_from(HOSTILE_TOPICS) | st.text(max_size=60))
messages = st.fixed_dictionaries(
    {"topic": topics_, "body": bodies, "sign": st.sampled_from(SIGN_MODES)},
    optional={"flip": st.lists(st.lists(st.integers(0, 300), min_size=2, max_size=2), max_size=2),
              "rt": st.text(max_size=20) | st.just("dno/replies/x")})


@settings(max_examples=150, deadline=None)   # each example is a few messages through the whole path
@given(st.lists(messages, min_size=1, max_size=3), st.integers(-400_000, 400_000))
def test_hostile_commands_change_nothing_and_get_a_reason(cmd: Fuzzed,
                                                          msgs: list[dict[str, Any]], clock_ms: int) -> None:
    _target, harness = cmd
    harness.run({"clock_ms": clock_ms, "messages": msgs})


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data())
def test_mutated_commands(cmd: Fuzzed, data: st.DataObject) -> None:
    target, harness = cmd
    value = data.draw(st.sampled_from(target.seeds()))
    rng_seed = data.draw(st.integers(0, 2**32))
    harness.run(target.mutate(random.Random(rng_seed), value, target.seeds()))


@pytest.mark.parametrize(("sign", "raw", "reason"), [
    ("none", None, "unauthenticated"),
    ("badkey", None, "bad_signature"),
    ("unknown", None, "unknown_key"),
    ("othertopic", None, "bad_signature"),
    ("good", '{"id": "x", "limit_a": NaN}', "not_finite"),
    ("good", '{"a": 1, "a": 2}', "bad_json"),
])
def test_each_refusal_says_why(cmd: Fuzzed, sign: str, raw: str | None,
                               reason: str) -> None:
    _target, harness = cmd
    msg: dict[str, Any] = {"topic": _topic("limit"), "sign": sign,
                           "body": {"id": "dno-1", "issued_ms": NOW_MS, "validity_s": 600, "limit_a": 40}}
    if raw is not None:
        msg["raw"] = raw
    label = harness.run({"clock_ms": 0, "messages": [msg]})
    assert label is not None and label.startswith(reason + ":"), label
