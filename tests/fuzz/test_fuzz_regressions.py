"""Every input a fuzz run ever found a bug with (fuzz/regressions/<target>/) through its target's
harness again: the fix must hold."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from fuzz import targets
from fuzz.engine import REGRESSIONS, Harness, regression_files, replay, scratch_dir

CASES = [path for name in targets.NAMES for path in regression_files(REGRESSIONS, name)]
_harnesses: dict[str, Harness[Any]] = {}


@pytest.fixture(scope="module")
def folder() -> Any:
    path = Path(tempfile.mkdtemp(prefix="fuzz-regressions-", dir=scratch_dir()))
    yield path
    for harness in _harnesses.values():
        harness.close()
    _harnesses.clear()
    shutil.rmtree(path, ignore_errors=True)


def test_regression_folders_are_targets() -> None:
    folders = sorted(p.name for p in REGRESSIONS.iterdir() if p.is_dir())
    assert folders and set(folders) <= set(targets.NAMES), folders
    assert CASES, "no regression cases"


@pytest.mark.parametrize("path", CASES, ids=lambda p: "%s/%s" % (p.parent.name, p.stem[:12]))
def test_regression_case_passes(folder: Path, path: Path) -> None:
    target = targets.get(path.parent.name)
    harness = _harnesses.get(target.name)
    if harness is None:
        (folder / target.name).mkdir()
        harness = _harnesses[target.name] = target.harness(folder / target.name)
    verdict = replay(target, harness, path.read_bytes())
    assert verdict.kind is None, "%s: %s" % (verdict.kind, verdict.message)
