"""A TCP proxy a test can cut and restore, to take PostgreSQL or Redis "down" for one
service without stopping the shared server."""

from __future__ import annotations

import contextlib
import socket
import threading
from urllib.parse import urlsplit

import sqlalchemy as sa

Target = tuple[str, int] | str


def connect(target: Target) -> socket.socket:
    """A connection to a TCP (host, port) or a unix socket path."""
    if isinstance(target, str):
        upstream = socket.socket(socket.AF_UNIX)
        upstream.connect(target)
        return upstream
    upstream = socket.create_connection(target, timeout=5)
    upstream.settimeout(None)
    return upstream


def postgres_target(url: str) -> Target:
    """Where the server behind ``url`` listens: its unix socket (an embedded server's only
    door), or its host and port."""
    parsed = sa.engine.make_url(url)
    host = parsed.query.get("host")
    if isinstance(host, str) and host.startswith("/"):
        return f"{host}/.s.PGSQL.{parsed.port or 5432}"
    return (parsed.host or "127.0.0.1", parsed.port or 5432)


def through(url: str, port: int) -> str:
    """``url`` pointed at a proxy on 127.0.0.1:``port``."""
    parsed = sa.engine.make_url(url)
    return parsed.set(host="127.0.0.1", port=port, query={}).render_as_string(hide_password=False)


class CuttableProxy:
    """Listens on 127.0.0.1; forwards to a TCP (host, port) or a unix socket path."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port: int = self._listener.getsockname()[1]
        self._up = True
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up:
                client.close()
                continue
            try:
                upstream = connect(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self._conns.discard(src)
                self._conns.discard(dst)

    def cut(self) -> None:
        """Refuse new connections and drop every open one, as a dead server would."""
        self._up = False
        with self._lock:
            conns = list(self._conns)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self._up = True

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()


def proxy_postgres(url: str) -> tuple[CuttableProxy, str]:
    """A proxy in front of the server behind ``url`` and the URL that goes through it."""
    proxy = CuttableProxy(postgres_target(url))
    return proxy, through(url, proxy.port)


def proxy_redis(url: str) -> tuple[CuttableProxy, str]:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        proxy = CuttableProxy(parts.path)
        return proxy, f"redis://127.0.0.1:{proxy.port}/0"
    proxy = CuttableProxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    db = parts.path.lstrip("/") or "0"
    return proxy, f"redis://127.0.0.1:{proxy.port}/{db}"
