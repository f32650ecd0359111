"""ntspy: Network Time Security (RFC 8915) and NTPv4 (RFC 5905) in Python.

The library API (``query``, ``query_async``, ``NtsSession``, ``Measurement``)
is loaded on first use, so that importing a protocol module such as
``ntspy.proto.ntp`` does not pull in TLS.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Measurement", "NtsSession", "PlainSession", "__version__", "query", "query_async"]

if TYPE_CHECKING:
    from .api import Measurement, NtsSession, PlainSession, query, query_async

_API_NAMES = frozenset({"Measurement", "NtsSession", "PlainSession", "query", "query_async"})


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ntspy' has no attribute {name!r}")
