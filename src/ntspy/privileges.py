"""Dropping root after start-up (chrony's ``user`` directive and ``-u``).

A daemon binds its sockets and reads its keys, certificates and state as root,
then becomes ``user`` keeping only the capabilities it still needs:
CAP_SYS_TIME for a client that steers the clock, none otherwise.  Python,
and whatever C it calls, then parse network input without root.

Linux only: ``prctl(PR_SET_KEEPCAPS)`` carries the permitted set across
``setuid``, then ``capset`` keeps the wanted capability and nothing else.
"""

from __future__ import annotations

import ctypes
import os
import pwd
from collections.abc import Iterable
from pathlib import Path

CAP_SYS_TIME = 25
_PR_SET_KEEPCAPS = 8
_PR_SET_NO_NEW_PRIVS = 38
_CAP_VERSION_3 = 0x20080522


class PrivilegeError(OSError):
    """The switch to the unprivileged user could not be made."""


def startup_failure(exc: BaseException, doing: str) -> str:
    """The one line ``ntspy run`` and ``ntspy serve`` print when they cannot start
    (``doing``: "start", "start the server"): never a traceback."""
    if isinstance(exc, PrivilegeError):
        return f"ntspy: cannot drop privileges: {exc.strerror or exc}"
    if isinstance(exc, OSError):
        return f"ntspy: cannot {doing}: {exc}"
    return f"ntspy: {exc}"


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise PrivilegeError(err, f"{what}: {os.strerror(err)}")


def lookup(user: str) -> pwd.struct_passwd:
    """The account named ``user`` (or a numeric uid); PrivilegeError if there is none."""
    try:
        return pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise PrivilegeError(0, f"no such user: {user}") from None


def hand_over(paths: Iterable[Path], account: pwd.struct_passwd) -> list[Path]:
    """Give the daemon's own state directories and their files to ``account``, so
    that dumps, keys and the drift file can still be written after the switch.
    Only directories that exist are touched; returns what was changed."""
    changed = []
    for directory in paths:
        if not directory.is_dir():
            continue
        for path in (directory, *directory.iterdir()):
            if path.is_symlink():
                continue  # never follow a link out of our own directory
            st = path.stat()
            if (st.st_uid, st.st_gid) != (account.pw_uid, account.pw_gid):
                os.chown(path, account.pw_uid, account.pw_gid)
                changed.append(path)
    return changed


def drop_to(account: pwd.struct_passwd, keep_sys_time: bool) -> None:
    """Become ``account``, keeping CAP_SYS_TIME only if ``keep_sys_time``.

    Raises :class:`PrivilegeError` (the daemon must then not go on as root).
    """
    if os.geteuid() != 0:
        if os.geteuid() == account.pw_uid:
            return  # already that user
        raise PrivilegeError(1, f"only root can switch to user {account.pw_name}")
    libc = _libc()
    _check(libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(account.pw_gid)
    os.setuid(account.pw_uid)
    _check(libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    wanted = (1 << CAP_SYS_TIME) if keep_sys_time else 0
    header = _CapHeader(_CAP_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = wanted
    _check(libc.capset(ctypes.byref(header), data), "capset")
    # No exec'd program can gain anything back (setuid binaries, file caps).
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
