"""ntspy: Network Time Security (RFC 8915) and NTPv4 (RFC 5905) in Python."""

from __future__ import annotations

__version__ = "0.1.0"
