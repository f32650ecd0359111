"""The one gate of the optional compiled modules (``ntspy._accel``, ``ntspy._ke``).

``NTSPY_NO_ACCEL=1`` (read once, here) switches every one of them off, so the
pure-Python paths run as when nothing was built.  Each importer does::

    try:
        require_compiled()
        from .._accel import AesSiv
    except ImportError:  # not built, built without it, or switched off
        AesSiv = None
"""

from __future__ import annotations

import os

DISABLED = os.environ.get("NTSPY_NO_ACCEL", "") not in ("", "0")
"""Whether ``NTSPY_NO_ACCEL`` switched the compiled modules off for this process."""


def require_compiled() -> None:
    """Raise ImportError when the compiled modules are switched off."""
    if DISABLED:
        raise ImportError("compiled modules disabled by NTSPY_NO_ACCEL")
