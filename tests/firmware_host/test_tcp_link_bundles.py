"""A board carries the TCP link code of its own link mode only: Modbus TCP and its server
(firmware/modbus_tcp.py) on modbus-tcp, the CBOR link's TCP server (firmware/tcp_link.py)
on cbor-tcp, and neither on a serial board, whose RAM and flash they would only take."""

from __future__ import annotations

import pytest

from tools.firmware_build import bundle_names

TCP_LINK = "firmware/tcp_link.mpy"
MODBUS_TCP = "firmware/modbus_tcp.mpy"


@pytest.mark.parametrize(("mode", "tcp_link", "modbus_tcp"), [
    ("modbus-rtu", False, False),
    ("modbus-tcp", False, True),
    ("cbor-serial", False, False),
    ("cbor-tcp", True, False),
])
def test_only_a_tcp_board_carries_the_tcp_link(mode: str, tcp_link: bool, modbus_tcp: bool) -> None:
    names = bundle_names(mode)
    assert (TCP_LINK in names) == tcp_link
    assert (MODBUS_TCP in names) == modbus_tcp
