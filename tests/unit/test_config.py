"""chrony.conf-style configuration: what a chrony user's file turns into."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from ntspy.config import (
    AccessRule,
    Config,
    RateLimit,
    is_allowed,
    load_config,
    load_sources_dir,
    parse_config,
    parse_source_line,
)
from ntspy.errors import ConfigError

# The client configuration from the article the project started from.
SEED_CLIENT = """\
server time.cloudflare.com iburst nts
server nts.sth2.ntp.se iburst nts
ntsdumpdir /var/lib/chrony
"""

SERVER = """\
# NTS server for the lab
port 123
ntsport 4460
bindaddress 192.0.2.10
bindaddress 2001:db8::10
ntsserverkey /etc/ntspy/a.key
ntsservercert /etc/ntspy/a.crt
ntsserverkey /etc/ntspy/b.key
ntsservercert /etc/ntspy/b.crt
ntsdumpdir /var/lib/ntspy
ntsrotate 86400
ntsntpserver ntp.example.net
ntsprocesses 4
maxntsconnections 500
ntsclientconnections 4
ntssessiontimeout 1.5
ntsaeads 30 15
allow 192.168.0.0/16
deny 192.168.66
allow 2001:db8::/32
ratelimit interval 1 burst 16
ntsratelimit interval 3 burst 1
local stratum 3 orphan distance 0.5
server time.cloudflare.com iburst nts
"""

# Debian's /etc/chrony/chrony.conf as shipped by chrony 4.3 (comments shortened).
DEBIAN_DEFAULT = """\
# Welcome to the chrony configuration file. See chrony.conf(5) for more
# information about usable directives.

# Include configuration files found in /etc/chrony/conf.d.
confdir /etc/chrony/conf.d

# Use Debian vendor zone.
pool 2.debian.pool.ntp.org iburst

# Use time sources from DHCP.
sourcedir /run/chrony-dhcp

# Use NTP sources found in /etc/chrony/sources.d.
sourcedir /etc/chrony/sources.d

keyfile /etc/chrony/chrony.keys
driftfile /var/lib/chrony/chrony.drift
ntsdumpdir /var/lib/chrony
#log tracking measurements statistics
logdir /var/log/chrony
maxupdateskew 100.0
rtcsync
makestep 1 3
leapsectz right/UTC
"""


def error_of(text: str, filename: str = "ntspy.conf") -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, filename)
    return info.value


# --------------------------------------------------------------------------
# realistic files


def test_seed_client_config() -> None:
    config = parse_config(SEED_CLIENT, "ntspy.conf")
    assert [s.name for s in config.sources] == ["time.cloudflare.com", "nts.sth2.ntp.se"]
    for source, lineno in zip(config.sources, (1, 2), strict=True):
        assert source.nts and source.iburst and not source.pool
        assert (source.port, source.ntsport) == (123, 4460)
        assert (source.minpoll, source.maxpoll) == (6, 10)
        assert (source.filename, source.lineno) == ("ntspy.conf", lineno)
    assert config.ntsdumpdir == Path("/var/lib/chrony")
    assert config.ignored == []


def test_server_config() -> None:
    config = parse_config(SERVER)
    assert (config.port, config.ntsport) == (123, 4460)
    assert config.bindaddress == ["192.0.2.10", "2001:db8::10"]
    assert config.nts_server_credentials() == [
        (Path("/etc/ntspy/a.crt"), Path("/etc/ntspy/a.key")),
        (Path("/etc/ntspy/b.crt"), Path("/etc/ntspy/b.key")),
    ]
    assert config.ntsdumpdir == Path("/var/lib/ntspy")
    assert config.ntsrotate == 86400
    assert config.ntsntpserver == "ntp.example.net"
    assert (config.ntsprocesses, config.maxntsconnections) == (4, 500)
    assert (config.ntsclientconnections, config.ntssessiontimeout) == (4, 1.5)
    assert config.ntsaeads == [30, 15]
    assert config.access == [
        AccessRule(True, ipaddress.ip_network("192.168.0.0/16")),
        AccessRule(False, ipaddress.ip_network("192.168.66.0/24")),
        AccessRule(True, ipaddress.ip_network("2001:db8::/32")),
    ]
    assert config.ratelimit == RateLimit(interval=1, burst=16, leak=2)
    assert config.ntsratelimit == RateLimit(interval=3, burst=1, leak=2)
    assert (config.local_stratum, config.local_orphan, config.local_distance) == (3, True, 0.5)
    assert config.is_allowed("192.168.1.1")
    assert not config.is_allowed("192.168.66.1")
    assert config.is_allowed("2001:db8::99")
    assert not config.is_allowed("198.51.100.1")


def test_client_directives() -> None:
    config = parse_config(
        "ntstrustedcerts /etc/pki/nts/foo.crt\n"
        "ntstrustedcerts 1 /etc/pki/nts/bar.crt\n"
        "ntstrustedcerts 4294967295 /etc/pki/nts/dir\n"
        "nosystemcert\n"
        "nocerttimecheck 1\n"
        "ntsrefresh 86400\n"
        "sourcedir /run/chrony-dhcp /etc/chrony/sources.d\n"
        "sourcedir /etc/ntspy/sources.d\n"
        "driftfile /var/lib/ntspy/drift\n"
        "makestep 0.1 -5\n"
        "minsources 2\n"
        "authselectmode require\n"
        "bindcmdaddress /run/ntspy/ntspy.sock\n"
        "bindcmdaddress 127.0.0.1\n"
        "ntscachedir /var/cache/ntspy\n"
    )
    assert config.ntstrustedcerts == [
        (0, Path("/etc/pki/nts/foo.crt")),
        (1, Path("/etc/pki/nts/bar.crt")),
        (4294967295, Path("/etc/pki/nts/dir")),
    ]
    assert config.nosystemcert
    assert config.nocerttimecheck == 1
    assert config.ntsrefresh == 86400
    assert config.sourcedir == [
        Path("/run/chrony-dhcp"),
        Path("/etc/chrony/sources.d"),
        Path("/etc/ntspy/sources.d"),
    ]
    assert config.driftfile == Path("/var/lib/ntspy/drift")
    assert config.makestep == (0.1, -1)  # any negative limit means "no limit"
    assert config.minsources == 2
    assert config.authselectmode == "require"
    assert config.bindcmdaddress == ["/run/ntspy/ntspy.sock", "127.0.0.1"]
    assert config.ntsdumpdir == Path("/var/cache/ntspy")  # chrony's older name


def test_defaults_are_chronys() -> None:
    config = parse_config("")
    assert config.sources == [] and config.access == []
    assert (config.port, config.ntsport) == (123, 4460)
    assert (config.ntsrotate, config.ntsrefresh) == (604800, 2419200)
    assert (config.ntsprocesses, config.maxntsconnections) == (1, 100)
    assert config.ratelimit is None and config.ntsratelimit is None
    assert config.ntsaeads is None and config.local_stratum is None
    assert config.authselectmode == "mix" and config.minsources == 1
    assert config.makestep is None and config.driftfile is None and config.ntsdumpdir is None
    assert not config.is_allowed("127.0.0.1")  # no allow: not a server


def test_debian_default_loads() -> None:
    config = parse_config(DEBIAN_DEFAULT, "/nonexistent-dir/chrony.conf")
    [pool] = config.sources
    assert (pool.name, pool.pool, pool.iburst, pool.maxsources) == (
        "2.debian.pool.ntp.org", True, True, 4,
    )  # fmt: skip
    assert config.sourcedir == [Path("/run/chrony-dhcp"), Path("/etc/chrony/sources.d")]
    assert config.driftfile == Path("/var/lib/chrony/chrony.drift")
    assert config.ntsdumpdir == Path("/var/lib/chrony")
    assert config.makestep == (1.0, 3)
    assert [name for _, _, name in config.ignored] == [
        "keyfile",
    ]  # fmt: skip
    assert config.leapsectz == "right/UTC"
    assert config.rtcsync
    assert config.logdir == Path("/var/log/chrony")
    assert config.maxupdateskew == 100.0
    assert config.ignored[0] == ("/nonexistent-dir/chrony.conf", 16, "keyfile")


SYSTEM_CHRONY_CONF = Path("/etc/chrony/chrony.conf")


def test_chrony_conf_file_loads(tmp_path: Path) -> None:
    # The installed file where chrony is installed (CI installs it), else our copy.
    path = SYSTEM_CHRONY_CONF
    if not path.is_file():
        path = tmp_path / "chrony.conf"
        path.write_text(DEBIAN_DEFAULT)
    config = load_config(path)
    assert config.filename == str(path)
    assert config.sources or config.sourcedir


# --------------------------------------------------------------------------
# syntax


def test_comments_blank_lines_and_line_endings() -> None:
    text = (
        "# hash\r\n"
        "   ! bang after spaces\r\n"
        "; semicolon\n"
        "% percent\n"
        "\n"
        "   \t  \n"
        "server a.example iburst\r\n"
        "\tserver   b.example\t nts  \n"
    )
    config = parse_config(text)
    assert [(s.name, s.lineno) for s in config.sources] == [("a.example", 7), ("b.example", 8)]
    assert config.sources[1].nts


def test_directives_and_options_are_case_insensitive() -> None:
    config = parse_config("SERVER Time.Example IBURST NTS MinPoll 4\nNtsDumpDir /x\nALLOW ALL")
    [source] = config.sources
    assert source.name == "Time.Example"  # names are kept as written
    assert source.iburst and source.nts and source.minpoll == 4
    assert config.ntsdumpdir == Path("/x")
    assert config.access == [AccessRule(True, None, all=True)]


def test_trailing_comment_is_an_error_like_in_chrony() -> None:
    err = error_of("server a.example iburst # my server")
    assert "comments must be on their own line" in str(err)


def test_last_value_wins_for_single_directives() -> None:
    config = parse_config("ntsrotate 10\nntsrotate 20\nport 1123\nport 0")
    assert config.ntsrotate == 20
    assert config.port == 0  # 0: do not serve NTP at all


def test_bindaddress_keeps_one_per_family() -> None:
    config = parse_config("bindaddress 10.0.0.1\nbindaddress ::1\nbindaddress 10.0.0.2")
    assert config.bindaddress == ["::1", "10.0.0.2"]


# --------------------------------------------------------------------------
# sources


def test_all_source_options() -> None:
    line = (
        "pool pool.example.org port 1123 ntsport 14460 nts iburst burst minpoll -7 maxpoll 24 "
        "prefer noselect trust require maxsamples 32 minsamples 4 certset 7 maxsources 16 "
        "version 4"
    )
    config = parse_config(line)
    [s] = config.sources
    assert s.pool and s.name == "pool.example.org"
    assert (s.port, s.ntsport, s.minpoll, s.maxpoll) == (1123, 14460, -7, 24)
    assert s.nts and s.iburst and s.burst and s.prefer and s.noselect and s.trust and s.require
    assert (s.maxsamples, s.minsamples, s.certset, s.maxsources, s.version) == (32, 4, 7, 16, 4)
    assert s.ignored_options == []


def test_source_line_helper_and_ip_literals() -> None:
    s = parse_source_line(["2001:db8::1", "nts"], False, "x.sources", 3)
    assert (s.name, s.nts, s.pool, s.filename, s.lineno) == (
        "2001:db8::1",
        True,
        False,
        "x.sources",
        3,
    )
    assert parse_source_line(["192.0.2.1"], True, "f", 1).pool


def test_minpoll_above_default_maxpoll_raises_maxpoll() -> None:
    [s] = parse_config("server a.example minpoll 12").sources
    assert (s.minpoll, s.maxpoll) == (12, 12)


def test_chrony_tuning_options_are_accepted_and_reported() -> None:
    [s] = parse_config(
        "server a.example maxdelay 0.3 polltarget 30 offline xleave asymmetry -0.1 iburst"
    ).sources
    assert s.iburst
    assert s.ignored_options == ["maxdelay", "polltarget", "offline", "xleave", "asymmetry"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("server", "server: missing hostname"),
        ("server a.example port abc", "server: invalid port 'abc'"),
        ("server a.example port 0", "server: port 0 out of range 1..65535"),
        ("server a.example port 65536", "server: port 65536 out of range 1..65535"),
        ("server a.example ntsport", "server: option ntsport needs a value"),
        ("server a.example minpoll -8", "server: minpoll -8 out of range -7..24"),
        ("server a.example maxpoll 1.5", "server: invalid maxpoll '1.5'"),
        ("server a.example fast", "server: unknown option 'fast'"),
        ("server a.example key 1", "server: symmetric-key authentication (key) is not supported"),
        ("server a.example maxsources 2", "server: option maxsources is only valid for pool"),
        ("pool a.example maxsources 17", "pool: maxsources 17 out of range 1..16"),
        ("server a.example version 5", "server: version 5 out of range 1..4"),
        ("server a.example nts version 3", "server: nts needs NTP version 4"),
        ("server a..example", "server: invalid hostname 'a..example'"),
        ("server bad/name", "server: invalid hostname 'bad/name'"),
        ("server a.example maxdelay fast", "server: invalid maxdelay 'fast'"),
        ("server a.example port 1_23", "server: invalid port '1_23'"),
        ("server a.example port \u0663", "server: invalid port '\\u0663'"),
    ],
)
def test_source_errors(line: str, message: str) -> None:
    err = error_of("# first line\n" + line)
    assert (err.filename, err.lineno) == ("ntspy.conf", 2)
    assert err.reason.startswith(message)
    assert str(err).startswith(f"ntspy.conf:2: {message}")


# --------------------------------------------------------------------------
# errors point at the right line


def test_error_message_format_from_the_brief() -> None:
    text = "\n".join(["# c"] * 6 + ["server a.example port abc"])
    assert str(error_of(text)) == "ntspy.conf:7: server: invalid port 'abc'"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("sever a.example", "unknown directive 'sever' (did you mean 'server'?)"),
        ("frobnicate 1", "unknown directive 'frobnicate'"),
        ("peer a.example", "peer: symmetric peers are not supported"),
        ("refclock PPS /dev/pps0", "refclock: reference clocks are not supported"),
        ("ntsport", "ntsport: expected 1 argument, got 0"),
        ("ntsport 1 2", "ntsport: expected 1 argument, got 2"),
        ("ntsport -1", "ntsport: port -1 out of range 0..65535"),
        ("port x", "port: invalid port 'x'"),
        ("ntsrotate -1", "ntsrotate: interval -1 out of range"),
        ("ntsrefresh 0", "ntsrefresh: interval 0 out of range"),
        ("ntsprocesses many", "ntsprocesses: invalid number of processes 'many'"),
        ("maxntsconnections 0", "maxntsconnections: connections 0 out of range"),
        ("ntsaeads", "ntsaeads: expected 1 to 4 arguments, got 0"),
        ("ntsaeads 15 99", "ntsaeads: unsupported AEAD id 99 (known: 15, 16, 17, 30)"),
        ("ntsaeads 15 15", "ntsaeads: AEAD id 15 listed twice"),
        ("ntsntpserver bad_host!", "ntsntpserver: invalid hostname 'bad_host!'"),
        ("ntstrustedcerts x /a", "ntstrustedcerts: invalid set ID 'x'"),
        ("ntstrustedcerts 4294967296 /a", "ntstrustedcerts: set ID 4294967296 out of range"),
        ("nosystemcert yes", "nosystemcert: expected 0 arguments, got 1"),
        ("nocerttimecheck -1", "nocerttimecheck: limit -1 out of range"),
        ("makestep 1", "makestep: expected 2 arguments, got 1"),
        ("makestep -1 3", "makestep: threshold -1 out of range"),
        ("makestep inf 3", "makestep: invalid threshold 'inf'"),
        ("makestep 1e999 3", "makestep: threshold 1e999 out of range"),
        ("makestep 1 x", "makestep: invalid limit 'x'"),
        ("minsources 0", "minsources: number of sources 0 out of range"),
        ("authselectmode strict", "authselectmode: invalid mode 'strict'"),
        ("bindaddress eth0", "bindaddress: invalid address 'eth0'"),
        ("bindcmdaddress localhost", "bindcmdaddress: invalid address 'localhost'"),
        ("local stratum 0", "local: stratum 0 out of range 1..15"),
        ("local stratum 16", "local: stratum 16 out of range 1..15"),
        ("local stratum", "local: option stratum needs a value"),
        ("local orphan strong", "local: unknown option 'strong'"),
        ("ratelimit interval 13", "ratelimit: interval 13 out of range -19..12"),
        ("ratelimit burst 0", "ratelimit: burst 0 out of range 1..255"),
        ("ratelimit leak 5", "ratelimit: leak 5 out of range 1..4"),
        ("ratelimit burst", "ratelimit: option 'burst' needs a value"),
        ("ntsratelimit speed 3", "ntsratelimit: unknown option 'speed'"),
        ("driftfile", "driftfile: expected 1 to 3 arguments, got 0"),
        ("driftfile /a every 3", "driftfile: unknown option 'every'"),
        ("sourcedir", "sourcedir: expected 1 to 10 arguments, got 0"),
        ("allow 10/8 10/16", "allow: expected at most one subnet, got 2 words"),
        ("deny all all", "deny: 'all': hostnames are not supported here"),
        ("ntsdumpdir /var/\x00lib", "ntsdumpdir: invalid path '/var/\\x00lib'"),
        ("confdir /etc/\x00", "confdir: invalid path"),
        ("bindcmdaddress /run/\x00.sock", "bindcmdaddress: invalid path"),
    ],
)
def test_directive_errors(line: str, message: str) -> None:
    err = error_of("server a.example\n\n# comment\n" + line + "\nserver b.example")
    assert err.lineno == 4
    assert err.filename == "ntspy.conf"
    assert err.reason.startswith(message), err.reason


@pytest.mark.parametrize(
    ("text", "lineno", "message"),
    [
        (
            "ntsserverkey /a.key\nntsservercert /a.crt\nntsserverkey /b.key\nallow",
            3,
            "ntsserverkey: no matching ntsservercert",
        ),
        (
            "ntsservercert /a.crt\nntsservercert /b.crt\n\nntsserverkey /a.key",
            2,
            "ntsservercert: no matching ntsserverkey",
        ),
    ],
)
def test_key_certificate_count_mismatch_points_at_the_extra_line(
    text: str, lineno: int, message: str
) -> None:
    err = error_of(text)
    assert err.lineno == lineno
    assert err.reason.startswith(message)


# --------------------------------------------------------------------------
# access rules


@pytest.mark.parametrize(
    ("subnet", "network"),
    [
        ("1.2.3.4", "1.2.3.4/32"),
        ("192.168.1", "192.168.1.0/24"),
        ("192.168", "192.168.0.0/16"),
        ("10", "10.0.0.0/8"),
        ("10/8", "10.0.0.0/8"),
        ("3.4.5.0/24", "3.4.5.0/24"),
        ("1.2.3.4/24", "1.2.3.0/24"),  # host bits are dropped, as chrony does
        ("0/0", "0.0.0.0/0"),
        ("::1", "::1/128"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("::/0", "::/0"),
    ],
)
def test_subnet_syntax(subnet: str, network: str) -> None:
    [rule] = parse_config(f"allow {subnet}").access
    assert rule == AccessRule(True, ipaddress.ip_network(network))


@pytest.mark.parametrize(
    "subnet", ["1.2.3.4.5", "256.1", "1..2", "10/33", "::/129", "1.2.3.4/x", "::g", "-1", "1.2.3/"]
)
def test_bad_subnets(subnet: str) -> None:
    err = error_of(f"deny {subnet}")
    assert err.lineno == 1 and err.reason.startswith("deny: ")


def test_allow_forms() -> None:
    config = parse_config("allow\ndeny all\nallow all 10/8\ndeny 10.1")
    assert config.access == [
        AccessRule(True, None),
        AccessRule(False, None, all=True),
        AccessRule(True, ipaddress.ip_network("10.0.0.0/8"), all=True),
        AccessRule(False, ipaddress.ip_network("10.1.0.0/16")),
    ]


def test_access_evaluation_follows_chronys_example() -> None:
    # chrony.conf(5): the order of these three does not matter ...
    rules = parse_config("allow 1.2.3.4\ndeny 1.2.3.0/24\nallow 1.2.0.0/16").access
    for ordering in (rules, rules[::-1], [rules[1], rules[0], rules[2]]):
        assert is_allowed(ordering, "1.2.3.4")
        assert not is_allowed(ordering, "1.2.3.5")
        assert is_allowed(ordering, "1.2.200.1")
        assert not is_allowed(ordering, "1.3.0.1")
    # ... but `allow all` overrides the earlier rules inside its subnet
    rules = parse_config("allow 1.2.3.4\ndeny 1.2.3.0/24\nallow all 1.2.0.0/16").access
    assert is_allowed(rules, "1.2.3.5")


def test_bare_allow_covers_both_families_and_mapped_addresses() -> None:
    rules = parse_config("allow\ndeny 10/8").access
    assert is_allowed(rules, "2001:db8::1")
    assert is_allowed(rules, ipaddress.ip_address("192.0.2.1"))
    assert not is_allowed(rules, "10.0.0.1")
    assert not is_allowed(rules, "::ffff:10.0.0.1")  # v4-mapped is the v4 client


def test_ratelimit_defaults() -> None:
    config = parse_config("ratelimit\nntsratelimit")
    assert config.ratelimit == RateLimit(interval=3, burst=8, leak=2)
    assert config.ntsratelimit == RateLimit(interval=6, burst=8, leak=2)
    config = parse_config("ratelimit leak 4 interval -19 burst 255")
    assert config.ratelimit == RateLimit(interval=-19, burst=255, leak=4)


def test_ntskeystore_directives() -> None:
    config = parse_config("ntskeystore redis://10.0.0.5:6379/2 passwordfile /etc/ntspy/pw "
                          "poll 0.5\nntskeystorekey /etc/ntspy/kek\n")
    assert config.ntskeystore == "redis://10.0.0.5:6379/2"
    assert config.ntskeystore_options == {"passwordfile": "/etc/ntspy/pw", "poll": "0.5"}
    assert config.ntskeystorekey == Path("/etc/ntspy/kek")
    for bad, why in (("ntskeystore memcached://x", "invalid key store URL"),
                     ("ntskeystore redis://x passwordfile", "needs a value"),
                     ("ntskeystore redis://x color blue", "unknown option")):
        with pytest.raises(ConfigError, match=why):
            parse_config(bad)


def test_local_alone_means_stratum_10() -> None:
    config = parse_config("local")
    assert (config.local_stratum, config.local_orphan, config.local_distance) == (10, False, 1.0)


def test_ignored_and_newer_chrony_options_are_reported_with_lines() -> None:
    config = parse_config(
        "rtcsync\nlogdir /var/log/chrony\nlog tracking\nlocal activate 0.5\n"
        "driftfile /d interval 3600\ncmdallow 10.0.0.0/8\ncmdport 0\n"
    )
    assert config.ignored == [
        ("<config>", 4, "local activate"),
        ("<config>", 5, "driftfile interval"),
        ("<config>", 6, "cmdallow"),
    ]
    assert config.local_stratum == 10 and config.driftfile == Path("/d")
    assert config.cmdport == 0  # acted on: the UDP command port


def test_ignored_lines_of_an_included_file_name_that_file(tmp_path: Path) -> None:
    extra = tmp_path / "extra.conf"
    extra.write_text("# comment\nhwclockfile /etc/adjtime\n")
    main = tmp_path / "main.conf"
    main.write_text(f"keyfile /etc/chrony.keys\ninclude {extra}\n")
    config = load_config(main)
    assert config.ignored == [(str(main), 1, "keyfile"), (str(extra), 2, "hwclockfile")]


def test_config_object_defaults_construct() -> None:
    assert Config().filename == "<config>"


# --------------------------------------------------------------------------
# files: include, confdir, sourcedir, load_config


def test_include_glob_relative_to_including_file(tmp_path: Path) -> None:
    (tmp_path / "conf.d").mkdir()
    (tmp_path / "conf.d" / "b.conf").write_text("server b.example\n")
    (tmp_path / "conf.d" / "a.conf").write_text("server a.example\nntsrotate 5\n")
    (tmp_path / "conf.d" / "c.txt").write_text("garbage\n")
    main = tmp_path / "ntspy.conf"
    main.write_text("server first.example\ninclude conf.d/*.conf\nserver last.example\n")
    config = load_config(main)
    assert [s.name for s in config.sources] == [
        "first.example", "a.example", "b.example", "last.example",
    ]  # fmt: skip
    assert config.sources[1].filename == str(tmp_path / "conf.d" / "a.conf")
    assert config.ntsrotate == 5


def test_errors_in_included_files_name_that_file(tmp_path: Path) -> None:
    (tmp_path / "extra.conf").write_text("# extra\n\nntsport 99999\n")
    main = tmp_path / "main.conf"
    main.write_text(f"include {tmp_path}/extra.conf\n")
    with pytest.raises(ConfigError) as info:
        load_config(main)
    assert (info.value.filename, info.value.lineno) == (str(tmp_path / "extra.conf"), 3)


def test_include_requires_a_match_and_stops_loops(tmp_path: Path) -> None:
    main = tmp_path / "main.conf"
    main.write_text("\ninclude nothing-*.conf\n")
    with pytest.raises(ConfigError, match=r"main\.conf:2: include: no file matches"):
        load_config(main)
    main.write_text("include main.conf\n")
    with pytest.raises(ConfigError, match="nested deeper than 10"):
        load_config(main)


def test_confdir_first_directory_wins_and_missing_is_fine(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "10-x.conf").write_text("server x-from-first.example\n")
    (second / "10-x.conf").write_text("server x-from-second.example\n")
    (second / "05-y.conf").write_text("server y.example\n")
    (second / "20-z.sources").write_text("server not-read.example\n")
    config = parse_config(f"confdir {first} {tmp_path}/missing {second}\n", "<test>")
    assert [s.name for s in config.sources] == ["y.example", "x-from-first.example"]


def test_load_config_failures(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration"):
        load_config(tmp_path / "missing.conf")
    with pytest.raises(ConfigError, match="cannot read configuration: Is a directory"):
        load_config(tmp_path)
    bad = tmp_path / "latin1.conf"
    bad.write_bytes(b"# caf\xe9\nserver a.example\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)


def test_fifo_config_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.conf"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(fifo)


def test_load_sources_dir(tmp_path: Path) -> None:
    (tmp_path / "b.sources").write_text("server b.example nts\n")
    # the last line has no newline yet: a writer may be midway, chrony skips it
    (tmp_path / "a.sources").write_text("# dhcp\npool a.example iburst\nserver half.exa")
    (tmp_path / "c.conf").write_text("server ignored.example\n")
    sources = load_sources_dir(tmp_path)
    assert [(s.name, s.pool, s.lineno) for s in sources] == [
        ("a.example", True, 2), ("b.example", False, 1),
    ]  # fmt: skip
    assert sources[0].filename == str(tmp_path / "a.sources")
    assert load_sources_dir(tmp_path / "missing") == []


def test_sources_files_only_hold_sources(tmp_path: Path) -> None:
    (tmp_path / "x.sources").write_text("server a.example\nallow 10/8\n")
    with pytest.raises(ConfigError) as info:
        load_sources_dir(tmp_path)
    assert info.value.lineno == 2
    assert "only server and pool lines" in info.value.reason


def test_rtcsync_with_rtcfile_is_refused_as_chronyd_does() -> None:
    with pytest.raises(ConfigError, match=r"<config>:2: rtcfile: cannot be used together"):
        parse_config("rtcsync\nrtcfile /var/lib/chrony/rtc\n")
