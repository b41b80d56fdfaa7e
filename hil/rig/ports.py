"""Free loopback ports, so parallel runs never fight over a fixed number."""

from __future__ import annotations

import socket

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port that is free on `host` right now (loopback only)."""
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise ValueError(f"refusing non-loopback host {host!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
