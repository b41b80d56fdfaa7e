"""Flash a column controller: firmware and config over the board's USB serial port.

    python -m tools.flash /dev/ttyACM0 --config column.json

Steps, each one stopping the flash with a clear message when it fails:
  1. check the config with the firmware's own validator (firmware/config.py), before
     anything touches the device: a config that does not validate is refused, naming
     every wrong key;
  2. compile the firmware with mpy-cross (tools.firmware_build) into a temporary folder
     (or take a prebuilt bundle with --bundle), and take from it only the modules a board
     of the config's link mode imports (tools.firmware_build.link_modules; with
     --keep-config, the link mode of the config the device keeps);
  3. check the port: present, not held by another program, and a MicroPython REPL
     answering on it;
  4. copy the bundle (boot.py, main.py, firmware/*.mpy) with mpremote, removing stale
     firmware modules; write column.json (through a temporary file and a rename, so a
     power cut never leaves half a config);
  5. verify the SHA-256 of every file on the device against the bundle;
  6. reset the device: it boots the new firmware with its config.

The energy register files on the device (energy_a.bin, energy_b.bin) are never touched.

Exit status: 0 flashed and verified; 1 the flash failed (build error, a copy error, the
device stopped answering during the copy, or a file on the device that does not match:
the device is then left unreset, flash again); 2 refused before anything was written
(bad config, missing or busy port, no answer from the device, firmware the board's
MicroPython cannot load).
"""

from __future__ import annotations

import argparse
import ast
import errno
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import serial

REPO = Path(__file__).resolve().parents[1]
CONFIG_NAME = "column.json"
EXIT_FAILED = 1
EXIT_REFUSED = 2
RAW_BANNER = b"raw REPL; CTRL-B to exit"
# sys.implementation._mpy: .mpy version in the low byte, then sub-version and native arch.
MPY_ARCHES = ("", "x86", "x64", "armv6", "armv6m", "armv7m", "armv7em", "armv7emsp", "armv7emdp",
              "xtensa", "xtensawin", "rv32imc", "rv64imc")


class FlashError(Exception):
    """A flash that cannot go on; the message is the one line the technician reads."""

    def __init__(self, message: str, code: int = EXIT_REFUSED) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class BundleFile:
    local: Path
    remote: str           # path on the device, relative to its filesystem root
    sha256: str
    size: int


@dataclass
class Plan:
    files: list[BundleFile]
    config_text: str | None      # None: keep the device's column.json
    dirs: list[str] = field(default_factory=list)
    link: str | None = None      # the link mode the files are for (None: every mode's)

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class DeviceInfo:
    version: tuple[int, ...]
    mpy: int                     # sys.implementation._mpy, 0 when the board does not say
    config_text: str | None      # the device's column.json, None when it has none


# -- config ------------------------------------------------------------------------------
def load_config(path: Path) -> tuple[dict[str, object], str]:
    """The config dict and the text to write; FlashError naming each wrong key."""
    from firmware.config import validate

    try:
        raw = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise FlashError(f"config file {path} not found") from None
    except (OSError, UnicodeError) as exc:
        raise FlashError(f"cannot read config file {path}: {exc}") from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FlashError(f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} "
                         f"column {exc.colno}") from None
    errors = validate(data)
    if errors:
        lines = [f"{path} does not validate, nothing was written to the device:"]
        lines += [f"  {e}" for e in errors]
        raise FlashError("\n".join(lines))
    assert isinstance(data, dict)  # validate() accepts objects only
    return data, json.dumps(data, indent=2) + "\n"


def describe_config(cfg: dict[str, object]) -> str:
    link = cfg.get("link")
    mode = link.get("mode") if isinstance(link, dict) else "?"
    return f"column {cfg.get('column_id')}, bus address {cfg.get('bus_address')}, link {mode}"


# -- bundle ------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def bundle_files(root: Path, link: str | None = None) -> list[BundleFile]:
    """The files of a firmware bundle (tools.firmware_build layout), in copy order: with
    `link`, only those a board of that link mode imports (all of them must be there)."""
    from tools.firmware_build import BOARD_SCRIPTS, BuildError, bundle_names

    files = []
    for name in BOARD_SCRIPTS:
        p = root / name
        if not p.is_file():
            raise FlashError(f"{root} is not a firmware bundle: {name} is missing")
        files.append(p)
    package = root / "firmware"
    modules = sorted(p for p in package.rglob("*.mpy")) if package.is_dir() else []
    if not modules:
        raise FlashError(f"{root} is not a firmware bundle: no firmware/*.mpy modules")
    if link is not None:
        try:
            wanted = bundle_names(link)
        except BuildError as exc:
            raise FlashError(str(exc)) from None
        have = {p.relative_to(root).as_posix() for p in modules}
        missing = sorted(n for n in wanted - have if n.endswith(".mpy"))
        if missing:
            raise FlashError(f"the bundle {root} lacks {', '.join(missing)}, which a column with link "
                             f"mode {link} imports: build it for that mode (python -m "
                             f"tools.firmware_build --link {link}) or flash without --bundle")
        modules = [p for p in modules if p.relative_to(root).as_posix() in wanted]
    files += modules
    return [BundleFile(p, p.relative_to(root).as_posix(), _sha256(p), p.stat().st_size) for p in files]


def link_mode(cfg: dict[str, object]) -> str | None:
    link = cfg.get("link")
    mode = link.get("mode") if isinstance(link, dict) else None
    return mode if isinstance(mode, str) else None


def build_bundle(out: Path, march: str | None, link: str | None = None) -> Path:
    """Compile the firmware (only the modules of link mode `link`, when given)."""
    from tools.firmware_build import BuildError, build

    try:
        return build(out=out, march=march, link=link).root
    except BuildError as exc:
        raise FlashError(f"firmware build failed: {exc}", EXIT_FAILED) from None


def plan_for(root: Path, link: str | None, config_text: str | None) -> Plan:
    files = bundle_files(root, link)
    dirs = sorted({f.remote.rpartition("/")[0] for f in files} - {""}, key=lambda d: (d.count("/"), d))
    return Plan(files, config_text, dirs, link)


def check_mpy_compat(files: Sequence[BundleFile], mpy: int) -> None:
    """Refuse modules the board's MicroPython cannot import (sys.implementation._mpy)."""
    if not mpy:
        return  # the board does not say; an import error will
    dev_ver, dev_sub, dev_arch = mpy & 0xFF, (mpy >> 8) & 3, (mpy >> 10) & 0xF
    for f in files:
        if not f.remote.endswith(".mpy"):
            continue
        head = f.local.read_bytes()[:4]
        if len(head) < 4 or head[0] != ord("M"):
            raise FlashError(f"{f.remote} is not a .mpy file", EXIT_FAILED)
        if head[1] != dev_ver:
            raise FlashError(f"the board's MicroPython loads .mpy version {dev_ver}, the firmware is "
                             f".mpy version {head[1]}: update MicroPython on the board (1.23 or later "
                             f"for version 6), or build with a matching mpy-cross")
        feat = head[2]
        if feat:  # native code: sub-version and architecture must match too
            sub, arch = feat & 3, feat >> 2
            if sub != dev_sub or arch != dev_arch:
                name = MPY_ARCHES[arch] if arch < len(MPY_ARCHES) else str(arch)
                dev = MPY_ARCHES[dev_arch] if dev_arch < len(MPY_ARCHES) else str(dev_arch)
                raise FlashError(f"{f.remote} holds native code for {name or 'no arch'}, the board is "
                                 f"{dev or 'bytecode-only'}: build with --march {dev or '(none)'}")


# -- port --------------------------------------------------------------------------------
def _port_error(port: str, exc: Exception) -> FlashError:
    code = getattr(exc, "errno", None)
    text = str(exc)
    if code in (errno.EBUSY, errno.EAGAIN, errno.EWOULDBLOCK) or "exclusively lock" in text:
        return FlashError(f"port {port} is busy: another program holds it (close any serial monitor, "
                          f"mpremote or Thonny using it, then try again)")
    if code == errno.ENOENT:
        return _missing(port)
    if code == errno.ENOTTY or "Inappropriate ioctl" in text:
        return FlashError(f"{port} is not a serial port")
    if code == errno.EACCES:
        return FlashError(f"no permission to open {port}: add your user to the 'dialout' group "
                          f"(sudo usermod -aG dialout $USER) and log in again")
    return FlashError(f"cannot open port {port}: {text}")


def _missing(port: str) -> FlashError:
    return FlashError(f"port {port} not found: is the board plugged in and powered? "
                      f"(list ports with: python -m serial.tools.list_ports)")


def _close(ser: serial.Serial) -> None:
    # As mpremote does: drop RTS then DTR first, so an ESP32's auto-reset circuit stays idle.
    for attr in ("rts", "dtr"):
        try:
            setattr(ser, attr, False)
        except (OSError, serial.SerialException):  # a pty or an adapter without modem lines
            pass
    ser.close()


def open_port(port: str) -> serial.Serial:
    """The port opened exclusively (an advisory lock, as mpremote takes), or FlashError."""
    if port.startswith("/dev/") and not os.path.exists(port):
        raise _missing(port)
    try:
        return serial.Serial(port, 115200, timeout=0.05, exclusive=True)
    except (serial.SerialException, OSError) as exc:
        raise _port_error(port, exc) from None


def check_port_free(port: str) -> None:
    """Present and not held by another program; nothing is sent."""
    _close(open_port(port))


def probe(port: str, timeout_s: float) -> None:
    """Interrupt whatever runs (Ctrl-C), ask for the raw REPL (Ctrl-A) and wait for it."""
    ser = open_port(port)
    try:
        deadline = time.monotonic() + timeout_s
        seen = b""
        next_try = 0.0
        while time.monotonic() < deadline:
            if time.monotonic() >= next_try:
                ser.write(b"\r\x03\x03\r\x01")  # twice: a program may catch the first Ctrl-C
                next_try = time.monotonic() + 1.0
            seen = (seen + ser.read(256))[-512:]
            if RAW_BANNER in seen:
                ser.write(b"\r\x02")  # back to the friendly REPL
                return
        raise FlashError(f"the device on {port} does not answer (no MicroPython prompt within "
                         f"{timeout_s:g} s): check that the board is powered, runs MicroPython, and "
                         f"that {port} is its USB port, not the RS-485 adapter")
    finally:
        _close(ser)


# -- mpremote ----------------------------------------------------------------------------
def mpremote(port: str, args: Sequence[str], step: str, timeout_s: float,
             stall_code: int = EXIT_FAILED) -> str:
    """Run the real mpremote on the port; its stdout, or FlashError with one line.
    stall_code: the exit status when the device stops answering (EXIT_REFUSED while
    nothing has been written yet)."""
    cmd = [sys.executable, "-m", "mpremote", "connect", port, *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                              timeout=timeout_s, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise FlashError(f"the device on {port} stopped answering while {step} "
                         f"(mpremote got no reply within {timeout_s:g} s)", stall_code) from None
    except FileNotFoundError:
        raise FlashError("mpremote is not installed: run 'make setup'", EXIT_FAILED) from None
    if done.returncode == 0:
        return done.stdout
    text = done.stderr + "\n" + done.stdout
    last = next((ln.strip() for ln in reversed(text.splitlines()) if ln.strip()), "no output")
    if "failed to access" in text:
        raise FlashError(f"port {port} is busy: another program holds it (close it and try again)")
    if "No module named mpremote" in text:
        raise FlashError("mpremote is not installed: run 'make setup'", EXIT_FAILED)
    if "could not enter raw repl" in text or "timeout waiting" in text or "could not exec" in text:
        raise FlashError(f"the device on {port} stopped answering while {step}: {last}", stall_code)
    if "ENOSPC" in text:
        raise FlashError(f"the device's filesystem is full while {step}: remove files you do not "
                         f"need (mpremote connect {port} fs ls)", EXIT_FAILED)
    if "SerialException" in text or "disconnected" in text or "Input/output error" in text:
        raise FlashError(f"the device on {port} disconnected while {step}: {last}", EXIT_FAILED)
    raise FlashError(f"{step} failed: {last}", EXIT_FAILED)


_INFO_CODE = """\
import sys
try:
    _f = open('column.json')
    _t = _f.read()
    _f.close()
except OSError:
    _t = None
print('INFO', repr((tuple(sys.implementation.version[:3]), getattr(sys.implementation, '_mpy', 0), _t)))
"""


def device_info(port: str, timeout_s: float) -> DeviceInfo:
    out = mpremote(port, ["exec", _INFO_CODE], "reading the device", timeout_s, EXIT_REFUSED)
    for line in out.splitlines():
        if line.startswith("INFO "):
            try:
                version, mpy, text = ast.literal_eval(line[5:].strip())
                return DeviceInfo(tuple(version), int(mpy), text)
            except (ValueError, SyntaxError, TypeError):
                break
    raise FlashError(f"the device on {port} gave an unexpected answer: {out.strip()[:200]!r}")


def _prep_code(plan: Plan) -> str:
    """Make the bundle's folders and remove modules the new firmware does not have (a stale
    firmware/x.py would even shadow the new x.mpy)."""
    keep: dict[str, list[str]] = {d: [] for d in plan.dirs}
    for f in plan.files:
        folder, _, name = f.remote.rpartition("/")
        if folder:
            keep[folder].append(name)
    lines = ["import os"]
    for d in plan.dirs:
        lines += [f"try:\n os.mkdir({d!r})\nexcept OSError:\n pass",
                  f"for _e in os.ilistdir({d!r}):",
                  f" if _e[1] == 0x8000 and _e[0] not in {tuple(sorted(keep[d]))!r}:",
                  f"  os.remove({d!r} + '/' + _e[0])",
                  f"  print('REMOVED', {d!r} + '/' + _e[0])"]
    return "\n".join(lines) + "\n"


_FINISH_CODE = """\
import os
try:
    os.rename('column.json.tmp', 'column.json')
except OSError:
    os.remove('column.json')
    os.rename('column.json.tmp', 'column.json')
if hasattr(os, 'sync'):
    os.sync()
"""


def _hash_code(paths: Sequence[str]) -> str:
    return f"""\
import hashlib, binascii
_b = bytearray(512)
_m = memoryview(_b)
for _p in {tuple(paths)!r}:
    _h = hashlib.sha256()
    try:
        with open(_p, 'rb') as _f:
            while True:
                _n = _f.readinto(_b)
                if not _n:
                    break
                _h.update(_m[:_n])
        print('SHA', _p, binascii.hexlify(_h.digest()).decode())
    except OSError:
        print('SHA', _p, '-')
"""


def copy_and_verify(port: str, plan: Plan, config_file: Path | None, timeout_s: float) -> dict[str, str]:
    """One mpremote session: folders, files, config, then the hash of every file.
    Returns {remote path: sha256 or "-"} as the device reports it; prints what changed."""
    args: list[str] = ["exec", _prep_code(plan)]
    by_dir: dict[str, list[BundleFile]] = {}
    for f in plan.files:
        folder = f.remote.rpartition("/")[0]
        if folder:
            by_dir.setdefault(folder, []).append(f)
        else:
            args += ["+", "fs", "cp", str(f.local), ":" + f.remote]
    for folder, files in by_dir.items():
        args += ["+", "fs", "cp", *[str(f.local) for f in files], f":{folder}/"]
    paths = [f.remote for f in plan.files]
    if config_file is not None:
        args += ["+", "fs", "cp", str(config_file), ":column.json.tmp", "+", "exec", _FINISH_CODE]
        paths.append(CONFIG_NAME)
    args += ["+", "exec", _hash_code(paths)]
    out = mpremote(port, args, "copying the firmware", timeout_s)
    copied = unchanged = 0
    reported: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("cp "):
            copied += 1
        elif line.startswith("Up to date:"):
            unchanged += 1
        elif line.startswith("REMOVED "):
            print(f"  removed stale {line.split(' ', 1)[1].strip()}")
        elif line.startswith("SHA "):
            parts = line.split()
            if len(parts) == 3:
                reported[parts[1]] = parts[2]
    # mpremote names every file it copies ("cp ..."), then says "Up to date" for one it skips.
    print(f"  written: {copied - unchanged}, already up to date: {unchanged}")
    return reported


def verify(expected: dict[str, str], reported: dict[str, str]) -> list[str]:
    """One problem line per file that is missing or differs on the device."""
    problems = []
    for path, want in expected.items():
        got = reported.get(path)
        if got is None or got == "-":
            problems.append(f"{path} is missing on the device")
        elif got != want:
            problems.append(f"{path} differs on the device (sha256 {got[:12]}..., expected {want[:12]}...)")
    return problems


# -- the command -------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.flash", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("port", help="the board's USB serial port (e.g. /dev/ttyACM0, /dev/ttyUSB0, COM5)")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="the column's config (column.json) to write to the device")
    p.add_argument("--keep-config", action="store_true",
                   help="keep the column.json already on the device (checked against this firmware); "
                        "--config is then written only to a device that has none")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, build the firmware and check the port is free; send nothing")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--march", help="mpy-cross -march for native code (e.g. xtensawin for ESP32, "
                                     "armv6m for RP2040); not needed for the standard firmware")
    src.add_argument("--bundle", type=Path, metavar="DIR",
                     help="flash a prebuilt bundle (from 'make firmware') instead of compiling")
    p.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                   help="how long to wait for the device to answer (default 5)")
    return p


def run(args: argparse.Namespace) -> int:
    if args.config is None and not args.keep_config:
        raise FlashError("give the column's config with --config FILE (or --keep-config to keep the "
                         "one on the device)")
    # 1. The config, before anything touches the device.
    config_text = None
    link = None     # the link mode whose modules are flashed; with --keep-config the device's decides
    if args.config is not None:
        cfg, config_text = load_config(args.config)
        print(f"config {args.config}: valid ({describe_config(cfg)})")
        if not args.keep_config:
            link = link_mode(cfg)
    with tempfile.TemporaryDirectory(prefix="evedge-flash-") as tmp:
        # 2. The firmware: the modules a board of the link mode imports.
        root = (args.bundle if args.bundle is not None
                else build_bundle(Path(tmp) / "bundle", args.march, link))
        plan = plan_for(root, link, config_text)
        _say_firmware(plan, root, args.bundle is not None)
        if args.dry_run:
            _dry_run(args, plan)
        else:
            _flash(args, plan, Path(tmp), root)
    return 0


def _say_firmware(plan: Plan, root: Path, prebuilt: bool) -> None:
    origin = f"prebuilt bundle {root}" if prebuilt else "compiled with mpy-cross"
    which = f"for link mode {plan.link}" if plan.link else "for every link mode"
    print(f"firmware: {len(plan.files)} files, {plan.size_bytes} bytes {which} ({origin})")


def _dry_run(args: argparse.Namespace, plan: Plan) -> None:
    check_port_free(args.port)
    print(f"port {args.port}: present and free")
    for f in plan.files:
        print(f"  would copy {f.remote} ({f.size} bytes)")
    if plan.config_text is not None:
        unless = " unless the device has one" if args.keep_config else ""
        print(f"  would write {CONFIG_NAME}{unless}")
    if plan.link is None:
        print(f"  (of these, only the modules of the link mode in the {CONFIG_NAME} the device keeps)")
    print("dry run: nothing was sent to the device")


def _flash(args: argparse.Namespace, plan: Plan, tmp: Path, root: Path) -> None:
    port = args.port
    # 3. The device: answering, able to load the bundle, and its config when it is kept.
    probe(port, args.timeout)
    info = device_info(port, max(30.0, args.timeout))
    print(f"device on {port}: MicroPython {'.'.join(str(v) for v in info.version)}")
    check_mpy_compat(plan.files, info.mpy)
    config_file = None
    if args.keep_config and info.config_text is not None:
        kept = _check_kept_config(info.config_text)
        print(f"keeping the device's {CONFIG_NAME} ({describe_config(kept)})")
        config = kept
    elif plan.config_text is None:
        raise FlashError(f"the device has no {CONFIG_NAME}: give one with --config FILE")
    else:
        config_file = tmp / CONFIG_NAME
        config_file.write_text(plan.config_text, encoding="utf-8")
        config = json.loads(plan.config_text)
    if plan.link is None:
        # --keep-config: the config the device boots with decides which modules it imports.
        plan = plan_for(root, link_mode(config), plan.config_text)
        _say_firmware(plan, root, args.bundle is not None)
    # 4. and 5. Copy, then check every file's hash on the device.
    also = f" and {CONFIG_NAME}" if config_file is not None else ""
    print(f"copying {len(plan.files)} files{also} to {port} ...")
    reported = copy_and_verify(port, plan, config_file, 60.0 + plan.size_bytes / 1000.0)
    expected = {f.remote: f.sha256 for f in plan.files}
    if config_file is not None:
        expected[CONFIG_NAME] = _sha256(config_file)
    problems = verify(expected, reported)
    if problems:
        for line in problems:
            print(f"flash: verification failed: {line}", file=sys.stderr)
        raise FlashError("the device was not reset and still holds the bad copy: run the flash again; "
                         "if the same file fails again the board's flash memory may be failing", EXIT_FAILED)
    print(f"verified: sha256 of {len(expected)} files on the device match")
    # 6. Reset: the board boots the new firmware with its config.
    try:
        mpremote(port, ["reset"], "resetting the device", 30.0)
    except FlashError as exc:
        raise FlashError(f"flashed and verified, but the reset failed ({exc}): press the board's "
                         f"reset button or power-cycle it", EXIT_FAILED) from None
    print(f"device reset: the column boots the new firmware{also and ' with its new ' + CONFIG_NAME}")


def _check_kept_config(text: str) -> dict[str, object]:
    from firmware.config import validate

    try:
        data = json.loads(text)
    except ValueError as exc:
        raise FlashError(f"the {CONFIG_NAME} on the device is not valid JSON ({exc}): give a new one "
                         f"with --config FILE instead of --keep-config") from None
    errors = validate(data)
    if errors:
        raise FlashError(f"the {CONFIG_NAME} on the device does not validate with this firmware: "
                         f"{'; '.join(errors)}: give a corrected one with --config FILE")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except FlashError as exc:
        print(f"flash: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("flash: interrupted: if files were being copied, run the flash again", file=sys.stderr)
        return 130
    except Exception as exc:  # never a traceback in front of a technician
        print(f"flash: internal error: {type(exc).__name__}: {exc} (please report this)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
