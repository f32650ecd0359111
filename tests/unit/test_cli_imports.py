"""``ntspy serve`` loads what serving needs and nothing else: no client code, no
stdlib ssl, no system OpenSSL (each costs every server worker memory)."""

from __future__ import annotations

import json
import subprocess
import sys

from ntspy import cli

PROBE = """
import json, sys
sys.argv = ["ntspy", *sys.argv[1:]]
from ntspy import cli
try:
    cli.main()
except SystemExit:
    pass
print(json.dumps(sorted(m for m, v in sys.modules.items() if v is not None)))
"""


def loaded_by(*argv: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, check=True
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_serve_loads_neither_client_code_nor_system_openssl() -> None:
    loaded = loaded_by("serve", "--help")
    assert {"ntspy.serve", "ntspy.server.daemon"} <= loaded
    assert "asyncio" in loaded
    unwanted = {"ssl", "_ssl", "_hashlib", "ntspy.api", "ntspy.client.session",
                "ntspy.client.ke", "ntspy.client.daemon", "ntspy.demo", "ntspy.control.cli",
                "ntspy.run"}
    assert loaded & unwanted == set()


def test_query_loads_no_server_code() -> None:
    loaded = loaded_by("query", "--help")
    assert "ntspy.server.daemon" not in loaded
    assert "ntspy.serve" not in loaded and "ntspy.run" not in loaded


def test_parser_without_argv_knows_every_subcommand_option() -> None:
    # Other code (docs, completion) may build the whole parser: it still works.
    args = cli.build_parser().parse_args(["serve", "-f", "x.conf"])
    assert args.command == "serve" and args.func is not None
    args = cli.build_parser().parse_args(["ctl", "tracking"])
    assert args.command == "ctl"
