"""Fixtures for real parts: a mosquitto broker, serial line pairs, free loopback ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hil.rig.broker import Broker, Listener
from hil.rig.certs import Pki, make_pki
from hil.rig.ports import free_port as _free_port
from hil.rig.serial_pair import SerialPair


@pytest.fixture
def free_port() -> Callable[[], int]:
    return _free_port


@pytest.fixture
def serial_pair() -> Iterator[SerialPair]:
    with SerialPair() as pair:
        yield pair


@pytest.fixture
def mqtt_broker(tmp_path: Path) -> Iterator[Broker]:
    """A plain (anonymous) listener on a free loopback port."""
    with Broker([Listener("plain")], workdir=tmp_path / "broker") as broker:
        yield broker


@dataclass
class SecureBroker:
    broker: Broker
    pki: Pki
    users: dict[str, str]


SECURE_USERS = {"gateway-site1": "gw-pass-1", "dno": "dno-pass-1"}
SECURE_ACL = """\
user gateway-site1
topic write evedge/v1/site1/#
topic read evedge/v1/site1/cmd/#

user dno
topic read evedge/v1/+/#
topic write evedge/v1/+/cmd/#
"""


@pytest.fixture
def secure_broker(tmp_path: Path) -> Iterator[SecureBroker]:
    """Three listeners: plain, TLS with client certificates, password + ACL."""
    pki = make_pki(tmp_path / "pki", ("gateway-site1", "dno"))
    workdir = tmp_path / "broker"
    workdir.mkdir()
    listeners = [Listener("plain"), Listener("tls", tls=pki.server),
                 Listener("auth", users=dict(SECURE_USERS), acl=SECURE_ACL)]
    with Broker(listeners, workdir=workdir) as broker:
        yield SecureBroker(broker, pki, dict(SECURE_USERS))
