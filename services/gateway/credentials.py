"""The API key of a request, read from the Authorization header: shared by the Segment routes and
the JSON API, so both accept the same two spellings."""

from __future__ import annotations

import base64
import binascii


def api_key(header: str | None) -> str | None:
    """The write key: Basic auth's user name (Segment), or a Bearer token (Tessera's own clients)."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value or None
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return decoded.partition(":")[0] or None
    return None
