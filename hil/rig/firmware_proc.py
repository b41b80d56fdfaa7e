"""Start firmware code in a separate interpreter: CPython or the MicroPython unix port.

Both legs see the same module path: the repository root (for the `firmware` package),
the virtual board (`hil/vboard`, which holds the fake `machine` module) and any extra
folders a caller names. MicroPython always runs with a fixed heap and under a timeout,
because some of its fatal paths spin forever.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VBOARD = REPO / "hil" / "vboard"
INTERPRETERS = ("cpython", "micropython")
DEFAULT_HEAP = "128K"


def micropython_binary() -> str:
    """The unix port installed in the same environment as this Python, else on PATH."""
    beside = Path(sys.executable).with_name("micropython")
    if beside.exists():
        return str(beside)
    found = shutil.which("micropython")
    if not found:
        raise FileNotFoundError("micropython is not installed: run 'make setup'")
    return found


def firmware_command(interp: str, script: str | Path, args: list[str] | None = None,
                     heap: str = DEFAULT_HEAP) -> list[str]:
    if interp == "micropython":
        return [micropython_binary(), "-X", f"heapsize={heap}", str(script), *(args or [])]
    if interp == "cpython":
        return [sys.executable, "-u", str(script), *(args or [])]
    raise ValueError(f"unknown interpreter {interp!r}; choose from {INTERPRETERS}")


def firmware_env(extra_paths: list[Path] | None = None, bundle: Path | None = None) -> dict[str, str]:
    """Module paths for both legs. `bundle` (a `tools.firmware_build` output folder) puts
    the compiled .mpy firmware ahead of the sources for MicroPython, as on a board, where
    compiling source at import would cost heap the device does not have."""
    paths = [str(p) for p in (extra_paths or [])] + [str(REPO), str(VBOARD)]
    env = dict(os.environ)
    mpy_paths = ([str(bundle)] if bundle is not None else []) + paths
    env["MICROPYPATH"] = os.pathsep.join([*mpy_paths, ".frozen"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def run_firmware(interp: str, script: str | Path, args: list[str] | None = None, *,
                 heap: str = DEFAULT_HEAP, timeout_s: float = 60.0, cwd: Path | None = None,
                 extra_paths: list[Path] | None = None, input_bytes: bytes | None = None,
                 bundle: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run to completion; a run past `timeout_s` is killed and raises TimeoutExpired."""
    return subprocess.run(firmware_command(interp, script, args, heap), cwd=cwd,
                          env=firmware_env(extra_paths, bundle), input=input_bytes,
                          capture_output=True, timeout=timeout_s, check=False)


def start_firmware(interp: str, script: str | Path, args: list[str] | None = None, *,
                   heap: str = DEFAULT_HEAP, cwd: Path | None = None,
                   extra_paths: list[Path] | None = None,
                   bundle: Path | None = None) -> subprocess.Popen[bytes]:
    """Start in the background; the caller stops it (see `stop_process`)."""
    return subprocess.Popen(firmware_command(interp, script, args, heap), cwd=cwd,
                            env=firmware_env(extra_paths, bundle), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 3.0) -> bytes:
    """Terminate a process we started and return what it printed."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)
    out = proc.stdout.read() if proc.stdout else b""
    return out or b""
