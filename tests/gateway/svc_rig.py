"""Rig for the gateway service tests: an RS-485 bus joining several virtual columns, site files
with generated secrets, the gateway as a subprocess, and a DNO client on the broker.

The parts live in hil/rig/ (the site demo uses them too); this module gathers them for the
tests and adds the tests' waiting helpers. Everything started is stopped by the code that
started it (by its own handle or PID).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from hil.rig.bus_relay import BusRelay
from hil.rig.dno_client import DnoClient, Received, on
from hil.rig.firmware_proc import REPO
from hil.rig.gateway_proc import GatewayProcess
from hil.rig.site_files import KEY_ID, new_key, toml_text, toml_value, write_secrets

__all__ = ["KEY_ID", "REPO", "BusRelay", "DnoClient", "GatewayProcess", "Received", "new_key", "offered_da",
           "on", "toml_text", "toml_value", "wait_until", "write_secrets"]


def wait_until(what: str, pred: Callable[[], Any], timeout_s: float, poll_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last: {last!r})")


def offered_da(columns: Iterable[Any]) -> dict[str, int]:
    """Each virtual column's pilot offer in deci-amps, by column id."""
    return {c.config["column_id"]: int(c.outputs().get("offered_da", -1)) for c in columns}
