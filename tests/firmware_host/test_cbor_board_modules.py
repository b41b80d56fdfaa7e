"""A CBOR board loads three modules for its link (firmware/cbor_wire.py, msg_link.py,
gw_cbor.py) and none of the names host code imports them by (cbor.py, frames.py,
messages.py, cbor_link.py, messages_tables.py): those hold what only host code calls, and
each must stay a view of the board's code, never a second definition of it."""

from __future__ import annotations

import pytest

from firmware import cbor, cbor_link, cbor_wire, frames, gw_cbor, messages, msg_link
from tools.firmware_build import bundle_names

HOST_NAMES = ("cbor", "frames", "messages", "cbor_link", "messages_tables")
BOARD = ("cbor_wire", "msg_link", "gw_cbor")


@pytest.mark.parametrize("mode", ["cbor-serial", "cbor-tcp"])
def test_a_cbor_board_carries_the_three_link_modules_and_no_host_names(mode: str) -> None:
    names = bundle_names(mode)
    for module in BOARD:
        assert f"firmware/{module}.mpy" in names, module
    for module in HOST_NAMES:
        assert f"firmware/{module}.mpy" not in names, module
    assert ("firmware/cbor_tcp.mpy" in names) == (mode == "cbor-tcp")


def test_the_host_names_are_the_board_objects_themselves() -> None:
    # Re-exported, not copied: the gateway's codec, framing and contract are the column's.
    assert cbor.dumps is cbor_wire.dumps and cbor.loads is cbor_wire.loads
    assert cbor.CBORError is cbor_wire.CBORError
    assert frames.FrameReader is cbor_wire.FrameReader and frames.encode_frame is cbor_wire.encode_frame
    assert frames.SYNC == cbor_wire.SYNC and frames.MAX_PAYLOAD == cbor_wire.MAX_PAYLOAD
    for name in ("MessageError", "parse", "validate_payload", "direction", "describe", "ERROR_CODES",
                 "STOP_REASONS", "_SPECS", "_ARGS", "_KINDS", "_RES"):
        assert getattr(messages, name) is getattr(msg_link, name), name
    assert issubclass(cbor_link.Link, msg_link.Link)
    assert gw_cbor.Link is msg_link.Link          # the column runs the board's Link itself
    assert messages.ERROR_CODES == (messages.NOT_IMPLEMENTED, messages.NOT_SUPPORTED,
                                    messages.INTERNAL_ERROR, messages.PROTOCOL_ERROR,
                                    messages.SECURITY_ERROR, messages.FORMATION_VIOLATION,
                                    messages.PROPERTY_CONSTRAINT_VIOLATION,
                                    messages.OCCURRENCE_CONSTRAINT_VIOLATION,
                                    messages.TYPE_CONSTRAINT_VIOLATION, messages.GENERIC_ERROR)

