"""Fixtures for the models tests: the shipped tiny presets, copied into a model directory once per session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from models import registry  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory holding every tiny preset, copied from models/presets (not downloaded) and verified."""
    root = tmp_path_factory.mktemp("models")
    for name, spec in registry.SPECS.items():
        if spec.tiny:
            registry.ensure_model(name, root)
    return root


@pytest.fixture(scope="session")
def generator(model_dir: Path) -> "registry.Arc2FaceGenerator":
    return registry.load_generator("arc2face-tiny", model_dir)


@pytest.fixture(scope="session")
def embedder(model_dir: Path) -> "registry.IResNetEmbedder":
    return registry.load_embedder("iresnet-tiny", model_dir)
