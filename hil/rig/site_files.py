"""Files a gateway site needs, written from code: the TOML site file and the DNO key table.

Used by the gateway tests and the site demo. `toml_text` writes just enough TOML for a
site file (tables, sub-tables, arrays of tables, scalars, lists); secrets are generated
fresh per run and written with mode 600, as examples/site.toml asks.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

KEY_ID = "dno-test"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def toml_text(doc: Mapping[str, Any]) -> str:
    """Enough TOML for a site file: tables, sub-tables, arrays of tables, scalars, lists."""
    lines: list[str] = []

    def table(name: str, body: Mapping[str, Any], header: str) -> None:
        lines.append(header)
        subs = []
        for key, value in body.items():
            if isinstance(value, Mapping):
                subs.append((key, value))
            else:
                lines.append(f"{key} = {toml_value(value)}")
        lines.append("")
        for key, value in subs:
            table(f"{name}.{key}", value, f"[{name}.{key}]")

    for name, body in doc.items():
        if isinstance(body, list):
            for item in body:
                table(name, item, f"[[{name}]]")
        else:
            table(name, body, f"[{name}]")
    return "\n".join(lines) + "\n"


def new_key() -> bytes:
    """A fresh 256-bit DNO command key."""
    return secrets.token_bytes(32)


def write_secrets(folder: Path, key: bytes, *, password: str | None = None, key_id: str = KEY_ID) -> None:
    """secrets/dno-keys (and secrets/mqtt-password) with mode 600, as the example asks."""
    sec = folder / "secrets"
    sec.mkdir(parents=True, exist_ok=True)
    keys = sec / "dno-keys"
    keys.write_text(f"{key_id}:{key.hex()}\n")
    keys.chmod(0o600)
    if password is not None:
        pw = sec / "mqtt-password"
        pw.write_text(password + "\n")
        pw.chmod(0o600)
