"""Import mappings: data files saying how a source becomes a trace.

A mapping is a TOML (or JSON) table with a `name`, an `importer` ("csv" or
"acn-sessions") and the importer's settings. The ready mappings live next to this
file as `<name>.toml`; `load_mapping` takes such a name or the path of a user's own
mapping file.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from hil.trace.format import TraceImportError

_HERE = Path(__file__).resolve().parent
IMPORTERS = ("csv", "acn-sessions")


class MappingError(TraceImportError):
    """A mapping that is malformed or does not fit its source; names the mapping and the key."""


def ready_mappings() -> list[str]:
    """Names of the mappings shipped with the harness."""
    return sorted(p.stem for p in _HERE.glob("*.toml"))


def load_mapping(name_or_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping table for a ready mapping name or a mapping file (.toml or .json).

    The result always has `name` (the file's stem if the file gives none) and a known
    `importer`. Raises MappingError for an unknown name, an unreadable or malformed file.
    """
    text = str(name_or_path)
    ready = _HERE / (text + ".toml")
    if "/" not in text and not text.endswith((".toml", ".json")):
        if not ready.is_file():
            raise MappingError("unknown mapping %r: ready mappings are %s, or give a .toml/.json mapping file"
                               % (text, ", ".join(ready_mappings())))
        path = ready
    else:
        path = Path(text)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise MappingError("cannot read mapping file %s: %s" % (path, exc.strerror or exc)) from None
    try:
        if path.suffix == ".json":
            table = json.loads(raw)
        else:
            table = tomllib.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MappingError("mapping file %s is not valid %s: %s"
                           % (path, "JSON" if path.suffix == ".json" else "TOML", exc)) from None
    if not isinstance(table, dict):
        raise MappingError("mapping file %s must hold a table" % path)
    table.setdefault("name", path.stem)
    if not isinstance(table["name"], str):
        raise MappingError("mapping file %s: 'name' must be a string" % path)
    if table.get("importer") not in IMPORTERS:
        raise MappingError("mapping %r: 'importer' must be one of %s, got %r"
                           % (table["name"], ", ".join(IMPORTERS), table.get("importer")))
    return table


class Section:
    """Typed access to one table of a mapping, with errors naming the mapping and key.

    `Section(mapping_name, "csv", table).get("delimiter", str, ",")`; `done()` rejects
    keys nobody asked for, so a typo in a mapping file is an error, not a silent default.
    """

    def __init__(self, mapping: str, where: str, table: Any) -> None:
        self.mapping = mapping
        self.where = where
        if not isinstance(table, dict):
            raise self.error("must be a table")
        self.table: dict[str, Any] = table
        self._used: set[str] = set()

    def error(self, problem: str, key: str | None = None) -> MappingError:
        place = self.where + ("." + key if key else "") if self.where else (key or "")
        return MappingError("mapping %r: %s%s" % (self.mapping, place + ": " if place else "", problem))

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = None, *,
            required: bool = False) -> Any:
        self._used.add(key)
        if key not in self.table:
            if required:
                raise self.error("missing (required)", key)
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error("must be %s, got %r" % (names, value), key)
        return value

    def done(self) -> None:
        unknown = sorted(set(self.table) - self._used)
        if unknown:
            raise self.error("unknown key%s %s" % ("s" if len(unknown) > 1 else "",
                                                   ", ".join(repr(k) for k in unknown)))
