"""Certificate files: read PEM certificates, each failure one clear line.

Both the client's trusted certificates (:mod:`.trust`) and the server's
certificate chains (:mod:`.credentials`) are read here, so a missing,
unreadable or non-PEM file reads the same on both sides; :func:`when`
is how those messages print a certificate's dates.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from cryptography import x509

from ntspy.errors import CertificateError


def read_file(path: Path, what: str) -> bytes:
    """The bytes of ``path``, or a :class:`CertificateError` naming it as ``what``."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CertificateError(f"{what} {path} does not exist") from None
    except OSError as e:
        raise CertificateError(f"cannot read {what} {path}: {e.strerror or e}") from None


def pem_certificates(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    """Every PEM certificate in ``data`` (read from ``path``); CertificateError if none."""
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"{what} {path} holds no readable PEM certificate") from None


def when(t: datetime) -> str:
    """A certificate's date as messages print it."""
    return t.strftime("%Y-%m-%d %H:%M:%S UTC")
