"""Run every firmware test twice: in this CPython process and in the MicroPython unix port.

A firmware test module is plain MicroPython-compatible code: module-level `test_*`
functions with no arguments, plain `assert`, helpers from `fwtest`. For each function
pytest shows two items, `test_x` (CPython, in-process) and `test_x[micropython]` (a
fresh `micropython -X heapsize=128K` process per test, under a timeout). A module may
ask for another heap with `MPY_HEAP = "64K"` and another limit with `MPY_TIMEOUT_S = 30`.
Both legs run with a fresh temporary folder as the working directory. The MicroPython
leg imports the firmware from its mpy-cross bundle (built once per session), as a board
does: what is tested is what ships, and source compilation does not eat the heap.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from hil.rig.firmware_proc import DEFAULT_HEAP, VBOARD, run_firmware
from tools.firmware_build import BuildError, build

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "mpy_runner.py"
PASS_MARKER = "@@FWTEST-PASS"

# The CPython leg imports the same fake `machine` the MicroPython leg does.
for _path in (str(HERE), str(VBOARD)):
    if _path not in sys.path:
        sys.path.insert(0, _path)


def _module_settings(path: Path) -> dict[str, object]:
    """Read MPY_HEAP / MPY_TIMEOUT_S without importing the module."""
    settings: dict[str, object] = {"MPY_HEAP": DEFAULT_HEAP, "MPY_TIMEOUT_S": 60}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name) and target.id in settings:
                settings[target.id] = ast.literal_eval(node.value)
    return settings


class MicroPythonFailure(Exception):
    """A firmware test failed (or hung) inside the MicroPython unix port."""


_BUNDLE: dict[str, Path | str] = {}


def _bundle() -> Path:
    """The firmware compiled once per test session; a build error fails every MicroPython leg."""
    if "path" not in _BUNDLE and "error" not in _BUNDLE:
        out = Path(tempfile.mkdtemp(prefix="fwbundle-"))
        try:
            _BUNDLE["path"] = build(out=out).root
        except BuildError as exc:
            _BUNDLE["error"] = str(exc)
    if "error" in _BUNDLE:
        raise MicroPythonFailure(f"the firmware does not build:\n{_BUNDLE['error']}")
    return Path(_BUNDLE["path"])


def pytest_sessionfinish(session: pytest.Session) -> None:
    path = _BUNDLE.get("path")
    if isinstance(path, Path):
        shutil.rmtree(path.parent if path.name == "firmware" else path, ignore_errors=True)


class MicroPythonItem(pytest.Item):
    def __init__(self, *, function_name: str, settings: dict[str, object], **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.function_name = function_name
        self.settings = settings
        self.add_marker("micropython")

    def runtest(self) -> None:
        workdir = Path(tempfile.mkdtemp(prefix="fwtest-"))
        try:
            try:
                done = run_firmware("micropython", RUNNER, [self.path.stem, self.function_name],
                                    heap=str(self.settings["MPY_HEAP"]),
                                    timeout_s=float(self.settings["MPY_TIMEOUT_S"]),  # type: ignore[arg-type]
                                    cwd=workdir, extra_paths=[self.path.parent], bundle=_bundle())
            except subprocess.TimeoutExpired as exc:
                raise MicroPythonFailure(
                    f"timed out after {exc.timeout} s\n{(exc.output or b'').decode(errors='replace')}"
                ) from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        out = (done.stdout + done.stderr).decode(errors="replace")
        if done.returncode != 0 or PASS_MARKER not in out:
            raise MicroPythonFailure(f"exit code {done.returncode}\n{out}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: object = None) -> str:
        if isinstance(excinfo.value, MicroPythonFailure):
            heap = self.settings["MPY_HEAP"]
            return f"MicroPython (heap {heap}) failed in {self.function_name}:\n{excinfo.value}"
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"{self.name}"


class DualModule(pytest.Module):
    def collect(self):  # type: ignore[no-untyped-def]
        settings = _module_settings(self.path)
        for item in super().collect():
            yield item
            if isinstance(item, pytest.Function) and item.name.startswith("test_"):
                item.add_marker("cpython")
                yield MicroPythonItem.from_parent(self, name=f"{item.name}[micropython]",
                                                  function_name=item.name, settings=settings)


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if module_path.parent == HERE and module_path.name.startswith("test_"):
        return DualModule.from_parent(parent, path=module_path)
    return None


@pytest.fixture(autouse=True)
def _firmware_workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPython leg gets a fresh working folder too, like the MicroPython leg."""
    monkeypatch.chdir(tmp_path)
