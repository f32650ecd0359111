"""``ntspy query`` and ``ntspy ke``: one-shot measurements and NTS-KE inspection.

Every failure the user can cause or meet (unreachable host, bad certificate,
tampered packets) ends as one line ``ntspy: HOST: message`` on stderr and a
non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from ..api import SAMPLE_INTERVAL, best, make_session
from ..errors import NtsError
from ..net.tls.trust import TrustConfig
from ..proto.ke import DEFAULT_KE_PORT, NextProtocol
from ..proto.ntp import Leap
from .ke import KeResult, key_exchange
from .session import Measurement, NtsSession

PROG = "ntspy"
_LEAP_NAMES = {
    Leap.NONE: "none",
    Leap.INSERT_SECOND: "insert second",
    Leap.DELETE_SECOND: "delete second",
    Leap.UNSYNCHRONIZED: "unsynchronised",
}


def _fail(host: str, message: object) -> None:
    print(f"{PROG}: {host}: {message}", file=sys.stderr)


def _trust(args: argparse.Namespace) -> TrustConfig:
    return TrustConfig(
        use_system_store=True,
        extra=[Path(p) for p in args.ca],
        no_cert_time_check=args.nocerttimecheck,
    )


# ---------------------------------------------------------------------------
# ntspy query


@dataclass(slots=True)
class _HostResult:
    host: str
    nts: bool
    ke: KeResult | None = None
    samples: list[Measurement] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    ntp_port: int | None = None  # where NTP went: --port, or what NTS-KE named

    @property
    def ok(self) -> bool:
        return bool(self.samples) and all(m.authenticated or not self.nts for m in self.samples)


async def _query_host(args: argparse.Namespace, host: str) -> _HostResult:
    result = _HostResult(host, nts=not args.no_nts)
    session = make_session(
        host,
        not args.no_nts,
        port=args.port,
        ke_port=args.ke_port,
        ca=args.ca,
        timeout=args.timeout,
        no_cert_time_check=args.nocerttimecheck,
    )
    try:
        if isinstance(session, NtsSession):
            try:
                result.ke = await session.key_exchange()
            except NtsError as exc:
                result.errors.append(str(exc))
                return result
            result.ntp_port = session.ntp_target[1]
        else:
            result.ntp_port = session.port
        for i in range(args.samples):
            if i:
                await asyncio.sleep(SAMPLE_INTERVAL)
            try:
                result.samples.append(await session.measure())
            except NtsError as exc:
                result.errors.append(f"sample {i + 1}: {exc}")
    finally:
        session.close()
        result.rejected = {
            k.removeprefix("rejected: "): v
            for k, v in session.stats.items()
            if k.startswith("rejected: ")
        }
    return result


def _fmt_s(seconds: float) -> str:
    return f"{seconds:+.6f} s"


def _print_host(result: _HostResult, out: TextIO) -> None:
    ke = result.ke
    if ke is not None:
        port = result.ntp_port or ke.ntp_port
        # The port NTP really went to (--port overrides the Port record).
        named = f" (NTS-KE named port {ke.ntp_port})" if port != ke.ntp_port else ""
        print(
            f"{result.host}: NTS-KE {ke.ke_host} port {ke.ke_port}, {ke.tls_version}, "
            f"{ke.aead_name} ({ke.aead_id}), {len(ke.cookies)} cookies; "
            f"NTP {ke.ntp_server} port {port}{named}",
            file=out,
        )
    elif result.samples:
        m = result.samples[0]
        print(f"{result.host}: plain NTP (no authentication) {m.address} port {m.port}", file=out)
    for i, m in enumerate(result.samples, 1):
        cookies = f"  cookies {m.cookies}" if m.authenticated else ""
        print(
            f"  #{i} offset {_fmt_s(m.offset)}  delay {m.delay:.6f} s  stratum {m.stratum}  "
            f"refid {m.reference_id or '-'}  leap {_LEAP_NAMES.get(Leap(m.leap), m.leap)}",
            file=out,
        )
        print(
            f"     root delay {m.root_delay:.6f} s  root dispersion {m.root_dispersion:.6f} s  "
            f"authenticated {'yes' if m.authenticated else 'no'}  "
            f"kernel timestamp {'yes' if m.kernel_rx_timestamp else 'no'}{cookies}",
            file=out,
        )
    if result.samples:
        # chronyd -Q says how wrong the local clock is: the RFC 5905 offset,
        # positive when the server is ahead (the local clock is slow).
        print(f"System clock wrong by {best(result.samples).offset:.6f} seconds", file=out)


def _host_json(result: _HostResult) -> dict[str, Any]:
    ke = result.ke
    return {
        "host": result.host,
        "ok": result.ok,
        "nts": result.nts,
        "ke": _ke_json(ke) if ke is not None else None,
        "ntp_port": result.ntp_port,
        "samples": [m.as_dict() for m in result.samples],
        "offset": best(result.samples).offset if result.samples else None,
        "errors": result.errors,
        "rejected": result.rejected,
    }


def run_query(args: argparse.Namespace) -> int:
    if args.samples < 1:
        print(f"{PROG}: --samples must be at least 1", file=sys.stderr)
        return 2

    async def run_all() -> list[_HostResult]:
        return list(await asyncio.gather(*(_query_host(args, h) for h in args.hosts)))

    results = asyncio.run(run_all())
    for result in results:
        if not args.json:
            _print_host(result, sys.stdout)
        for error in result.errors:
            _fail(result.host, error)
    if args.json:
        json.dump(
            {"ok": all(r.ok for r in results), "hosts": [_host_json(r) for r in results]},
            sys.stdout,
            indent=2,
        )
        print()
    return 0 if all(r.ok for r in results) else 1


# ---------------------------------------------------------------------------
# ntspy ke


def _ke_json(ke: KeResult) -> dict[str, Any]:
    return {
        "ke_host": ke.ke_host,
        "ke_port": ke.ke_port,
        "tls_version": ke.tls_version,
        "cert_subject": ke.cert_subject,
        "cert_not_after": ke.cert_not_after.isoformat() if ke.cert_not_after else None,
        "next_protocol": ke.next_protocol,
        "aead_id": ke.aead_id,
        "aead_name": ke.aead_name,
        "ntp_server": ke.ntp_server,
        "ntp_port": ke.ntp_port,
        "cookies": len(ke.cookies),
        "cookie_lengths": sorted({len(c) for c in ke.cookies}),
        "compliant_128gcm": ke.compliant_128gcm,
    }


def run_ke(args: argparse.Namespace) -> int:
    try:
        ke = asyncio.run(
            key_exchange(args.host, args.ke_port, trust=_trust(args), timeout=args.timeout)
        )
    except NtsError as exc:
        _fail(args.host, exc)
        return 1
    if args.json:
        json.dump(_ke_json(ke), sys.stdout, indent=2)
        print()
        return 0
    lengths = ", ".join(str(n) for n in sorted({len(c) for c in ke.cookies}))
    expires = ke.cert_not_after.strftime("%Y-%m-%d %H:%M:%S UTC") if ke.cert_not_after else "?"
    protocol = "NTPv4" if ke.next_protocol == NextProtocol.NTPV4 else str(ke.next_protocol)
    print(f"NTS-KE server {ke.ke_host} port {ke.ke_port}")
    print(f"  TLS version:    {ke.tls_version}")
    print(f"  certificate:    {ke.cert_subject or '?'}")
    print(f"  expires:        {expires}")
    print(f"  next protocol:  {protocol} ({ke.next_protocol})")
    print(f"  AEAD:           {ke.aead_id} ({ke.aead_name})")
    print(f"  NTP server:     {ke.ntp_server} port {ke.ntp_port}")
    print(f"  cookies:        {len(ke.cookies)} of {lengths} bytes")
    return 0


# ---------------------------------------------------------------------------
# parser


def _add_trust_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca", action="append", default=[], metavar="FILE",
                   help="trust this CA certificate (PEM) besides the system store; repeatable")
    p.add_argument("--nocerttimecheck", action="store_true",
                   help="accept certificates outside their validity period (clock not set yet)")
    p.add_argument("--ke-port", type=int, default=DEFAULT_KE_PORT, metavar="N",
                   help=f"NTS-KE port (default {DEFAULT_KE_PORT})")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S",
                   help="seconds to wait for each exchange (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_query_arguments(q: argparse.ArgumentParser) -> None:
    q.add_argument("hosts", nargs="+", metavar="HOST")
    q.add_argument("--no-nts", action="store_true", help="plain, unauthenticated NTP")
    q.add_argument("--port", type=int, default=None, metavar="N",
                   help="NTP port (default 123, or what the NTS-KE server says)")
    q.add_argument("--samples", type=int, default=1, metavar="N", help="exchanges per host")
    _add_trust_options(q)


def add_ke_arguments(k: argparse.ArgumentParser) -> None:
    k.add_argument("host", metavar="HOST")
    _add_trust_options(k)

