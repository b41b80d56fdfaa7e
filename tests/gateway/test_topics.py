"""The topic tree: exact strings, strict parsing of hostile topics, subscription filters."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from gateway.north import topics
from gateway.north.payloads import CommandKind, Reason
from gateway.north.topics import Topic, TopicError, TopicKind

BUILT = [
    (topics.gateway_state("site-1"), "evedge/v1/site-1/gateway/state"),
    (topics.site_telemetry("site-1"), "evedge/v1/site-1/telemetry"),
    (topics.site_events("site-1"), "evedge/v1/site-1/events"),
    (topics.column_status("site-1", "c7"), "evedge/v1/site-1/columns/c7/status"),
    (topics.column_telemetry("site-1", "c7"), "evedge/v1/site-1/columns/c7/telemetry"),
    (topics.column_events("site-1", "c7"), "evedge/v1/site-1/columns/c7/events"),
    (topics.cmd_site_limit("site-1"), "evedge/v1/site-1/cmd/site/limit"),
    (topics.cmd_site_failsafe("site-1"), "evedge/v1/site-1/cmd/site/failsafe"),
    (topics.cmd_column_limit("site-1", "c7"), "evedge/v1/site-1/cmd/columns/c7/limit"),
    (topics.cmd_config("site-1"), "evedge/v1/site-1/cmd/config"),
    (topics.ack("site-1"), "evedge/v1/site-1/ack"),
]


@pytest.mark.parametrize(("built", "expected"), BUILT)
def test_builders_give_the_documented_strings(built: str, expected: str) -> None:
    assert built == expected


@pytest.mark.parametrize(("kind", "column"), [(k, "c.7_x-1" if k.startswith(("column", "cmd_column"))
                                                else None) for k in TopicKind])
def test_every_kind_round_trips(kind: TopicKind, column: str | None) -> None:
    topic = Topic(kind, "Site_01", column)
    parsed = topics.parse(str(topic))
    assert parsed == topic
    assert topics.parse(str(topic).encode()) == topic


def test_command_kinds_and_retained() -> None:
    assert topics.parse("evedge/v1/s/cmd/site/limit").command_kind is CommandKind.SITE_LIMIT
    assert topics.parse("evedge/v1/s/cmd/columns/c1/limit").command_kind is CommandKind.COLUMN_LIMIT
    assert topics.parse("evedge/v1/s/cmd/site/failsafe").command_kind is CommandKind.SITE_FAILSAFE
    assert topics.parse("evedge/v1/s/cmd/config").command_kind is CommandKind.CONFIG
    assert topics.parse("evedge/v1/s/telemetry").command_kind is None
    assert {k for k in TopicKind if Topic(k, "s", "c" if "column" in k else None).retained} == {
        TopicKind.GATEWAY_STATE, TopicKind.COLUMN_STATUS}


HOSTILE = [
    "", "/", "evedge", "evedge/v1", "evedge/v1/site-1",
    "evedge/v1/site-1/cmd/site/limit/",          # trailing empty level
    "/evedge/v1/site-1/cmd/site/limit",          # leading empty level
    "evedge/v1/site-1//cmd/site/limit",          # empty level
    "evedge/v1/+/cmd/site/limit",                # wildcard as site
    "evedge/v1/site-1/cmd/#",
    "evedge/v1/site-1/cmd/columns/+/limit",
    "evedge/v1/site-1/cmd/columns/c+1/limit",    # wildcard inside a level
    "evedge/v2/site-1/cmd/site/limit",           # unknown version
    "EVEDGE/v1/site-1/cmd/site/limit",
    "other/v1/site-1/cmd/site/limit",
    "$SYS/broker/uptime",
    "evedge/v1/$site/cmd/site/limit",
    "evedge/v1/site-1/cmd/site/limits",          # unknown leaf
    "evedge/v1/site-1/cmd/site/limit/extra",
    "evedge/v1/site-1/cmd/columns/limit",        # column level missing
    "evedge/v1/site-1/columns/c1",
    "evedge/v1/site 1/telemetry",                # space in an id
    "evedge/v1/-site/telemetry",                 # id must start with a letter or digit
    "evedge/v1/.site/telemetry",
    f"evedge/v1/{'s' * 65}/telemetry",           # overlong id
    f"evedge/v1/site-1/columns/{'c' * 65}/status",
    "evedge/v1/site-1/tele\x00metry",
    "evedge/v1/sité/telemetry",                  # non-ASCII id
    "evedge/v1/" + "a/" * 130 + "telemetry",     # overlong topic
]


@pytest.mark.parametrize("topic", HOSTILE)
def test_hostile_topics_are_rejected_with_a_reason(topic: str) -> None:
    with pytest.raises(TopicError) as err:
        topics.parse(topic)
    assert err.value.reason is Reason.UNKNOWN_TOPIC
    assert err.value.detail


def test_non_utf8_bytes_are_rejected() -> None:
    with pytest.raises(TopicError):
        topics.parse(b"evedge/v1/s\xff/telemetry")


@pytest.mark.parametrize(("kind", "site", "column"), [
    (TopicKind.SITE_TELEMETRY, "a/b", None), (TopicKind.SITE_TELEMETRY, "+", None),
    (TopicKind.COLUMN_STATUS, "s", None), (TopicKind.SITE_TELEMETRY, "s", "c1"),
    (TopicKind.COLUMN_STATUS, "s", "#"), (TopicKind.COLUMN_STATUS, "s", ""),
])
def test_building_with_bad_ids_raises(kind: TopicKind, site: str, column: str | None) -> None:
    with pytest.raises(TopicError):
        Topic(kind, site, column)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("evdg1/+#$ascolumnitmrypkf-_.\x00é")), max_size=60))
def test_parse_never_fails_other_than_topic_error(text: str) -> None:
    try:
        parsed = topics.parse(text)
    except TopicError:
        return
    assert str(parsed) == text


_ids = st.from_regex(topics.ID_PATTERN, fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(TopicKind)), _ids, _ids)
def test_any_valid_ids_round_trip(kind: TopicKind, site: str, column: str) -> None:
    topic = Topic(kind, site, column if "column" in kind else None)
    assert topics.parse(str(topic)) == topic


def _all_topics(site: str) -> dict[TopicKind, str]:
    return {k: str(Topic(k, site, "c1" if "column" in k else None)) for k in TopicKind}


def test_gateway_subscribes_to_its_commands_only() -> None:
    (flt,) = topics.gateway_subscriptions("site-1")
    for kind, topic in _all_topics("site-1").items():
        assert topic_matches_sub(flt, topic) == (kind in topics.COMMAND_KINDS), kind
    for topic in _all_topics("site-2").values():
        assert not topic_matches_sub(flt, topic)
    # a misspelt command topic still reaches the gateway, which acks unknown_topic
    assert topic_matches_sub(flt, "evedge/v1/site-1/cmd/site/limits")


@pytest.mark.parametrize("site", ["site-1", "+"])
def test_consumer_filters_cover_every_outgoing_topic_and_no_command(site: str) -> None:
    filters = topics.consumer_subscriptions(site)
    for kind, topic in _all_topics("site-1").items():
        matched = any(topic_matches_sub(f, topic) for f in filters)
        assert matched == (kind not in topics.COMMAND_KINDS), kind
    no_tel = topics.consumer_subscriptions(site, telemetry=False)
    assert not any(topic_matches_sub(f, topics.site_telemetry("site-1")) for f in no_tel)
    assert not any(topic_matches_sub(f, topics.column_telemetry("site-1", "c")) for f in no_tel)


def test_shared_consumer_filters() -> None:
    shared = topics.consumer_subscriptions(share_group="dno-ingest")
    assert shared[0] == "$share/dno-ingest/evedge/v1/+/gateway/state"
    assert all(f.startswith("$share/dno-ingest/evedge/v1/+/") for f in shared)
    with pytest.raises(TopicError):
        topics.consumer_subscriptions(share_group="a/b")


@pytest.mark.parametrize(("topic", "ok"), [
    ("dno/replies/42", True), ("evedge/v1/s/ack", True), ("", False), ("dno/+/x", False),
    ("dno/#", False), ("$SYS/x", False), ("a//b", False), ("a/\x00", False), ("x" * 257, False),
    (None, False),
])
def test_response_topic_check(topic: object, ok: bool) -> None:
    assert topics.valid_response_topic(topic) is ok
