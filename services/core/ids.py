"""Identifier spellings shared by the servicer, the read facade and storage. Pure: no I/O."""

from __future__ import annotations

import uuid


def canonical_uuid(text: str) -> str | None:
    """The canonical lower-case hyphenated form, or None: PostgreSQL accepts fewer spellings
    than Python's ``uuid.UUID`` (no ``urn:uuid:``), so only this form is ever sent to it."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return None
