"""The fuzz harnesses silence the gateway's and pymodbus's loggers (a hostile input logs a
warning each time, which would swamp a 10^6-input run); in the test process that must not
outlive the test, or later tests that read the logs see nothing."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

SILENCED = ("gateway", "pymodbus")


@pytest.fixture(autouse=True, scope="module")
def _restore_logger_levels() -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in SILENCED}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
