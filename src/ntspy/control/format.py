"""Tables in chronyc's layout, so chrony users read ntspy's output at a glance.

Column formats and unit rules follow chronyc's (see shared/reference): the
same headers, widths, unit switch points and rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SOURCES_HEADER = "MS Name/IP address         Stratum Poll Reach LastRx Last sample               "
AUTHDATA_HEADER = "Name/IP address             Mode KeyID Type KLen Last Atmp  NAK Cook CLen"
SOURCESTATS_HEADER = (
    "Name/IP Address            NP  NR  Span  Frequency  Freq Skew  Offset  Std Dev"
)
SOURCESTATS_LEGEND = """                             .- Number of sample points in measurement set.
                            /    .- Number of residual runs with same sign.
                           |    /    .- Length of measurement set (time).
                           |   |    /      .- Est. clock freq error (ppm).
                           |   |   |      /           .- Est. error in freq.
                           |   |   |     |           /         .- Est. offset.
                           |   |   |     |          |          |   On the -.
                           |   |   |     |          |          |   samples. \\
                           |   |   |     |          |          |             |
"""
AUTHDATA_LEGEND = """
                             .- Auth. mechanism (NTS, SK - symmetric key)
                            |   Key length -.  Cookie length (bytes) -.
                            |       (bits)  |  Num. of cookies --.    |
                            |               |  Key est. attempts  |   |
                            |               |           |         |   |
"""
SOURCES_LEGEND = """
  .-- Source mode  '^' = server, '=' = peer, '#' = local clock.
 / .- Source state '*' = current best, '+' = combined, '-' = not combined,
| /             'x' = may be in error, '~' = too variable, '?' = unusable.
||                                                 .- xxxx [ yyyy ] +/- zzzz
||      Reachability register (octal) -.           |  xxxx = adjusted offset,
||      Log2(Polling interval) --.      |          |  yyyy = measured offset,
||                                \\     |          |  zzzz = estimated error.
||                                 |    |           \\
"""


def header(title: str) -> str:
    """A table header followed by a rule of ``=`` as long as it, like chronyc."""
    return f"{title}\n{'=' * len(title)}\n"


def interval(seconds: float | None) -> str:
    """chronyc's ``%I``: 4 columns, seconds, then m, h, d, y."""
    if seconds is None or seconds < 0 or math.isnan(seconds):
        return "   -"
    s = int(seconds)
    if s < 1200:
        return f"{s:4d}"
    if s < 36000:
        return f"{s // 60:3d}m"
    if s < 345600:
        return f"{s // 3600:3d}h"
    days = s // 86400
    if days <= 999:
        return f"{days:3d}d"
    return f"{days // 365:3d}y"


_UNITS = (("ns", 1e-9), ("us", 1e-6), ("ms", 1e-3))


def _duration(seconds: float, signed: bool) -> str:
    """chronyc's ``%S`` / ``%+S``: a duration with a unit, switching at 9999.5 of it."""
    x = abs(seconds)
    value = seconds if signed else x
    sign, width = ("+", 5) if signed else ("", 4)
    for unit, scale in _UNITS:
        if x / scale < 9999.5:
            return f"{value / scale:{sign}{width}.0f}{unit}"
    if x < 999.5:
        return f"{value:{sign}{width + 1}.1f}s"
    return _big(value, signed)


def nanoseconds(seconds: float) -> str:
    """chronyc's ``%S``: an unsigned duration with a unit, 6 columns."""
    return _duration(seconds, signed=False)


def signed_nanoseconds(seconds: float) -> str:
    """chronyc's ``%+S``: a signed duration with a unit, 7 columns."""
    return _duration(seconds, signed=True)


def _big(seconds: float, signed: bool) -> str:
    width = 6 if signed else 5
    sign = "+" if signed else ""
    for unit, scale, limit in (("s", 1, 99999.5), ("m", 60, 99999.5), ("h", 3600, 99999.5),
                               ("d", 86400, 99999.5)):
        if abs(seconds) / scale < limit:
            return f"{seconds / scale:{sign}{width}.0f}{unit}"
    return f"{seconds / 31556952:{sign}{width}.0f}y"


@dataclass(slots=True)
class SourceRow:
    name: str
    mode: str = "^"  # '^' server, '=' peer, '#' local reference
    state: str = "?"  # '*', '+', '-', 'x', '~', '?'
    stratum: int = 0
    poll: int = 0
    reach: int = 0
    last_rx: float | None = None  # seconds since the last good sample
    adjusted_offset: float = 0.0
    measured_offset: float = 0.0
    error: float = 0.0


def source_line(row: SourceRow, wide: bool = False) -> str:
    width = 43 if wide else 27
    name = row.name[:width]
    return (
        f"{row.mode}{row.state} {name:<{width}}  {row.stratum:2d}  {row.poll:2d}   "
        f"{row.reach:3o}  {interval(row.last_rx)}  {signed_nanoseconds(row.adjusted_offset)}"
        f"[{signed_nanoseconds(row.measured_offset)}] +/- {nanoseconds(row.error)}"
    )


@dataclass(slots=True)
class AuthRow:
    name: str
    mode: str = "NTS"  # 'NTS', 'SK' or '-'
    key_id: int = 0  # for NTS: successful key exchanges so far
    aead: int = 0
    key_bits: int = 0
    last: float | None = None  # seconds since the last successful KE
    attempts: int = 0  # KE attempts since the last success
    naks: int = 0
    cookies: int = 0
    cookie_length: int = 0


def auth_line(row: AuthRow, wide: bool = False) -> str:
    width = 43 if wide else 27
    return (
        f"{row.name[:width]:<{width}} {row.mode:>4} {row.key_id:5d} {row.aead:4d} "
        f"{row.key_bits:4d} {interval(row.last)} {row.attempts:4d} {row.naks:4d} "
        f"{row.cookies:4d} {row.cookie_length:4d}"
    )


def ppm(value: float | None) -> str:
    """chronyc's ``%P``: ``%10.3f``, or ``%10.0f`` from 99999.5 on."""
    if value is None or math.isnan(value) or math.isinf(value):
        return f"{'-':>10}"
    return f"{value:10.0f}" if abs(value) >= 99999.5 else f"{value:10.3f}"


def signed_ppm(value: float) -> str:
    return f"{value:+10.0f}" if abs(value) >= 99999.5 else f"{value:+10.3f}"


@dataclass(slots=True)
class SourceStatsRow:
    name: str
    np: int
    nr: int
    span: float
    frequency_ppm: float
    skew_ppm: float | None
    offset: float
    std_dev: float


def sourcestats_line(row: SourceStatsRow, wide: bool = False) -> str:
    width = 41 if wide else 25
    return (
        f"{row.name[:width]:<{width}} {row.np:3d} {row.nr:3d}  {interval(row.span)} "
        f"{signed_ppm(row.frequency_ppm)} {ppm(row.skew_ppm)}  "
        f"{signed_nanoseconds(row.offset)}  {nanoseconds(row.std_dev)}"
    )
