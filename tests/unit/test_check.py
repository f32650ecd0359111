"""``ntspy check``'s verdicts as pure functions: facts and a time in, lines out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from ntspy.certs import make_test_pki
from ntspy.check import (
    Check,
    Exchange,
    Facts,
    KeOutcome,
    Status,
    TlsFacts,
    VerifyProblem,
    check_aead,
    check_chain,
    check_cookies,
    check_expiry,
    check_ke_time,
    check_nak,
    check_name,
    check_ntp,
    check_packet_size,
    check_records,
    check_response_size,
    check_tls_version,
    exit_code,
    request_size,
    verdicts,
)
from ntspy.client.ke import KeResult
from ntspy.errors import KeConnectionError, KeProtocolError, KeServerError
from ntspy.net.tls.trust import VerifyError

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


def leaf(tmp_path: Path, days_left: float, started_days_ago: float = 30) -> x509.Certificate:
    pki = make_test_pki(tmp_path, not_before=NOW - timedelta(days=started_days_ago),
                        not_after=NOW + timedelta(days=days_left))
    return x509.load_pem_x509_certificate(pki.server_cert.read_bytes())


def ke_result(aead: int = 30, cookie_len: int = 72, count: int = 8,
              server: str | None = None, port: int | None = 4123) -> KeResult:
    return KeResult(aead_id=aead, c2s=b"", s2c=b"", cookies=[bytes(cookie_len)] * count,
                    ntp_server=server or "127.0.0.1", ntp_port=port or 123, ke_host="h",
                    ke_port=4460, ke_address="127.0.0.1", tls_version="TLSv1.3",
                    cert_subject="CN=h", cert_not_after=None,
                    server_record=server, port_record=port)


@pytest.mark.parametrize(("days", "status"), [
    (60, Status.OK), (14.5, Status.OK), (13.9, Status.WARN), (0.5, Status.WARN),
    (-0.5, Status.FAIL), (-40, Status.FAIL),
])
def test_expiry_thresholds(tmp_path: Path, days: float, status: Status) -> None:
    started = max(30.0, -days + 10)
    check = check_expiry([leaf(tmp_path, days, started)], NOW)
    assert check.status is status, check.text
    if status is Status.FAIL:
        assert "expired" in check.text
    else:
        assert check.data["days_left"] == int(days)


def test_not_yet_valid_is_a_failure(tmp_path: Path) -> None:
    check = check_expiry([leaf(tmp_path, 60, started_days_ago=-2)], NOW)
    assert check.status is Status.FAIL and "not valid until" in check.text


def test_name_match(tmp_path: Path) -> None:
    cert = leaf(tmp_path, 60)
    assert check_name([cert], "localhost").status is Status.OK
    assert check_name([cert], "127.0.0.1").status is Status.OK
    wrong = check_name([cert], "time.example.net")
    assert wrong.status is Status.FAIL and "localhost" in wrong.text


def test_chain_verdicts() -> None:
    missing = TlsFacts(version="TLSv1.3", chain=[], problems=[VerifyProblem(
        VerifyError.UNABLE_TO_GET_ISSUER_CERT_LOCALLY, 0, "CN=leaf", "CN=Intermediate")])
    check = check_chain(missing)
    assert check.status is Status.FAIL
    assert "incomplete" in check.text and "CN=Intermediate" in check.text
    untrusted = TlsFacts(problems=[VerifyProblem(
        VerifyError.DEPTH_ZERO_SELF_SIGNED_CERT, 0, "CN=me", "CN=me")])
    assert "not trusted" in check_chain(untrusted).text
    # Dates and names have lines of their own: the chain itself is fine.
    dated = TlsFacts(problems=[VerifyProblem(VerifyError.CERT_HAS_EXPIRED, 0, "CN=a", "CN=b")],
                     verified_root="")
    assert check_chain(dated).status is Status.OK
    good = TlsFacts(version="TLSv1.3", verified_root="CN=Root")
    assert check_chain(good).status is Status.OK and "CN=Root" in check_chain(good).text


def test_tls_version() -> None:
    assert check_tls_version(TlsFacts(version="TLSv1.3")).status is Status.OK
    assert check_tls_version(TlsFacts(version="TLSv1.2")).status is Status.FAIL
    failed = check_tls_version(TlsFacts(error="tlsv1 alert protocol version"))
    assert failed.status is Status.FAIL and "protocol version" in failed.text


def test_aead_verdicts() -> None:
    accepted = check_aead(16, KeOutcome(result=ke_result(16, 136)))
    assert accepted.status is Status.OK and "136 octets" in accepted.text
    refused = KeOutcome(error=KeProtocolError("server supports none of the AEAD algorithms we "
                                              "offered"))
    assert check_aead(17, refused).status is Status.INFO
    assert check_aead(30, KeOutcome(error=KeServerError(1))).status is Status.INFO
    mandatory = check_aead(15, refused)
    assert mandatory.status is Status.FAIL and "RFC 8915" in mandatory.text
    broken = check_aead(30, KeOutcome(error=KeConnectionError("refused")))
    assert broken.status is Status.FAIL
    skipped = check_aead(30, None, "no GCM-SIV here")
    assert skipped.status is Status.SKIP and "not tested" in skipped.text


def test_packet_size_limit() -> None:
    assert request_size(30, 72) == 200  # 48 + 36 (uid) + 76 (cookie) + 40 (auth)
    assert request_size(15, 100) == 228
    assert check_packet_size(ke_result(30, 72)).status is Status.OK
    big = check_packet_size(ke_result(15, 100))
    assert big.status is Status.WARN and "228 octets" in big.text and "GCM-SIV" in big.text


def test_cookie_count() -> None:
    assert check_cookies(ke_result(count=8)).status is Status.OK
    few = check_cookies(ke_result(count=2))
    assert few.status is Status.WARN and "clients keep 8" in few.text


def test_ntp_response_size_and_nak() -> None:
    ke = ke_result()
    good = [Exchange(0, 200, 200, 0.0002, 0.00001, 1, 1), Exchange(7, 732, 732, 0.0002, 0, 1, 8)]
    assert check_ntp(ke, good).status is Status.OK
    assert "200 us" in check_ntp(ke, good).text
    assert "delay 1.5 ms" in check_ntp(ke, [Exchange(0, 200, 200, 0.0015)]).text
    assert check_response_size(good).status is Status.OK
    amplified = [Exchange(0, 200, 300)]
    assert check_response_size(amplified).status is Status.FAIL
    lost = [Exchange(0, 200, error="no response within 1 s (UDP blocked or dropped?)")]
    failed = check_ntp(ke, lost, "no answer either")
    assert failed.status is Status.FAIL and "no response within 1 s" in failed.text
    assert "plain NTP: no answer either" in failed.text
    assert check_response_size(lost).status is Status.SKIP
    assert check_records(ke, lost).status is Status.FAIL
    assert check_records(ke, good).status is Status.OK
    assert "Port 4123" in check_records(ke, good).text
    assert check_nak("nak").status is Status.OK
    assert check_nak("authenticated").status is Status.FAIL
    assert check_nak("silent").status is Status.WARN
    assert check_nak("skipped").status is Status.SKIP


def test_no_records_is_said() -> None:
    ke = ke_result(port=None)
    ke.port_record = None
    assert "no Server/Port records" in check_records(ke, []).text


def test_ke_time() -> None:
    assert check_ke_time(KeOutcome(result=ke_result(), seconds=0.02), 0.01).status is Status.OK
    assert check_ke_time(KeOutcome(result=ke_result(), seconds=2.5), 0.01).status is Status.WARN
    assert check_ke_time(KeOutcome(error=KeConnectionError("x")), 0).status is Status.FAIL


def test_exit_codes() -> None:
    def line(status: Status) -> Check:
        return Check("x", status, "")

    assert exit_code([line(Status.OK), line(Status.INFO), line(Status.SKIP)]) == 0
    assert exit_code([line(Status.OK), line(Status.WARN)]) == 1
    assert exit_code([line(Status.WARN), line(Status.FAIL), line(Status.OK)]) == 2
    assert exit_code([]) == 0


def test_skipped_nts_half_after_a_refused_certificate(tmp_path: Path) -> None:
    cert = leaf(tmp_path, 60)
    tls = TlsFacts(version="TLSv1.3", chain=[cert], problems=[VerifyProblem(
        VerifyError.UNABLE_TO_GET_ISSUER_CERT_LOCALLY, 0, "CN=localhost", "CN=Mid")])
    facts = Facts("h", 4460, "localhost", tls, KeOutcome(), skipped="clients refuse it")
    checks = verdicts(facts, NOW)
    assert [c.name for c in checks] == ["tls-version", "cert-subject", "cert-chain",
                                        "cert-expiry", "cert-name", "nts"]
    assert exit_code(checks) == 2
