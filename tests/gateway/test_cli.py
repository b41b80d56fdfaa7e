"""`python -m gateway`: check-config and run as a user meets them, as real processes.

User errors end with exit code 2 and one line per problem on stderr, never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.gateway.svc_rig import REPO, new_key, write_secrets

EXAMPLE = REPO / "examples" / "site.toml"


def gateway(*args: str, timeout_s: float = 20.0) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout_s, check=False)


@pytest.fixture
def example(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    shutil.copy(EXAMPLE, path)
    write_secrets(tmp_path, new_key(), password="generated-for-this-test")
    return path


def assert_user_error(result: subprocess.CompletedProcess[str]) -> list[str]:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    return result.stderr.splitlines()


def test_check_config_passes_the_example(example: Path) -> None:
    result = gateway("check-config", str(example))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip() == (
        f"{example}: ok: site 'depot-1', 6 columns (1 cbor-serial, 1 cbor-tcp, 3 modbus-rtu, 1 modbus-tcp), "
        "3 circuits, broker 127.0.0.1:1883")


def test_check_config_names_every_broken_key_of_the_example(example: Path) -> None:
    text = example.read_text()
    for old, new in [("capacity_a = 100 ", "capacity_a = -5 "), ("address = 2\n", "address = 300\n"),
                     ("hardware_a = 16\n", "hardware_a = 100\n"), ("keepalive_s = 30", "keepalive_s = 2"),
                     ("[gateway]", "[gateway]\nspeed = 2")]:
        assert old in text
        text = text.replace(old, new, 1)
    example.write_text(text + "\n[mqqt]\nhost = \"x\"\n")
    lines = assert_user_error(gateway("check-config", str(example)))
    assert lines == [f"{example}: {line}" for line in [
        "mqqt: unknown table (expected one of: site, circuits, columns, buses, meter, allocation, mqtt, dno, "
        "gateway)",
        "site.capacity_a: must be above 0 to 10000, got -5",
        "columns[1].address: must be from 1 to 247, got 300",
        "columns[5].hardware_a: must be from 6 to 80, got 100",
        "mqtt.keepalive_s: must be an integer 5..3600, got 2",
        "gateway.speed: unknown key (expected one of: control_interval_s, telemetry_interval_s, "
        "poll_period_s, heartbeat_period_s, limit_validity_s, response_timeout_s)",
    ]] + [f"{example}: 6 errors"]


def test_check_config_without_the_secrets_says_which_file_is_missing(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "site.toml")
    lines = assert_user_error(gateway("check-config", str(tmp_path / "site.toml")))
    secrets = tmp_path / "secrets"
    assert lines[0].endswith("mqtt.password_file: file not found: " + str(secrets / "mqtt-password"))
    assert lines[1].endswith("dno.keys_file: file not found: " + str(secrets / "dno-keys"))


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    lines = assert_user_error(gateway("check-config", str(tmp_path / "missing.toml")))
    assert len(lines) == 2 and "cannot read: No such file or directory" in lines[0]
    bad = tmp_path / "bad.toml"
    bad.write_text("[site\n")
    lines = assert_user_error(gateway("check-config", str(bad)))
    assert "not valid TOML" in lines[0]


def test_run_refuses_a_broken_config_before_starting(example: Path) -> None:
    (example.parent / "secrets" / "dno-keys").chmod(0o644)
    lines = assert_user_error(gateway("run", "--config", str(example)))
    assert len(lines) == 1 and "dno.keys_file:" in lines[0] and "chmod 600" in lines[0]


def test_run_reports_an_outbox_it_cannot_open_in_one_line(example: Path) -> None:
    """A folder where the outbox file should be: the service cannot start, and says why."""
    outbox = example.parent / "outbox"
    outbox.mkdir()
    text = example.read_text().replace("/var/lib/evedge/outbox.sqlite3", str(outbox))
    text = text.replace("/var/lib/evedge/dno-audit.jsonl", str(example.parent / "audit.jsonl"))
    example.write_text(text)
    lines = assert_user_error(gateway("run", "--config", str(example), "--log-level", "error"))
    assert len(lines) == 1 and "outbox" in lines[0], lines


@pytest.mark.parametrize("args", [(), ("run",), ("run", "--config"), ("check-config",), ("launch",),
                                  ("run", "--config", "x.toml", "--log-level", "loud")])
def test_usage_errors_are_one_line(args: tuple[str, ...]) -> None:
    lines = assert_user_error(gateway(*args))
    assert len(lines) == 1 and lines[0].startswith("python -m gateway"), lines


def test_help_lists_both_commands() -> None:
    result = gateway("--help")
    assert result.returncode == 0
    assert "run" in result.stdout and "check-config" in result.stdout


def test_logs_are_json_lines(tmp_path: Path, example: Path) -> None:
    """A warning from the loaded config is logged as one JSON object per line on stderr."""
    text = example.read_text().replace("heartbeat_period_s = 10 ", "heartbeat_period_s = 30 ")
    text = text.replace("/var/lib/evedge/outbox.sqlite3", str(tmp_path / "outbox"))   # fails: a folder
    (tmp_path / "outbox").mkdir()
    example.write_text(text)
    result = gateway("run", "--config", str(example))
    assert result.returncode == 2
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert logged and logged[0]["level"] == "warning" and logged[0]["logger"] == "gateway"
    assert logged[0]["msg"].startswith("config: gateway.heartbeat_period_s:")
    assert set(logged[0]) >= {"ts", "level", "logger", "msg"}


# -- the systemd unit ------------------------------------------------------------------------

UNIT = REPO / "deploy" / "evedge-gateway.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_runs_the_cli_as_a_restarted_unprivileged_service() -> None:
    s = unit_settings()
    assert s["Type"] == ["simple"] and s["Restart"] == ["always"]
    assert s["User"] == ["evedge"] and s["Group"] == ["evedge"]
    assert s["ExecStart"] == ["/opt/evedge/.venv/bin/python -m gateway run --config /etc/evedge/site.toml "
                              "--log-level info"]
    assert s["ExecStartPre"] == ["/opt/evedge/.venv/bin/python -m gateway check-config /etc/evedge/site.toml"]
    assert s["KillSignal"] == ["SIGTERM"]
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "RestrictSUIDSGID", "LockPersonality"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"] and s["CapabilityBoundingSet"] == [""]
    assert s["StateDirectory"] == ["evedge"]   # the example's outbox and audit paths live there
    example = EXAMPLE.read_text()
    assert "/var/lib/evedge/outbox.sqlite3" in example and "/var/lib/evedge/dno-audit.jsonl" in example


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/opt/evedge/.venv/bin/python", sys.executable))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True,
                            timeout=30, check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr
