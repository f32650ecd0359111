"""Fixtures shared by every test directory: daemons started from tests/peers.py.

Each fixture ends what it started, by PID, whatever the test did.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.peers import ServerProc, start_ntspy_server

ServerFactory = Callable[..., ServerProc]


@pytest.fixture
def ntspy_server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start ``ntspy serve`` subprocesses, each in its own directory; all stopped at teardown."""
    started: list[ServerProc] = []

    def start(**kwargs: Any) -> ServerProc:
        directory = tmp_path / f"s{len(started)}"
        directory.mkdir()
        server = start_ntspy_server(directory, **kwargs)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def ntspy_server(ntspy_server_factory: ServerFactory) -> ServerProc:
    """One ``ntspy serve`` with the default test configuration."""
    return ntspy_server_factory()
