"""Command line: ``python -m gateway run --config site.toml`` and ``python -m gateway check-config FILE``.

Exit codes: 0 ok (and after a clean SIGTERM/SIGINT shutdown); 2 a user error (bad arguments,
a config that does not check out, a file that cannot be opened): one line per problem on
stderr, never a traceback; 1 an unexpected failure while running (logged with its traceback
as a JSON line, so systemd restarts the service).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.logging_setup import LEVELS, setup_logging
from gateway.north.outbox import OutboxError
from gateway.north.settings import SettingsError

log = logging.getLogger("gateway")
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:   # one line, not the usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m gateway", description="EV charging site gateway: columns <-> MQTT.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run the gateway service for one site")
    run.add_argument("--config", required=True, type=Path, help="the site file (TOML)")
    run.add_argument("--log-level", choices=LEVELS, default="info", help="default: info")
    check = sub.add_parser("check-config", help="check a site file and say what is wrong")
    check.add_argument("config", type=Path, help="the site file (TOML)")
    return parser


def _user_errors(errors: Sequence[str], path: Path) -> int:
    for line in errors:
        print(f"{path}: {line}", file=sys.stderr)
    return EXIT_USAGE


def check_config_command(path: Path) -> int:
    try:
        config = load_config(path)
    except ConfigError as exc:
        n = len(exc.errors)
        _user_errors(exc.errors, path)
        print(f"{path}: {n} error{'s' if n != 1 else ''}", file=sys.stderr)
        return EXIT_USAGE
    for warning in config.warnings:
        print(f"{path}: warning: {warning}", file=sys.stderr)
    site = config.site
    kinds: dict[str, int] = {}
    for col in site.columns:
        kinds[col.link.kind] = kinds.get(col.link.kind, 0) + 1
    links = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) or "no columns"
    print(f"{path}: ok: site {site.id!r}, {len(site.columns)} columns ({links}), "
          f"{len(site.circuits)} circuits, broker {config.mqtt.host}:{config.mqtt.port}")
    return 0


async def _serve(config: GatewayConfig) -> None:
    from gateway.collector import manage_collector
    from gateway.service import GatewayService

    service = GatewayService(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.request_stop)

    collector = asyncio.create_task(manage_collector(service.ready, service.all_columns_online))
    try:
        await service.run()
    finally:
        collector.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def run_command(path: Path, level: str) -> int:
    setup_logging(level)
    try:
        config = load_config(path)
    except ConfigError as exc:
        return _user_errors(exc.errors, path)
    for warning in config.warnings:
        log.warning("config: %s", warning)
    try:
        asyncio.run(_serve(config))
    except (SettingsError, OutboxError) as exc:
        print(f"{path}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, sqlite3.Error) as exc:
        print(f"{path}: cannot start: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 0
    except BaseException:
        log.exception("gateway failed")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return check_config_command(args.config)
    return run_command(args.config, args.log_level)


if __name__ == "__main__":
    sys.exit(main())
