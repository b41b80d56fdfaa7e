"""DNO control-room console: watch a site, send it a signed limit, see what happened.

    python -m tools.dno watch    --site depot-1 [--column c01] [--json] [--once | --duration S]
    python -m tools.dno limit    --site depot-1 [--column c01] (--amps A | --kw KW) --validity 15m
                                 --key-file dno-keys [--key-id dno-1] [--settle 10]
    python -m tools.dno failsafe --site depot-1 (--amps A | --kw KW) --validity 24h [--duration 2h]
                                 --key-file dno-keys [--key-id dno-1]

plus the connection options of every command: --broker HOST:PORT, --tls-ca/--tls-cert/--tls-key,
--username/--password-file (a password is never given on the command line), --mqtt 5|3.1.1.

`limit` signs the command (gateway.north.auth.sign_command, HMAC over the topic and the body),
publishes it with an MQTT 5 response topic under the site's ack namespace
(evedge/v1/<site>/ack/<client-id>, the only place the broker lets a gateway answer) and
correlation data, prints the ack, then waits --settle seconds and prints what the site's
telemetry measured against the limit: an ack is not proof.

Exit status: 0 done (limit: accepted and the measured load within it); 1 rejected, no ack, or
(watch --once) no telemetry in time; 2 a usage or connection problem (one line on stderr:
broker unreachable, credentials refused, TLS, key file, unknown or offline site); 3 accepted
but the measured load is above the limit, or there was no telemetry to judge it by.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from gateway.north import topics
from gateway.north.auth import CanonicalError, KeyStore, KeyTableError, sign_command
from gateway.north.payloads import FAILSAFE_DURATION_S, MAX_VALIDITY_S, utc_ms
from tools import dno_view as view
from tools.dno_link import EXIT_USAGE, ConnectOptions, ConsoleError, Link, Message

PROG = "python -m tools.dno"
EXIT_REJECTED = 1
EXIT_NOT_CONFIRMED = 3
EPILOG = """\
examples (connection options go after the command):
  %(prog)s watch --site depot-1 --broker broker.dno.example:8883 \\
      --tls-ca ca.pem --tls-cert dno-ops.pem --tls-key dno-ops.key
  %(prog)s limit --site depot-1 --amps 40 --validity 15m --key-file dno-keys ...
  %(prog)s limit --site depot-1 --column c01 --kw 7.4 --validity 1h --key-file dno-keys ...
  %(prog)s failsafe --site depot-1 --amps 32 --validity 24h --duration 2h --key-file dno-keys ...
  %(prog)s COMMAND --help     all options of a command

exit status: 0 done (limit: accepted and the measured load within it); 1 rejected, no ack,
or no telemetry for watch --once; 2 usage or connection problem (one line on stderr);
3 accepted, but the measured load is above the limit or there was no telemetry to judge.
Walkthrough: docs/dno-console.md
"""
STATE_WAIT_S = 2.0        # how long the retained gateway state may take after the SUBACK


# -- arguments --------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:   # one line, not the usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _broker(text: str) -> tuple[str, int | None]:
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\s]+)(?::(\d+))?", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if port is not None and not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"port {port} is not 1-65535")
    return host, int(port) if port is not None else None


def _ident(text: str) -> str:
    if not topics.valid_id(text):
        raise argparse.ArgumentTypeError(f"{text!r}: ids are 1-64 characters of [A-Za-z0-9_.-], "
                                         "starting with a letter or digit")
    return text


def _seconds(text: str) -> float:
    """900, 900s, 15m, 2h, 1.5h."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 900, 15m, 2h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0")
    return value


def _connection_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--broker", type=_broker, default=("127.0.0.1", None), metavar="HOST:PORT",
                   help="the control room broker (default 127.0.0.1, port 8883 with TLS, else 1883)")
    g.add_argument("--mqtt", choices=("5", "3.1.1"), default="5",
                   help="MQTT version (default 5: acks come back on your own response topic)")
    g.add_argument("--client-id", type=_ident, default=None,
                   help="MQTT client id, also names your ack topic (default dno-console-<random>)")
    g.add_argument("--username", help="broker username (password from --password-file)")
    g.add_argument("--password-file", type=Path, metavar="FILE",
                   help="file holding the broker password on its first line (mode 600)")
    g.add_argument("--tls", action="store_true",
                   help="TLS with the system's CAs (implied by --tls-ca/--tls-cert)")
    g.add_argument("--tls-ca", type=Path, metavar="PEM", help="the CA that signed the broker's certificate")
    g.add_argument("--tls-cert", type=Path, metavar="PEM",
                   help="your client certificate (its CN is your username)")
    g.add_argument("--tls-key", type=Path, metavar="PEM", help="your client certificate's private key")
    g.add_argument("--connect-timeout", type=_seconds, default=10.0, metavar="S", help="default 10 s")
    return p


def _signing_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("signing")
    g.add_argument("--key-file", type=Path, required=True, metavar="FILE",
                   help="the shared command keys: lines 'key_id:hex', mode 600 (as the gateway's "
                   "[dno] keys_file)")
    g.add_argument("--key-id", help="which key of the file signs (default: the only one in the file)")
    g.add_argument("--ack-timeout", type=_seconds, default=15.0, metavar="S",
                   help="how long to wait for the gateway's ack (default 15 s)")


def _limit_value(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--amps", type=_non_negative, metavar="A", help="limit in amps per phase")
    g.add_argument("--kw", type=_non_negative, metavar="KW",
                   help="limit in kW (the gateway converts: I = P / (230 V x phases))")


def parser() -> argparse.ArgumentParser:
    conn = _connection_options()
    p = _Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
                description="DNO control-room console for evedge sites over MQTT: watch a site, "
                "send a signed limit,\nprint the ack and the measured result.", epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    w = sub.add_parser("watch", parents=[conn],
                       help="live lines for a site's telemetry, status, events, acks",
                       description="Print the site's messages as they arrive: retained gateway state and "
                       "column status first, then telemetry, events and acks (duplicates dropped by seq).")
    w.add_argument("--site", type=_ident, required=True)
    w.add_argument("--column", type=_ident, help="only this column (and the site lines)")
    w.add_argument("--json", action="store_true",
                   help="one raw JSON object per message: topic, retain, payload")
    w.add_argument("--once", action="store_true", help="stop after the first site telemetry (one round)")
    w.add_argument("--duration", type=_seconds, metavar="S", help="stop after S seconds")

    lim = sub.add_parser("limit", parents=[conn],
                         help="send a signed site or column limit, print ack and result",
                         description="Sign and send a site limit (or, with --column, a column limit), wait "
                         "for the ack, then wait --settle seconds and print the measured result.")
    lim.add_argument("--site", type=_ident, required=True)
    lim.add_argument("--column", type=_ident, help="limit this column instead of the whole site")
    _limit_value(lim)
    lim.add_argument("--validity", type=_seconds, required=True, metavar="S",
                     help=f"how long the limit holds: seconds, or 15m, 2h "
                     f"(at most {MAX_VALIDITY_S // 3600} h)")
    lim.add_argument("--settle", type=_seconds, default=10.0, metavar="S",
                     help="wait this long after the ack, then judge telemetry (default 10 s; 0: do not)")
    lim.add_argument("--json", action="store_true",
                     help="print one JSON object: command, ack, measured result")
    _signing_options(lim)

    fs = sub.add_parser("failsafe", parents=[conn], help="send a signed site failsafe limit, print the ack",
                        description="The site limit the gateway falls back to when DNO limits expire while "
                        "the DNO link is down.")
    fs.add_argument("--site", type=_ident, required=True)
    _limit_value(fs)
    fs.add_argument("--validity", type=_seconds, required=True, metavar="S",
                    help="how long this failsafe setting holds (seconds, 15m, 24h)")
    lo, hi = FAILSAFE_DURATION_S
    fs.add_argument("--duration", type=_seconds, metavar="S",
                    help=f"how long the failsafe holds once it applies ({lo} s to {hi // 3600} h)")
    fs.add_argument("--json", action="store_true", help="print the ack as one JSON object")
    _signing_options(fs)
    return p


def connect_options(args: argparse.Namespace) -> ConnectOptions:
    host, port = args.broker
    tls = bool(args.tls or args.tls_ca or args.tls_cert)
    if args.tls_key and not args.tls_cert:
        raise ConsoleError("--tls-key needs --tls-cert")
    if args.password_file and not args.username:
        raise ConsoleError("--password-file needs --username")
    return ConnectOptions(host=host, port=port or (8883 if tls else 1883), protocol=args.mqtt,
                          client_id=args.client_id or f"dno-console-{secrets.token_hex(3)}",
                          username=args.username, password_file=args.password_file, tls=tls,
                          tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
                          connect_timeout_s=args.connect_timeout)


def load_key(path: Path, key_id: str | None) -> tuple[str, bytes]:
    try:
        store = KeyStore.from_file(path)
    except OSError as exc:
        raise ConsoleError(f"key file {path}: {exc.strerror or exc}") from None
    except (KeyTableError, UnicodeDecodeError) as exc:
        why = str(exc)          # KeyTableError names the file itself, and never holds key material
        why = why[len(str(path)):].lstrip(": ") if why.startswith(str(path)) else why
        raise ConsoleError(f"key file {path}: {why}") from None
    if key_id is None:
        if len(store) != 1:
            raise ConsoleError(f"key file {path} holds {len(store)} keys ({', '.join(store.key_ids)}): "
                               "say which with --key-id")
        key_id = store.key_ids[0]
    key = store.get(key_id)
    if key is None:
        raise ConsoleError(f"key file {path} has no key {key_id!r} (it has {', '.join(store.key_ids)})")
    return key_id, key


# -- output -----------------------------------------------------------------------------------

def out(line: str = "") -> None:
    print(line, flush=True)


def _site_filters(site: str, *, reply_to: str | None = None) -> list[str]:
    base = f"{topics.PREFIX}/{site}"
    filters = [f for f in topics.consumer_subscriptions(site) if f != topics.ack(site)]
    filters.insert(1, f"{base}/bridge/state")
    filters.append(f"{base}/ack/#" if reply_to is None else topics.ack(site))
    if reply_to is not None:
        filters.append(reply_to)
    return filters


def await_site(link: Link, site: str, sink: list[Message]) -> dict[str, Any]:
    """The site's retained gateway state; every message read meanwhile goes to `sink`."""
    deadline = time.monotonic() + STATE_WAIT_S
    state_topic = topics.gateway_state(site)
    while True:
        msg = link.next_message(deadline - time.monotonic())
        if msg is None:
            raise ConsoleError(f"unknown site {site!r}: no gateway state on {state_topic} (the site id "
                               "is wrong, its gateway never connected to this broker, or this user may "
                               "not read it)")
        sink.append(msg)
        if msg.topic == state_topic and msg.payload is not None:
            return msg.payload


# -- watch ------------------------------------------------------------------------------------

def watch(args: argparse.Namespace) -> int:
    site = args.site
    with Link(connect_options(args)) as link:
        link.connect()
        link.subscribe(_site_filters(site))
        first: list[Message] = []
        await_site(link, site, first)
        site_view = view.SiteView(site)
        started = time.monotonic()
        end = started + args.duration if args.duration is not None else None
        if args.once and end is None:
            end = started + 60.0
        queue_ = list(first)
        telemetry_topic = topics.site_telemetry(site)
        while True:
            msg = queue_.pop(0) if queue_ else link.next_message(
                1.0 if end is None else max(0.0, end - time.monotonic()))
            if msg is None:
                if end is not None and time.monotonic() >= end:
                    break
                continue
            if args.column and "/columns/" in msg.topic and f"/columns/{args.column}/" not in msg.topic:
                continue
            if args.json:
                body: Any = msg.payload if msg.payload is not None else msg.raw.decode(errors="replace")
                out(json.dumps({"topic": msg.topic, "retain": msg.retain, "payload": body}))
            elif site_view.take(msg.topic, msg.payload, msg.at):
                out(view.message_line(site, msg.topic, msg.payload, msg.raw))
            if args.once and msg.topic == telemetry_topic:
                return 0
            if end is not None and time.monotonic() >= end:
                break
        if args.once:
            raise ConsoleError(f"no site telemetry from {site!r} within {end - started:g} s", 1)
    return 0


# -- commands ---------------------------------------------------------------------------------

def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _command_body(args: argparse.Namespace) -> dict[str, Any]:
    if not 0 < args.validity <= MAX_VALIDITY_S:
        raise ConsoleError(f"--validity must be more than 0 and at most {MAX_VALIDITY_S} s")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    body: dict[str, Any] = {"id": f"dno-{stamp}-{secrets.token_hex(3)}", "issued_ms": utc_ms(),
                            "validity_s": _number(args.validity)}
    if args.amps is not None:
        body["limit_a"] = _number(args.amps)
    else:
        body["limit_kw"] = _number(args.kw)
    return body


def _target(args: argparse.Namespace) -> tuple[str, str]:
    if args.command == "failsafe":
        held = f", held {args.duration:g} s once it applies" if args.duration is not None else ""
        return topics.cmd_site_failsafe(args.site), f"the failsafe of site {args.site}{held}"
    if args.column:
        return topics.cmd_column_limit(args.site, args.column), f"column {args.column} of site {args.site}"
    return topics.cmd_site_limit(args.site), f"site {args.site}"


def send(args: argparse.Namespace) -> int:
    """`limit` and `failsafe`: sign, send, ack, and (limits) the measured result."""
    key_id, key = load_key(args.key_file, args.key_id)
    body = _command_body(args)
    if args.command == "failsafe" and args.duration is not None:
        lo, hi = FAILSAFE_DURATION_S
        if not lo <= args.duration <= hi:
            raise ConsoleError(f"--duration must be {lo} s to {hi} s")
        body["duration_s"] = int(args.duration)
    topic, what = _target(args)
    try:
        command = sign_command(body, topic, key_id, key)
    except CanonicalError as exc:      # e.g. 1e-05 A: a number with no canonical JSON form
        raise ConsoleError(f"cannot sign this command: {exc}") from None
    opts = connect_options(args)
    site = args.site
    reply_to = f"{topics.ack(site)}/{opts.client_id}" if opts.protocol == "5" else None
    correlation = uuid.uuid4().bytes
    text = not args.json
    with Link(opts) as link:
        link.connect()
        link.subscribe(_site_filters(site, reply_to=reply_to))
        early: list[Message] = []
        state = await_site(link, site, early)
        if state.get("state") != "online":
            raise ConsoleError(f"site {site!r} is offline since {view.utc_clock(state.get('ts_ms'))} "
                               f"({state.get('cause', 'no cause given')}): its gateway would not receive "
                               "the command")
        site_view = view.SiteView(site)
        for msg in early:
            site_view.take(msg.topic, msg.payload, msg.at)
        amount = f"{body['limit_a']} A" if "limit_a" in body else f"{body['limit_kw']} kW"
        if text:
            out(f"sending {amount} to {what}, valid {body['validity_s']} s "
                f"(until {view.utc_clock(body['issued_ms'] + body['validity_s'] * 1000)}), id {body['id']}, "
                f"key {key_id}")
        link.publish(topic, json.dumps(command).encode(), response_topic=reply_to, correlation=correlation)
        ack_msg = _await_ack(link, site_view, command["id"], correlation, args.ack_timeout)
        if ack_msg is None:
            raise ConsoleError(f"no ack from site {site!r} within {args.ack_timeout:g} s: is its gateway "
                               f"online and subscribed (gateway/state)? The command may still apply; "
                               f"watch the site", EXIT_REJECTED)
        ack = ack_msg.payload or {}
        report: dict[str, Any] = {"topic": topic, "command": {k: v for k, v in command.items() if k != "sig"},
                                  "ack_topic": ack_msg.topic, "ack": ack}
        if text:
            label = "site failsafe" if args.command == "failsafe" else "applied limit"
            for line in view.ack_report(ack, label):
                out(line)
        if ack.get("result") != "accepted":
            if text and ack.get("reason") == "unknown_column" and site_view.columns:
                out(f"  columns of {site}: {', '.join(site_view.columns)}")
            _json_report(args, report)
            return EXIT_REJECTED
        if args.command == "failsafe" or args.settle <= 0:
            _json_report(args, report)
            return 0
        if text:
            out(f"waiting {args.settle:g} s for the site to follow...")
        deadline = time.monotonic() + args.settle
        while (msg := link.next_message(deadline - time.monotonic())) is not None:
            site_view.take(msg.topic, msg.payload, msg.at)
        verdict = view.measured_result(site_view, since=ack_msg.at, limit_a=ack.get("applied_limit_a"),
                                       column_id=args.column)
        if text:
            for line in verdict.lines:
                out(line)
        report["measured"] = {"within": verdict.within, **verdict.detail}
        _json_report(args, report)
        return 0 if verdict.within else EXIT_NOT_CONFIRMED


def _await_ack(link: Link, site_view: view.SiteView, cmd_id: str, correlation: bytes,
               timeout_s: float) -> Message | None:
    deadline = time.monotonic() + timeout_s
    ack_base = topics.ack(site_view.site_id)
    while (msg := link.next_message(deadline - time.monotonic())) is not None:
        if msg.topic == ack_base or msg.topic.startswith(ack_base + "/"):
            if msg.correlation == correlation or (msg.payload or {}).get("id") == cmd_id:
                return msg
            continue
        site_view.take(msg.topic, msg.payload, msg.at)
    return None


def _json_report(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.json:
        out(json.dumps(report))


# -- entry point ------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "watch":
            return watch(args)
        return send(args)
    except ConsoleError as exc:
        print(f"dno: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except KeyboardInterrupt:
        return 0 if args.command == "watch" else 130
    except BrokenPipeError:        # `watch | head`: the reader is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error at exit
        return 0
    except Exception as exc:
        print(f"dno: internal error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
