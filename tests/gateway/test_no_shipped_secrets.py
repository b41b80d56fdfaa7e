"""No default credentials or keys ship: every file git tracks is scanned for private keys,
DNO command keys, and passwords written into a config, so a site can never come up with a
secret that every other copy of this repository also knows."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from gateway.north.auth import KeyStore

ROOT = Path(__file__).resolve().parents[2]

PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
# A "key id:64 hex digits" line is the DNO key file format (docs/deployment.md).
DNO_KEY_LINE = re.compile(rb"^[\w.-]+:[0-9a-fA-F]{64}\s*$", re.M)
# password = "..." / password: ... / PASSWORD=... with a literal value in a config-like file.
PASSWORD = re.compile(rb"""(?im)^[ \t]*[\w.-]*password[ \t]*[=:][ \t]*["']?([^\s"'#$]{4,})""")
CONFIG_SUFFIXES = {".toml", ".json", ".conf", ".template", ".ini", ".yaml", ".yml", ".env", ".service"}


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout ({exc}): nothing to scan")
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_the_scan_sees_the_repository() -> None:
    names = {p.relative_to(ROOT).as_posix() for p in _tracked()}
    assert {"examples/site.toml", "deploy/mosquitto/site/mosquitto.conf.template"} <= names


def test_no_private_key_or_dno_key_is_tracked() -> None:
    found = []
    for path in _tracked():
        if not path.is_file():
            continue
        data = path.read_bytes()
        if PRIVATE_KEY.search(data) or DNO_KEY_LINE.search(data):
            found.append(path.relative_to(ROOT).as_posix())
    assert found == [], f"secrets committed in: {found}"


def test_no_config_carries_a_literal_password() -> None:
    found = []
    for path in _tracked():
        if path.suffix not in CONFIG_SUFFIXES or not path.is_file():
            continue
        for match in PASSWORD.finditer(path.read_bytes()):
            found.append(f"{path.relative_to(ROOT).as_posix()}: {match.group(0).strip().decode()}")
    assert found == [], found


def test_the_scanners_would_catch_a_committed_secret() -> None:
    """The patterns themselves: a key file line, a PEM key and a password line are caught."""
    key_line = b"dno-1:" + b"ab" * 32 + b"\n"
    assert DNO_KEY_LINE.search(key_line)
    assert KeyStore.parse(key_line.decode()) is not None   # really the format the gateway reads
    pem = b"-----BEGIN EC " + b"PRIVATE KEY-----\nMHc..."   # split: this file is scanned too
    assert PRIVATE_KEY.search(pem)
    assert PASSWORD.search(b'password = "hunter22"\n')
    assert not PASSWORD.search(b'password_file = "secrets/mqtt-password"\n')
    assert not PASSWORD.search(b"password_file /mosquitto/passwd\n")
    assert not PASSWORD.search(b"localPassword:\n  type: string\n")   # a schema, not a value
