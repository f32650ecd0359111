"""``ntspy ctl``: status views of a running ntspy daemon, like chronyc."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..proto.ntp import reference_id_for
from ..server.stats import format_serverstats
from .format import (
    AUTHDATA_HEADER,
    AUTHDATA_LEGEND,
    SOURCES_HEADER,
    SOURCES_LEGEND,
    SOURCESTATS_HEADER,
    SOURCESTATS_LEGEND,
    AuthRow,
    SourceRow,
    SourceStatsRow,
    auth_line,
    header,
    interval,
    source_line,
    sourcestats_line,
)
from .protocol import DEFAULT_SOCKET, ControlError, request

COMMANDS = ("sources", "sourcestats", "tracking", "authdata", "ntpdata", "selectdata",
            "activity", "serverstats", "serverkeys", "clients", "add", "delete", "burst",
            "online", "offline", "makestep", "reload", "rekey", "refresh", "dump", "cyclelogs",
            "shutdown", "waitsync")
# What chronyc prints for a command that changes something and worked.
_DONE = ("add", "delete", "burst", "online", "offline", "makestep", "refresh", "dump",
         "cyclelogs", "shutdown")
LEAP_NAMES = {0: "Normal", 1: "Insert second", 2: "Delete second", 3: "Not synchronised"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-s", "--socket", type=Path, default=DEFAULT_SOCKET,
                        help=f"the daemon's control socket (default {DEFAULT_SOCKET})")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("-N", dest="configured_names", action="store_true",
                        help="show the configured names of sources, not their addresses")
    parser.add_argument("-v", dest="verbose", action="store_true",
                        help="print the column legend first (sources, sourcestats, authdata)")
    parser.add_argument("subcommand", choices=COMMANDS, metavar="COMMAND",
                        help="one of: " + ", ".join(COMMANDS))
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="arguments of the command (add server HOST [options], delete "
                             "ADDRESS, burst [good/max] [ADDRESS], reload sources, ...)")


def run(args: argparse.Namespace) -> int:
    if args.subcommand == "waitsync":
        return waitsync(args.socket, args.args)
    try:
        result = asyncio.run(request(args.socket, args.subcommand, list(args.args)))
    except ControlError as exc:
        print(f"ntspy ctl: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        sys.stdout.write(render(args.subcommand, result, args.configured_names, args.verbose))
    if args.subcommand == "reload" and isinstance(result, dict) and result.get("rejected"):
        for line in result["rejected"]:
            print(f"ntspy ctl: rejected: {line}", file=sys.stderr)
        return 1
    return 0


def waitsync(socket: Path, words: list[str], sleep: Any = time.sleep) -> int:
    """chronyc's ``waitsync [max-tries [max-correction [max-skew [interval]]]]``.

    Asks for ``tracking`` every ``interval`` seconds (default 10) until the
    daemon is synchronised, its remaining correction is at most
    ``max-correction`` seconds and its skew at most ``max-skew`` ppm (0: not
    checked), or ``max-tries`` tries were made (0, the default: no limit).
    A daemon that does not answer yet is a failed try. 0 when synchronised.
    """
    try:
        tries = int(words[0]) if len(words) > 0 else 0
        max_corr = float(words[1]) if len(words) > 1 else 0.0
        max_skew = float(words[2]) if len(words) > 2 else 0.0
        every = float(words[3]) if len(words) > 3 else 10.0
        if len(words) > 4 or tries < 0 or max_corr < 0 or max_skew < 0 or every <= 0:
            raise ValueError
    except ValueError:
        print("ntspy ctl: usage: waitsync [max-tries [max-correction [max-skew [interval]]]]",
              file=sys.stderr)
        return 2
    n = 0
    while True:
        n += 1
        try:
            t = asyncio.run(request(socket, "tracking", []))
        except ControlError as exc:
            print(f"try: {n}, no answer ({exc})")
        else:
            correction = abs(float(t["system_time_offset"]))
            skew = float(t["skew_ppm"])
            ref = _refid(t.get("reference")) if t.get("synchronised") else 0
            print(f"try: {n}, refid: {ref:08X}, correction: {correction:.9f}, skew: {skew:.3f}")
            if ref and (not max_corr or correction <= max_corr) \
                    and (not max_skew or skew <= max_skew):
                return 0
        if tries and n >= tries:
            return 1
        sleep(every)


def _refid(reference: Any) -> int:
    """The reference id as 32 bits (0: none)."""
    return int(refid_hex(str(reference) if reference else None), 16)


def _name(row: dict[str, Any], configured: bool) -> str:
    return str(row["configured"] if configured else row["name"])


def render(command: str, result: Any, configured: bool = False, verbose: bool = False) -> str:
    if command == "sources":
        out = SOURCES_LEGEND if verbose else ""
        out += header(SOURCES_HEADER)
        for r in result:
            out += source_line(SourceRow(
                _name(r, configured), r["mode"], r["state"], r["stratum"], r["poll"], r["reach"],
                r["last_rx"], r["adjusted_offset"], r["measured_offset"], r["error"],
            )) + "\n"
        return out
    if command == "sourcestats":
        out = SOURCESTATS_LEGEND if verbose else ""
        out += header(SOURCESTATS_HEADER)
        for r in result:
            out += sourcestats_line(SourceStatsRow(
                _name(r, configured), r["np"], r["nr"], r["span"], r["frequency_ppm"],
                r["skew_ppm"], r["offset"], r["std_dev"],
            )) + "\n"
        return out
    if command == "authdata":
        out = AUTHDATA_LEGEND if verbose else ""
        out += header(AUTHDATA_HEADER)
        for r in result:
            out += auth_line(AuthRow(
                _name(r, configured), r["mode"], r["key_id"], r["type"], r["key_bits"],
                r["last"], r["attempts"], r["naks"], r["cookies"], r["cookie_length"],
            )) + "\n"
        return out
    if command == "tracking":
        return render_tracking(result)
    if command == "ntpdata":
        return render_ntpdata(result)
    if command == "serverstats":
        return format_serverstats(result)
    if command == "serverkeys":
        lines = ["Key ID    Age", "=============="]
        lines += [f"{k['id']:08x} {interval(k['age'])}{'  pending' if k.get('pending') else ''}"
                  for k in result if "id" in k]
        for row in result:
            if "keystore" in row:  # ntskeystore: the fleet's state as this server sees it
                ks = row["keystore"]
                lines.append(f"key store: {'reachable' if ks['connected'] else 'UNREACHABLE'}, "
                             f"ring serial {ks['serial']}, {ks['members']} members"
                             f"{', this server rotates' if ks['leader'] else ''}")
        return "\n".join(lines) + "\n"
    if command == "reload":
        return f"{result['added']} sources added, {result['removed']} removed\n"
    if command == "rekey":
        return f"NTS-KE will be redone for {result['sources']} sources\n"
    if command == "activity":
        return ("200 OK\n"
                f"{result['online']} sources online\n"
                f"{result['offline']} sources offline\n"
                f"{result['burst_online']} sources doing burst (return to online)\n"
                f"{result['burst_offline']} sources doing burst (return to offline)\n"
                f"{result['unresolved']} sources with unknown address\n")
    if command == "selectdata":
        return render_selectdata(result, configured)
    if command == "clients":
        return render_clients(result)
    if command in _DONE:
        return "200 OK\n"
    return json.dumps(result, indent=2) + "\n"


CLIENTS_HEADER = "Hostname                      NTP   Drop Int IntL Last  NTS-KE   Drop Int  Last"


def _count(n: int) -> str:
    """chronyc's %N: a count in 6 columns, with k/M/G past what fits."""
    for unit, scale in (("", 1), ("K", 10**3), ("M", 10**6), ("G", 10**9)):
        if n < 10**6 * scale:
            return f"{n // scale}{unit}"
    return f"{n // 10**9}G"


def render_clients(rows: list[dict[str, Any]]) -> str:
    """chronyc clients -k's layout (ntspy keeps no per-client interval estimates:
    those columns are '-')."""
    out = header(CLIENTS_HEADER)
    for r in rows:
        out += (f"{str(r['address'])[:25]:<25} {_count(int(r['ntp_hits'])):>6} "
                f"{_count(int(r['ntp_drops'])):>6}   -    - {interval(r.get('last_ntp_ago'))}"
                f"  {_count(int(r['nke_hits'])):>6} {_count(int(r['nke_drops'])):>6}   -  "
                f"{interval(r.get('last_nke_ago'))}\n")
    return out


SELECTDATA_HEADER = "S Name/IP Address        Auth COpts EOpts Last Score     Interval  Leap"
_LEAP_LETTERS = {0: "N", 1: "+", 2: "-", 3: "?"}


def _short(seconds: float) -> str:
    """A signed interval end as chronyc prints them (+8329us, -12ms, +1.5s)."""
    magnitude = abs(seconds)
    for unit, scale in (("ns", 1e-9), ("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if magnitude < 9999.5 * scale or unit == "s":
            return f"{seconds / scale:+.0f}{unit}"
    return f"{seconds:+.0f}s"  # pragma: no cover (the loop always returns)


def render_selectdata(rows: list[dict[str, Any]], configured: bool = False) -> str:
    out = header(SELECTDATA_HEADER)
    for r in rows:
        last = interval(r["last"]) if r.get("last") is not None else "-"
        score = f"{float(r['score']):5.1f}" if r.get("score") is not None else "    -"
        out += (f"{r['state']} {_name(r, configured)[:25]:<25} {'Y' if r['authenticated'] else 'N'}"
                f" {r['conf_options']:>5} {r['eff_options']:>5} {last:>4} {score}"
                f" {_short(float(r['low'])):>8} {_short(float(r['high'])):>8}"
                f"  {_LEAP_LETTERS.get(int(r['leap']), '?')}\n")
    return out


def refid_hex(reference: str | None) -> str:
    """The reference id as chronyc's tracking prints it (8 hex digits)."""
    if not reference:
        return "00000000"
    return reference_id_for(reference).hex().upper()


def render_tracking(t: dict[str, Any]) -> str:
    ref = t.get("reference")
    ref_time = t.get("ref_time_ns")
    when = (time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime(ref_time / 1e9))
            if ref_time else "Thu Jan 01 00:00:00 1970")
    pending = float(t["system_time_offset"])  # positive: clock behind NTP time
    freq = float(t["frequency_ppm"])  # positive: clock sped up, so on its own it is slow
    leap = LEAP_NAMES.get(int(t["leap"]), "Not synchronised") if t.get("synchronised") \
        else "Not synchronised"
    lines = [
        f"Reference ID    : {refid_hex(ref)} ({ref or ''})",
        f"Stratum         : {t['stratum'] if t.get('synchronised') else 0}",
        f"Ref time (UTC)  : {when}",
        f"System time     : {abs(pending):.9f} seconds {'slow' if pending > 0 else 'fast'} "
        "of NTP time",
        f"Last offset     : {-float(t['last_offset']):+.9f} seconds",
        f"RMS offset      : {float(t['rms_offset']):.9f} seconds",
        f"Frequency       : {abs(freq):.3f} ppm {'slow' if freq >= 0 else 'fast'}",
        f"Residual freq   : {-float(t['residual_freq_ppm']):+.3f} ppm",
        f"Skew            : {float(t['skew_ppm']):.3f} ppm",
        f"Root delay      : {float(t['root_delay']):.9f} seconds",
        f"Root dispersion : {float(t['root_dispersion']):.9f} seconds",
        f"Update interval : {float(t['update_interval']):.1f} seconds",
        f"Leap status     : {leap}",
    ]
    return "\n".join(lines) + "\n"


def render_ntpdata(rows: list[dict[str, Any]]) -> str:
    blocks = []
    for r in rows:
        rejected = ", ".join(f"{k}: {v}" for k, v in r["rejected"].items()) or "none"
        bad = r.get("bad_samples", {})
        bad_text = ", ".join(f"{k}: {v}" for k, v in bad.items()) or "none"
        blocks.append("\n".join([
            f"Remote address  : {r['remote_address']} ({r['name']})",
            f"Remote port     : {r['remote_port']}",
            f"Leap status     : {LEAP_NAMES.get(int(r['leap']), '?')}",
            f"Version         : {r['version']}",
            "Mode            : Server",
            f"Stratum         : {r['stratum']}",
            f"Poll interval   : {r['poll']} ({2.0 ** int(r['poll']):.0f} seconds)",
            f"Precision       : {r['precision']} ({2.0 ** int(r['precision']):.9f} seconds)",
            f"Root delay      : {float(r['root_delay']):.6f} seconds",
            f"Root dispersion : {float(r['root_dispersion']):.6f} seconds",
            f"Reference ID    : {r['reference_id']}",
            f"Offset          : {float(r['offset']):+.9f} seconds",
            f"Peer delay      : {float(r['peer_delay']):.9f} seconds",
            f"Authenticated   : {'Yes' if r['authenticated'] else 'No'}",
            f"RX timestamping : {'Kernel' if r['kernel_rx'] else 'Daemon'}",
            f"Total TX        : {r['requests']}",
            f"Total valid RX  : {r['accepted']}",
            f"Total good RX   : {int(r['accepted']) - sum(bad.values())}",
            f"Rejected RX     : {rejected}",
            f"Bad samples     : {bad_text}",
        ]))
    return "\n\n".join(blocks) + ("\n" if blocks else "")
