"""RFC 6125 server-name checks: does a certificate's subjectAltName cover a name?

A host name matches dNSName entries (exact, or one RFC 6125 s6.4.3 wildcard
label), an IP literal matches iPAddress entries only; the subject CN never
counts.  Pure functions over :mod:`cryptography` certificates, shared by the
client's verify callback (:mod:`.trust`), its SNI (:mod:`.stream`) and the
server's certificate selection by SNI (:mod:`.credentials`).
"""

from __future__ import annotations

import ipaddress

from cryptography import x509

_IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(name: str) -> _IpAddress | None:
    """The IP address ``name`` spells (``[::1]`` accepted), or None for a host name."""
    try:
        return ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return None


def dns_form(name: str) -> str:
    """A host name as certificates spell it: A-labels, lower case, no trailing dot."""
    name = name.rstrip(".")
    if not name.isascii():
        # Certificates carry IDNs as A-labels ("xn--..."); so must the name we compare.
        name = name.encode("idna").decode("ascii")
    return name.lower()


def _dns_pattern_matches(pattern: str, name: str) -> bool:
    """RFC 6125 s6.4: exact match, or ``*`` as the whole leftmost label of a pattern
    with at least two more labels, matching exactly one label of ``name``."""
    pattern = pattern.rstrip(".").lower()
    if not pattern.startswith("*."):
        return pattern == name
    suffix = pattern[1:]  # ".example.com"
    if suffix.count(".") < 2 or "*" in suffix:
        return False
    head, dot, rest = name.partition(".")
    return bool(head) and dot == "." and "." + rest == suffix


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def certificate_matches(cert: x509.Certificate, server_name: str) -> bool:
    """Whether ``cert`` is valid for ``server_name`` (a host name or IP literal).

    Only the subjectAltName counts (RFC 6125 s6.4.4: no fall-back to the
    subject CN when a SAN exists, and we require one).  An IP literal matches
    only an iPAddress entry; a host name only dNSName entries.
    """
    san = _san(cert)
    if san is None:
        return False
    ip = parse_ip(server_name)
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    try:
        name = dns_form(server_name)
    except UnicodeError:
        return False
    return any(_dns_pattern_matches(p, name) for p in san.get_values_for_type(x509.DNSName))


def names_of(cert: x509.Certificate) -> str:
    """The names ``cert`` is for, as a name-mismatch message lists them."""
    san = _san(cert)
    if san is None:
        return f"no subjectAltName; subject {cert.subject.rfc4514_string()}"
    names = list(san.get_values_for_type(x509.DNSName))
    names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return ", ".join(names) if names else "no DNS names or IP addresses"
