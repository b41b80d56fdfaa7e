"""A board carries the TCP link code of its own link mode only: the TCP transport
(firmware/tcp_link.py) on both TCP modes, with Modbus TCP's server (firmware/modbus_tcp.py) on
modbus-tcp and the CBOR link's (firmware/cbor_tcp.py) on cbor-tcp, and none of it on a serial
board, whose RAM and flash they would only take. The CPython stand-ins for MicroPython-only
names (firmware/cpython.py) are on no board."""

from __future__ import annotations

import pytest

from tools.firmware_build import bundle_names

TCP_LINK = "firmware/tcp_link.mpy"
MODBUS_TCP = "firmware/modbus_tcp.mpy"
CBOR_TCP = "firmware/cbor_tcp.mpy"
CPYTHON = "firmware/cpython.mpy"


@pytest.mark.parametrize(("mode", "tcp_link", "modbus_tcp", "cbor_tcp"), [
    ("modbus-rtu", False, False, False),
    ("modbus-tcp", True, True, False),
    ("cbor-serial", False, False, False),
    ("cbor-tcp", True, False, True),
])
def test_only_a_tcp_board_carries_the_tcp_link(mode: str, tcp_link: bool, modbus_tcp: bool,
                                               cbor_tcp: bool) -> None:
    names = bundle_names(mode)
    assert (TCP_LINK in names) == tcp_link
    assert (MODBUS_TCP in names) == modbus_tcp
    assert (CBOR_TCP in names) == cbor_tcp
    assert CPYTHON not in names
