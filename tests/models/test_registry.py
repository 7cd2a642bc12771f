import shutil
import subprocess
import sys

import pytest
import torch

from app.catalog import CATALOG
from models import registry
from models.generators import arc2face
from models.registry import (
    ModelUnavailable,
    ensure_model,
    load_embedder,
    load_generator,
    verify,
    weights_sha256,
)


def test_registry_matches_the_public_catalogue():
    assert set(registry.SPECS) == set(CATALOG)
    for name, spec in registry.SPECS.items():
        entry = CATALOG[name]
        assert (spec.name, spec.kind, spec.family, spec.tiny) == (name, entry.kind, entry.family, entry.tiny)
        assert spec.license and spec.files
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in spec.files.values())
        assert spec.build is not None or not spec.tiny


def test_tiny_presets_verify_against_the_pins(model_dir):
    for name, spec in registry.SPECS.items():
        result = verify(name, model_dir)
        assert result.ok and result.reason is None
        assert result.sha256 == dict(spec.files)
        assert weights_sha256(name, model_dir) == dict(spec.files)


def test_tiny_build_is_deterministic_and_leaves_global_rng_alone(tmp_path):
    before = torch.random.get_rng_state()
    arc2face.build_tiny(tmp_path / "arc2face-tiny", seed=0)
    assert torch.equal(before, torch.random.get_rng_state())
    result = verify("arc2face-tiny", tmp_path)
    assert result.ok, result.reason
    arc2face.build_tiny(tmp_path / "other", seed=1)
    other = registry.file_sha256(tmp_path / "other" / "encoder" / "model.safetensors")
    assert other != registry.SPECS["arc2face-tiny"].files["encoder/model.safetensors"]


@pytest.fixture
def tampered_dir(model_dir, tmp_path):
    shutil.copytree(model_dir / "arc2face-tiny", tmp_path / "arc2face-tiny")
    shutil.copytree(model_dir / "iresnet-tiny", tmp_path / "iresnet-tiny")
    for rel in ("arc2face-tiny/encoder/model.safetensors", "iresnet-tiny/model.safetensors"):
        path = tmp_path / rel
        data = bytearray(path.read_bytes())
        data[-1] ^= 0x01  # flip one bit of the last weight
        path.write_bytes(bytes(data))
    return tmp_path


def test_tampered_file_fails_verify_and_load(tampered_dir):
    result = verify("arc2face-tiny", tampered_dir)
    pinned = registry.SPECS["arc2face-tiny"].files["encoder/model.safetensors"]
    actual = registry.file_sha256(tampered_dir / "arc2face-tiny/encoder/model.safetensors")
    assert not result.ok
    assert "encoder/model.safetensors" in result.reason
    assert pinned in result.reason and actual in result.reason
    assert "vae/" not in result.reason  # untouched files are not blamed
    with pytest.raises(ModelUnavailable, match="encoder/model.safetensors") as info:
        load_generator("arc2face-tiny", tampered_dir)
    assert info.value.name == "arc2face-tiny"
    with pytest.raises(ModelUnavailable):
        load_embedder("iresnet-tiny", tampered_dir)
    with pytest.raises(ModelUnavailable):
        ensure_model("iresnet-tiny", tampered_dir)  # an existing, tampered model is never rebuilt
    with pytest.raises(ModelUnavailable):
        weights_sha256("iresnet-tiny", tampered_dir)


def test_missing_file_fails_verify(model_dir, tmp_path):
    shutil.copytree(model_dir / "arc2face-tiny", tmp_path / "arc2face-tiny")
    (tmp_path / "arc2face-tiny/tokenizer/merges.txt").unlink()
    result = verify("arc2face-tiny", tmp_path)
    assert not result.ok and "tokenizer/merges.txt: missing" in result.reason
    assert "tokenizer/merges.txt" not in result.sha256


def test_ensure_model_builds_a_missing_tiny_preset(tmp_path):
    path = ensure_model("iresnet-tiny", tmp_path / "store")
    assert path == tmp_path / "store" / "iresnet-tiny"
    assert verify("iresnet-tiny", tmp_path / "store").ok
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["iresnet-tiny"]  # no staging left over
    assert ensure_model("iresnet-tiny", tmp_path / "store") == path


def test_wrong_kind_or_unknown_name(model_dir):
    with pytest.raises(ValueError, match="name"):
        load_embedder("arc2face-tiny", model_dir)
    with pytest.raises(ValueError, match="name"):
        verify("no-such-model", model_dir)


def test_models_never_import_the_service():
    code = (
        "import sys, models.registry, models.sampling.random, models.sampling.variations, models.align\n"
        "bad = [m for m in ('fastapi', 'celery', 'redis', 'boto3', 'app', 'workers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
