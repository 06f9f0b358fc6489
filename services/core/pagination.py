"""AIP-158 page tokens and resumable feed cursors: opaque to callers, bound to the tenant (and, for
page tokens, the query) that made them."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from typing import Any

from services.core.errors import InvalidArgument, Violation
from services.core.tenancy import current_tenant_id

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int, default: int = DEFAULT_PAGE_SIZE, maximum: int = MAX_PAGE_SIZE) -> int:
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", [Violation("page_size", "must be >= 0")])
    return min(requested or default, maximum)


def _fingerprint(query: Any) -> str:
    """The query and the caller's tenant: another tenant's token fails like one for other filters."""
    bound = {"query": query, "tenant": current_tenant_id()}
    return hashlib.sha256(json.dumps(bound, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_token(position: Any, query: Any) -> str:
    raw = json.dumps({"p": position, "q": _fingerprint(query)}, default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def invalid_token() -> InvalidArgument:
    return InvalidArgument("invalid page_token", [Violation("page_token", "not a token this API issued")])


def decode_token(token: str, query: Any, valid: Callable[[Any], bool] = lambda _position: True) -> Any:
    """The position a token points at; a token from another query or tenant, or a forged one
    (including a position ``valid`` rejects, so a handler never queries with it), is refused."""
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        position, fingerprint = data["p"], data["q"]
    except (ValueError, KeyError, TypeError):
        raise invalid_token() from None
    if fingerprint != _fingerprint(query):
        raise InvalidArgument(
            "page_token does not match the request",
            [Violation("page_token", "was issued for a request with other filters")],
        )
    if not valid(position):
        raise invalid_token()
    return position


# ---- feed cursors --------------------------------------------------------------------------------


def encode_feed_cursor(tenant_id: str, seq: int, feed: str = "feed") -> str:
    """A resumable position in one of a tenant's feeds (the profile change feed, the alerts):
    opaque, and refused by any other tenant or feed."""
    raw = json.dumps({"s": seq, "t": _feed_tag(tenant_id, feed)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_feed_cursor(tenant_id: str, cursor: str, feed: str = "feed") -> int | None:
    """The position of a cursor :func:`encode_feed_cursor` issued (None for an empty one)."""
    if not cursor:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        seq, tag = int(data["s"]), data["t"]
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument("invalid cursor", [Violation("cursor", "not a cursor this API issued")]) from None
    if tag != _feed_tag(tenant_id, feed) or seq < 0:
        raise InvalidArgument("invalid cursor", [Violation("cursor", "not a cursor this API issued")])
    return seq


def _feed_tag(tenant_id: str, feed: str) -> str:
    return hashlib.sha256((feed + "\x1f" + tenant_id).encode()).hexdigest()[:12]
