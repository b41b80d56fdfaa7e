"""`python -m hil`: the harness's command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hil", description="EV column HIL harness")
    sub = parser.add_subparsers(dest="command", required=True)
    from hil import demo

    demo.add_parser(sub)
    from hil.cli_trace import add_import_parser, add_info_parser

    add_import_parser(sub)
    add_info_parser(sub)
    from hil import validate_ev

    validate_ev.add_parser(sub)
    from hil import scenarios
    from hil.replay import cli as replay_cli

    replay_cli.add_parsers(sub)
    scenarios.add_parser(sub)
    from hil import cli_column

    cli_column.add_parser(sub)
    from hil import soak

    soak.add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
