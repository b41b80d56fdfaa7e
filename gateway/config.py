"""The gateway's one TOML site file: site sections, [mqtt], [dno] and [gateway], checked at start.

``check_config(doc, base_dir)`` collects every problem it can find as a line ``"key.path:
problem"`` and never raises; ``load_config(path)`` reads the file and raises ``ConfigError``
carrying that whole list. The site sections (``core.site_config.SITE_SECTIONS``) report every
error at once; [mqtt] and [dno] (``north.settings``) stop at their first error, so they add at
most one line each. Unknown top-level tables are errors: a misspelt ``[mqqt]`` must not leave
the gateway without a broker setting silently. Relative file paths in [mqtt] and [dno] are
relative to the site file's folder.

The [gateway] table (all optional, defaults below) tunes the service loop:

    [gateway]
    control_interval_s = 1.0      # allocation step period (also run at once on any change)
    telemetry_interval_s = 10     # column and site telemetry period (the DNO may change it)
    poll_period_s = 1.0           # Modbus poll period per column
    heartbeat_period_s = 10       # Modbus heartbeat writes / CBOR heartbeat interval
    limit_validity_s = 120        # validity of each limit sent to a column; refreshed at 1/3
    response_timeout_s = 0.3      # extra time a Modbus RTU column gets to answer
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.core.site import Site
from gateway.core.site_config import SITE_SECTIONS, check_site
from gateway.north.settings import DnoSettings, MqttSettings, SettingsError, parse_dno, parse_mqtt

NORTH_SECTIONS = ("mqtt", "dno")
SERVICE_SECTION = "gateway"
KNOWN_SECTIONS = (*SITE_SECTIONS, *NORTH_SECTIONS, SERVICE_SECTION)
# Columns fall back to their failsafe after heartbeat_timeout_s (firmware default 60 s): the
# gateway's heartbeats and limit refreshes must come well inside that.
COLUMN_HEARTBEAT_TIMEOUT_DEFAULT_S = 60


@dataclass(frozen=True)
class ServiceSettings:
    control_interval_s: float = 1.0
    telemetry_interval_s: float = 10.0
    poll_period_s: float = 1.0
    heartbeat_period_s: int = 10
    limit_validity_s: int = 120
    response_timeout_s: float = 0.3


# name -> (lo, hi, integer)
_SERVICE_KEYS: dict[str, tuple[float, float, bool]] = {
    "control_interval_s": (0.1, 60.0, False),
    "telemetry_interval_s": (1.0, 3600.0, False),
    "poll_period_s": (0.1, 60.0, False),
    "heartbeat_period_s": (1, 600, True),
    "limit_validity_s": (10, 65535, True),   # the Modbus validity register is 16 bits
    "response_timeout_s": (0.01, 10.0, False),
}


@dataclass(frozen=True)
class GatewayConfig:
    site: Site
    mqtt: MqttSettings
    dno: DnoSettings
    service: ServiceSettings
    path: Path | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConfigCheck:
    config: GatewayConfig | None   # None when there are errors
    errors: tuple[str, ...]
    warnings: tuple[str, ...]


class ConfigError(Exception):
    """The site file is unusable; ``errors`` holds one "key.path: problem" line per problem."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def check_config(doc: Mapping[str, Any], *, base_dir: Path | None = None,
                 load_secrets: bool = True) -> ConfigCheck:
    """Validate a whole site document. ``load_secrets`` also reads the DNO key table (its
    format and file mode), so that a bad key file is found by check-config, not at the first
    command."""
    base = base_dir or Path.cwd()
    errors: list[str] = []
    warnings: list[str] = []
    for name in doc:
        if name not in KNOWN_SECTIONS:
            errors.append(str(name) + ": unknown table (expected one of: " + ", ".join(KNOWN_SECTIONS) + ")")
    site_check = check_site(doc)
    errors.extend(str(e) for e in site_check.errors)
    warnings.extend(str(w) for w in site_check.warnings)
    site_id = site_check.site.id if site_check.site is not None else _raw_site_id(doc)
    mqtt = _north(doc, "mqtt", errors, lambda t: parse_mqtt(
        t, base_dir=base, default_client_id="evedge-" + site_id if site_id else None))
    dno = _north(doc, "dno", errors, lambda t: parse_dno(t, base_dir=base))
    if dno is not None and load_secrets:
        try:
            dno.load_keys()
        except SettingsError as exc:
            errors.append(str(exc))
    service = _service(doc.get(SERVICE_SECTION, {}), errors, warnings)
    if errors or site_check.site is None or mqtt is None or dno is None or service is None:
        return ConfigCheck(None, tuple(errors), tuple(warnings))
    config = GatewayConfig(site_check.site, mqtt, dno, service, warnings=tuple(warnings))
    return ConfigCheck(config, (), tuple(warnings))


def load_config(path: str | Path, *, load_secrets: bool = True) -> GatewayConfig:
    """Read and check a site file; ``ConfigError`` lists every problem found."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as exc:
        raise ConfigError([str(path) + ": cannot read: " + (exc.strerror or str(exc))]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([str(path) + ": not valid TOML: " + str(exc)]) from None
    except UnicodeDecodeError as exc:   # TOML is UTF-8; tomllib lets the decode error through
        raise ConfigError([str(path) + ": not valid TOML: not UTF-8 text (byte " + str(exc.start) + ")"]) \
            from None
    check = check_config(doc, base_dir=path.resolve().parent, load_secrets=load_secrets)
    if check.config is None:
        raise ConfigError(list(check.errors))
    return GatewayConfig(check.config.site, check.config.mqtt, check.config.dno, check.config.service,
                         path=path, warnings=check.warnings)


def _raw_site_id(doc: Mapping[str, Any]) -> str | None:
    site = doc.get("site")
    value = site.get("id") if isinstance(site, Mapping) else None
    return value if isinstance(value, str) and value else None


def _north(doc: Mapping[str, Any], name: str, errors: list[str], parse: Any) -> Any:
    if name not in doc:
        what = "broker, TLS, credentials, outbox" if name == "mqtt" else "DNO command keys and audit log"
        errors.append(name + ": missing table [" + name + "] (" + what + ")")
        return None
    try:
        return parse(doc[name])
    except SettingsError as exc:
        errors.append(str(exc))
        return None


def _service(raw: Any, errors: list[str], warnings: list[str]) -> ServiceSettings | None:
    if not isinstance(raw, Mapping):
        errors.append(SERVICE_SECTION + ": expected a table, got " + type(raw).__name__)
        return None
    values: dict[str, Any] = {}
    ok = True
    for key, value in raw.items():
        path = SERVICE_SECTION + "." + str(key)
        if key not in _SERVICE_KEYS:
            errors.append(path + ": unknown key (expected one of: " + ", ".join(_SERVICE_KEYS) + ")")
            ok = False
            continue
        lo, hi, integer = _SERVICE_KEYS[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(path + ": expected a number, got " + type(value).__name__ + " " + repr(value))
            ok = False
        elif integer and not isinstance(value, int):
            errors.append(path + ": expected an integer, got " + repr(value))
            ok = False
        elif not math.isfinite(value) or not lo <= value <= hi:
            errors.append(path + ": must be from " + _fmt(lo) + " to " + _fmt(hi) + ", got " + repr(value))
            ok = False
        else:
            values[key] = int(value) if integer else float(value)
    if not ok:
        return None
    settings = ServiceSettings(**values)
    if settings.heartbeat_period_s * 3 > COLUMN_HEARTBEAT_TIMEOUT_DEFAULT_S:
        warnings.append(SERVICE_SECTION + ".heartbeat_period_s: above a third of the columns' default "
                        "heartbeat_timeout_s (60 s): a lost heartbeat or two may drop columns to failsafe")
    if settings.limit_validity_s < 3 * settings.control_interval_s:
        warnings.append(SERVICE_SECTION + ".limit_validity_s: shorter than three control steps: limits "
                        "may expire between refreshes")
    return settings


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
