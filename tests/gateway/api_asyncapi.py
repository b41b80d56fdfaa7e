"""docs/asyncapi.yaml as a validator: which channel a topic is on, and whether a payload is one
of that channel's messages. Schemas are JSON Schema draft 7 (the AsyncAPI 3.0 schema format)
and `$ref`s inside the document are resolved against the document itself."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

REPO = Path(__file__).resolve().parents[2]
ASYNCAPI = REPO / "docs" / "asyncapi.yaml"
_URI = "urn:evedge:asyncapi"


def deref(doc: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def walk_refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from walk_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk_refs(item)


@dataclass(frozen=True)
class Channel:
    name: str
    address: str
    spec: dict[str, Any]
    messages: dict[str, dict[str, Any]]   # message name -> message object (refs resolved)

    @property
    def pattern(self) -> re.Pattern[str]:
        parts = re.split(r"(\{[A-Za-z]+\})", self.address)
        regex = "".join("([^/]+)" if p.startswith("{") else re.escape(p) for p in parts)
        if self.address.endswith("{replyId}"):   # a response topic may have several levels
            regex = regex[: -len("([^/]+)")] + "(.+)"
        return re.compile(regex)

    def fill(self, **params: str) -> str:
        return re.sub(r"\{([A-Za-z]+)\}", lambda m: params[m.group(1)], self.address)


class AsyncApi:
    def __init__(self, path: Path = ASYNCAPI) -> None:
        self.doc: dict[str, Any] = yaml.safe_load(path.read_text())
        self._registry = Registry().with_resource(_URI, Resource(contents=self.doc, specification=DRAFT7))

    @cached_property
    def channels(self) -> dict[str, Channel]:
        out = {}
        for name, spec in self.doc["channels"].items():
            messages = {mname: deref(self.doc, m["$ref"]) for mname, m in spec["messages"].items()}
            out[name] = Channel(name, spec["address"], spec, messages)
        return out

    def operations_on(self, channel: str) -> list[dict[str, Any]]:
        return [op for op in self.doc["operations"].values()
                if op["channel"]["$ref"] == f"#/channels/{channel}"]

    def channel_for(self, topic: str) -> Channel:
        found = [c for c in self.channels.values() if c.pattern.fullmatch(topic)]
        assert len(found) == 1, f"{topic}: matches channels {[c.name for c in found]}"
        return found[0]

    def validator(self, schema_ref: str) -> jsonschema.protocols.Validator:
        return jsonschema.Draft7Validator({"$ref": f"{_URI}{schema_ref}"}, registry=self._registry)

    def schema(self, name: str) -> dict[str, Any]:
        return self.doc["components"]["schemas"][name]  # type: ignore[no-any-return]

    def payload_ref(self, message: dict[str, Any]) -> str:
        return str(message["payload"]["$ref"])

    def errors(self, schema_ref: str, payload: Any) -> list[str]:
        return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in self.validator(schema_ref).iter_errors(payload)]

    def validate_message(self, topic: str, payload: bytes | Any) -> str:
        """Raise AssertionError unless `payload` (bytes are parsed as JSON) is one of the
        messages of the channel `topic` is on; returns the message name."""
        obj = json.loads(payload) if isinstance(payload, bytes | bytearray) else payload
        channel = self.channel_for(topic)
        problems = {}
        for name, message in channel.messages.items():
            errs = self.errors(self.payload_ref(message), obj)
            if not errs:
                return name
            problems[name] = errs
        raise AssertionError(f"{topic}: payload {obj!r} matches no message of {channel.name}: {problems}")

    def message_by(self, key: str, value: str) -> dict[str, Any]:
        found = [m for m in self.doc["components"]["messages"].values() if m.get(key) == value]
        assert len(found) == 1, f"{key}={value}: {len(found)} messages"
        return found[0]
