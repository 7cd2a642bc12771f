import dataclasses
import hashlib
import json
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
    Registry,
    ensure_model,
    load_embedder,
    load_generator,
    load_overrides,
    verify,
    weights_sha256,
)


def test_registry_matches_the_public_catalogue():
    assert set(registry.SPECS) == set(CATALOG)
    for name, spec in registry.SPECS.items():
        entry = CATALOG[name]
        assert (spec.name, spec.kind, spec.family, spec.tiny) == (name, entry.kind, entry.family, entry.tiny)
        assert spec.license and spec.files
        if spec.tiny:  # idforge pins what it builds; published weights are pinned by the operator
            assert all(len(f.sha256) == 64 and int(f.sha256, 16) >= 0 for f in spec.required().values())
            assert spec.build is not None
        else:
            assert spec.build is None and all(f.what for f in spec.files.values())


def test_tiny_presets_verify_against_the_pins(model_dir):
    for name, spec in registry.SPECS.items():
        if not spec.tiny:
            continue
        result = verify(name, model_dir)
        assert result.ok and result.reason is None
        pins = {rel: f.sha256 for rel, f in spec.required().items()}
        assert result.sha256 == pins
        assert weights_sha256(name, model_dir) == pins


def test_tiny_build_is_deterministic_and_leaves_global_rng_alone(tmp_path):
    before = torch.random.get_rng_state()
    arc2face.build_tiny(tmp_path / "arc2face-tiny", seed=0)
    assert torch.equal(before, torch.random.get_rng_state())
    result = verify("arc2face-tiny", tmp_path)
    assert result.ok, result.reason
    arc2face.build_tiny(tmp_path / "other", seed=1)
    other = registry.file_sha256(tmp_path / "other" / "encoder" / "model.safetensors")
    assert other != registry.SPECS["arc2face-tiny"].files["encoder/model.safetensors"].sha256


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
    pinned = registry.SPECS["arc2face-tiny"].files["encoder/model.safetensors"].sha256
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
    assert not result.ok and "missing from" in result.reason and "tokenizer/merges.txt" in result.reason
    assert result.missing == ("tokenizer/merges.txt",)
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


# ---- published models: operator pins, locations, clear refusals ------------------------------


def _registry_file(tmp_path, models):
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"models": models}))
    return path


def test_a_published_model_without_its_files_names_them_and_where_they_go(tmp_path):
    result = Registry(tmp_path).verify("arc2face")
    assert not result.ok
    assert "arc2face/diffusion_pytorch_model.safetensors" in result.missing
    assert "lcm-lora/pytorch_lora_weights.safetensors" not in result.missing  # optional
    assert str(tmp_path / "arc2face") in result.reason
    assert "FoivosPar/Arc2Face" in result.reason and "Stable Diffusion 1.5" in result.reason
    with pytest.raises(ModelUnavailable, match="backbone.pth") as info:
        Registry(tmp_path).ensure("arcface-r100")
    assert "arcface_torch" in info.value.reason


def test_a_file_in_place_but_unpinned_is_refused_until_the_operator_pins_it(tmp_path):
    (tmp_path / "arcface-r18").mkdir()
    weights = tmp_path / "arcface-r18" / "backbone.pth"
    weights.write_bytes(b"published weights")
    result = Registry(tmp_path).verify("arcface-r18")
    assert not result.ok and "no sha256 is pinned" in result.reason
    assert "idforge models pin arcface-r18" in result.reason

    entry = Registry(tmp_path).pin_entry("arcface-r18")
    digest = hashlib.sha256(b"published weights").hexdigest()
    assert entry == {"models": {"arcface-r18": {"sha256": {"backbone.pth": digest}}}}
    specs = load_overrides(_registry_file(tmp_path, entry["models"]))
    assert Registry(tmp_path, specs).verify("arcface-r18").ok
    assert Registry(tmp_path, specs).weights_sha256("arcface-r18") == {"backbone.pth": digest}

    weights.write_bytes(b"published weightz")  # replaced after pinning
    result = Registry(tmp_path, specs).verify("arcface-r18")
    assert not result.ok and f"does not match the pinned {digest}" in result.reason


def test_registry_file_yaml_and_its_errors_name_the_entry(tmp_path):
    digest = "ab" * 32
    path = tmp_path / "registry.yaml"
    path.write_text(f"models:\n  arcface-onnx:\n    location: s3://weights/arcface/\n"
                    f"    sha256:\n      arcface.onnx: {digest.upper()}\n")
    spec = load_overrides(path)["arcface-onnx"]
    assert spec.location == "s3://weights/arcface/" and spec.files["arcface.onnx"].sha256 == digest
    assert registry.SPECS["arcface-onnx"].files["arcface.onnx"].sha256 is None  # the table is untouched

    tiny_pin = registry.SPECS["iresnet-tiny"].files["model.safetensors"].sha256
    for models, match in (
        ({"no-such": {}}, "models.no-such: unknown model"),
        ({"arcface-onnx": {"sha256": {"other.onnx": digest}}}, "sha256.other.onnx: not a file"),
        ({"arcface-onnx": {"sha256": {"arcface.onnx": "12ab"}}}, "expected 64 hex digits"),
        ({"iresnet-tiny": {"sha256": {"model.safetensors": digest}}}, f"idforge pins {tiny_pin}"),
        ({"arcface-onnx": {"location": "relative/dir"}}, "location: expected an absolute directory"),
        ({"arcface-onnx": {"weights": "x"}}, "expected a mapping with 'location'"),
    ):
        with pytest.raises(ValueError, match=match):
            load_overrides(_registry_file(tmp_path, models))


def test_a_model_in_another_directory_is_read_in_place(tmp_path, model_dir):
    elsewhere = tmp_path / "mounted" / "weights"
    shutil.copytree(model_dir / "iresnet-tiny", elsewhere)
    specs = load_overrides(_registry_file(tmp_path, {"iresnet-tiny": {"location": str(elsewhere)}}))
    reg = Registry(tmp_path / "empty", specs)
    assert reg.root("iresnet-tiny") == elsewhere and reg.verify("iresnet-tiny").ok
    emb = reg.load("iresnet-tiny", "cpu", "embedder")
    assert emb.embedding_dim == 512
    assert not (tmp_path / "empty").exists()  # nothing built or copied


def test_an_s3_model_is_fetched_against_its_pins(tmp_path, model_dir):
    source = model_dir / "iresnet-tiny"
    objects = {f"s3://weights/tiny/{p.name}": p for p in source.iterdir()}
    fetched: list[str] = []

    def fetch(uri, dest):
        fetched.append(uri)
        if uri not in objects:
            raise FileNotFoundError(uri)
        shutil.copyfile(objects[uri], dest)

    specs = load_overrides(_registry_file(tmp_path, {"iresnet-tiny": {"location": "s3://weights/tiny/"}}))
    specs["iresnet-tiny"] = dataclasses.replace(specs["iresnet-tiny"], build=None)  # fetch, not build
    reg = Registry(tmp_path / "cache", specs, fetch=fetch)
    assert reg.ensure("iresnet-tiny") == tmp_path / "cache" / "iresnet-tiny"
    assert sorted(fetched) == ["s3://weights/tiny/config.json", "s3://weights/tiny/model.safetensors"]
    assert reg.verify("iresnet-tiny").ok
    reg.ensure("iresnet-tiny")
    assert len(fetched) == 2  # in place now: not fetched again

    objects["s3://weights/tiny/model.safetensors"] = model_dir / "arc2face-tiny" / "tokenizer" / "vocab.json"
    reg2 = Registry(tmp_path / "cache2", specs, fetch=fetch)
    with pytest.raises(ModelUnavailable, match="does not match the pinned"):
        reg2.ensure("iresnet-tiny")
    assert not (tmp_path / "cache2" / "iresnet-tiny" / "model.safetensors").exists()  # nothing kept
    del objects["s3://weights/tiny/model.safetensors"]
    with pytest.raises(ModelUnavailable, match="not found at s3://weights/tiny/model.safetensors"):
        reg2.ensure("iresnet-tiny")


def test_tiny_presets_match_their_pins_at_other_thread_counts(tmp_path):
    """Computed values in the presets (BatchNorm statistics, the mean latent, the covariates' fit)
    are float64 and rounded: a worker with another core count builds the same bytes."""
    code = (
        "import sys, torch\n"
        "torch.set_num_threads(int(sys.argv[2]))\n"
        "from models.registry import Registry, SPECS\n"
        "reg = Registry(sys.argv[1])\n"
        "for name, spec in SPECS.items():\n"
        "    if spec.tiny:\n"
        "        reg.ensure(name)\n"  # builds, then verifies against the pins
    )
    for threads in (1, 3):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"t{threads}"), str(threads)],
                       check=True, timeout=300)
