"""Compile the firmware with mpy-cross into a bundle that a board loads.

`python -m tools.firmware_build` (what `make firmware` runs) compiles every module of
the `firmware` package to .mpy under build/firmware/firmware/ and copies the board's
`boot.py` and `main.py` (which MicroPython runs as source) to build/firmware/. A syntax
MicroPython rejects stops the build with the file and line, and a non-zero exit.

Modules are compiled with `mpy-cross -O3`: no source line numbers (a board keeps loaded
code in RAM, and the line tables cost the app about 2.5 KB of it) and no `assert`s (the
firmware uses none; its checks are code that stays). `--debug` (or `build(debug=True)`)
keeps the line numbers for tracebacks that name them.

A board runs one gateway link mode. `--link MODE` (or `build(link=MODE)`) bundles only the
modules a board of that mode imports (build/firmware-MODE/ by default): the closure of the
import statements of boot.py and main.py, lazy ones inside functions and relative ones included,
plus the link modules the app's boot loads for MODE by name (the `LINKS` table in
firmware/links.py). Imports in an `except ImportError:` handler are a module's CPython fallback
(firmware/tcp_link.py's), which a board never runs: they are left out. Nothing is listed here,
so the bundle cannot drift from the code. Without `--link` the bundle holds
every module (what `make firmware` and the tests use).
"""

from __future__ import annotations

import argparse
import ast
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "firmware"
BUILD = REPO / "build" / "firmware"
# Scripts a board runs from source at its filesystem root.
BOARD_SCRIPTS = ("boot.py", "main.py")
OPTIMIZE = 3    # mpy-cross -O level of a release build (see the module docstring)
PACKAGE = "firmware"
LINK_TABLE = ("links.py", "LINKS")   # (module, name): (mode, (module names...)) pairs


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


# -- which modules a board of one link mode imports --------------------------------------------

def link_table(source: Path = SOURCE) -> dict[str, tuple[str, ...]]:
    """mode -> the link modules the app loads for it (firmware/wiring.py), from firmware/links.py."""
    path = source / LINK_TABLE[0]
    try:
        tree = ast.parse(path.read_text(), str(path))
    except (OSError, SyntaxError) as exc:
        raise BuildError(f"cannot read the link table in {path}: {exc}") from None
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == LINK_TABLE[1]):
            try:
                return {mode: tuple(names) for mode, names in ast.literal_eval(node.value)}
            except (ValueError, TypeError) as exc:
                raise BuildError(f"{path}: {LINK_TABLE[1]} is not a literal table of "
                                 f"(mode, (module, ...)): {exc}") from None
    raise BuildError(f"{path} has no {LINK_TABLE[1]} table")


def link_modes(source: Path = SOURCE) -> tuple[str, ...]:
    return tuple(link_table(source))


def _module_path(source: Path, dotted: str) -> Path | None:
    """The source file of `firmware.x` (None: not a firmware module, e.g. `asyncio`)."""
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return None
    if len(parts) == 1:
        return source / "__init__.py"
    py = source.joinpath(*parts[1:]).with_suffix(".py")
    return py if py.is_file() else None


def _import_base(py: Path, source: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names: `from .x import y` in firmware/a.py
    is firmware.x, `from . import x` is firmware (then x in it)."""
    if node.level == 0:
        return node.module or ""   # always named at level 0
    rel = py.relative_to(source)
    if rel.name in BOARD_SCRIPTS and len(rel.parts) == 1:
        raise BuildError(f"{py.relative_to(source.parent)}: a board script runs outside the "
                         f"package: a relative import cannot work there")
    package = [PACKAGE, *rel.parent.parts]
    if node.level > len(package):
        raise BuildError(f"{py.relative_to(source.parent)}: relative import beyond the package")
    parent = ".".join(package[:len(package) - node.level + 1])
    return f"{parent}.{node.module}" if node.module else parent


def _is_import_error(handler: ast.ExceptHandler) -> bool:
    kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(isinstance(k, ast.Name) and k.id in ("ImportError", "ModuleNotFoundError")
               for k in kinds)


def _board_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of tree (as ast.walk) but those of an `except ImportError:` handler: the
    firmware's fallback for CPython, where a module MicroPython has is missing
    (`try: from asyncio import core` ... `except ImportError: from .x_cpython import ...`),
    which a board never runs."""
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo += [child for child in ast.iter_child_nodes(node)
                 if not (isinstance(child, ast.ExceptHandler) and _is_import_error(child))]


def imports_of(py: Path, source: Path = SOURCE) -> set[Path]:
    """The firmware modules a file's import statements name, anywhere in it (a lazy import
    inside a function counts: the path that runs it may come on any board), relative
    imports (`from .x import y`) included, those of a CPython fallback left out
    (_board_nodes)."""
    tree = ast.parse(py.read_text(), str(py))
    found: set[Path] = set()
    for node in _board_nodes(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            # `from firmware import config` imports firmware.config; `from firmware.x
            # import y` imports firmware.x (y is a name in it).
            base = _import_base(py, source, node)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):   # `import firmware.x` loads firmware too
                path = _module_path(source, ".".join(parts[:i]))
                if path is not None:
                    found.add(path)
    return found


def link_modules(mode: str, source: Path = SOURCE) -> list[Path]:
    """The firmware's source files a board of link `mode` imports: the import closure of
    boot.py and main.py plus the link's modules from the app's table."""
    table = link_table(source)
    if mode not in table:
        raise BuildError(f"unknown link mode {mode!r}: choose from {', '.join(table)}")
    todo = [source / name for name in BOARD_SCRIPTS] + [source / f"{m}.py" for m in table[mode]]
    seen: set[Path] = set()
    while todo:
        py = todo.pop()
        if py in seen:
            continue
        if not py.is_file():
            raise BuildError(f"{py.relative_to(source.parent)} is imported but does not exist")
        seen.add(py)
        todo += [p for p in imports_of(py, source) if p not in seen]
    return sorted(seen)


def bundle_names(mode: str, source: Path = SOURCE) -> set[str]:
    """The files of a bundle (paths inside it: boot.py, firmware/app.mpy, ...) that a board
    of link `mode` needs."""
    out = set()
    for py in link_modules(mode, source):
        rel = py.relative_to(source)
        if rel.name in BOARD_SCRIPTS and len(rel.parts) == 1:
            out.add(rel.name)
        else:
            out.add((Path(source.name) / rel.with_suffix(".mpy")).as_posix())
    return out


# -- the build ----------------------------------------------------------------------------------

def default_out(link: str | None) -> Path:
    return BUILD if link is None else BUILD.with_name(f"firmware-{link}")


def build(source: Path = SOURCE, out: Path | None = None, march: str | None = None,
          debug: bool = False, link: str | None = None) -> Bundle:
    """Compile the firmware modules (every one, or those a board of link mode `link`
    imports); raise BuildError on the first rejected file. debug keeps source line
    numbers in the .mpy files (costs the board RAM)."""
    optimize = 0 if debug else OPTIMIZE
    if out is None:
        out = default_out(link)
    wanted = None if link is None else set(link_modules(link, source))
    if out.exists():
        shutil.rmtree(out)
    files: list[Path] = []
    errors: list[str] = []
    for py in sorted(source.rglob("*.py")):
        rel = py.relative_to(source)
        if "__pycache__" in rel.parts:
            continue
        if wanted is not None and py not in wanted:
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
    parser.add_argument("--out", type=Path, help="bundle folder, replaced (default build/firmware, "
                                                  "or build/firmware-MODE with --link)")
    parser.add_argument("--link", metavar="MODE",
                        help="only the modules a board of this link mode imports (modbus-rtu, "
                             "modbus-tcp, cbor-serial, cbor-tcp)")
    parser.add_argument("--march", help="mpy-cross -march (e.g. xtensawin, armv6m) for native code")
    parser.add_argument("--debug", action="store_true",
                        help="keep source line numbers (tracebacks name them; costs board RAM)")
    args = parser.parse_args(argv)
    try:
        bundle = build(args.source, args.out, args.march, args.debug, args.link)
    except BuildError as exc:
        print(f"firmware build failed: {exc}", file=sys.stderr)
        return 1
    for f in bundle.files:
        print(f"  {f.stat().st_size:6d}  {f.relative_to(bundle.root)}")
    which = f"link mode {args.link}" if args.link else "every link mode"
    print(f"firmware bundle ({which}): {len(bundle.files)} files, {bundle.size_bytes} bytes in {bundle.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
