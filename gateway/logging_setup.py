"""Structured logs: one JSON object per line on stderr (journald and log shippers read them as is).

    {"ts": "2026-01-05T10:00:00.123Z", "level": "info", "logger": "gateway.service",
     "msg": "column c01 online", "column_id": "c01"}

Fields passed with ``extra={...}`` are added to the object (names that clash with the
record's own are prefixed with ``x_``); an exception adds ``exc`` with the traceback text.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any

LEVELS = ("debug", "info", "warning", "error")
# Attributes every LogRecord has: anything else on a record came from `extra`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
_OWN = frozenset({"ts", "level", "logger", "msg", "exc"})


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + ".%03dZ" % int(record.msecs),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key in _STANDARD or key.startswith("_"):
                continue
            out["x_" + key if key in _OWN else key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False, allow_nan=True)


def setup_logging(level: str = "info", stream: IO[str] | None = None) -> None:
    """Send every logger's records to ``stream`` (stderr) as JSON lines, at ``level`` and above."""
    if level not in LEVELS:
        raise ValueError("log level must be one of " + ", ".join(LEVELS))
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # pymodbus logs every failed exchange at error level: the adapters count and report those.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL if level != "debug" else logging.DEBUG)
