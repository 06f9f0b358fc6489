"""The agent console's pages and assets: plain files from ``console/`` (package data), no build step.

The files are read once when the routes are added, so a request can only ever name one of them
(no path is joined from the URL, hence no traversal) and each carries a strong ETag. Every answer
has a Content-Security-Policy that allows only this origin: the pages' scripts are ES modules
from ``/console/`` and every value from the API is inserted as text, so an injected string has
nothing to run."""

from __future__ import annotations

import hashlib
import mimetypes
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources

from aiohttp import web

#: Only this origin: scripts, styles, fetches and the EventSources. No inline script or style, no
#: framing (clickjacking on the sign-in form), no <base> or plugin tricks.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
#: The pages are revalidated on every load (a new release shows at once); assets for five minutes.
PAGE_CACHE = "no-cache"
ASSET_CACHE = "public, max-age=300"
#: Explicit, so the answer does not depend on the host's /etc/mime.types.
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}


@dataclass(frozen=True)
class Asset:
    """One file of the console, in memory."""

    body: bytes
    content_type: str
    etag: str


def load(package: str = "services.gateway", folder: str = "console") -> dict[str, Asset]:
    """Every regular file directly in the folder (no dot files, no subfolders), by name."""
    assets: dict[str, Asset] = {}
    root = resources.files(package).joinpath(folder)
    for entry in root.iterdir():
        name = entry.name
        if name.startswith(".") or not entry.is_file():
            continue
        suffix = name[name.rfind(".") :] if "." in name else ""
        content_type = TYPES.get(suffix) or mimetypes.guess_type(name)[0] or "application/octet-stream"
        body = entry.read_bytes()
        assets[name] = Asset(body, content_type, '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return assets


def _answer(request: web.Request, asset: Asset, cache: str) -> web.Response:
    headers = {**SECURITY_HEADERS, "Cache-Control": cache, "ETag": asset.etag}
    if asset.etag in (t.strip() for t in request.headers.get("If-None-Match", "").split(",")):
        return web.Response(status=304, headers=headers)
    return web.Response(body=asset.body, headers={**headers, "Content-Type": asset.content_type})


def add_routes(app: web.Application) -> None:
    """GET / (the console), GET /dashboard, GET /console/{file}."""
    assets = load()

    def page(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            return _answer(request, assets[name], PAGE_CACHE)

        return handle

    async def asset(request: web.Request) -> web.Response:
        found = assets.get(request.match_info["file"])
        if found is None:
            raise web.HTTPNotFound(text="no such console file", headers=SECURITY_HEADERS)
        return _answer(request, found, PAGE_CACHE if request.match_info["file"].endswith(".html") else ASSET_CACHE)

    app.router.add_get("/", page("index.html"))
    app.router.add_get("/dashboard", page("dashboard.html"))
    app.router.add_get("/console/{file}", asset)
