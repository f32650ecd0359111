"""systemd's readiness protocol (sd_notify(3)), without a dependency.

With ``Type=notify`` systemd passes a datagram socket in ``NOTIFY_SOCKET``; the
daemon sends ``READY=1`` once it serves, ``STATUS=...`` lines as it goes and
``STOPPING=1`` when it leaves.  Outside systemd nothing is sent.
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("ntspy.sdnotify")


def notify(*fields: str) -> bool:
    """Send ``fields`` (``KEY=value``) to systemd; False when not under systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    # A leading '@' names a socket in the abstract namespace.
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", path, exc)
        return False
    return True
