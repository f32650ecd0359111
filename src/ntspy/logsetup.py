"""What both daemons (``ntspy run``, ``ntspy serve``) log alike: where the lines go
(stderr, the journal when stderr is the journal, or a file with ``-l``) and, once at
start, every directive the configuration asks for that is not acted on."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import ClassVar

from .config import Config

log = logging.getLogger("ntspy.config")


class _JournalFormatter(logging.Formatter):
    """Lines for journald: no timestamp of our own (the journal has one) and
    the record's syslog priority as a ``<N>`` prefix (sd-daemon(3))."""

    _PRIORITY: ClassVar[dict[int, int]] = {
        logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
        logging.DEBUG: 7,
    }

    def format(self, record: logging.LogRecord) -> str:
        prio = self._PRIORITY.get(record.levelno, 6)
        return f"<{prio}>{record.name}: {super().format(record)}"


def report_ignored(config: Config) -> None:
    """Every accepted directive or source option that is not acted on, once, at start,
    with the file and line it is in (an included file's own name)."""
    for filename, lineno, directive in config.ignored:
        log.warning("%s:%d: ignoring directive %s (not supported)", filename, lineno, directive)
    for src in config.sources:
        if src.ignored_options:
            log.warning("%s %s: ignoring options %s (not supported)",
                        "pool" if src.pool else "server", src.name,
                        ", ".join(src.ignored_options))


def setup_logging(level: str, logfile: Path | None = None) -> None:
    """Log to stderr (to journald when it is the journal), or to ``logfile`` (``-l``)."""
    handler: logging.Handler
    if logfile is not None:
        handler = logging.FileHandler(logfile)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        if os.environ.get("JOURNAL_STREAM"):
            handler.setFormatter(_JournalFormatter("%(message)s"))
        else:
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])

