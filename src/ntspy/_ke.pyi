"""Types of the optional compiled NTS-KE server loop (``src/ntspy/_ke.c``)."""

from collections.abc import Callable

MAX_MESSAGE: int

class TlsContext:
    """NTS-KE server TLS settings for ``[(chain_pem, key_pem), ...]``.

    The first pair is the default; the others are chosen by the client's SNI.
    Raises ValueError when OpenSSL refuses a pair.
    """

    def __init__(self, pairs: list[tuple[bytes, bytes]]) -> None: ...

class Engine:
    """Accepts on ``listen_fd`` and runs each connection's TLS and KE exchange
    on a thread of its own (:meth:`start`); the callbacks run there.

    ``on_accept(host, same)`` admits (True) or drops a new connection
    (``same``: connections open now from that client: its IPv4 address or
    IPv6 /64); ``session_timeout`` bounds each connection from accept to its
    last byte;
    ``on_request(data, eof)`` turns the request bytes into the answer;
    ``on_failed(who, kind, detail)`` reports a connection that ended without
    one (``who`` None: accept() itself failed).
    """

    def __init__(
        self,
        listen_fd: int,
        tls: TlsContext,
        on_accept: Callable[[str, int], bool],
        on_request: Callable[[bytes, bool], bytes],
        on_failed: Callable[[str | None, str, str | bytes | None], None],
        session_timeout: float,
    ) -> None: ...
    @property
    def active(self) -> int: ...
    def start(self) -> None: ...
    def close(self) -> None: ...
    def export(self, label: bytes, length: int, context: bytes, /) -> bytes: ...
    def peer(self) -> str: ...
    def elapsed(self) -> float:
        """Seconds since the connection being answered was accepted (inside on_request)."""
    def set_tls(self, tls: TlsContext, /) -> None: ...
