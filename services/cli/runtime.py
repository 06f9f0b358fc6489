"""Where a running ``tessera up`` left its embedded servers, so other ``tessera`` commands, in
another terminal or another directory, find them without any configuration.

The data directory holds ``runtime.json``; a pointer in the user's state directory names the
most recent ``tessera up``, for commands run from elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.core.settings import Settings


def runtime_file(settings: Settings) -> Path:
    return settings.data_dir.expanduser().resolve() / "runtime.json"


def pointer_file() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "tessera" / "current.json"


def _write_private(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fp:
        json.dump(data, fp)


def write_runtime(settings: Settings, database_url: str, redis_url: str, ports: dict[str, int]) -> None:
    data = {
        "database_url": database_url,
        "redis_url": redis_url,
        "ports": dict(ports),
        "data_dir": str(settings.data_dir.expanduser().resolve()),
        "pid": os.getpid(),
    }
    _write_private(runtime_file(settings), data)
    with contextlib.suppress(OSError):  # a read-only home only costs the convenience
        _write_private(pointer_file(), data)


def clear_runtime(settings: Settings) -> None:
    runtime_file(settings).unlink(missing_ok=True)
    pointer = pointer_file()
    try:
        if json.loads(pointer.read_text()).get("data_dir") == str(settings.data_dir.expanduser().resolve()):
            pointer.unlink(missing_ok=True)
    except (OSError, ValueError):
        pass


def _alive(pid: object) -> bool:
    try:
        os.kill(int(pid), 0)  # type: ignore[call-overload]
        return True
    except (OSError, TypeError, ValueError):
        return False


def _load(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and _alive(data.get("pid")) else None


def current(settings: Settings) -> dict[str, Any] | None:
    """What the running ``tessera up`` of this data dir (else the latest one) wrote, if it still runs."""
    return _load(runtime_file(settings)) or _load(pointer_file())


def with_runtime(settings: Settings) -> Settings:
    """Fill what is not configured from a running ``tessera up``; explicit settings always win."""
    if settings.database_url and settings.redis_url:
        return settings
    data = current(settings)
    if data is None:
        return settings
    return settings.with_overrides(
        database_url=settings.database_url or data.get("database_url"),
        redis_url=settings.redis_url or data.get("redis_url"),
    )


def service_port(service: str, environ: Mapping[str, str] | None = None) -> int:
    """``TESSERA_<SERVICE>_PORT`` when set, else the port a running ``tessera up`` gave the service,
    else the service's default."""
    from services.cli import registry

    env = os.environ if environ is None else environ
    if not env.get(f"TESSERA_{service.upper()}_PORT", "").strip():
        data = current(Settings.from_env(env))
        ports = (data or {}).get("ports")
        if isinstance(ports, dict) and isinstance(ports.get(service), int):
            return int(ports[service])
    return registry.port(service, env)
