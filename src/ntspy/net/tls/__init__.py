"""TLS 1.3 for NTS-KE (RFC 8915 s4) over pyOpenSSL memory BIOs.

The stdlib ``ssl`` module has no TLS keying-material exporter, which NTS needs to
derive its AEAD keys (RFC 8915 s5.1), so NTS-KE runs pyOpenSSL with memory BIOs:
OpenSSL never touches a socket.  One idea per module; import from the module:

- :mod:`.ntske`: what NTS-KE asks of TLS (TLS 1.3 only, ALPN ``ntske/1``), the
  exporter, and the words for a failed handshake;
- :mod:`.names`: RFC 6125 server-name checks against a certificate's SANs;
- :mod:`.certfiles`: reading PEM certificate files, one clear error each;
- :mod:`.trust`: the client's trust store (:class:`~.trust.TrustConfig`), its
  Context and verify callback, and the certificate failure messages;
- :mod:`.credentials`: the server's certificate/key pairs, SNI selection,
  reload, and the same pairs for the compiled NTS-KE engine;
- :mod:`.stream`: :class:`~.stream.TlsStream`, TLS pumped between memory BIOs
  and an asyncio stream pair (the client; server code that wants streams);
- :mod:`.server`: :class:`~.server.ServerTls`, the server half with no I/O at
  all, for the NTS-KE server's ``asyncio.Protocol``.
"""
