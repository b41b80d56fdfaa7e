"""Compile the firmware with mpy-cross into a bundle that a board loads.

`python -m tools.firmware_build` (what `make firmware` runs) compiles every module of
the `firmware` package to .mpy under build/firmware/firmware/ and copies the board's
`boot.py` and `main.py` (which MicroPython runs as source) to build/firmware/. A syntax
MicroPython rejects stops the build with the file and line, and a non-zero exit.

Modules are compiled with `mpy-cross -O3`: no source line numbers (a board keeps loaded
code in RAM, and the line tables cost the app about 2.5 KB of it) and no `assert`s (the
firmware uses none; its checks are code that stays). `--debug` (or `build(debug=True)`)
keeps the line numbers for tracebacks that name them.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "firmware"
BUILD = REPO / "build" / "firmware"
# Scripts a board runs from source at its filesystem root.
BOARD_SCRIPTS = ("boot.py", "main.py")
OPTIMIZE = 3    # mpy-cross -O level of a release build (see the module docstring)


class BuildError(Exception):
    """MicroPython rejected a firmware file; the message names the file and line."""


@dataclass
class Bundle:
    root: Path
    files: list[Path]

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def mpy_cross_binary() -> str:
    beside = Path(sys.executable).with_name("mpy-cross")
    if beside.exists():
        return str(beside)
    found = shutil.which("mpy-cross")
    if not found:
        raise BuildError("mpy-cross is not installed: run 'make setup'")
    return found


def compile_file(source: Path, target: Path, march: str | None = None, optimize: int = 0) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    cmd = [mpy_cross_binary(), "-o", str(target)]
    if optimize:
        cmd.append(f"-O{optimize}")
    if march:
        cmd.append(f"-march={march}")
    cmd.append(source.name)
    # Run from the file's folder so the error names the file as the developer sees it.
    done = subprocess.run(cmd, cwd=source.parent, capture_output=True, text=True, timeout=60,
                          check=False)
    if done.returncode != 0:
        rel = source.relative_to(REPO) if source.is_relative_to(REPO) else source
        detail = (done.stderr or done.stdout).strip().replace(f'File "{source.name}"', f'File "{rel}"')
        raise BuildError(f"{rel}: MicroPython rejects this file\n{detail}")


def build(source: Path = SOURCE, out: Path = BUILD, march: str | None = None,
          debug: bool = False) -> Bundle:
    """Compile every firmware module; raise BuildError on the first rejected file.
    debug keeps source line numbers in the .mpy files (costs the board RAM)."""
    optimize = 0 if debug else OPTIMIZE
    if out.exists():
        shutil.rmtree(out)
    files: list[Path] = []
    errors: list[str] = []
    for py in sorted(source.rglob("*.py")):
        rel = py.relative_to(source)
        if "__pycache__" in rel.parts:
            continue
        if rel.name in BOARD_SCRIPTS and len(rel.parts) == 1:
            # Checked like the rest, shipped as source at the board's root.
            try:
                compile_file(py, out / "check" / rel.with_suffix(".mpy"), march)
            except BuildError as exc:
                errors.append(str(exc))
                continue
            target = out / rel.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(py, target)
        else:
            target = out / source.name / rel.with_suffix(".mpy")
            try:
                compile_file(py, target, march, optimize)
            except BuildError as exc:
                errors.append(str(exc))
                continue
        files.append(target)
    shutil.rmtree(out / "check", ignore_errors=True)
    if errors:
        raise BuildError("\n".join(errors))
    return Bundle(out, files)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.firmware_build", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=SOURCE, help="firmware package folder")
    parser.add_argument("--out", type=Path, default=BUILD, help="bundle folder (replaced)")
    parser.add_argument("--march", help="mpy-cross -march (e.g. xtensawin, armv6m) for native code")
    parser.add_argument("--debug", action="store_true",
                        help="keep source line numbers (tracebacks name them; costs board RAM)")
    args = parser.parse_args(argv)
    try:
        bundle = build(args.source, args.out, args.march, args.debug)
    except BuildError as exc:
        print(f"firmware build failed: {exc}", file=sys.stderr)
        return 1
    for f in bundle.files:
        print(f"  {f.stat().st_size:6d}  {f.relative_to(bundle.root)}")
    print(f"firmware bundle: {len(bundle.files)} files, {bundle.size_bytes} bytes in {bundle.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
