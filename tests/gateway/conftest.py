"""Fixtures shared by the gateway tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from hil.rig.certs import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA, the broker's certificate and the gateway's client certificate (CN gw-site-1)."""
    made = make_pki(tmp_path_factory.mktemp("pki"), ("gw-site-1",))
    client = made.clients["gw-site-1"]
    return {"ca": made.cafile, "server_cert": made.server.certfile, "server_key": made.server.keyfile,
            "client_cert": client.certfile, "client_key": client.keyfile}
