"""The test machinery itself: the MicroPython leg really runs MicroPython, with a fixed
heap and a timeout, and the firmware build really rejects what MicroPython rejects."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tools.firmware_build import BuildError, build

REPO = Path(__file__).resolve().parents[2]
FIRMWARE_TESTS = REPO / "tests" / "firmware"


def _run_dual_suite(tmp_path: Path, module_text: str, name: str = "test_probe_module.py") -> str:
    """Run a firmware test module through the dual-interpreter plugin in a child pytest."""
    suite = tmp_path / "firmware"
    suite.mkdir()
    for support in ("conftest.py", "fwtest.py", "mpy_runner.py"):
        shutil.copy(FIRMWARE_TESTS / support, suite / support)
    (suite / name).write_text(module_text)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", str(suite), "-v", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "-c", "/dev/null", "--timeout", "120"],
        cwd=tmp_path, capture_output=True, text=True, timeout=180, check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    return done.stdout + done.stderr


def test_cpython_only_module_fails_only_in_the_micropython_leg(tmp_path: Path) -> None:
    out = _run_dual_suite(tmp_path, "import dataclasses\n\n\ndef test_uses_dataclasses():\n"
                                    "    assert dataclasses.is_dataclass(int) is False\n")
    assert "test_uses_dataclasses PASSED" in out
    assert "test_uses_dataclasses[micropython] FAILED" in out
    # The MicroPython traceback itself is shown.
    assert "ImportError: no module named 'dataclasses'" in out


def test_micropython_leg_runs_micropython_with_the_fixed_heap(tmp_path: Path) -> None:
    out = _run_dual_suite(tmp_path, "import sys\nimport gc\nMPY_HEAP = '64K'\n\n\n"
                                    "def test_interpreter():\n"
                                    "    if sys.implementation.name == 'micropython':\n"
                                    "        gc.collect()\n"
                                    "        total = gc.mem_free() + gc.mem_alloc()\n"
                                    "        assert 60000 < total <= 65536, total\n\n\n"
                                    "def test_heap_exhausted():\n"
                                    "    if sys.implementation.name == 'micropython':\n"
                                    "        bytearray(100 * 1024)\n")
    assert "test_interpreter PASSED" in out
    assert "test_interpreter[micropython] PASSED" in out
    assert "test_heap_exhausted PASSED" in out
    assert "test_heap_exhausted[micropython] FAILED" in out
    assert "MemoryError" in out
    assert "heap 64K" in out


def test_micropython_leg_has_a_timeout(tmp_path: Path) -> None:
    out = _run_dual_suite(tmp_path, "import sys\nMPY_TIMEOUT_S = 2\n\n\ndef test_spins():\n"
                                    "    while sys.implementation.name == 'micropython':\n"
                                    "        pass\n")
    assert "test_spins PASSED" in out
    assert "test_spins[micropython] FAILED" in out
    assert "timed out after 2" in out


def test_build_rejects_cpython_only_syntax_with_file_and_line(tmp_path: Path) -> None:
    source = tmp_path / "firmware"
    source.mkdir()
    (source / "good.py").write_text("X = 1\n")
    (source / "bad.py").write_text("X = 1\n\n\ndef positional_only(a, /):\n    return a\n")
    with pytest.raises(BuildError) as err:
        build(source, tmp_path / "out")
    assert "bad.py" in str(err.value)
    assert "line 4" in str(err.value)
    assert "good.py" not in str(err.value)


def test_build_cli_fails_and_names_the_file(tmp_path: Path) -> None:
    source = tmp_path / "firmware"
    source.mkdir()
    (source / "uses_match.py").write_text("def f(x):\n    match x:\n        case 1:\n            return 2\n")
    done = subprocess.run([sys.executable, "-m", "tools.firmware_build", "--source", str(source),
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 1
    assert "uses_match.py" in done.stderr and "line" in done.stderr


def test_build_bundles_the_real_firmware(tmp_path: Path) -> None:
    bundle = build(out=tmp_path / "out")
    names = {f.relative_to(bundle.root).as_posix() for f in bundle.files}
    assert "firmware/crc.mpy" in names
    assert all(n.endswith(".mpy") or n in ("boot.py", "main.py") for n in names)
    assert bundle.size_bytes == sum(f.stat().st_size for f in bundle.files) > 0
