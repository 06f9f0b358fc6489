"""A second terminal finds a running `tessera up` from its data dir, or from anywhere via the pointer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.cli import runtime
from services.core.settings import Settings


@pytest.fixture(autouse=True)
def state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state"


def test_commands_in_the_data_dir_and_elsewhere_find_the_servers(tmp_path: Path) -> None:
    up = Settings(data_dir=tmp_path / "data")
    runtime.write_runtime(up, "postgresql://u@/db?host=/x", "unix:///x/redis.sock", {"ingest": 50999})
    assert oct(runtime.runtime_file(up).stat().st_mode & 0o777) == "0o600"

    same_dir = runtime.with_runtime(Settings(data_dir=tmp_path / "data"))
    assert same_dir.database_url == "postgresql://u@/db?host=/x"
    assert same_dir.redis_url == "unix:///x/redis.sock"
    assert runtime.service_port("ingest", {"TESSERA_DATA_DIR": str(tmp_path / "data")}) == 50999

    elsewhere = runtime.with_runtime(Settings(data_dir=tmp_path / "other"))
    assert elsewhere.database_url == "postgresql://u@/db?host=/x"
    assert runtime.service_port("ingest", {"TESSERA_DATA_DIR": str(tmp_path / "other")}) == 50999


def test_explicit_settings_win(tmp_path: Path) -> None:
    runtime.write_runtime(Settings(data_dir=tmp_path), "postgresql://a@/a", "redis://a", {"ingest": 50999})
    mine = Settings(data_dir=tmp_path, database_url="postgresql://mine@db/x")
    resolved = runtime.with_runtime(mine)
    assert resolved.database_url == "postgresql://mine@db/x"
    assert resolved.redis_url == "redis://a"
    assert runtime.service_port("ingest", {"TESSERA_DATA_DIR": str(tmp_path), "TESSERA_INGEST_PORT": "1234"}) == 1234


def test_a_service_up_did_not_start_has_its_default_port(tmp_path: Path) -> None:
    runtime.write_runtime(Settings(data_dir=tmp_path), "postgresql://a@/a", "redis://a", {"ingest": 50999})
    assert runtime.service_port("identity", {"TESSERA_DATA_DIR": str(tmp_path)}) == 50052


def test_a_stopped_or_dead_up_is_ignored(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    runtime.write_runtime(settings, "postgresql://a@/a", "redis://a", {"ingest": 50999})
    runtime.clear_runtime(settings)
    assert runtime.with_runtime(settings).database_url is None
    assert not runtime.pointer_file().exists()

    runtime.write_runtime(settings, "postgresql://a@/a", "redis://a", {"ingest": 50999})
    data = runtime.runtime_file(settings).read_text().replace(f'"pid": {os.getpid()}', '"pid": 999999999')
    runtime.runtime_file(settings).write_text(data)
    runtime.pointer_file().write_text(data)
    assert runtime.with_runtime(settings).database_url is None
    assert runtime.service_port("ingest", {"TESSERA_DATA_DIR": str(tmp_path)}) == 50051
