"""chrony's ``log measurements statistics tracking`` files in ``logdir``.

Their users parse them (graphing scripts, ntpviz converters, monitoring), so the
columns and their signs are chrony's: ``measurements.log`` has one line per
valid sample, ``statistics.log`` one per regression, ``tracking.log`` one per
clock update, each file with chrony's banner at its start and again every
``logbanner`` lines.  A file that cannot be written (a full disk) is reported
once and then left alone; the daemon goes on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TextIO

log = logging.getLogger("ntspy.client.logfiles")

KINDS = ("measurements", "statistics", "tracking")
DEFAULT_BANNER_EVERY = 32

_HEADERS = {
    "measurements": "   Date (UTC) Time     IP Address   L St 123 567 ABCD  LP RP Score"
                    "    Offset  Peer del. Peer disp.  Root del. Root disp. Refid     MTxRx",
    "statistics": "   Date (UTC) Time     IP Address    Std dev'n Est offset  Offset sd"
                  "  Diff freq   Est skew  Stress  Ns  Bs  Nr  Asym",
    "tracking": "   Date (UTC) Time     IP Address   St   Freq ppm   Skew ppm     Offset L Co"
                "  Offset sd Rem. corr. Root delay Root disp. Max. error",
}
_LEAP = {0: "N", 1: "+", 2: "-", 3: "?"}


def _stamp(unix_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix_s))


class _LogFile:
    __slots__ = ("_broken", "_file", "_lines", "_path", "banner_every", "kind")

    def __init__(self, path: Path, kind: str, banner_every: int) -> None:
        self._path = path
        self.kind = kind
        self.banner_every = banner_every
        self._file: TextIO | None = None
        self._lines = 0
        self._broken = False

    def write(self, line: str) -> None:
        if self._broken:
            return
        try:
            if self._file is None:
                self._file = self._path.open("a", encoding="ascii", buffering=1)
            if self.banner_every and self._lines % self.banner_every == 0:
                header = _HEADERS[self.kind]
                rule = "=" * len(header)
                self._file.write(f"{rule}\n{header}\n{rule}\n")
            self._file.write(line + "\n")
            self._lines += 1
        except OSError as exc:
            self._broken = True
            log.error("cannot write %s (%s): no more %s lines until restart",
                      self._path, exc, self.kind)

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                log.error("cannot close %s: %s", self._path, exc)
            self._file = None


class ChronyLogs:
    """The log files named by ``log`` in ``logdir`` (a kind not asked for is a no-op)."""

    def __init__(self, logdir: Path | None, kinds: list[str],
                 banner_every: int = DEFAULT_BANNER_EVERY) -> None:
        self._files: dict[str, _LogFile] = {}
        if logdir is None:
            return
        for kind in kinds:
            if kind in KINDS:
                self._files[kind] = _LogFile(logdir / f"{kind}.log", kind, banner_every)

    def measurement(self, now_s: float, address: str, *, leap: int, stratum: int,
                    local_poll: int, remote_poll: int, score: float, offset: float,
                    delay: float, dispersion: float, root_delay: float,
                    root_dispersion: float, refid: int, interleaved: bool = False,
                    tx_kernel: bool = False, rx_kernel: bool = False) -> None:
        """A valid sample; ``offset`` is RFC 5905 theta (positive: the local clock is slow)."""
        f = self._files.get("measurements")
        if f is None:
            return
        # Tests 1-3, 5-7 and the delay tests: only samples that passed them get here.
        f.write(f"{_stamp(now_s)} {address:<15} {_LEAP.get(leap, '?')} {stratum:2d} 111 111 1111"
                f" {local_poll:3d} {remote_poll:2d} {score:3.1f} {offset:10.3e} {delay:10.3e}"
                f" {dispersion:10.3e} {root_delay:10.3e} {root_dispersion:10.3e}"
                f" {refid & 0xFFFFFFFF:08X} 4{'I' if interleaved else 'B'}"
                f" {'K' if tx_kernel else 'D'} {'K' if rx_kernel else 'D'}")

    def statistics(self, now_s: float, address: str, *, std_dev: float, est_offset: float,
                   offset_sd: float, diff_freq: float, est_skew: float, stress: float,
                   samples: int, best_start: int, runs: int, asymmetry: float) -> None:
        """A regression; offsets in seconds, ``diff_freq``/``est_skew`` as fractions (s/s)."""
        f = self._files.get("statistics")
        if f is None:
            return
        f.write(f"{_stamp(now_s)} {address:<15} {std_dev:10.3e} {est_offset:10.3e}"
                f" {offset_sd:10.3e} {diff_freq:10.3e} {est_skew:10.3e} {stress:7.1e}"
                f" {samples:3d} {best_start:3d} {runs:3d} {asymmetry:5.2f}")

    def tracking(self, now_s: float, address: str, *, stratum: int, freq_ppm: float,
                 skew_ppm: float, offset: float, leap: int, combined: int, offset_sd: float,
                 remaining: float, root_delay: float, root_dispersion: float,
                 max_error: float) -> None:
        """A clock update, in chrony's signs: ``freq_ppm`` negative = the clock runs slow,
        ``offset`` positive = it was ahead, ``remaining`` positive = still behind."""
        f = self._files.get("tracking")
        if f is None:
            return
        f.write(f"{_stamp(now_s)} {address:<15} {stratum:2d} {freq_ppm:10.3f} {skew_ppm:10.3f}"
                f" {offset:10.3e} {_LEAP.get(leap, '?')} {combined:2d} {offset_sd:10.3e}"
                f" {remaining:10.3e} {root_delay:10.3e} {root_dispersion:10.3e}"
                f" {max_error:10.3e}")

    def close(self) -> None:
        for f in self._files.values():
            f.close()
