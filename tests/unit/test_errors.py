"""The exception tree: every public error importable from ``ntspy``, and the
built-in classes a Python user would catch for the same trouble."""

from __future__ import annotations

import pickle
import ssl

import pytest

import ntspy
from ntspy import errors
from ntspy.errors import format_duration

ERROR_CLASSES = [
    obj for obj in vars(errors).values()
    if isinstance(obj, type) and issubclass(obj, errors.NtsError)
]


def test_every_error_is_importable_from_the_package() -> None:
    assert len(ERROR_CLASSES) >= 20
    for cls in ERROR_CLASSES:
        assert getattr(ntspy, cls.__name__) is cls
        assert cls.__name__ in ntspy.__all__
    from ntspy import CertificateVerifyError, KeTimeoutError, NtsError  # noqa: F401


@pytest.mark.parametrize(("cls", "builtin"), [
    (errors.KeTimeoutError, TimeoutError),
    (errors.NtpTimeoutError, TimeoutError),
    (errors.KeConnectionError, ConnectionError),
    (errors.KeTimeoutError, ConnectionError),
    (errors.NtpConnectionError, ConnectionError),
    (errors.CertificateVerifyError, ssl.SSLCertVerificationError),
    (errors.CertificateVerifyError, errors.CertificateError),
    (errors.KeTimeoutError, errors.KeConnectionError),
])
def test_builtin_bases(cls: type[Exception], builtin: type[Exception]) -> None:
    assert issubclass(cls, builtin)
    assert issubclass(cls, errors.NtsError)


def test_ke_errors_stay_ke_errors() -> None:
    # The client daemon backs off KE failures by these classes (client/source.py).
    for cls in (errors.KeTimeoutError, errors.CertificateVerifyError, errors.TlsError):
        assert issubclass(cls, errors.KeError)
    assert not issubclass(errors.CertificateError, OSError)  # a bad CA file is no socket error
    assert not issubclass(errors.NtpTimeoutError, errors.KeError)


def test_messages_are_the_message() -> None:
    exc = errors.CertificateVerifyError("certificate of h has expired", 10)
    assert str(exc) == "certificate of h has expired"
    assert exc.verify_code == 10 and exc.verify_message == str(exc)
    assert str(errors.KeTimeoutError("timed out")) == "timed out"
    timeout = errors.NtpTimeoutError("no response", rejected=2)
    assert str(timeout) == "no response" and timeout.rejected == 2
    for value in (exc, timeout, errors.KeConnectionError("refused")):
        again = pickle.loads(pickle.dumps(value))
        assert type(again) is type(value) and str(again) == str(value)
    assert pickle.loads(pickle.dumps(exc)).verify_code == 10


@pytest.mark.parametrize(("seconds", "text"), [
    (2.98895, "3 s"), (3, "3 s"), (5.0, "5 s"), (2.5, "2.5 s"), (12.34, "12.3 s"),
    (0.5, "0.5 s"), (0.2, "0.2 s"), (0.69873, "0.7 s"), (0.0456, "0.046 s"),
])
def test_durations_are_rounded(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
