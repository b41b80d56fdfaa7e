"""The trace's layout as the replay reads it: the columns, their firmware configs, the site.

Layout (header `layout`), every key optional:
- `site`: id (or name), capacity_a (one number or [L1, L2, L3]; default: the sum of the
  column ratings, i.e. unconstrained), voltage_v, dno_failsafe_a, dno_failsafe_duration_s,
  circuits, allocation: as in the gateway's site config (gateway.core.site_config), which
  checks them;
- `columns`: [{id, phases (1|3), rotation, circuit, hardware_a, installation_a, failsafe_a,
  cable_a (PP rating: 13, 20, 32 or 63 A), meter_start_wh, ev_profile, plugged,
  config: {firmware config overrides}}]; a column that only a channel names gets the
  defaults (3 phases, 32 A);
- `gateway`: period_s, refresh_s, validity_s, retry_s, seed (hil.replay.gateway_model).

Each column's firmware config (firmware/config.py's keys) is built from its entry: id
(made safe for the firmware), bus address = its index + 1, ratings, failsafe, an SDM630
meter for three phases or an SDM120 for one, a Modbus RTU link; `config` overrides any of it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from firmware.controller import DEFAULTS as FW_DEFAULTS
from gateway.core.site import Site
from gateway.core.site_config import SiteConfigError, parse_site
from hil.models.ev_profiles import NOMINAL_V
from hil.trace.channels import split_name

CABLE_OHMS = ((13.0, 1500), (20.0, 680), (32.0, 220), (63.0, 100))  # STANDARDS.md PP values


class ReplayError(ValueError):
    """A trace the engine cannot replay as it is (layout, an event); the message says where."""


@dataclass
class ColumnSpec:
    id: str
    index: int
    phases: int = 3
    rotation: str = ""
    hardware_a: float = 32.0
    installation_a: float = 32.0
    failsafe_a: float = float(FW_DEFAULTS["failsafe_a"])
    circuit: str = "site"
    ev_profile: str | None = None
    cable_a: float = 32.0
    meter_start_wh: float = 0.0
    plugged: bool | None = None
    config: dict[str, Any] = field(default_factory=dict)

    def firmware_config(self) -> dict[str, Any]:
        fw_id = re.sub(r"[^A-Za-z0-9_-]", "_", self.id)[:32]
        cfg: dict[str, Any] = {
            "column_id": fw_id,
            "bus_address": self.index % 247 + 1,
            "phases": self.phases,
            "hardware_rating_a": self.hardware_a,
            "installation_rating_a": self.installation_a,
            "failsafe_a": self.failsafe_a,
            "meter": {"type": "sdm630" if self.phases == 3 else "sdm120", "address": 1},
            "link": {"mode": "modbus-rtu", "baud": 115200},
        }
        for key, value in self.config.items():
            if isinstance(value, dict) and isinstance(cfg.get(key), dict):
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
        return cfg


def _num(table: dict[str, Any], key: str, where: str, default: float, *, lo: float, hi: float) -> float:
    value = table.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise ReplayError("%s.%s: expected a number from %g to %g, got %r" % (where, key, lo, hi, value))
    return float(value)


def column_specs(header: dict[str, Any]) -> list[ColumnSpec]:
    """The columns of a trace: the layout's, then any column a channel names."""
    layout = header.get("layout") or {}
    specs: dict[str, ColumnSpec] = {}
    for i, entry in enumerate(layout.get("columns") or []):
        where = "layout.columns[%d]" % i
        cid = entry["id"]
        phases = entry.get("phases", 3)
        if phases not in (1, 3):
            raise ReplayError(
                "%s.phases: the column firmware supports 1 or 3 phases, got %r" % (where, phases)
            )
        hw = _num(entry, "hardware_a", where, 32.0, lo=6.0, hi=80.0)
        config = entry.get("config") or {}
        if not isinstance(config, dict):
            raise ReplayError("%s.config: expected a map of firmware config keys" % where)
        for key in ("rotation", "circuit", "ev_profile"):
            if key in entry and not isinstance(entry[key], str):
                raise ReplayError("%s.%s: expected a string, got %r" % (where, key, entry[key]))
        spec = ColumnSpec(
            cid,
            len(specs),
            int(phases),
            str(entry.get("rotation", "")),
            hw,
            _num(entry, "installation_a", where, hw, lo=6.0, hi=80.0),
            _num(entry, "failsafe_a", where, float(FW_DEFAULTS["failsafe_a"]), lo=0.0, hi=80.0),
            str(entry.get("circuit", "site")),
            entry.get("ev_profile"),
            _num(entry, "cable_a", where, 32.0, lo=13.0, hi=63.0),
            _num(entry, "meter_start_wh", where, 0.0, lo=0.0, hi=1e12),
            entry.get("plugged") if isinstance(entry.get("plugged"), bool) else None,
            dict(config),
        )
        specs[cid] = spec
    for name in header["channels"]:
        cid = split_name(name)[0]
        if cid is not None and cid not in specs:
            specs[cid] = ColumnSpec(cid, len(specs))
    return list(specs.values())


def build_site(header: dict[str, Any], specs: list[ColumnSpec], notes: list[str]) -> Site:
    layout = header.get("layout") or {}
    raw = layout.get("site") or {}
    if not isinstance(raw, dict):
        raise ReplayError("layout.site must be a map")
    sid = (
        raw.get("id")
        or re.sub(r"[^A-Za-z0-9_.-]", "-", str(raw.get("name", "site")))[:64].strip("-.")
        or "site"
    )
    site: dict[str, Any] = {"id": sid, "voltage_v": raw.get("voltage_v", NOMINAL_V)}
    if "capacity_a" in raw:
        site["capacity_a"] = raw["capacity_a"]
    else:
        site["capacity_a"] = max(6.0, sum(min(s.hardware_a, s.installation_a) for s in specs))
        notes.append(
            "the trace gives no site capacity: the site is unconstrained (%.0f A per phase)"
            % site["capacity_a"]
        )
    for key in ("dno_failsafe_a", "dno_failsafe_duration_s"):
        if key in raw:
            site[key] = raw[key]
    columns = []
    for s in specs:
        col: dict[str, Any] = {
            "id": s.id,
            "phases": s.phases,
            "hardware_a": s.hardware_a,
            "installation_a": s.installation_a,
            "circuit": s.circuit,
            "link": "cbor-tcp",
            "host": "replay",
            "port": 1024 + s.index,
        }
        if s.rotation:
            col["rotation"] = s.rotation
        columns.append(col)
    doc = {
        "site": site,
        "circuits": raw.get("circuits", {}),
        "columns": columns,
        "allocation": raw.get("allocation", {}),
    }
    try:
        return parse_site(doc)
    except SiteConfigError as exc:
        raise ReplayError("trace layout: " + "; ".join(str(e) for e in exc.errors)) from None
