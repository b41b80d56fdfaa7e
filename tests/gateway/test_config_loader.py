"""The gateway's site file loader: one TOML file, every section checked, every error named."""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.config import KNOWN_SECTIONS, ConfigError, ServiceSettings, check_config, load_config
from tests.gateway.svc_rig import KEY_ID, new_key, toml_text, write_secrets

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "site.toml"


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """The example copied next to freshly generated secrets, as its comments tell a user to."""
    path = tmp_path / "site.toml"
    shutil.copy(EXAMPLE, path)
    write_secrets(tmp_path, new_key(), password="not-a-default-password")
    return path


def minimal(tmp_path: Path) -> dict[str, Any]:
    write_secrets(tmp_path, new_key())
    return {
        "site": {"id": "s1", "capacity_a": 63},
        "columns": [{"id": "c1", "hardware_a": 32, "link": "modbus-tcp", "host": "10.0.0.3"}],
        "mqtt": {"host": "127.0.0.1", "outbox": {"path": "state/outbox.sqlite3"}},
        "dno": {"keys_file": "secrets/dno-keys", "audit_path": "state/audit.jsonl"},
    }


def errors_of(doc: dict[str, Any], tmp_path: Path) -> list[str]:
    check = check_config(doc, base_dir=tmp_path)
    assert check.config is None
    return list(check.errors)


def test_the_example_passes_once_its_secrets_exist(example: Path) -> None:
    config = load_config(example)
    assert config.site.id == "depot-1"
    assert len(config.site.columns) == 6
    assert config.mqtt.host == "127.0.0.1" and config.mqtt.port == 1883 and config.mqtt.protocol == "5"
    assert config.mqtt.password() == "not-a-default-password"
    assert config.mqtt.password_file == example.parent / "secrets" / "mqtt-password"   # relative to the file
    assert config.dno.load_keys().key_ids == (KEY_ID,)
    assert config.service == ServiceSettings()          # the example shows the defaults
    assert config.warnings == ()
    with open(example, "rb") as f:
        assert set(tomllib.load(f)) == set(KNOWN_SECTIONS)   # the example shows every table


def test_the_example_without_secrets_names_each_missing_file(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "site.toml")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "site.toml")
    assert err.value.errors == [
        "mqtt.password_file: file not found: " + str(tmp_path / "secrets" / "mqtt-password"),
        "dno.keys_file: file not found: " + str(tmp_path / "secrets" / "dno-keys"),
    ]


def test_every_section_reports_in_one_pass(tmp_path: Path) -> None:
    doc = minimal(tmp_path)
    doc["site"]["capacity_a"] = -5
    doc["columns"][0]["address"] = 300
    doc["mqtt"]["port"] = 70000
    doc["dno"]["window_s"] = 0
    doc["gateway"] = {"heartbeat_period_s": 1.5, "telemetry_interval_s": 0, "speed": 3}
    doc["mqqt"] = {"host": "x"}
    errors = errors_of(doc, tmp_path)
    assert errors == [
        "mqqt: unknown table (expected one of: " + ", ".join(KNOWN_SECTIONS) + ")",
        "site.capacity_a: must be above 0 to 10000, got -5",
        "columns[0].address: not used by link 'modbus-tcp'",
        "mqtt.port: must be an integer 1..65535, got 70000",
        "dno.window_s: must be an integer 1..3600, got 0",
        "gateway.heartbeat_period_s: expected an integer, got 1.5",
        "gateway.telemetry_interval_s: must be from 1 to 3600, got 0",
        "gateway.speed: unknown key (expected one of: control_interval_s, telemetry_interval_s, "
        "poll_period_s, heartbeat_period_s, limit_validity_s, response_timeout_s)",
    ]


@pytest.mark.parametrize(("change", "error"), [
    (lambda d: d.pop("mqtt"), "mqtt: missing table [mqtt] (broker, TLS, credentials, outbox)"),
    (lambda d: d.pop("dno"), "dno: missing table [dno] (DNO command keys and audit log)"),
    (lambda d: d["mqtt"].update(password="hunter2"),
     "mqtt.password: secrets do not belong in the site file: use password_file or password_env"),
    (lambda d: d["dno"].update(keys="dno-1:00"), "dno.keys: secrets do not belong in the site file: use "
     "keys_file or keys_env"),
    (lambda d: d["mqtt"].pop("outbox"), "mqtt.outbox: is required (a table with at least path)"),
    (lambda d: d["mqtt"].update(protocl="5"), "mqtt.protocl: unknown key (did you mean 'protocol'?)"),
    (lambda d: d.update(gateway=3), "gateway: expected a table, got int"),
    (lambda d: d.update(gateway={"limit_validity_s": 70000}),
     "gateway.limit_validity_s: must be from 10 to 65535, got 70000"),
    (lambda d: d.update(gateway={"poll_period_s": True}),
     "gateway.poll_period_s: expected a number, got bool True"),
    (lambda d: d.update(gateway={"control_interval_s": float("nan")}),
     "gateway.control_interval_s: must be from 0.1 to 60, got nan"),
])
def test_each_problem_names_its_key(tmp_path: Path, change: Any, error: str) -> None:
    doc = minimal(tmp_path)
    change(doc)
    assert errors_of(doc, tmp_path) == [error]


def test_a_key_file_others_can_read_is_refused_at_check_time(tmp_path: Path) -> None:
    doc = minimal(tmp_path)
    (tmp_path / "secrets" / "dno-keys").chmod(0o644)
    [error] = errors_of(doc, tmp_path)
    assert error.startswith("dno.keys_file: ") and "chmod 600" in error
    (tmp_path / "secrets" / "dno-keys").chmod(0o600)
    (tmp_path / "secrets" / "dno-keys").write_text("dno-1:abcd\n")    # 2 bytes: too short
    [error] = errors_of(doc, tmp_path)
    assert error == "dno.keys_file: key 'dno-1' is shorter than 16 bytes"


def test_service_settings_and_their_warnings(tmp_path: Path) -> None:
    doc = minimal(tmp_path)
    doc["gateway"] = {"heartbeat_period_s": 30, "limit_validity_s": 10, "control_interval_s": 5}
    check = check_config(doc, base_dir=tmp_path)
    assert check.errors == ()
    assert check.config is not None
    assert check.config.service == ServiceSettings(control_interval_s=5.0, heartbeat_period_s=30,
                                                   limit_validity_s=10)
    assert [w.split(":")[0] for w in check.warnings] == [
        "site.dno_failsafe_a", "gateway.heartbeat_period_s", "gateway.limit_validity_s"]
    assert check.config.mqtt.client_id == "evedge-s1"     # default from the site id


def test_files_that_cannot_be_read_or_parsed(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "nope.toml")
    assert err.value.errors == [str(tmp_path / "nope.toml") + ": cannot read: No such file or directory"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[site]\nid = \n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    [line] = err.value.errors
    assert line.startswith(str(bad) + ": not valid TOML: ") and "line 2" in line


def test_a_written_file_round_trips(tmp_path: Path) -> None:
    doc = minimal(tmp_path)
    (tmp_path / "site.toml").write_text(toml_text(doc))
    config = load_config(tmp_path / "site.toml")
    assert config.path == tmp_path / "site.toml"
    assert config.mqtt.outbox.path == tmp_path / "state" / "outbox.sqlite3"
    assert config.dno.audit_path == tmp_path / "state" / "audit.jsonl"
