"""Render docs/firmware-contract.md from the firmware's own contract definitions.

The register map (firmware/regmap.py), the status vocabulary (firmware/status.py) and the
CBOR message set (firmware/messages.py) are defined once, in the firmware; this renders
their tables so the document can never drift. `python -m tools.contract_docs` rewrites
the file; `--check` exits 1 when it is out of date (a test runs the check).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from firmware import frames, messages, messages_tables, regmap, regmap_tables, status_names

REPO = Path(__file__).resolve().parents[1]
TARGET = REPO / "docs" / "firmware-contract.md"


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return lines


def _hex(addr: int) -> str:
    return f"0x{addr:04X}"


def _ranged(rows: Iterable[tuple[str, int, int, str, int, int, str]]) -> list[str]:
    return _table(("address", "words", "name", "encoding", "valid range", "meaning"),
                  ((_hex(a), w, n, e, f"{lo}..{hi}", d) for n, a, w, e, lo, hi, d in rows))


def _registers() -> list[str]:
    out = ["## Modbus register map (column = slave)", "",
           "Every register is an unsigned 16-bit word, big-endian; 32-bit values take two words,",
           "high word first. `_da` = 0.1 A, `_dv` = 0.1 V. Unit id = the column's bus address.", "",
           "### Input registers (function 04)", ""]
    out += _table(("address", "words", "name", "encoding", "meaning"),
                  ((_hex(a), w, n, e, d) for n, a, w, e, d in regmap_tables.input_map()))
    out += ["", "### Holding registers (function 03 read, 06/16 write)", ""]
    out += _ranged(regmap_tables.holding_map())
    out += ["", "A value outside its range is refused with exception 03 and nothing is stored.", "",
            "`column_id` holds the config's column id in ASCII, two characters a word, high byte",
            "first, zero-padded. It never changes while the column runs, so the gateway polls only",
            "0x0000..0x%04X (`POLL_COUNT` = %d registers); the commissioning tool reads the id."
            % (regmap.POLL_COUNT - 1, regmap.POLL_COUNT), "",
            "Changing the bus address (commissioning, `python -m tools.commission set-address`):",
            "write `new_address` and `address_confirm` together (function 16 at 0x0007, 2 registers;",
            "or function 06 to each, the confirm last), nothing else in the same write. The column",
            "checks the confirm, validates its config with the new `bus_address` and saves it",
            "atomically, answers the write from its old address, and from then on answers on the",
            "new one (no reset needed; it boots on the new one too). A wrong confirm, an address",
            "outside 1..247, a write with other registers or a config that would not validate is",
            "refused with exception 03; a column whose config is broken or cannot be written",
            "answers 04. A refused write changes nothing.", "",
            "### Broadcast limit table (unit id 0, function 16, no reply)", ""]
    out += _ranged(regmap_tables.broadcast_map())
    out += ["", "### Error flag bits (`error_flags`)", ""]
    out += _table(("bit", "name"), enumerate(regmap_tables.FLAG_NAMES))
    return out


def _vocabulary() -> list[str]:
    out = ["## Status vocabulary (firmware/status.py)", "",
           "Registers carry the code; CBOR messages and MQTT carry the name.", ""]
    for title, names in (("Control pilot state", status_names.CP_NAMES),
                         ("Connector status", status_names.STATUS_NAMES),
                         ("Error code", status_names.ERROR_NAMES),
                         ("Limit source", status_names.LIMIT_SOURCE_NAMES)):
        out += [f"### {title}", ""]
        out += _table(("code", "name"), enumerate(names))
        out.append("")
    return out


def _fields(fields: Sequence[tuple[str, str, bool, object]]) -> str:
    if not fields:
        return "(empty)"
    return "<br>".join(f"`{name}` {messages.describe(kind, arg)}{'' if required else ' (optional)'}"
                       for name, kind, required, arg in fields)


def _messages() -> list[str]:
    out = ["## CBOR message link (firmware/messages.py)", "",
           "Frames are OCPP-J shaped and CBOR-encoded: call `[2, id, action, payload]`, result",
           "`[3, id, payload]`, error `[4, id, errorCode, description, details]`; ids are integers",
           f"0..{messages.MAX_ID}. On serial and TCP alike each frame is `0xC5 | LEN (2, big-endian)",
           "| CBOR payload | CRC-16/MODBUS over LEN+payload (2, low byte first)`, payload at most",
           f"{frames.MAX_PAYLOAD} bytes.", ""]
    rows = [(action, "column" if sender == messages.FROM_COLUMN else "gateway", _fields(request),
             _fields(result)) for action, sender, request, result in messages_tables.ACTIONS]
    out += _table(("action", "sent by", "request payload", "result payload"), rows)
    out += ["", "Error codes: " + ", ".join(f"`{c}`" for c in messages.ERROR_CODES) + "."]
    return out


def render() -> str:
    lines = ["# Firmware contract", "",
             "Generated by `python -m tools.contract_docs` from the firmware's own definitions;",
             "do not edit by hand. The gateway and the HIL import these definitions from",
             "`firmware/`, so this page, the firmware and its peers always agree.", ""]
    lines += [*_registers(), "", *_vocabulary(), *_messages()]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.contract_docs", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(REPO)} is out of date: run python -m tools.contract_docs",
                  file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
