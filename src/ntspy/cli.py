"""The ``ntspy`` command: a dispatcher to the subcommands' own modules.

Each subcommand's code is imported only when the command line names it, so
``ntspy serve`` and its forked workers do not carry the client in memory and
``ntspy query`` does not load the server (docs/performance.md, RSS).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__

PROG = "ntspy"


def _add_external(
    sub: Any, name: str, module: str, prefix: str, help_text: str, load: bool
) -> None:
    """Register a subcommand whose options and code live in ``module``
    (``add_arguments``/``run``, or ``add_PREFIX_arguments``/``run_PREFIX``).

    ``module`` is imported only when ``load`` is set (the command line names
    this subcommand), so that ``ntspy query`` does not load the server and
    ``ntspy serve`` does not load the client daemon, the demo or ``ctl``.
    """
    p = sub.add_parser(name, help=help_text)
    if load:
        mod = importlib.import_module(module)
        suffix = f"_{prefix}" if prefix else ""
        getattr(mod, f"add{suffix}_arguments")(p)
        p.set_defaults(func=getattr(mod, f"run{suffix}"))


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (the
    options before the subcommand, --help and --version, take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``ntspy`` parser; given ``argv``, only the subcommand it names has its
    options loaded (enough to parse that ``argv``), otherwise all of them."""
    command = _command(argv) if argv is not None else None
    parser = argparse.ArgumentParser(
        prog=PROG, description="Network Time Security (RFC 8915) client and server"
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    externals = (
        ("query", "ntspy.client.commands", "query",
         "measure the clock offset to servers (NTS by default)"),
        ("ke", "ntspy.client.commands", "ke", "run NTS-KE only and show what was negotiated"),
        ("check", "ntspy.check", "",
         "health report of an NTS server: certificate, AEADs, cookies, NTP, NAK"),
        ("run", "ntspy.run", "",
         "run the client daemon: sync the clock from NTS sources (and serve time)"),
        ("serve", "ntspy.serve", "", "run an NTS/NTP server"),
        ("demo", "ntspy.demo", "", "run a local NTS server and query it"),
        ("ctl", "ntspy.control.cli", "", "ask a running ntspy daemon for its status"),
    )
    for name, module, prefix, help_text in externals:
        _add_external(sub, name, module, prefix, help_text, argv is None or command == name)
    return parser


# Commands whose process never needs the system OpenSSL bindings: their TLS
# and AEAD come from pyOpenSSL and cryptography (which bundle their own).
_LEAN_COMMANDS = frozenset({"serve"})
# Loaded only as optional back ends by modules a server imports: asyncio
# imports ``ssl`` for its ``ssl=`` arguments, hashlib/hmac use ``_hashlib``
# when present and their built-in implementations otherwise.  Each maps the
# system libssl/libcrypto: together about 5 MiB of RSS per server process.
_OPTIONAL_BACKENDS = ("ssl", "_hashlib")


def _keep_optional_backends_out() -> None:
    """Make ``import ssl`` / ``import _hashlib`` fail cleanly (``None`` in
    ``sys.modules``) so their importers fall back as they are written to.

    Only for a real ``ntspy serve`` process (never when main() is called from
    other code), and only for modules nothing has loaded yet.
    """
    for name in _OPTIONAL_BACKENDS:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]


# Directives whose libraries need the system ``ssl`` module before asyncio is
# imported: the Redis client of ``ntskeystore`` (asyncio's TLS, for ``rediss://``).
# (``metricsaddress`` lets it in later, in the one process that serves metrics.)
_NEED_SSL = frozenset({"ntskeystore"})


def _needs_system_ssl(words: Sequence[str]) -> bool:
    """Whether ``serve -f FILE`` uses a directive of :data:`_NEED_SSL`."""
    for i, word in enumerate(words[:-1]):
        if word in ("-f", "--config"):
            try:
                text = Path(words[i + 1]).read_text(errors="replace")
            except OSError:
                return False  # the server itself will say what is wrong with it
            return any(line.split()[:1] and line.split()[0] in _NEED_SSL
                       for line in text.splitlines())
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    words = sys.argv[1:] if argv is None else argv
    if argv is None and _command(words) in _LEAN_COMMANDS and "asyncio" not in sys.modules \
            and not _needs_system_ssl(words):
        _keep_optional_backends_out()
    args = build_parser(words).parse_args(words)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        code = func(args)
        # Output to a pipe is block-buffered: flush while a closed pipe can
        # still be handled here, not in the interpreter's exit.
        sys.stdout.flush()
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `ntspy query --json | head`: the reader is gone, which is no error
        # of ours.  Exit as a process killed by SIGPIPE would, without a
        # traceback, and with nothing left to flush at exit.
        _silence_closed_output()
        return 128 + signal.SIGPIPE


def _silence_closed_output() -> None:
    """Point stdout and stderr at /dev/null, so the interpreter's final flush
    of what is still buffered for the closed pipe cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in (sys.stdout, sys.stderr):
            # A stream that is not a real file (a test's capture) has nothing to flush.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
