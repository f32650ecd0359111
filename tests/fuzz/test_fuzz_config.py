"""Untrusted input never escapes as anything but our own errors.

parse_config must turn any text into a Config or a ConfigError, and
decode_state any bytes into a payload or a StateFileError: a stray
ValueError or IndexError would crash the daemon instead of being reported.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntspy.config import IGNORED_DIRECTIVES, UNSUPPORTED_DIRECTIVES, Config, parse_config
from ntspy.errors import ConfigError, StateFileError
from ntspy.state import decode_state, encode_state

FUZZ = settings(max_examples=300, deadline=None)

DIRECTIVES = sorted(
    {
        "server", "pool", "port", "ntsport", "bindaddress", "allow", "deny", "local",
        "ntsserverkey", "ntsservercert", "ntsdumpdir", "ntscachedir", "ntsrotate",
        "ntsntpserver", "ntsprocesses", "maxntsconnections", "ntsratelimit", "ratelimit",
        "ntsaeads", "ntstrustedcerts", "nosystemcert", "nocerttimecheck", "ntsrefresh",
        "sourcedir", "driftfile", "makestep", "minsources", "authselectmode",
        "bindcmdaddress", "include", "confdir",
        *IGNORED_DIRECTIVES, *UNSUPPORTED_DIRECTIVES,
    }
)  # fmt: skip

# Words that make the parser go down its deeper paths: options, keywords,
# edge numbers, subnets and addresses in all the shapes chrony accepts.
WORDS = [
    "iburst", "burst", "nts", "prefer", "noselect", "trust", "require", "offline", "xleave",
    "key", "minpoll", "maxpoll", "port", "ntsport", "certset", "maxsources", "version",
    "maxsamples", "minsamples", "maxdelay", "polltarget", "interval", "leak", "stratum",
    "orphan", "distance", "activate", "all", "require", "prefer", "mix", "ignore",
    "0", "1", "-1", "-7", "4", "15", "16", "17", "30", "123", "4460", "65535", "65536",
    "2147483647", "4294967296", "99999999999999999999999", "1.5", "1e999", "nan", "-0",
    "10/8", "192.168.1", "1.2.3.4/24", "0/0", "::1", "::/0", "2001:db8::/32", "::/129",
    "1.2.3.4.5", "fe80::1%eth0", "::ffff:1.2.3.4", "a.example", "a..b", "/abs/path",
    "rel/path", "*", "[", "#", "!x", "",
]  # fmt: skip

words = st.one_of(st.sampled_from(WORDS), st.text(max_size=12))
lines = st.one_of(
    st.builds(
        lambda d, case, args: " ".join([d.upper() if case else d, *args]),
        st.sampled_from(DIRECTIVES),
        st.booleans(),
        st.lists(words, max_size=8),
    ),
    st.text(max_size=40),
)


@pytest.fixture(scope="module", autouse=True)
def empty_working_directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    # Random `include`/`confdir` lines resolve relative paths from here: keep
    # them away from the real working directory's files.
    old = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("fuzz-cwd"))
    try:
        yield
    finally:
        os.chdir(old)


def parse_or_config_error(text: str) -> None:
    try:
        config = parse_config(text)
    except ConfigError as err:
        assert err.lineno >= 0 and err.reason
        return
    assert isinstance(config, Config)


@FUZZ
@given(st.text(max_size=300))
def test_any_text_parses_or_raises_config_error(text: str) -> None:
    parse_or_config_error(text)


@FUZZ
@given(st.lists(lines, max_size=12), st.sampled_from(["\n", "\r\n"]))
def test_directive_shaped_lines_parse_or_raise_config_error(body: list[str], newline: str) -> None:
    parse_or_config_error(newline.join(body))


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes_decode_or_raise_state_file_error(data: bytes) -> None:
    try:
        decode_state(data, "client-cookies", 1)
    except StateFileError:
        return
    raise AssertionError("random bytes decoded as a valid state file")


VALID = encode_state("client-cookies", 1, {"cookies": ["AAAA", "BBBB"], "aead": 15})


@FUZZ
@given(
    st.integers(0, len(VALID) - 1),
    st.integers(0, len(VALID)),
    st.binary(max_size=20),
)
def test_edited_state_files_are_detected(start: int, length: int, insert: bytes) -> None:
    edited = VALID[:start] + insert + VALID[start + length :]
    if edited == VALID:
        return
    try:
        decode_state(edited, "client-cookies", 1)
    except StateFileError:
        return
    raise AssertionError(f"edit at {start} went unnoticed: {edited!r}")


def test_fuzz_working_directory_is_empty() -> None:
    # The fixture above really isolates include/confdir from the repository.
    assert list(Path.cwd().iterdir()) == []
