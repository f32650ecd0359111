"""chrony.conf-style configuration: directives in, a typed :class:`Config` out.

The syntax follows chrony.conf(5) so an existing chrony configuration keeps
working: one directive per line, directive names and options are not
case-sensitive, a line whose first non-blank character is one of ``! ; # %``
is a comment (chrony has no trailing comments), and a directive given twice
keeps its last value unless it is one of the repeatable ones (``server``,
``allow``, ``ntsserverkey`` ...).

Every problem is a :class:`~ntspy.errors.ConfigError` naming the file, the
line, the directive and what is wrong, e.g.
``ntspy.conf:7: server: invalid port 'abc'``.  Directives that only tune
chronyd internals are accepted and listed in :attr:`Config.ignored` so the
daemon can say that it ignores them; directives whose absence would change
what is trusted or served (``peer``, ``refclock``, ``key`` ...) are errors.

Reading files happens only in :func:`load_config`, ``include``/``confdir``
and :func:`load_sources_dir`; everything else is pure parsing.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError
from .proto.aead import AeadId
from .proto.ke import DEFAULT_KE_PORT
from .proto.ntp import NTP_PORT

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


COMMENT_CHARS = "!;#%"
MAX_CONFIG_SIZE = 1 << 20
"""Larger files are refused: a configuration is never that big, a mistake may be."""
MAX_INCLUDE_DEPTH = 10

_U32_MAX = 2**32 - 1
_I31_MAX = 2**31 - 1

# chrony.conf(5) defaults, used where a directive is absent.
DEFAULT_MINPOLL = 6
DEFAULT_MAXPOLL = 10
POLL_RANGE = (-7, 24)
DEFAULT_MAXSOURCES = 4
DEFAULT_NTSROTATE = 604800  # 1 week
DEFAULT_NTSREFRESH = 2419200  # 4 weeks
DEFAULT_LOCAL_STRATUM = 10
AUTHSELECT_MODES = ("require", "prefer", "mix", "ignore")


@dataclass(slots=True)
class SourceConfig:
    """One ``server NAME [option]...`` or ``pool NAME [option]...`` line."""

    name: str
    pool: bool = False
    port: int = NTP_PORT
    nts: bool = False
    ntsport: int = DEFAULT_KE_PORT
    iburst: bool = False
    burst: bool = False
    minpoll: int = DEFAULT_MINPOLL
    maxpoll: int = DEFAULT_MAXPOLL
    prefer: bool = False
    noselect: bool = False
    trust: bool = False
    require: bool = False
    maxsamples: int | None = None
    minsamples: int | None = None
    certset: int = 0
    maxsources: int = DEFAULT_MAXSOURCES
    version: int | None = None
    ignored_options: list[str] = field(default_factory=list)
    """chrony options accepted for compatibility but without effect here."""
    filename: str = ""
    lineno: int = 0


@dataclass(slots=True)
class RateLimit:
    """``ratelimit``/``ntsratelimit`` options (chrony semantics).

    ``interval`` is log2 of the minimum mean seconds between responses,
    ``burst`` how many responses may exceed it, ``leak`` means one in 2**leak
    limited requests is still answered (so spoofed floods cannot silence a
    victim completely).
    """

    interval: int = 3
    burst: int = 8
    leak: int = 2


NTS_RATELIMIT_DEFAULT_INTERVAL = 6
"""chrony's ``ntsratelimit`` differs from ``ratelimit`` only in this default."""


@dataclass(slots=True)
class AccessRule:
    """One ``allow``/``deny`` line; ``network`` None means every address."""

    allow: bool
    network: IPNetwork | None = None
    all: bool = False


@dataclass(slots=True)
class Config:
    """Everything a configuration file says, with chrony's defaults."""

    filename: str = "<config>"
    sources: list[SourceConfig] = field(default_factory=list)
    # server role
    port: int = NTP_PORT
    ntsport: int = DEFAULT_KE_PORT
    bindaddress: list[str] = field(default_factory=list)
    access: list[AccessRule] = field(default_factory=list)
    local_stratum: int | None = None
    local_orphan: bool = False
    local_distance: float = 1.0
    ntsserverkey: list[Path] = field(default_factory=list)
    ntsservercert: list[Path] = field(default_factory=list)
    ntsdumpdir: Path | None = None
    ntsrotate: int = DEFAULT_NTSROTATE
    ntskeystore: str | None = None
    """ntspy: the fleet's shared key ring, ``redis://`` ``rediss://`` ``unix://`` URL."""
    ntskeystore_options: dict[str, str] = field(default_factory=dict)
    """``passwordfile``, ``cafile``, ``poll`` given after the URL."""
    ntskeystorekey: Path | None = None
    """ntspy: the key-encryption key wrapping the master keys held in the store."""
    ntsntpserver: str | None = None
    ntsprocesses: int = 1
    maxntsconnections: int = 100
    ntsclientconnections: int = 8  # ntspy: concurrent NTS-KE connections per client
    ntssessiontimeout: float = 2.0  # ntspy: seconds for a whole NTS-KE session
    ntsratelimit: RateLimit | None = None
    ratelimit: RateLimit | None = None
    ntsaeads: list[int] | None = None
    clientloglimit: int = 524288
    """chrony's ``clientloglimit``: bytes for the server's client log (``clients``)."""
    noclientlog: bool = False
    """chrony's ``noclientlog``: keep no client log."""
    metricsaddress: tuple[str, int] | None = None
    """ntspy: serve Prometheus metrics over HTTP at ``/metrics`` on (address, port)."""
    # client role
    ntstrustedcerts: list[tuple[int, Path]] = field(default_factory=list)
    nosystemcert: bool = False
    nocerttimecheck: int = 0
    ntsrefresh: int = DEFAULT_NTSREFRESH
    sourcedir: list[Path] = field(default_factory=list)
    driftfile: Path | None = None
    makestep: tuple[float, int] | None = None
    minsources: int = 1
    authselectmode: str = "mix"
    # clock and selection tuning, chrony's directives and defaults
    maxdistance: float = 3.0
    maxjitter: float = 1.0
    combinelimit: float = 3.0
    reselectdist: float = 1e-4
    stratumweight: float = 1e-3
    corrtimeratio: float = 3.0
    maxupdateskew: float = 1000.0
    maxslewrate: float = 83333.333
    maxdrift: float = 500000.0
    bindcmdaddress: list[str] = field(default_factory=list)
    cmdport: int = 323
    """chrony's UDP command port (0: none), on ``bindcmdaddress`` or 127.0.0.1 and ::1."""
    maxchange: tuple[float, int, int] | None = None
    """chrony's ``maxchange offset start ignore``."""
    leapsectz: str | None = None
    """chrony's ``leapsectz``: a tz zone counting leap seconds (``right/UTC``)."""
    rtcsync: bool = False
    """chrony's ``rtcsync``: clear STA_UNSYNC when synchronised (kernel 11-minute mode)."""
    logdir: Path | None = None
    log: list[str] = field(default_factory=list)
    """chrony's ``log`` kinds ntspy writes (measurements, statistics, tracking)."""
    logbanner: int = 32
    pidfile: Path | None = None
    """chrony's ``pidfile``; None = the daemon's default under /run/ntspy."""
    user: str | None = None
    """chrony's ``user``: the account to run as after start-up."""
    ignored: list[tuple[str, int, str]] = field(default_factory=list)
    """(file, line number, directive) of each accepted-but-ignored directive; the
    file is the one the line is in (an ``include`` or ``confdir`` file too)."""

    def nts_server_credentials(self) -> list[tuple[Path, Path]]:
        """(certificate, key) pairs for the NTS-KE server, paired by order."""
        return list(zip(self.ntsservercert, self.ntsserverkey, strict=True))

    def is_allowed(self, address: str | IPAddress) -> bool:
        """Whether the ``allow``/``deny`` rules let ``address`` use the server."""
        return is_allowed(self.access, address)


# --------------------------------------------------------------------------
# token helpers


@dataclass(slots=True)
class _Where:
    """The line being parsed, to build errors that point at it."""

    filename: str
    lineno: int
    directive: str

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.directive}: {message}", self.filename, self.lineno)


_INT_RE = re.compile(r"[+-]?[0-9]{1,20}", re.ASCII)
_FLOAT_RE = re.compile(
    r"[+-]?(?:[0-9]{1,20}(?:\.[0-9]{0,20})?|\.[0-9]{1,20})(?:[eE][+-]?[0-9]{1,3})?"
)
_HOST_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]*[A-Za-z0-9_])?", re.ASCII)


def _show(token: str) -> str:
    """Quote a token for a message, escaped and cut short so garbage stays readable."""
    text = token if len(token) <= 40 else token[:40] + "..."
    return "'" + text.encode("unicode_escape").decode("ascii").replace("'", "\\'") + "'"


def _tokens(line: str) -> list[str] | None:
    """Split a line into words; None for blank and comment lines."""
    stripped = line.strip()
    if not stripped or stripped[0] in COMMENT_CHARS:
        return None
    return stripped.split()


def _int(where: _Where, token: str, what: str, lo: int, hi: int) -> int:
    # Python's int() would also take '1_000' and non-ASCII digits; chrony would not.
    if not _INT_RE.fullmatch(token):
        raise where.error(f"invalid {what} {_show(token)}")
    value = int(token)
    if not lo <= value <= hi:
        raise where.error(f"{what} {value} out of range {lo}..{hi}")
    return value


def _float(where: _Where, token: str, what: str, lo: float, hi: float = math.inf) -> float:
    if not _FLOAT_RE.fullmatch(token):
        raise where.error(f"invalid {what} {_show(token)}")
    value = float(token)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise where.error(f"{what} {token} out of range")
    return value


def _port(where: _Where, token: str, allow_zero: bool = False) -> int:
    return _int(where, token, "port", 0 if allow_zero else 1, 65535)


def _nargs(where: _Where, args: list[str], lo: int, hi: int | None = None) -> None:
    hi = lo if hi is None else hi
    if lo <= len(args) <= hi:
        return
    want = f"{lo} to {hi} arguments" if lo != hi else f"{lo} argument" + "s" * (lo != 1)
    raise where.error(f"expected {want}, got {len(args)}")


def _is_host(name: str) -> bool:
    """A hostname or an IP literal, as chrony would hand it to the resolver."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        return True
    if len(name) > 253:
        return False
    labels = name.removesuffix(".").split(".")
    return all(len(label) <= 63 and _HOST_RE.fullmatch(label) for label in labels)


def _ip(where: _Where, token: str, what: str = "address") -> IPAddress:
    try:
        return ipaddress.ip_address(token)
    except ValueError:
        raise where.error(f"invalid {what} {_show(token)}") from None


def _parse_subnet(where: _Where, token: str) -> IPNetwork:
    """A chrony subnet: ``1.2.3.4``, ``1.2.3`` (= /24), ``10/8``, ``2001:db8::/32``."""
    address, slash, bits_text = token.partition("/")
    bits: int | None = None
    if slash:
        bits = _int(where, bits_text, "prefix length", 0, 128)
    if ":" in address:
        if "%" in address:
            raise where.error(f"scoped address {_show(token)} cannot be a subnet")
        ip: IPAddress = _ip(where, address, "subnet")
        max_bits = 128
    else:
        # chrony's short IPv4 forms: missing trailing octets are zero and, without
        # an explicit prefix, each given octet adds 8 bits of prefix.
        parts = address.split(".")
        if not 1 <= len(parts) <= 4 or not all(
            re.fullmatch(r"[0-9]{1,3}", p, re.ASCII) and int(p) <= 255 for p in parts
        ):
            if any(c.isalpha() for c in address):
                raise where.error(
                    f"{_show(token)}: hostnames are not supported here, give an address or subnet"
                )
            raise where.error(f"invalid subnet {_show(token)}")
        ip = ipaddress.IPv4Address(".".join(parts + ["0"] * (4 - len(parts))))
        max_bits = 32
        if bits is None:
            bits = 8 * len(parts)
    if bits is None:
        bits = max_bits
    if bits > max_bits:
        raise where.error(f"prefix length {bits} too long for {_show(address)}")
    return ipaddress.ip_network((ip, bits), strict=False)


# --------------------------------------------------------------------------
# sources


_SOURCE_FLAGS = frozenset({"iburst", "burst", "nts", "prefer", "noselect", "trust", "require"})
# chrony options that only tune chronyd's filtering or packet timing; a source
# still means the same thing without them, so they are accepted and reported.
_SOURCE_IGNORED_FLAGS = frozenset({"offline", "auto_offline", "xleave"})
_SOURCE_IGNORED_VALUES: dict[str, bool] = {  # name -> takes a float (else an int)
    "maxdelay": True,
    "maxdelayratio": True,
    "maxdelaydevratio": True,
    "maxdelayquant": True,
    "mindelay": True,
    "asymmetry": True,
    "offset": True,
    "filter": False,
    "polltarget": False,
    "presend": False,
    "minstratum": False,
}


def parse_source_line(args: list[str], pool: bool, filename: str, lineno: int) -> SourceConfig:
    """Parse the words after ``server`` (or ``pool`` when ``pool`` is true).

    Shared by the main configuration and ``.sources`` files.  Raises
    :class:`ConfigError` for a bad name, an unknown option or a bad value.
    """
    where = _Where(filename, lineno, "pool" if pool else "server")
    if not args:
        raise where.error("missing hostname")
    name = args[0]
    if not _is_host(name):
        raise where.error(f"invalid hostname {_show(name)}")
    source = SourceConfig(name=name, pool=pool, filename=filename, lineno=lineno)
    i = 1
    while i < len(args):
        option = args[i].lower()
        i += 1
        if option in _SOURCE_FLAGS:
            setattr(source, option, True)
            continue
        if option in _SOURCE_IGNORED_FLAGS:
            source.ignored_options.append(option)
            continue
        if option == "key":
            raise where.error("symmetric-key authentication (key) is not supported, use nts")
        if option == "maxsources" and not pool:
            raise where.error("option maxsources is only valid for pool")
        if option not in _SOURCE_IGNORED_VALUES and option not in _SOURCE_VALUE_OPTIONS:
            hint = " (comments must be on their own line)" if option[0] in COMMENT_CHARS else ""
            raise where.error(f"unknown option {_show(args[i - 1])}{hint}")
        if i >= len(args):
            raise where.error(f"option {option} needs a value")
        value = args[i]
        i += 1
        if option in _SOURCE_IGNORED_VALUES:
            if _SOURCE_IGNORED_VALUES[option]:
                _float(where, value, option, -math.inf)
            else:
                _int(where, value, option, -_I31_MAX, _I31_MAX)
            source.ignored_options.append(option)
        else:
            _SOURCE_VALUE_OPTIONS[option](where, source, value)
    # chrony raises maxpoll to minpoll rather than failing, so that
    # `server x minpoll 12` alone works; do the same.
    source.maxpoll = max(source.maxpoll, source.minpoll)
    if source.nts and source.version not in (None, 4):
        raise where.error("nts needs NTP version 4")
    return source


def _opt_port(where: _Where, source: SourceConfig, value: str) -> None:
    source.port = _port(where, value)


def _opt_ntsport(where: _Where, source: SourceConfig, value: str) -> None:
    source.ntsport = _port(where, value)


def _opt_minpoll(where: _Where, source: SourceConfig, value: str) -> None:
    source.minpoll = _int(where, value, "minpoll", *POLL_RANGE)


def _opt_maxpoll(where: _Where, source: SourceConfig, value: str) -> None:
    source.maxpoll = _int(where, value, "maxpoll", *POLL_RANGE)


def _opt_maxsamples(where: _Where, source: SourceConfig, value: str) -> None:
    source.maxsamples = _int(where, value, "maxsamples", 0, 65536)


def _opt_minsamples(where: _Where, source: SourceConfig, value: str) -> None:
    source.minsamples = _int(where, value, "minsamples", 0, 65536)


def _opt_certset(where: _Where, source: SourceConfig, value: str) -> None:
    source.certset = _int(where, value, "certset", 0, _U32_MAX)


def _opt_maxsources(where: _Where, source: SourceConfig, value: str) -> None:
    source.maxsources = _int(where, value, "maxsources", 1, 16)


def _opt_version(where: _Where, source: SourceConfig, value: str) -> None:
    source.version = _int(where, value, "version", 1, 4)


_SOURCE_VALUE_OPTIONS: dict[str, Callable[[_Where, SourceConfig, str], None]] = {
    "port": _opt_port,
    "ntsport": _opt_ntsport,
    "minpoll": _opt_minpoll,
    "maxpoll": _opt_maxpoll,
    "maxsamples": _opt_maxsamples,
    "minsamples": _opt_minsamples,
    "certset": _opt_certset,
    "maxsources": _opt_maxsources,
    "version": _opt_version,
}


# --------------------------------------------------------------------------
# access rules


def is_allowed(rules: list[AccessRule], address: str | IPAddress) -> bool:
    """Evaluate ``allow``/``deny`` rules for one client address, like chrony.

    The most specific subnet containing the address decides; a later rule for
    the same subnet replaces an earlier one; an ``all`` rule also erases every
    earlier rule inside its subnet.  No matching rule means deny.
    """
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    table: dict[IPNetwork, bool] = {}
    for rule in rules:
        networks: list[IPNetwork] = (
            [rule.network]
            if rule.network is not None
            else [ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0")]
        )
        for net in networks:
            if rule.all:
                for old in [n for n in table if _within(n, net)]:
                    del table[old]
            table[net] = rule.allow
    best: IPNetwork | None = None
    for net in table:
        if ip in net and (best is None or net.prefixlen > best.prefixlen):
            best = net
    return best is not None and table[best]


def _within(inner: IPNetwork, outer: IPNetwork) -> bool:
    if isinstance(inner, ipaddress.IPv4Network) and isinstance(outer, ipaddress.IPv4Network):
        return inner.subnet_of(outer)
    if isinstance(inner, ipaddress.IPv6Network) and isinstance(outer, ipaddress.IPv6Network):
        return inner.subnet_of(outer)
    return False


# --------------------------------------------------------------------------
# directives

# Accepted and reported as ignored: they tune chronyd's own clock control,
# logging, RTC handling or monitoring, and ignoring them changes neither which
# sources are trusted nor what is served to whom.
IGNORED_DIRECTIVES = frozenset(
    {
        "acquisitionport", "bindacqaddress", "bindacqdevice", "bindcmddevice",
        "clockprecision", "cmdallow", "cmddeny",
        "cmdratelimit", "dscp", "dumpdir",
        "fallbackdrift", "hwclockfile", "hwtimestamp", "keyfile", "leapsecmode",
        "leapseclist", "lock_all", "logchange", "mailonchange", "manual",
        "maxclockerror",
        "maxsamples", "minsamples", "ptpport",
        "rtcautotrim", "rtcdevice", "rtcfile", "rtconutc",
        "sched_priority", "tempcomp",
    }
)  # fmt: skip

LOG_KINDS = ("measurements", "statistics", "tracking")
CHRONY_ONLY_LOGS = frozenset({"rawmeasurements", "refclocks", "tempcomp", "rtc", "selection"})

# chrony directives whose meaning ntspy cannot honour; silently dropping them
# would change which time is trusted or served, so they are errors.
UNSUPPORTED_DIRECTIVES = {
    "peer": "symmetric peers are not supported",
    "refclock": "reference clocks are not supported",
    "broadcast": "broadcast mode is not supported",
    "initstepslew": "not supported, use makestep",
    "smoothtime": "time smoothing is not supported",
    "ntpsigndsocket": "MS-SNTP signing is not supported",
    "binddevice": "binding to a device is not supported, use bindaddress",
}


class _Parser:
    """Applies directives to one :class:`Config`, following includes."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # (path, filename, lineno) so a count mismatch can point at the extra line
        self.keys: list[tuple[Path, str, int]] = []
        self.certs: list[tuple[Path, str, int]] = []

    def feed(self, text: str, filename: str, depth: int) -> None:
        # Split on "\n" only: str.splitlines() also breaks at \f, \x1c, U+2028...,
        # which would make our line numbers disagree with the user's editor.
        for lineno, line in enumerate(text.split("\n"), start=1):
            words = _tokens(line)
            if words is None:
                continue
            name = words[0].lower()
            where = _Where(filename, lineno, name)
            handler = _HANDLERS.get(name)
            if handler is not None:
                handler(self, where, words[1:], depth)
            elif name in IGNORED_DIRECTIVES:
                self.config.ignored.append((filename, lineno, name))
            elif name in UNSUPPORTED_DIRECTIVES:
                raise where.error(UNSUPPORTED_DIRECTIVES[name])
            else:
                raise ConfigError(_unknown(words[0]), filename, lineno)

    def finish(self) -> None:
        """Checks that need the whole file."""
        names = {name: (f, n) for f, n, name in self.config.ignored}
        if self.config.rtcsync and "rtcfile" in names:
            filename, lineno = names["rtcfile"]
            # chronyd refuses the pair: two owners of the RTC.
            raise ConfigError("rtcfile: cannot be used together with rtcsync", filename, lineno)
        if len(self.keys) != len(self.certs):
            extra, directive, other = (
                (self.keys[len(self.certs)], "ntsserverkey", "ntsservercert")
                if len(self.keys) > len(self.certs)
                else (self.certs[len(self.keys)], "ntsservercert", "ntsserverkey")
            )
            _, filename, lineno = extra
            raise ConfigError(
                f"{directive}: no matching {other} (keys and certificates pair by order)",
                filename,
                lineno,
            )
        self.config.ntsserverkey = [p for p, _, _ in self.keys]
        self.config.ntsservercert = [p for p, _, _ in self.certs]

    # -- sources ----------------------------------------------------------

    def d_server(self, where: _Where, args: list[str], depth: int) -> None:
        self.config.sources.append(parse_source_line(args, False, where.filename, where.lineno))

    def d_pool(self, where: _Where, args: list[str], depth: int) -> None:
        self.config.sources.append(parse_source_line(args, True, where.filename, where.lineno))

    def d_sourcedir(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1, 10)
        self.config.sourcedir.extend(_relative(where, a) for a in args)

    # -- server role ------------------------------------------------------

    def d_port(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.port = _port(where, args[0], allow_zero=True)

    def d_ntsport(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.ntsport = _port(where, args[0], allow_zero=True)

    def d_bindaddress(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        ip = _ip(where, args[0])
        # chrony keeps one address per family; a repeat replaces the earlier one.
        self.config.bindaddress = [
            a for a in self.config.bindaddress if ipaddress.ip_address(a).version != ip.version
        ]
        self.config.bindaddress.append(str(ip))

    def d_allow(self, where: _Where, args: list[str], depth: int) -> None:
        self.config.access.append(_access_rule(where, args, where.directive == "allow"))

    d_deny = d_allow

    def d_local(self, where: _Where, args: list[str], depth: int) -> None:
        stratum, orphan, distance = DEFAULT_LOCAL_STRATUM, False, 1.0
        i = 0
        while i < len(args):
            option = args[i].lower()
            i += 1
            if option == "orphan":
                orphan = True
                continue
            if option not in ("stratum", "distance", "activate", "waitsynced", "waitunsynced"):
                raise where.error(f"unknown option {_show(args[i - 1])}")
            if i >= len(args):
                raise where.error(f"option {option} needs a value")
            value = args[i]
            i += 1
            if option == "stratum":
                stratum = _int(where, value, "stratum", 1, 15)
            elif option == "distance":
                distance = _float(where, value, "distance", 0.0)
            else:  # newer chrony's activation tuning: no effect here
                _float(where, value, option, 0.0)
                self.config.ignored.append((where.filename, where.lineno, f"local {option}"))
        self.config.local_stratum = stratum
        self.config.local_orphan = orphan
        self.config.local_distance = distance

    def d_ntsserverkey(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.keys.append((_relative(where, args[0]), where.filename, where.lineno))

    def d_ntsservercert(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.certs.append((_relative(where, args[0]), where.filename, where.lineno))

    def d_ntsdumpdir(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.ntsdumpdir = _relative(where, args[0])

    d_ntscachedir = d_ntsdumpdir  # chrony 4.0's name for it, still accepted

    def d_ntskeystore(self, where: _Where, args: list[str], depth: int) -> None:
        """ntspy: ``ntskeystore URL [passwordfile FILE] [cafile FILE] [poll SECONDS]``."""
        if not args:
            raise where.error("missing URL")
        url = args[0]
        if not re.match(r"^(redis|rediss|unix)://", url):
            raise where.error(f"invalid key store URL {_show(url)} "
                              "(redis://HOST:PORT/DB, rediss://... or unix:///PATH)")
        options: dict[str, str] = {}
        rest = args[1:]
        if len(rest) % 2:
            raise where.error(f"option {rest[-1]} needs a value")
        for name, value in zip(rest[::2], rest[1::2], strict=True):
            name = name.lower()
            if name in ("passwordfile", "cafile"):
                options[name] = str(_relative(where, value))
            elif name == "poll":
                options[name] = str(_float(where, value, "poll", 0.05, 3600.0))
            else:
                raise where.error(f"unknown option {_show(name)}")
        self.config.ntskeystore = url
        self.config.ntskeystore_options = options

    def d_ntskeystorekey(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.ntskeystorekey = _relative(where, args[0])

    def d_ntsrotate(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.ntsrotate = _int(where, args[0], "interval", 0, _I31_MAX)

    def d_ntsntpserver(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        if not _is_host(args[0]):
            raise where.error(f"invalid hostname {_show(args[0])}")
        self.config.ntsntpserver = args[0]

    def d_ntsprocesses(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.ntsprocesses = _int(where, args[0], "number of processes", 0, 1024)

    def d_maxntsconnections(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.maxntsconnections = _int(where, args[0], "connections", 1, 1_000_000)

    def d_clientloglimit(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.clientloglimit = _int(where, args[0], "client log limit", 0, 2**32 - 1)

    def d_noclientlog(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 0)
        self.config.noclientlog = True

    def d_metricsaddress(self, where: _Where, args: list[str], depth: int) -> None:
        """ntspy: ``metricsaddress ADDRESS PORT``, the Prometheus endpoint (default: none)."""
        _nargs(where, args, 2)
        self.config.metricsaddress = (str(_ip(where, args[0])), _port(where, args[1]))

    def d_ntsclientconnections(self, where: _Where, args: list[str], depth: int) -> None:
        """ntspy: concurrent NTS-KE connections one client (IPv4 address, IPv6 /64) may hold."""
        _nargs(where, args, 1)
        self.config.ntsclientconnections = _int(where, args[0], "connections", 1, 1_000_000)

    def d_ntssessiontimeout(self, where: _Where, args: list[str], depth: int) -> None:
        """ntspy: the deadline of a whole NTS-KE session, from accept to the last byte."""
        _nargs(where, args, 1)
        self.config.ntssessiontimeout = _float(where, args[0], "timeout", 0.01, 3600.0)

    def d_ratelimit(self, where: _Where, args: list[str], depth: int) -> None:
        self.config.ratelimit = _rate_limit(where, args, RateLimit())

    def d_ntsratelimit(self, where: _Where, args: list[str], depth: int) -> None:
        default = RateLimit(interval=NTS_RATELIMIT_DEFAULT_INTERVAL)
        self.config.ntsratelimit = _rate_limit(where, args, default)

    def d_ntsaeads(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1, len(AeadId))
        valid = {int(a) for a in AeadId}
        ids: list[int] = []
        for token in args:
            aead = _int(where, token, "AEAD id", 0, 65535)
            if aead not in valid:
                known = ", ".join(str(a) for a in sorted(valid))
                raise where.error(f"unsupported AEAD id {aead} (known: {known})")
            if aead in ids:
                raise where.error(f"AEAD id {aead} listed twice")
            ids.append(aead)
        self.config.ntsaeads = ids

    # -- client role ------------------------------------------------------

    def d_ntstrustedcerts(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1, 2)
        certset = _int(where, args[0], "set ID", 0, _U32_MAX) if len(args) == 2 else 0
        self.config.ntstrustedcerts.append((certset, _relative(where, args[-1])))

    def d_nosystemcert(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 0)
        self.config.nosystemcert = True

    def d_nocerttimecheck(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.nocerttimecheck = _int(where, args[0], "limit", 0, _I31_MAX)

    def d_ntsrefresh(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.ntsrefresh = _int(where, args[0], "interval", 1, _I31_MAX)

    def d_driftfile(self, where: _Where, args: list[str], depth: int) -> None:
        # chrony 4.7 added `driftfile FILE interval N`; the interval is ours to pick.
        _nargs(where, args, 1, 3)
        if len(args) > 1:
            if args[1].lower() != "interval" or len(args) != 3:
                raise where.error(f"unknown option {_show(args[1])}")
            _int(where, args[2], "interval", 0, _I31_MAX)
            self.config.ignored.append((where.filename, where.lineno, "driftfile interval"))
        self.config.driftfile = _relative(where, args[0])

    def d_makestep(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 2)
        threshold = _float(where, args[0], "threshold", 0.0)
        limit = _int(where, args[1], "limit", -_I31_MAX, _I31_MAX)
        self.config.makestep = (threshold, max(limit, -1))  # any negative: no limit

    def _tuning(self, where: _Where, args: list[str], lo: float, hi: float = math.inf) -> None:
        """A clock or selection directive with one number (chrony's meaning and range)."""
        _nargs(where, args, 1)
        setattr(self.config, where.directive, _float(where, args[0], where.directive, lo, hi))

    def d_maxdistance(self, where: _Where, args: list[str], depth: int) -> None:
        self._tuning(where, args, 0.0)

    def d_maxjitter(self, where: _Where, args: list[str], depth: int) -> None:
        self._tuning(where, args, 0.0)

    def d_combinelimit(self, where: _Where, args: list[str], depth: int) -> None:
        self._tuning(where, args, 0.0)

    def d_reselectdist(self, where: _Where, args: list[str], depth: int) -> None:
        self._tuning(where, args, 0.0)

    def d_stratumweight(self, where: _Where, args: list[str], depth: int) -> None:
        self._tuning(where, args, 0.0)

    def d_corrtimeratio(self, where: _Where, args: list[str], depth: int) -> None:
        self._tuning(where, args, 0.0)

    def d_maxupdateskew(self, where: _Where, args: list[str], depth: int) -> None:
        self._tuning(where, args, 0.0)

    def d_maxslewrate(self, where: _Where, args: list[str], depth: int) -> None:
        # chrony's ceiling: a slew faster than 1/2 s/s would run the clock backwards.
        self._tuning(where, args, 0.0, 500000.0)

    def d_maxdrift(self, where: _Where, args: list[str], depth: int) -> None:
        self._tuning(where, args, 0.0, 500000.0)

    def d_minsources(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.minsources = _int(where, args[0], "number of sources", 1, 255)

    def d_maxchange(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 3)
        self.config.maxchange = (
            _float(where, args[0], "offset", 0.0),
            _int(where, args[1], "start", 0, _I31_MAX),
            max(-1, _int(where, args[2], "ignore", -_I31_MAX, _I31_MAX)),  # negative: never exit
        )

    def d_leapsectz(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.leapsectz = args[0]

    def d_rtcsync(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 0)
        self.config.rtcsync = True

    def d_logdir(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.logdir = _relative(where, args[0])

    def d_log(self, where: _Where, args: list[str], depth: int) -> None:
        if not args:
            raise where.error("which logs? (measurements, statistics, tracking)")
        for kind in args:
            name = kind.lower()
            if name in LOG_KINDS:
                if name not in self.config.log:
                    self.config.log.append(name)
            elif name in CHRONY_ONLY_LOGS:
                self.config.ignored.append((where.filename, where.lineno, f"log {name}"))
            else:
                raise where.error(f"unknown log {_show(kind)}")

    def d_logbanner(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.logbanner = _int(where, args[0], "banner interval", 0, _I31_MAX)

    def d_pidfile(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.pidfile = _relative(where, args[0])

    def d_user(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.user = args[0]

    def d_authselectmode(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        mode = args[0].lower()
        if mode not in AUTHSELECT_MODES:
            raise where.error(
                f"invalid mode {_show(args[0])} (one of {', '.join(AUTHSELECT_MODES)})"
            )
        self.config.authselectmode = mode

    def d_cmdport(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        self.config.cmdport = _int(where, args[0], "port", 0, 65535)

    def d_bindcmdaddress(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        value = args[0]
        if value.startswith("/"):
            kind = 0  # Unix socket
            _relative(where, value)  # only to vet the path
        else:
            kind = _ip(where, value).version
        # one per kind (IPv4, IPv6, Unix socket), the last one wins, as in chrony
        self.config.bindcmdaddress = [a for a in self.config.bindcmdaddress if _cmd_kind(a) != kind]
        self.config.bindcmdaddress.append(value)

    # -- file structure ---------------------------------------------------

    def d_include(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1)
        pattern = str(_relative(where, args[0]))
        import glob  # only include/confdir need it: kept out of every server's import time

        matches = sorted(glob.glob(pattern))
        if not matches:  # chrony: at least one file is required to exist
            raise where.error(f"no file matches {_show(args[0])}")
        for match in matches:
            self._include_file(where, Path(match), depth)

    def d_confdir(self, where: _Where, args: list[str], depth: int) -> None:
        _nargs(where, args, 1, 10)
        # Like chrony: *.conf files in name order; when several directories hold
        # the same name only the first directory's file counts, so a fragment
        # can be overridden from another directory.  Missing directories are fine.
        import glob

        chosen: dict[str, Path] = {}
        for directory in args:
            base = glob.escape(str(_relative(where, directory)))
            for match in glob.glob(os.path.join(base, "*.conf")):
                chosen.setdefault(os.path.basename(match), Path(match))
        for name in sorted(chosen):
            self._include_file(where, chosen[name], depth)

    def _include_file(self, where: _Where, path: Path, depth: int) -> None:
        if depth >= MAX_INCLUDE_DEPTH:
            raise where.error(f"includes nested deeper than {MAX_INCLUDE_DEPTH} (a loop?)")
        try:
            text = _read_text(path)
        except (OSError, ValueError) as exc:
            raise where.error(f"cannot read {_show(str(path))}: {_reason(exc)}") from None
        self.feed(text, str(path), depth + 1)


Handler = Callable[[_Parser, _Where, list[str], int], None]
_HANDLERS: dict[str, Handler] = {
    name.removeprefix("d_"): getattr(_Parser, name)
    for name in dir(_Parser)
    if name.startswith("d_")
}


def _unknown(word: str) -> str:
    import difflib  # only for the hint on a typo, not on every start

    known = [*_HANDLERS, *IGNORED_DIRECTIVES, *UNSUPPORTED_DIRECTIVES]
    close = difflib.get_close_matches(word.lower(), known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown directive {_show(word)}{hint}"


def _relative(where: _Where, path: str) -> Path:
    """Paths relative to the file that names them (chrony uses its working directory,
    which for a daemon is '/', so absolute paths behave the same)."""
    if "\0" in path:  # no system call takes it; refuse it here, not at first use
        raise where.error(f"invalid path {_show(path)}")
    p = Path(path)
    if p.is_absolute() or where.filename.startswith("<"):
        return p
    return Path(where.filename).parent / p


def _cmd_kind(address: str) -> int:
    return 0 if address.startswith("/") else ipaddress.ip_address(address).version


def _access_rule(where: _Where, args: list[str], allow: bool) -> AccessRule:
    rest = args
    everything = bool(rest) and rest[0].lower() == "all"
    if everything:
        rest = rest[1:]
    if len(rest) > 1:
        raise where.error(f"expected at most one subnet, got {len(rest)} words")
    network = _parse_subnet(where, rest[0]) if rest else None
    return AccessRule(allow=allow, network=network, all=everything)


_RATE_LIMIT_RANGES = {"interval": (-19, 12), "burst": (1, 255), "leak": (1, 4)}


def _rate_limit(where: _Where, args: list[str], limit: RateLimit) -> RateLimit:
    if len(args) % 2:
        raise where.error(f"option {_show(args[-1])} needs a value")
    for option_word, value in zip(args[::2], args[1::2], strict=True):
        option = option_word.lower()
        if option not in _RATE_LIMIT_RANGES:
            raise where.error(f"unknown option {_show(option_word)}")
        setattr(limit, option, _int(where, value, option, *_RATE_LIMIT_RANGES[option]))
    return limit


# --------------------------------------------------------------------------
# files


def _read_text(path: Path) -> str:
    """A regular file's UTF-8 text; never blocks on FIFOs or reads devices forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError("not a regular file")
        data = f.read(MAX_CONFIG_SIZE + 1)
    if len(data) > MAX_CONFIG_SIZE:
        raise ValueError(f"larger than {MAX_CONFIG_SIZE} bytes")
    return data.decode("utf-8")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 text (byte {exc.start})"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def parse_config(text: str, filename: str = "<config>") -> Config:
    """Parse configuration text; ``filename`` is used in errors and to resolve
    relative ``include``/``confdir`` paths.  Raises :class:`ConfigError`."""
    config = Config(filename=filename)
    parser = _Parser(config)
    parser.feed(text, filename, 0)
    parser.finish()
    return config


def load_config(path: Path) -> Config:
    """Read and parse a configuration file; unreadable files are a :class:`ConfigError`."""
    try:
        text = _read_text(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read configuration: {_reason(exc)}", str(path)) from None
    return parse_config(text, str(path))


def load_sources_dir(directory: Path,
                     errors: list[ConfigError] | None = None) -> list[SourceConfig]:
    """Sources from chrony ``sourcedir``-style ``*.sources`` files, in name order.

    Only ``server`` and ``pool`` lines are allowed.  As in chrony, a last line
    without a newline is ignored: the file may still be being written (by a
    DHCP hook, say).  A missing directory holds no sources.  Given ``errors``,
    a bad line (or an unreadable file) is put there and skipped, and the other
    lines still count; without it the first one raises.
    """
    def reject(exc: ConfigError) -> None:
        if errors is None:
            raise exc
        errors.append(exc)

    if not directory.is_dir():
        return []
    sources: list[SourceConfig] = []
    for path in sorted(directory.glob("*.sources")):
        try:
            text = _read_text(path)
        except (OSError, ValueError) as exc:
            reject(ConfigError(f"cannot read sources: {_reason(exc)}", str(path)))
            continue
        # the last element is the unterminated tail, or "" after a final newline
        lines = text.split("\n")[:-1]
        for lineno, line in enumerate(lines, start=1):
            try:
                words = _tokens(line)
                if words is None:
                    continue
                name = words[0].lower()
                if name not in ("server", "pool"):
                    raise ConfigError(
                        f"{name}: only server and pool lines are allowed in a .sources file",
                        str(path),
                        lineno,
                    )
                sources.append(parse_source_line(words[1:], name == "pool", str(path), lineno))
            except ConfigError as exc:
                reject(exc)
    return sources
