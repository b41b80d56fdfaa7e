"""The MQTT topic tree: the one place that knows its shape (build, parse, subscribe).

    evedge/v1/<site_id>/gateway/state                      retained birth/will: online/offline
    evedge/v1/<site_id>/telemetry                          site telemetry
    evedge/v1/<site_id>/events                             site (gateway) events
    evedge/v1/<site_id>/columns/<column_id>/status         retained column status
    evedge/v1/<site_id>/columns/<column_id>/telemetry      column telemetry
    evedge/v1/<site_id>/columns/<column_id>/events         column events
    evedge/v1/<site_id>/cmd/site/limit                     DNO site limit
    evedge/v1/<site_id>/cmd/site/failsafe                  DNO site failsafe limit
    evedge/v1/<site_id>/cmd/columns/<column_id>/limit      DNO column limit
    evedge/v1/<site_id>/cmd/config                         DNO remote settings
    evedge/v1/<site_id>/ack                                acks (when no MQTT 5 response topic)

The version level changes only for incompatible changes; a gateway ignores other
versions. Site and column ids are 1-64 characters of [A-Za-z0-9_.-] starting with a letter
or digit, so they can never contain MQTT wildcards, level separators or `$`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from gateway.north.payloads import CommandKind, Reason

ROOT = "evedge"
API_VERSION = "v1"
PREFIX = f"{ROOT}/{API_VERSION}"
MAX_ID_LEN = 64
MAX_TOPIC_LEN = 256
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}" % (MAX_ID_LEN - 1))


class TopicKind(StrEnum):
    GATEWAY_STATE = "gateway_state"
    SITE_TELEMETRY = "site_telemetry"
    SITE_EVENTS = "site_events"
    COLUMN_STATUS = "column_status"
    COLUMN_TELEMETRY = "column_telemetry"
    COLUMN_EVENTS = "column_events"
    CMD_SITE_LIMIT = "cmd_site_limit"
    CMD_SITE_FAILSAFE = "cmd_site_failsafe"
    CMD_COLUMN_LIMIT = "cmd_column_limit"
    CMD_CONFIG = "cmd_config"
    ACK = "ack"


_COL = None  # marks the <column_id> level in a layout
# Levels after evedge/v1/<site_id>/ for each kind: the tree, defined once.
_LAYOUT: dict[TopicKind, tuple[str | None, ...]] = {
    TopicKind.GATEWAY_STATE: ("gateway", "state"),
    TopicKind.SITE_TELEMETRY: ("telemetry",),
    TopicKind.SITE_EVENTS: ("events",),
    TopicKind.COLUMN_STATUS: ("columns", _COL, "status"),
    TopicKind.COLUMN_TELEMETRY: ("columns", _COL, "telemetry"),
    TopicKind.COLUMN_EVENTS: ("columns", _COL, "events"),
    TopicKind.CMD_SITE_LIMIT: ("cmd", "site", "limit"),
    TopicKind.CMD_SITE_FAILSAFE: ("cmd", "site", "failsafe"),
    TopicKind.CMD_COLUMN_LIMIT: ("cmd", "columns", _COL, "limit"),
    TopicKind.CMD_CONFIG: ("cmd", "config"),
    TopicKind.ACK: ("ack",),
}
COMMAND_KINDS: dict[TopicKind, CommandKind] = {
    TopicKind.CMD_SITE_LIMIT: CommandKind.SITE_LIMIT,
    TopicKind.CMD_SITE_FAILSAFE: CommandKind.SITE_FAILSAFE,
    TopicKind.CMD_COLUMN_LIMIT: CommandKind.COLUMN_LIMIT,
    TopicKind.CMD_CONFIG: CommandKind.CONFIG,
}
RETAINED = frozenset({TopicKind.GATEWAY_STATE, TopicKind.COLUMN_STATUS})


class TopicError(ValueError):
    """A topic outside the tree; `reason` is what an ack for it says."""

    def __init__(self, detail: str, reason: Reason = Reason.UNKNOWN_TOPIC) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def valid_id(value: str) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def _check_id(what: str, value: str) -> None:
    if not valid_id(value):
        raise TopicError(f"{what} must be 1-{MAX_ID_LEN} characters of [A-Za-z0-9_.-], "
                         f"starting with a letter or digit")


@dataclass(frozen=True)
class Topic:
    """A topic of the tree, typed. `str(topic)` is the wire form."""

    kind: TopicKind
    site_id: str
    column_id: str | None = None

    def __post_init__(self) -> None:
        _check_id("site id", self.site_id)
        if _COL in _LAYOUT[self.kind]:
            if self.column_id is None:
                raise TopicError(f"{self.kind} needs a column id")
            _check_id("column id", self.column_id)
        elif self.column_id is not None:
            raise TopicError(f"{self.kind} has no column id")

    def __str__(self) -> str:
        levels = [self.column_id if lvl is _COL else lvl for lvl in _LAYOUT[self.kind]]
        return "/".join((PREFIX, self.site_id, *levels))  # type: ignore[arg-type]

    @property
    def command_kind(self) -> CommandKind | None:
        return COMMAND_KINDS.get(self.kind)

    @property
    def retained(self) -> bool:
        return self.kind in RETAINED


def build(kind: TopicKind, site_id: str, column_id: str | None = None) -> str:
    return str(Topic(kind, site_id, column_id))


def gateway_state(site_id: str) -> str:
    return build(TopicKind.GATEWAY_STATE, site_id)


def site_telemetry(site_id: str) -> str:
    return build(TopicKind.SITE_TELEMETRY, site_id)


def site_events(site_id: str) -> str:
    return build(TopicKind.SITE_EVENTS, site_id)


def column_status(site_id: str, column_id: str) -> str:
    return build(TopicKind.COLUMN_STATUS, site_id, column_id)


def column_telemetry(site_id: str, column_id: str) -> str:
    return build(TopicKind.COLUMN_TELEMETRY, site_id, column_id)


def column_events(site_id: str, column_id: str) -> str:
    return build(TopicKind.COLUMN_EVENTS, site_id, column_id)


def cmd_site_limit(site_id: str) -> str:
    return build(TopicKind.CMD_SITE_LIMIT, site_id)


def cmd_site_failsafe(site_id: str) -> str:
    return build(TopicKind.CMD_SITE_FAILSAFE, site_id)


def cmd_column_limit(site_id: str, column_id: str) -> str:
    return build(TopicKind.CMD_COLUMN_LIMIT, site_id, column_id)


def cmd_config(site_id: str) -> str:
    return build(TopicKind.CMD_CONFIG, site_id)


def ack(site_id: str) -> str:
    return build(TopicKind.ACK, site_id)


def parse(topic: str | bytes) -> Topic:
    """The typed topic, or TopicError saying why it is not one of ours."""
    if isinstance(topic, bytes | bytearray):
        try:
            topic = topic.decode("utf-8")
        except UnicodeDecodeError:
            raise TopicError("not UTF-8") from None
    if not isinstance(topic, str):
        raise TopicError("not a string")
    if not topic or len(topic) > MAX_TOPIC_LEN:
        raise TopicError(f"empty or longer than {MAX_TOPIC_LEN} characters")
    if any(c in topic for c in "+#\x00"):
        raise TopicError("wildcard or NUL in a topic name")
    levels = topic.split("/")
    if "" in levels:
        raise TopicError("empty topic level")
    if len(levels) < 4 or levels[0] != ROOT:
        raise TopicError(f"not under {ROOT}/")
    if levels[1] != API_VERSION:
        raise TopicError(f"unsupported API version {levels[1][:16]!r}")
    site_id, rest = levels[2], levels[3:]
    _check_id("site id", site_id)
    for kind, layout in _LAYOUT.items():
        if len(layout) != len(rest):
            continue
        column_id = None
        for want, got in zip(layout, rest, strict=True):
            if want is _COL:
                column_id = got
            elif want != got:
                break
        else:
            return Topic(kind, site_id, column_id)
    raise TopicError("no such topic in the tree")


def valid_response_topic(topic: object) -> bool:
    """Whether a sender's MQTT 5 response topic is safe to publish an ack on: a topic
    name (no wildcards, NUL or empty levels), not a $-topic, at most MAX_TOPIC_LEN."""
    return (isinstance(topic, str) and 0 < len(topic) <= MAX_TOPIC_LEN
            and not any(c in topic for c in "+#\x00") and not topic.startswith("$")
            and "" not in topic.split("/"))


# -- subscriptions -----------------------------------------------------------------------

def gateway_subscriptions(site_id: str) -> tuple[str, ...]:
    """What a gateway subscribes to: every command topic of its own site.

    The whole cmd/ subtree (not just the known leaves) so that a command sent to a
    misspelt topic still gets an ack saying unknown_topic.
    """
    _check_id("site id", site_id)
    return (f"{PREFIX}/{site_id}/cmd/#",)


def consumer_subscriptions(site_id: str = "+", *, share_group: str | None = None,
                           telemetry: bool = True) -> tuple[str, ...]:
    """What a DNO consumer subscribes to for one site (or "+" for all sites).

    share_group puts the filters in an MQTT 5 shared subscription `$share/<group>/...`
    so several consumer processes split the load; a broker does not send retained
    messages to a shared subscription, so a consumer that needs the current
    gateway/column state subscribes to those filters without sharing.
    """
    if site_id != "+":
        _check_id("site id", site_id)
    base = f"{PREFIX}/{site_id}"
    filters = [f"{base}/gateway/state", f"{base}/columns/+/status", f"{base}/events",
               f"{base}/columns/+/events", f"{base}/ack"]
    if telemetry:
        filters += [f"{base}/telemetry", f"{base}/columns/+/telemetry"]
    if share_group is not None:
        _check_id("share group", share_group)
        filters = [f"$share/{share_group}/{f}" for f in filters]
    return tuple(filters)
