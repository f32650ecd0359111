"""The server's credentials: certificate/key pairs, chosen per connection by SNI.

Each pair is loaded and checked once (readable PEM, an unencrypted key that
signs and belongs to the certificate, unexpired at the time given);
:class:`ServerContexts` picks a pair by the client's SNI (:mod:`.names`),
reloads all pairs or none (SIGHUP), and hands the same pairs to the compiled
NTS-KE engine (``ntspy._ke``) when it is built.  The pyOpenSSL server
Contexts require ALPN ``ntske/1`` (a no_application_protocol alert otherwise)
and are tuned to make a handshake cheaper: no tickets, AES-128-GCM and X25519
first.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from OpenSSL import SSL
from OpenSSL._util import lib as _ssl_lib

from ntspy._optional import require_compiled
from ntspy.errors import CertificateError

from .certfiles import pem_certificates, read_file, when
from .names import certificate_matches
from .ntske import NTSKE_ALPN, ServerTlsFailure, new_tls13_context

try:  # the optional compiled NTS-KE server loop (src/ntspy/_ke.c), same settings
    require_compiled()
    from ..._ke import TlsContext as NativeTlsContext

    HAVE_NATIVE_KE = True
except ImportError:
    HAVE_NATIVE_KE = False

log = logging.getLogger("ntspy.tls")

_ServerKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | dsa.DSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    if NTSKE_ALPN in offered:
        return NTSKE_ALPN
    # Raising makes pyOpenSSL answer SSL_TLSEXT_ERR_ALERT_FATAL, so OpenSSL sends
    # a no_application_protocol alert (RFC 7301 s3.2); do_handshake then raises
    # this very exception.  NO_OVERLAPPING_PROTOCOLS would carry on without ALPN.
    names = ", ".join(p.decode("ascii", "replace") for p in offered) or "nothing"
    wire = b"".join(bytes([len(p)]) + p for p in offered if len(p) < 256)
    raise ServerTlsFailure(f"client offered ALPN {names}, not {NTSKE_ALPN.decode()}",
                           "alpn", wire)


# Key exchange groups the server prefers, cheapest first (docs/performance.md):
# X25519 costs the server ~0.04 ms less per handshake than the X25519MLKEM768
# hybrid OpenSSL >= 3.5 would pick by default, and its ServerHello is 1 KiB
# shorter.  The hybrid stays available to clients that offer nothing else.
# NTS-KE keys only authenticate time packets for a few days, so recording a
# session today to break it with a quantum computer later gains nothing.
# OpenSSL >= 3.5 syntax: "/" separates tuples in the server's order of
# preference; within a tuple a group the client sent a key share for wins (no
# HelloRetryRequest), then the client's order, so the hybrid goes in a tuple of
# its own.  Older builds refuse the string and get the first tuple.
SERVER_GROUPS: Final = "X25519:secp256r1:secp384r1/X25519MLKEM768"
SERVER_SUITES: Final = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"


def _tune_server_context(ctx: SSL.Context) -> None:
    """Settings that make a server handshake cheaper without weakening it."""
    # No TLS 1.3 session tickets: NTS-KE clients do not resume (each KE wants
    # fresh keys and cookies), so the two NewSessionTickets OpenSSL would send
    # cost CPU, a network write and ~350 bytes for nothing.  OP_NO_TICKET alone
    # would switch to stateful tickets; without a session cache none are sent.
    ctx.set_options(SSL.OP_NO_TICKET)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    raw = ctx._context  # the only way to reach the two settings below
    # Our order of TLS 1.3 suites, not the client's: AES-128-GCM with SHA-256
    # first (OpenSSL's default puts AES-256/SHA-384 first), ~0.01 ms less per
    # handshake.  The TLS keys only protect one NTS-KE exchange, which gains
    # nothing from 256-bit AES; all three RFC 8446 suites stay allowed.
    ctx.set_options(SSL.OP_CIPHER_SERVER_PREFERENCE)
    _ssl_lib.SSL_CTX_set_ciphersuites(raw, SERVER_SUITES.encode("ascii"))
    # pyOpenSSL has no set_groups(); SSL_CTX_set1_curves_list is the same call.
    # Older OpenSSL builds may lack a group: then keep the ones they know.
    for groups in (SERVER_GROUPS, SERVER_GROUPS.partition("/")[0]):
        if _ssl_lib.SSL_CTX_set1_curves_list(raw, groups.encode("ascii")) == 1:
            return


@dataclass(slots=True)
class _ServerPair:
    cert_chain: Path
    key: Path
    chain: list[x509.Certificate]  # leaf first
    private_key: _ServerKey
    _context: SSL.Context | None = None

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def context(self) -> SSL.Context:
        """The pyOpenSSL server Context for this pair, made on first use: a
        server whose NTS-KE runs on the compiled engine never needs one (and
        saves the memory OpenSSL takes to set it up)."""
        if self._context is None:
            self._context = _pair_context(self)
        return self._context


def _public_key_der(key: x509.Certificate | _ServerKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pair_context(pair: _ServerPair) -> SSL.Context:
    ctx = new_tls13_context()
    ctx.set_verify(SSL.VERIFY_NONE)  # NTS-KE does not use client certificates
    ctx.set_alpn_select_callback(_select_alpn)
    _tune_server_context(ctx)
    try:
        ctx.use_certificate(pair.leaf)
        for extra in pair.chain[1:]:
            ctx.add_extra_chain_cert(extra)
        ctx.use_privatekey(pair.private_key)
        ctx.check_privatekey()
    except SSL.Error:
        raise CertificateError(
            f"server key {pair.key} does not match certificate {pair.cert_chain}"
        ) from None
    return ctx


def _load_server_pair(cert_chain: Path, key_path: Path, now: datetime | None) -> _ServerPair:
    chain = pem_certificates(
        read_file(cert_chain, "server certificate file"),
        cert_chain,
        "server certificate file",
    )
    leaf = chain[0]
    key_data = read_file(key_path, "server key file")
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise CertificateError(
            f"server key file {key_path} is encrypted; ntspy needs an unencrypted key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateError(
            f"server key file {key_path} holds no readable PEM private key"
        ) from None
    if not isinstance(key, _ServerKey):
        raise CertificateError(f"server key file {key_path} holds a key that cannot sign")
    if now is not None and leaf.not_valid_after_utc < now:
        raise CertificateError(
            f"server certificate {cert_chain} expired on {when(leaf.not_valid_after_utc)}"
        )
    if _public_key_der(leaf) != _public_key_der(key):
        raise CertificateError(f"server key {key_path} does not match certificate {cert_chain}")
    return _ServerPair(cert_chain, key_path, chain, key)


def server_context(cert_chain: Path, key: Path, *, now: datetime | None = None) -> SSL.Context:
    """A server Context for NTS-KE: TLS 1.3 only, client must offer ALPN ``ntske/1``.

    ``cert_chain`` is a PEM file with the server certificate first, then any
    intermediates; ``key`` its unencrypted PEM private key.  Raises
    :class:`CertificateError` with a clear message if a file is missing,
    unreadable or not PEM, if the key does not match the certificate, or, when
    ``now`` is given, if the certificate has expired by then.
    """
    return _load_server_pair(cert_chain, key, now).context


class ServerContexts:
    """Several certificate/key pairs, chosen per connection by the client's SNI.

    The first pair is the default (no SNI, or no certificate matches).  Pass
    :meth:`context` (or this object) to
    :meth:`~ntspy.net.tls.stream.TlsStream.accept`; the server name callback
    switches the connection to the matching pair's Context.

    The pyOpenSSL Contexts are made when first asked for, or at once when the
    compiled engine cannot serve these pairs (:attr:`native` is None): a
    server on the engine never needs them.
    """

    def __init__(self, pairs: Sequence[tuple[Path, Path]], now: datetime) -> None:
        if not pairs:
            raise CertificateError("no server certificate and key configured")
        self._paths = list(pairs)
        self._armed = False  # whether the pairs' Contexts exist, with the SNI callback
        self._pairs, self.native = self._load(now)

    def _load(self, now: datetime) -> tuple[list[_ServerPair], NativeTlsContext | None]:
        loaded = [_load_server_pair(cert, key, now) for cert, key in self._paths]
        native = _native_context(loaded)
        if native is None or self._armed:
            self._arm(loaded)  # any error now, while the old pairs still serve
        return loaded, native

    def _arm(self, pairs: list[_ServerPair]) -> None:
        for pair in pairs:
            pair.context.set_tlsext_servername_callback(self._on_server_name)
        self._armed = True

    def _on_server_name(self, conn: SSL.Connection) -> None:
        raw = conn.get_servername()
        if raw is None:
            return
        name = raw.decode("ascii", "replace")
        for pair in self._pairs:
            if certificate_matches(pair.leaf, name):
                conn.set_context(pair.context)
                return

    def context(self) -> SSL.Context:
        """The Context to create server Connections with (the default pair's)."""
        if not self._armed:
            self._arm(self._pairs)
        return self._pairs[0].context

    @property
    def certificates(self) -> list[x509.Certificate]:
        """The leaf certificate of every pair, default first."""
        return [pair.leaf for pair in self._pairs]

    def reload(self, now: datetime) -> None:
        """Re-read every certificate and key file (e.g. on SIGHUP).

        All or nothing: on any failure the old contexts stay in use and
        :class:`CertificateError` is raised.  Connections already open keep
        their certificates.
        """
        self._pairs, self.native = self._load(now)


def _native_context(pairs: Sequence[_ServerPair]) -> NativeTlsContext | None:
    """The same pairs for the compiled NTS-KE server (``ntspy._ke``), if it is built.

    It gets the certificates and keys this module has already checked, in
    canonical PEM, so both paths serve exactly the same credentials.  None
    when the module is missing or the system OpenSSL refuses a pair (the
    asyncio path then serves, with pyOpenSSL).
    """
    if not HAVE_NATIVE_KE:
        return None
    pem = serialization.Encoding.PEM
    try:
        return NativeTlsContext(
            [
                (
                    b"".join(cert.public_bytes(pem) for cert in pair.chain),
                    pair.private_key.private_bytes(
                        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                    ),
                )
                for pair in pairs
            ]
        )
    except ValueError as exc:
        log.warning("NTS-KE served from Python: the compiled server refused the "
                    "certificates (%s)", exc)
        return None
