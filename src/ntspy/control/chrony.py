"""chrony's command requests answered from the daemon's own views.

The daemons expose their state and commands as handlers by name (the same ones
``ntspy ctl`` shows, as JSON); :class:`ChronyAdapter` turns each chrony request
(:mod:`ntspy.control.candm`) into a call of one of them and its result into
chrony's reply, so ``chronyc`` and ``ntspy ctl --json`` show the same values.
Signs: the views already use chronyc's (positive offset = local clock ahead),
except where ``tracking`` keeps ntspy's internal ones, converted here.
"""

from __future__ import annotations

import ipaddress
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import NtsError
from ..proto.ntp import reference_id_for
from . import candm

log = logging.getLogger("ntspy.control")

Handler = Callable[[list[str]], Awaitable[Any]]

# What every local user may read (the JSON extension's monitoring views).
READ_ONLY_VIEWS = frozenset({
    "sources", "sourcestats", "tracking", "authdata", "ntpdata", "selectdata", "activity",
    "serverstats", "serverkeys", "clients",
})
NEVER = 0xFFFFFFFF  # chrony's "no such time" in the u32 "seconds ago" fields

_STATE = {
    "*": candm.SourceState.SELECTED, "+": candm.SourceState.UNSELECTED,
    "-": candm.SourceState.SELECTABLE, "x": candm.SourceState.FALSETICKER,
    "~": candm.SourceState.JITTERY, "?": candm.SourceState.NONSELECTABLE,
}
_SIMPLE: dict[int, tuple[str, list[str]]] = {  # request -> handler and its arguments
    candm.Command.DUMP: ("dump", []),
    candm.Command.REKEY: ("rekey", []),
    candm.Command.CYCLELOGS: ("cyclelogs", []),
    candm.Command.REFRESH: ("refresh", []),
    candm.Command.SHUTDOWN: ("shutdown", []),
    candm.Command.RELOAD_SOURCES: ("reload", ["sources"]),
    candm.Command.MAKESTEP: ("makestep", []),
    candm.Command.ONOFFLINE: ("online", []),
}


def _u32(seconds: float | None) -> int:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return NEVER
    return min(int(seconds), NEVER - 1)


def _address(text: str | None, index: int) -> candm.Address:
    """A source's address for chrony: its IP, or (not resolved yet) an id, as chronyd."""
    if text:
        try:
            return ipaddress.ip_address(text)
        except ValueError:
            pass
    return candm.SourceId(index + 1)


def _refid(address: str | None) -> int:
    if not address:
        return 0
    return int.from_bytes(reference_id_for(address), "big")


def _options(row: dict[str, Any]) -> int:
    opts = row.get("options", {})
    bits = 0
    for name, flag in (("noselect", candm.SelectOption.NOSELECT),
                       ("prefer", candm.SelectOption.PREFER),
                       ("trust", candm.SelectOption.TRUST),
                       ("require", candm.SelectOption.REQUIRE)):
        if opts.get(name):
            bits |= flag
    return bits


def _letters(text: str) -> int:
    """selectdata's ``N P T R`` option text back to chrony's bits."""
    bits = 0
    for letter, flag in (("N", candm.SelectOption.NOSELECT), ("P", candm.SelectOption.PREFER),
                         ("T", candm.SelectOption.TRUST), ("R", candm.SelectOption.REQUIRE)):
        if letter in text:
            bits |= flag
    return bits


def _spec(mask: candm.Address, address: candm.Address) -> str | None:
    """chrony's (mask, address) pair as the ADDRESS argument of our commands."""
    if address is None or isinstance(address, candm.SourceId):
        return None
    if mask is None or isinstance(mask, candm.SourceId):
        return str(address)
    return f"{mask}/{address}"


def add_source_words(body: candm.AddSource) -> list[str]:
    """An ADD_SOURCE request as the words of ``add server|pool HOST [options]``; the
    filtering options chronyc always sends (maxdelay...) are chrony's defaults
    and mean nothing here, so they are left out."""
    flags = body.flags
    words = ["pool" if body.pool else "server", body.name, "port", str(body.port),
             "minpoll", str(body.minpoll), "maxpoll", str(body.maxpoll)]
    for flag, word in ((candm.AddSourceFlag.IBURST, "iburst"),
                       (candm.AddSourceFlag.BURST, "burst"),
                       (candm.AddSourceFlag.PREFER, "prefer"),
                       (candm.AddSourceFlag.NOSELECT, "noselect"),
                       (candm.AddSourceFlag.TRUST, "trust"),
                       (candm.AddSourceFlag.REQUIRE, "require"),
                       (candm.AddSourceFlag.NTS, "nts")):
        if flags & flag:
            words.append(word)
    if flags & candm.AddSourceFlag.NTS:
        words += ["ntsport", str(body.nts_port)]
        if body.cert_set:
            words += ["certset", str(body.cert_set)]
    if body.pool:
        words += ["maxsources", str(body.max_sources)]
    if body.min_samples >= 0:
        words += ["minsamples", str(body.min_samples)]
    if body.max_samples >= 0:
        words += ["maxsamples", str(body.max_samples)]
    if body.version:
        words += ["version", str(body.version)]
    return words


class ChronyAdapter:
    """Answers one parsed chrony request from the daemon's handlers."""

    def __init__(self, handlers: dict[str, Handler],
                 commands: Callable[[], tuple[int, int]] = lambda: (0, 0)) -> None:
        """``commands()``: command requests received and dropped so far (serverstats)."""
        self.handlers = handlers
        self.commands = commands

    async def _call(self, name: str, args: list[str] | None = None) -> Any:
        handler = self.handlers.get(name)
        if handler is None:
            raise _Status(candm.Status.NOTENABLED)
        return await handler(args or [])

    async def answer(self, request: candm.Request) -> tuple[int, candm.ReplyBody | None]:
        try:
            return candm.Status.SUCCESS, await self._answer(request)
        except _Status as exc:
            return exc.status, None
        except NtsError as exc:
            text = str(exc)
            if text.startswith("no such source"):
                return candm.Status.NOSUCHSOURCE, None
            if "already present" in text:
                return candm.Status.SOURCEALREADYKNOWN, None
            log.info("command %s failed: %s", _name(request.command), text)
            return candm.Status.FAILED, None

    async def _answer(self, request: candm.Request) -> candm.ReplyBody | None:
        command, body = request.command, request.body
        if command == candm.Command.NULL:
            return None
        if command == candm.Command.N_SOURCES:
            return candm.NSources(len(await self._call("sources")))
        if command == candm.Command.SOURCE_DATA:
            return self._source_data(await self._call("sources"), _index(body))
        if command == candm.Command.SOURCESTATS:
            return self._sourcestats(await self._call("sourcestats"), _index(body))
        if command == candm.Command.SELECT_DATA:
            return self._selectdata(await self._call("selectdata"), _index(body))
        if command == candm.Command.TRACKING:
            return self._tracking(await self._call("tracking"))
        if command == candm.Command.ACTIVITY:
            a = await self._call("activity")
            return candm.Activity(a["online"], a["offline"], a["burst_online"],
                                  a["burst_offline"], a["unresolved"])
        if command == candm.Command.SERVER_STATS:
            return await self._serverstats()
        if command in (candm.Command.NTP_DATA, candm.Command.AUTH_DATA,
                       candm.Command.NTP_SOURCE_NAME):
            return await self._by_address(command, body)
        if command == candm.Command.CLIENT_ACCESSES_BY_INDEX3:
            assert isinstance(body, candm.ClientAccessesQuery)
            return self._clients(await self._call("clients"), body)
        await self._change(command, body)
        return None

    async def _change(self, command: int, body: Any) -> None:
        if command in _SIMPLE:
            name, args = _SIMPLE[command]
            await self._call(name, list(args))
        elif command in (candm.Command.ONLINE, candm.Command.OFFLINE):
            spec = _spec(body.mask, body.address)
            await self._call("online" if command == candm.Command.ONLINE else "offline",
                             [spec] if spec else [])
        elif command == candm.Command.BURST:
            spec = _spec(body.mask, body.address)
            await self._call("burst", [f"{body.n_good_samples}/{body.n_total_samples}",
                                       *([spec] if spec else [])])
        elif command == candm.Command.DEL_SOURCE:
            if body.address is None or isinstance(body.address, candm.SourceId):
                raise _Status(candm.Status.NOSUCHSOURCE)
            await self._call("delete", [str(body.address)])
        elif command == candm.Command.MODIFY_MAKESTEP:
            await self._call("makestep", [repr(body.threshold), str(body.limit)])
        elif command == candm.Command.ADD_SOURCE:
            status = body.check()
            if status != candm.Status.SUCCESS:
                raise _Status(status)
            if body.source_type == candm.SourceType.PEER:
                raise _Status(candm.Status.INVALID)
            await self._call("add", add_source_words(body))
            if not body.flags & candm.AddSourceFlag.ONLINE:
                await self._call("offline", [body.name])
        else:
            raise _Status(candm.Status.INVALID if command not in candm.Command._value2member_map_
                          else candm.Status.FAILED)

    # -- the reports -----------------------------------------------------------------

    @staticmethod
    def _row(rows: list[dict[str, Any]], index: int) -> dict[str, Any]:
        if not 0 <= index < len(rows):
            raise _Status(candm.Status.NOSUCHSOURCE)
        return rows[index]

    def _source_data(self, rows: list[dict[str, Any]], index: int) -> candm.SourceData:
        r = self._row(rows, index)
        return candm.SourceData(
            address=_address(r.get("address"), index),
            poll=int(r["poll"]), stratum=int(r["stratum"]),
            state=_STATE.get(str(r["state"]), candm.SourceState.NONSELECTABLE),
            mode=candm.SourceMode.CLIENT, flags=_options(r), reachability=int(r["reach"]),
            since_sample=_u32(r.get("last_rx")),
            orig_latest_meas=float(r["measured_offset"]), latest_meas=float(r["adjusted_offset"]),
            latest_meas_err=float(r["error"]),
        )

    def _sourcestats(self, rows: list[dict[str, Any]], index: int) -> candm.SourceStats:
        r = self._row(rows, index)
        skew = r.get("skew_ppm")
        return candm.SourceStats(
            ref_id=_refid(r.get("address")), address=_address(r.get("address"), index),
            n_samples=int(r["np"]), n_runs=int(r["nr"]), span_seconds=_u32(r["span"]),
            sd=float(r["std_dev"]), resid_freq_ppm=float(r["frequency_ppm"]),
            skew_ppm=float(skew) if skew is not None else 0.0, est_offset=float(r["offset"]),
            est_offset_err=float(r["std_dev"]),
        )

    def _selectdata(self, rows: list[dict[str, Any]], index: int) -> candm.SelectData:
        r = self._row(rows, index)
        return candm.SelectData(
            ref_id=_refid(r.get("address")), address=_address(r.get("address"), index),
            state_char=str(r["state"]), authentication=bool(r["authenticated"]),
            leap=int(r["leap"]), conf_options=_letters(str(r["conf_options"])),
            eff_options=_letters(str(r["eff_options"])), last_sample_ago=_u32(r.get("last")),
            score=float(r["score"]) if r.get("score") is not None else 0.0,
            lo_limit=float(r["low"]), hi_limit=float(r["high"]),
        )

    @staticmethod
    def _tracking(t: dict[str, Any]) -> candm.Tracking:
        synced = bool(t.get("synchronised"))
        reference = t.get("reference") if synced else None
        address: candm.Address = None
        if reference:
            try:
                address = ipaddress.ip_address(str(reference))
            except ValueError:
                address = None
        ref_ns = t.get("ref_time_ns")
        return candm.Tracking(
            ref_id=_refid(str(reference)) if reference else 0,
            address=address,
            stratum=int(t["stratum"]) if synced else 0,
            leap_status=int(t["leap"]) if synced else 3,
            ref_time=ref_ns / 1e9 if ref_ns else 0.0,
            # chronyc: positive = the system clock is behind (slow); ours the same.
            current_correction=float(t["system_time_offset"]),
            # ntspy keeps RFC 5905 signs inside; chronyc's are the other way round.
            last_offset=-float(t["last_offset"]),
            rms_offset=float(t["rms_offset"]),
            freq_ppm=-float(t["frequency_ppm"]),
            resid_freq_ppm=-float(t["residual_freq_ppm"]),
            skew_ppm=float(t["skew_ppm"]),
            root_delay=float(t["root_delay"]),
            root_dispersion=float(t["root_dispersion"]),
            last_update_interval=float(t["update_interval"]),
        )

    async def _serverstats(self) -> candm.ServerStats:
        cmd_hits, cmd_drops = self.commands()
        if "serverstats" not in self.handlers:  # a client-only daemon serves no NTP
            return candm.ServerStats(cmd_hits=cmd_hits, cmd_drops=cmd_drops)
        s = await self._call("serverstats")
        return candm.ServerStats(
            cmd_hits=cmd_hits, cmd_drops=cmd_drops,
            ntp_hits=s.get("ntp_received", 0),
            nke_hits=s.get("ke_accepted", 0),
            ntp_drops=s.get("ntp_dropped", 0) + s.get("ntp_denied", 0),
            nke_drops=s.get("ke_dropped", 0) + s.get("ke_denied", 0),
            ntp_auth_hits=s.get("nts_authenticated", 0),
        )

    async def _by_address(self, command: int, body: Any) -> candm.ReplyBody:
        wanted = body.address
        views: dict[int, str] = {candm.Command.NTP_DATA: "ntpdata",
                                 candm.Command.AUTH_DATA: "authdata"}
        view = views.get(command, "sources")
        rows = await self._call(view)
        if command == candm.Command.NTP_DATA:
            for r in rows:
                if _address(r.get("remote_address"), -1) == wanted:
                    return _ntpdata(r)
            raise _Status(candm.Status.NOSUCHSOURCE)
        # AUTH_DATA and NTP_SOURCE_NAME rows come in source order, as SOURCE_DATA's.
        for i, r in enumerate(rows):
            if _address(r.get("address"), i) == wanted:
                if command == candm.Command.NTP_SOURCE_NAME:
                    return candm.NtpSourceName(str(r["configured"]))
                return _authdata(r)
        raise _Status(candm.Status.NOSUCHSOURCE)

    @staticmethod
    def _clients(rows: list[dict[str, Any]], query: candm.ClientAccessesQuery
                 ) -> candm.ClientAccesses:
        rows = [r for r in rows if int(r.get("ntp_hits", 0)) + int(r.get("nke_hits", 0))
                >= query.min_hits]
        first = min(query.first_index, len(rows))
        page = rows[first:first + min(query.n_clients, candm.MAX_CLIENT_ACCESSES)]
        clients = tuple(
            candm.ClientAccess(
                address=ipaddress.ip_address(str(r["address"])),
                ntp_hits=int(r.get("ntp_hits", 0)), nke_hits=int(r.get("nke_hits", 0)),
                ntp_drops=int(r.get("ntp_drops", 0)), nke_drops=int(r.get("nke_drops", 0)),
                last_ntp_hit_ago=_u32(r.get("last_ntp_ago")),
                last_nke_hit_ago=_u32(r.get("last_nke_ago")),
            ) for r in page)
        return candm.ClientAccesses(len(rows), first + len(page), clients)


def _ntpdata(r: dict[str, Any]) -> candm.NtpData:
    bad = sum(r.get("bad_samples", {}).values())
    rejected = sum(r.get("rejected", {}).values())
    return candm.NtpData(
        remote_address=_address(r.get("remote_address"), -1),
        remote_port=int(r["remote_port"]), leap=int(r["leap"]), version=int(r["version"]),
        mode=int(r["mode"]), stratum=int(r["stratum"]), poll=int(r["poll"]),
        precision=int(r["precision"]), root_delay=float(r["root_delay"]),
        root_dispersion=float(r["root_dispersion"]),
        ref_id=int(r.get("reference_id_raw", 0)),
        ref_time=r["reference_time_ns"] / 1e9 if r.get("reference_time_ns") else 0.0,
        offset=float(r["offset"]), peer_delay=float(r["peer_delay"]),
        tests=candm.NTP_FLAGS_TESTS, authenticated=bool(r["authenticated"]),
        rx_tss_char="K" if r.get("kernel_rx") else "D",
        total_tx_count=int(r["requests"]), total_rx_count=int(r["accepted"]) + rejected,
        total_valid_count=int(r["accepted"]), total_good_count=int(r["accepted"]) - bad,
    )


def _authdata(r: dict[str, Any]) -> candm.AuthData:
    nts = r.get("mode") == "NTS"
    return candm.AuthData(
        mode=candm.AuthMode.NTS if nts else candm.AuthMode.NONE,
        key_type=int(r["type"]), key_id=int(r["key_id"]), key_length=int(r["key_bits"]),
        ke_attempts=int(r["attempts"]), last_ke_ago=_u32(r.get("last")),
        cookies=int(r["cookies"]), cookie_length=int(r["cookie_length"]),
        nak=int(r["naks"]) > 0,
    )


def _index(body: Any) -> int:
    return int(body.index) if isinstance(body, candm.SourceIndex) else -1


def _name(command: int) -> str:
    try:
        return candm.Command(command).name
    except ValueError:
        return str(command)


class _Status(Exception):
    """Answer with this status and no body."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status
