"""chrony's ``leapsectz``: leap seconds from the system's tz database (``right/UTC``).

A zone of the ``right/`` family counts leap seconds, so 23:59:60 exists in it on a
day that ends with an inserted second.  The C library answers that question; the
``TZ`` variable is switched only for the duration of the call (the daemon is one
thread) and put back.
"""

from __future__ import annotations

import os
import time

KNOWN_LEAP_DAY = 1483142400.0  # 2016-12-31 00:00 UTC: that day ended with 23:59:60


def leap_at_end_of_day(zone: str, unix_s: float) -> int:
    """1 if the UTC day holding ``unix_s`` ends with an inserted second in ``zone``,
    2 with a deleted one, 0 with none (kernel STA_INS / STA_DEL / nothing)."""
    year, month, day = time.gmtime(unix_s)[:3]
    saved = os.environ.get("TZ")
    try:
        os.environ["TZ"] = zone
        time.tzset()
        at = time.mktime((year, month, day, 23, 59, 60, 0, 0, -1))
        if time.localtime(at).tm_sec == 60:
            return 1
        at = time.mktime((year, month, day, 23, 59, 59, 0, 0, -1))
        if time.localtime(at)[3:6] == (0, 0, 0):  # 23:59:59 does not exist that day
            return 2
        return 0
    except (OverflowError, ValueError):
        return 0
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


def zone_knows_leap_seconds(zone: str) -> bool:
    """Whether ``zone`` is usable at all: it must know the leap second of 2016."""
    return leap_at_end_of_day(zone, KNOWN_LEAP_DAY) == 1
