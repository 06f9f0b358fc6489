"""A minimal HTTP/1.1 keep-alive client for the load generator: request bytes built once, the
answer read by Content-Length, nothing parsed but the status line.

The gRPC side of every bench sends pre-serialized bytes through grpcio's C core; ``http.client``
would instead spend a few hundred microseconds of Python per call on the e-mail header parser, which
on a 2-core machine is CPU taken from the server being measured. This keeps the comparison about
the servers. It speaks only to servers that answer with Content-Length (aiohttp's json/text
responses do), never chunked.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping


class HttpError(OSError):
    """The server closed the connection or answered something this client does not read."""


class KeepAlive:
    """One TCP connection; :meth:`request` sends and returns (status, body); reconnects after an error."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    @staticmethod
    def build(method: str, path: str, headers: Mapping[str, str], body: bytes = b"", host: str = "bench") -> bytes:
        """The request's head and body, ready to send as often as wanted."""
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers.items())]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self._buf = sock, b""
        return sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(self, raw: bytes) -> tuple[int, bytes]:
        sock = self._sock or self._connect()
        try:
            sock.sendall(raw)
            return self._read(sock)
        except OSError:
            self.close()
            raise

    def _read(self, sock: socket.socket) -> tuple[int, bytes]:
        buf = self._buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            chunk = sock.recv(65536)
            if not chunk:
                raise HttpError("the server closed the connection")
            buf += chunk
        head = buf[:end].decode("latin-1")
        status_line, _, fields = head.partition("\r\n")
        status = int(status_line.split(" ", 2)[1])
        length = -1
        close = False
        for line in fields.split("\r\n"):
            name, _, value = line.partition(":")
            lowered = name.strip().lower()
            if lowered == "content-length":
                length = int(value)
            elif lowered == "transfer-encoding":
                raise HttpError("chunked answers are not read by this client")
            elif lowered == "connection" and value.strip().lower() == "close":
                close = True
        if length < 0:
            raise HttpError("an answer without Content-Length")
        start = end + 4
        while len(buf) - start < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise HttpError("the server closed the connection mid-answer")
            buf += chunk
        body = buf[start : start + length]
        self._buf = buf[start + length :]
        if close:
            self.close()
        return status, body
