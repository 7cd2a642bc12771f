from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from app.jobstore import JobStore  # noqa: E402
from app.servers import RedisServer  # noqa: E402

TEAM_KEYS = "alpha:key-alpha,beta:key-beta"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    srv = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield srv
    srv.stop()


@pytest.fixture
def store(redis_server: RedisServer) -> JobStore:
    s = JobStore.from_url(redis_server.url)
    s.r.flushdb()
    return s


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model directory for the session: tiny presets are built into it once."""
    return tmp_path_factory.mktemp("models")
