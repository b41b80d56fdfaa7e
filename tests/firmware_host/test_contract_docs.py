"""docs/firmware-contract.md is rendered from the firmware's own tables and kept current."""

from __future__ import annotations

from firmware import messages_tables, regmap_tables
from tools import contract_docs


def test_contract_doc_is_up_to_date() -> None:
    assert contract_docs.main(["--check"]) == 0, "run: python -m tools.contract_docs"


def test_every_register_appears_in_the_rendered_doc() -> None:
    text = contract_docs.render()
    tables = (*regmap_tables.input_map(), *regmap_tables.holding_map(), *regmap_tables.broadcast_map())
    for name, address, *_ in tables:
        assert f"| 0x{address:04X} |" in text and f"| {name} |" in text


def test_every_message_and_field_appears_in_the_rendered_doc() -> None:
    text = contract_docs.render()
    for action, _sender, request, result in messages_tables.ACTIONS:
        assert f"| {action} |" in text
        for name, *_ in (*request, *result):
            assert f"`{name}`" in text
