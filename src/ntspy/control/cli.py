"""``ntspy ctl``: status views of a running ntspy daemon, like chronyc."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from ..server.stats import format_serverstats
from .format import interval
from .protocol import DEFAULT_SOCKET, ControlError, request

COMMANDS = ("serverstats", "serverkeys")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-s", "--socket", type=Path, default=DEFAULT_SOCKET,
                        help=f"the daemon's control socket (default {DEFAULT_SOCKET})")
    parser.add_argument("--json", action="store_true", help="print the raw result as JSON")
    parser.add_argument("subcommand", choices=COMMANDS, metavar="COMMAND",
                        help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs="*", help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    try:
        result = asyncio.run(request(args.socket, args.subcommand, list(args.args)))
    except ControlError as exc:
        print(f"ntspy ctl: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        sys.stdout.write(render(args.subcommand, result))
    return 0


def render(command: str, result: Any) -> str:
    if command == "serverstats":
        return format_serverstats(result)
    if command == "serverkeys":
        lines = ["Key ID    Age", "=============="]
        lines += [f"{k['id']:08x} {interval(k['age'])}" for k in result]
        return "\n".join(lines) + "\n"
    return json.dumps(result, indent=2) + "\n"
