"""A second terminal finds a running `tessera up` from its data dir, or from anywhere via the pointer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.core import runtime
from services.core.settings import Settings


@pytest.fixture(autouse=True)
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state"


def test_commands_in_the_data_dir_and_elsewhere_find_the_servers(tmp_path: Path) -> None:
    up = Settings(data_dir=tmp_path / "data", ingest_port=50999)
    runtime.write_runtime(up, "postgresql://u@/db?host=/x", "unix:///x/redis.sock")
    assert oct(runtime.runtime_file(up).stat().st_mode & 0o777) == "0o600"

    same_dir = runtime.with_runtime(Settings(data_dir=tmp_path / "data"), environ={})
    assert same_dir.database_url == "postgresql://u@/db?host=/x"
    assert same_dir.redis_url == "unix:///x/redis.sock"
    assert same_dir.ingest_port == 50999

    elsewhere = runtime.with_runtime(Settings(data_dir=tmp_path / "other"), environ={})
    assert elsewhere.database_url == "postgresql://u@/db?host=/x"


def test_explicit_settings_win(tmp_path: Path) -> None:
    runtime.write_runtime(Settings(data_dir=tmp_path), "postgresql://a@/a", "redis://a")
    mine = Settings(data_dir=tmp_path, database_url="postgresql://mine@db/x", ingest_port=1234)
    resolved = runtime.with_runtime(mine, environ={"TESSERA_INGEST_PORT": "1234"})
    assert resolved.database_url == "postgresql://mine@db/x"
    assert resolved.redis_url == "redis://a"
    assert resolved.ingest_port == 1234


def test_a_stopped_or_dead_up_is_ignored(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    runtime.write_runtime(settings, "postgresql://a@/a", "redis://a")
    runtime.clear_runtime(settings)
    assert runtime.with_runtime(settings, environ={}).database_url is None
    assert not runtime.pointer_file().exists()

    runtime.write_runtime(settings, "postgresql://a@/a", "redis://a")
    data = runtime.runtime_file(settings).read_text().replace(f'"pid": {os.getpid()}', '"pid": 999999999')
    runtime.runtime_file(settings).write_text(data)
    runtime.pointer_file().write_text(data)
    assert runtime.with_runtime(settings, environ={}).database_url is None
