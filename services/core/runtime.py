"""Where a running ``tessera up`` left its embedded servers, so other ``tessera`` commands in
another terminal find them without any configuration."""

from __future__ import annotations

import json
import os
from pathlib import Path

from services.core.settings import Settings


def runtime_file(settings: Settings) -> Path:
    return settings.data_dir.expanduser().resolve() / "runtime.json"


def write_runtime(settings: Settings, database_url: str, redis_url: str) -> None:
    path = runtime_file(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fp:
        json.dump({"database_url": database_url, "redis_url": redis_url, "pid": os.getpid()}, fp)


def clear_runtime(settings: Settings) -> None:
    runtime_file(settings).unlink(missing_ok=True)


def with_runtime(settings: Settings) -> Settings:
    """Fill unset URLs from a running ``tessera up``; explicit settings always win."""
    if settings.database_url and settings.redis_url:
        return settings
    path = runtime_file(settings)
    if not path.exists():
        return settings
    data = json.loads(path.read_text())
    return settings.with_overrides(
        database_url=settings.database_url or data.get("database_url"),
        redis_url=settings.redis_url or data.get("redis_url"),
    )
