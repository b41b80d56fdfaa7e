"""Per-link-mode firmware bundles (`python -m tools.firmware_build --link MODE`): a board of
one link mode carries only the modules it imports, and those are all it needs to boot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hil.rig.firmware_proc import REPO, VBOARD, micropython_binary
from hil.rig.ports import free_port
from hil.rig.serial_pair import SerialPair
from tools.firmware_build import BuildError, build, bundle_names, link_modes

pytestmark = pytest.mark.timeout(120)

APP_MODULES = REPO / "bench" / "mpy" / "app_modules.py"
CONFIG = {
    "column_id": "links-1", "bus_address": 3, "phases": 3, "hardware_rating_a": 32,
    "installation_rating_a": 32, "failsafe_a": 6, "meter": {"type": "sdm630"},
}
LINKS = {
    "modbus-rtu": {"mode": "modbus-rtu", "baud": 115200},
    "modbus-tcp": {"mode": "modbus-tcp", "host": "127.0.0.1"},
    "cbor-serial": {"mode": "cbor-serial", "baud": 115200},
    "cbor-tcp": {"mode": "cbor-tcp", "host": "127.0.0.1"},
}


def test_the_modes_are_the_configs_link_modes() -> None:
    from firmware.config import LINK_MODES

    assert link_modes() == LINK_MODES


@pytest.mark.parametrize("mode", list(LINKS))
def test_a_link_bundle_boots_the_app_from_its_own_modules_only(mode: str, tmp_path: Path) -> None:
    bundle = build(out=tmp_path / "bundle", link=mode)
    names = {f.relative_to(bundle.root).as_posix() for f in bundle.files}
    assert names == bundle_names(mode)
    assert "firmware/regmap_tables.mpy" not in names            # host-only, never on a board
    if mode.startswith("modbus"):
        assert "firmware/gw_modbus.mpy" in names and "firmware/gw_cbor.mpy" not in names
    else:
        assert "firmware/gw_cbor.mpy" in names and "firmware/gw_modbus.mpy" not in names
    assert bundle.size_bytes < build(out=tmp_path / "all").size_bytes
    link = dict(LINKS[mode])
    if mode.endswith("-tcp"):
        link["tcp_port"] = free_port()
    (tmp_path / "column.json").write_text(json.dumps({**CONFIG, "link": link}))
    # The bundle alone on the module path (no firmware sources to fall back on), as on a
    # board; the virtual board's `machine` beside it.
    env = {"MICROPYPATH": f"{bundle.root}:{VBOARD}:.frozen", "PATH": "/usr/bin:/bin"}
    with SerialPair() as meter, SerialPair() as line:
        done = subprocess.run([micropython_binary(), "-X", "heapsize=128K", str(APP_MODULES), "column.json",
                               meter.b_path, "-" if mode.endswith("-tcp") else line.b_path],
                              cwd=tmp_path, env=env, capture_output=True, timeout=60, check=False)
    out = done.stdout.decode(errors="replace")
    assert done.returncode == 0, out + done.stderr.decode(errors="replace")
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    link_module = "firmware.gw_modbus" if mode.startswith("modbus") else "firmware.gw_cbor"
    assert link_module in loaded, loaded
    assert not any("config error" in line for line in out.splitlines()), out
    # (the list also names the asyncio submodules the column loaded: the port's own library)
    assert all(n.startswith(("firmware", "asyncio.")) for n in loaded), loaded
    assert {f"firmware/{n.split('.', 1)[1]}.mpy" for n in loaded if n.startswith("firmware.")} <= names


def _tree(root: Path, files: dict[str, str]) -> Path:
    src = root / "firmware"
    src.mkdir(parents=True)
    for name, text in files.items():
        (src / name).write_text(text)
    return src


BOARD = {
    "__init__.py": "",
    "boot.py": "import gc\n",
    "main.py": "from firmware import app\n\napp.main()\n",
    "app.py": "from firmware import core, links\n\n\ndef main():\n    pass\n",
    "links.py": "LINKS = (\n    ('wire-a', ('link_a',)),\n    ('wire-b', ('link_b',)),\n)\n",
    "core.py": "X = 1\n",
    "link_a.py": "def rare():\n    from firmware.lazy import Y\n    return Y\n",
    "link_b.py": "import firmware.other\n",
    "lazy.py": "Y = 2\n",
    "other.py": "Z = 3\n",
    "host_only.py": "from firmware import core\n",
}


# What the BOARD tree's two link modes bundle: the core, the mode's link and what it imports.
_CORE = {"boot.py", "main.py", "firmware/__init__.mpy", "firmware/app.mpy", "firmware/core.mpy",
         "firmware/links.mpy"}
WIRE_A = _CORE | {"firmware/link_a.mpy", "firmware/lazy.mpy"}
WIRE_B = _CORE | {"firmware/link_b.mpy", "firmware/other.mpy"}


def _bundle(src: Path, out: Path, link: str) -> set[str]:
    """The files of the link mode's bundle, relative to its folder."""
    return {f.relative_to(out).as_posix() for f in build(src, out, link=link).files}


def test_the_module_set_follows_the_imports_lazy_ones_included(tmp_path: Path) -> None:
    src = _tree(tmp_path, BOARD)
    assert _bundle(src, tmp_path / "a", "wire-a") == WIRE_A
    assert _bundle(src, tmp_path / "b", "wire-b") == WIRE_B
    # A new import statement is a new module in the bundle: nothing to keep in step by hand.
    (src / "core.py").write_text("def f():\n    from firmware import host_only\n")
    c = {f.name for f in build(src, tmp_path / "c", link="wire-b").files}
    assert "host_only.mpy" in c


def test_relative_imports_are_followed_like_absolute_ones(tmp_path: Path) -> None:
    # The firmware imports its own modules relatively (`from .x import y`): shorter module
    # names in the .mpy. A scan that skipped them would ship a bundle that fails at boot.
    src = _tree(tmp_path, dict(BOARD, **{
        "app.py": "from . import core, links\n\n\ndef main():\n    pass\n",
        "link_a.py": "from .core import X\n\n\ndef rare():\n    from .lazy import Y\n    return Y\n",
        "link_b.py": "def rare():\n    from . import other\n    return other\n",
    }))
    assert _bundle(src, tmp_path / "a", "wire-a") == WIRE_A
    assert _bundle(src, tmp_path / "b", "wire-b") == WIRE_B


def test_a_cpython_fallback_stays_out_of_the_bundle(tmp_path: Path) -> None:
    # What a module imports only where MicroPython's own module is missing (CPython) is not
    # carried by a board; the rest of the module's imports are.
    src = _tree(tmp_path, dict(BOARD, **{
        "core.py": ("try:\n    from asyncio import core\nexcept ImportError:\n"
                    "    from .host_only import X\nelse:\n    from . import other\n"),
    }))
    a = {f.name for f in build(src, tmp_path / "a", link="wire-a").files}
    assert "host_only.mpy" not in a and "other.mpy" in a and "core.mpy" in a


def test_a_relative_import_in_a_board_script_stops_the_build(tmp_path: Path) -> None:
    # boot.py and main.py run at the board's root, outside the package.
    src = _tree(tmp_path, dict(BOARD, **{"main.py": "from .app import main\n\nmain()\n"}))
    with pytest.raises(BuildError, match=r"main\.py: a board script runs outside the package"):
        build(src, tmp_path / "x", link="wire-a")


def test_an_unknown_mode_or_a_missing_module_stops_the_build(tmp_path: Path) -> None:
    links = BOARD["links.py"].replace("('wire-b', ('link_b',)),", "('wire-b', ('link_b', 'gone')),")
    src = _tree(tmp_path, dict(BOARD, **{"links.py": links}))
    with pytest.raises(BuildError, match="unknown link mode 'wire-c'"):
        build(src, tmp_path / "x", link="wire-c")
    with pytest.raises(BuildError, match=r"gone\.py is imported but does not exist"):
        build(src, tmp_path / "y", link="wire-b")


def test_the_cli_builds_one_mode(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "tools.firmware_build", "--link", "cbor-tcp", "--out",
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "link mode cbor-tcp" in done.stdout
    assert (tmp_path / "out" / "firmware" / "gw_cbor.mpy").exists()
    assert not (tmp_path / "out" / "firmware" / "gw_modbus.mpy").exists()
