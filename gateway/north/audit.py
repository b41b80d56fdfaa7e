"""Security log of DNO command decisions: append-only JSON lines, rotated by size.

One line per command received, accepted or rejected:

    {"ts_ms": 1767225600000, "decision": "rejected", "reason": "bad_signature",
     "id": "c-17", "topic": "evedge/v1/site-1/cmd/site/limit", "key_id": "dno-1",
     "detail": "signature does not match"}

plus, when known, "kind", "limit_a", "limit_kw", "issued_ms", "valid_until_ms" and
"applied_limit_a". It is built from an auth.Decision field by field: the signature,
the payload and any key are never written. Each line is flushed and fsync'd before
record() returns (commands are rare; the log must survive a power cut). When a line
would take the file past max_bytes the file is renamed to <name>.1 (older ones
shift to .2 ... .<backups>, the oldest is deleted) and a new file is started.

It is also the gateway's durable record of what the DNO ordered: read_decisions() gives
a restarted gateway the accepted commands, so that it goes on obeying those still valid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from gateway.north.auth import Decision
from gateway.north.payloads import utc_ms


class AuditLog:
    """Append-only audit file. Use as a context manager or call close()."""

    def __init__(self, path: Path, *, max_bytes: int = 1_000_000, backups: int = 5,
                 fsync: bool = True, clock_ms: Callable[[], int] = utc_ms) -> None:
        if max_bytes < 1024:
            raise ValueError("max_bytes must be >= 1024")
        if backups < 1:
            raise ValueError("backups must be >= 1 (rotation must not discard the live log)")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._fsync = fsync
        self._clock_ms = clock_ms
        self.lines_written = 0
        self._file: IO[bytes] | None = None
        self._open()

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "ab")
        self._size = os.fstat(fd).st_size

    def _rotate(self) -> None:
        assert self._file is not None
        self._file.close()
        for n in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._open()

    def record(self, decision: Decision, *, applied_limit_a: float | None = None,
               ts_ms: int | None = None) -> dict[str, Any]:
        """Write one decision; returns the entry written (for tests and structured logs)."""
        entry: dict[str, Any] = {
            "ts_ms": self._clock_ms() if ts_ms is None else ts_ms,
            "decision": "accepted" if decision.accepted else "rejected",
            "reason": str(decision.reason),
            "id": decision.command_id,
            "topic": decision.topic,
            "key_id": decision.key_id,
        }
        if decision.detail:
            entry["detail"] = decision.detail[:256]
        cmd = decision.command
        if cmd is not None:
            entry.update({"kind": str(cmd.kind), "issued_ms": cmd.issued_ms,
                          "valid_until_ms": cmd.valid_until_ms})
            for name in ("limit_a", "limit_kw", "duration_s"):
                value = getattr(cmd, name)
                if value is not None:
                    entry[name] = value
            if cmd.config is not None:
                entry["config"] = dict(cmd.config)
        if applied_limit_a is not None:
            entry["applied_limit_a"] = applied_limit_a
        self._write(entry)
        return entry

    def _write(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
                + "\n").encode("ascii")
        if self._size > 0 and self._size + len(line) > self.max_bytes:
            self._rotate()
        assert self._file is not None
        self._file.write(line)
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())
        self._size += len(line)
        self.lines_written += 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_decisions(path: Path, backups: int = 5) -> list[dict[str, Any]]:
    """Every decision still on disk, oldest first (<name>.<backups> .. <name>.1, then the
    live file). A line that does not parse (torn by a power cut) is skipped."""
    path = Path(path)
    files = [path.with_name(f"{path.name}.{n}") for n in range(backups, 0, -1)] + [path]
    out: list[dict[str, Any]] = []
    for f in files:
        try:
            text = f.read_bytes().decode("ascii", "replace")
        except OSError:
            continue
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                out.append(entry)
    return out
