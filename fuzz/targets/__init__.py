"""The fuzz targets by name; each module defines TARGET (a fuzz.engine.Target)."""

from __future__ import annotations

import importlib

from fuzz.engine import Target

MODULES = {
    "modbus-fw": "fuzz.targets.modbus_fw",
    "modbus-gw": "fuzz.targets.modbus_gw",
    "cbor-fw": "fuzz.targets.cbor_fw",
    "cbor-gw": "fuzz.targets.cbor_gw",
    "mqtt-cmd": "fuzz.targets.mqtt_cmd",
    "site-config": "fuzz.targets.site_config",
    "column-config": "fuzz.targets.column_config",
    "trace": "fuzz.targets.trace",
}
NAMES = tuple(MODULES)


def get(name: str) -> Target:  # type: ignore[type-arg]
    if name not in MODULES:
        raise KeyError("unknown fuzz target %r (choose from %s)" % (name, ", ".join(NAMES)))
    target: Target = importlib.import_module(MODULES[name]).TARGET  # type: ignore[type-arg]
    return target
