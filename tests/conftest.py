"""Shared fixtures. Heavier fixture families live in tests/fixtures/ and load as plugins."""

from __future__ import annotations

from pathlib import Path

import pytest

from gstalker_core.config import load_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

pytest_plugins = ["tests.fixtures.s3server", "tests.fixtures.media", "tests.fixtures.speaker", "tests.fixtures.offline"]


@pytest.fixture
def tiny_config(tmp_path):
    """Factory: the tiny profile with its home (local store + cache) in a temp dir."""

    def make(*overrides: str):
        return load_config("tiny", overrides=[f"home={tmp_path / 'home'}", *overrides], environ={})

    return make


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "cnn_anchor_71s.mp4").is_file():
        pytest.skip(f"sample media not found at {SHARED_DATA} (CI and dev machines have it)")
    return SHARED_DATA
