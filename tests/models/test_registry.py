import contextlib
import glob
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from app.catalog import CATALOG
from models import presets, registry
from models.generators import arc2face
from models.presets.__main__ import main as presets_main
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
        if spec.tiny:  # idforge pins what it ships; published weights are pinned by the operator
            assert all(len(f.sha256) == 64 and int(f.sha256, 16) >= 0 for f in spec.required().values())
            assert spec.build is not None  # the recipe that made the shipped bytes
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


def test_tiny_build_depends_on_its_seed_and_leaves_global_rng_alone(tmp_path):
    # The recipe's bytes are pinned only where the numerics match the machine that made the
    # shipped files (`python -m models.presets build` says which); what holds everywhere is this.
    before = torch.random.get_rng_state()
    arc2face.build_tiny(tmp_path / "seed0", seed=0)
    assert torch.equal(before, torch.random.get_rng_state())
    arc2face.build_tiny(tmp_path / "seed1", seed=1)
    rel = "encoder/model.safetensors"
    assert registry.file_sha256(tmp_path / "seed0" / rel) != registry.file_sha256(tmp_path / "seed1" / rel)


def test_the_shipped_presets_match_their_pins():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert presets_main(["check"]) == 0
    assert "all shipped files match their pins" in out.getvalue()
    for name, spec in registry.SPECS.items():
        if spec.tiny:
            result = Registry(presets.PRESETS_DIR).verify(name)  # laid out like a model directory
            assert result.root == presets.PRESETS_DIR / name
            assert result.ok, result.reason


def test_the_shipped_presets_are_package_data_and_binary_in_git():
    root = Path(presets.__file__).resolve().parents[2]
    config = tomllib.loads((root / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["models"]
    packaged = {  # what setuptools adds to a wheel: recursive globs relative to the package
        path for pattern in patterns
        for path in glob.glob(pattern, root_dir=root / "models", recursive=True)
        if (root / "models" / path).is_file()
    }
    shipped = {f"presets/{name}/{rel}" for name, spec in registry.SPECS.items() if spec.tiny
               for rel in spec.required()}
    assert shipped <= packaged, sorted(shipped - packaged)
    assert not [p for p in packaged if "__pycache__" in p or p.endswith(".py")]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout: .gitattributes does not apply")
    files = sorted(f"models/{p}" for p in shipped)
    attrs = subprocess.run(["git", "check-attr", "text", "diff", "--", *files],
                           cwd=root, capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(attrs) == 2 * len(shipped) and all(line.endswith(": unset") for line in attrs), attrs


def test_the_build_command_prints_each_rebuilt_file_beside_its_pin(tmp_path):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = presets_main(["build", "--out", str(tmp_path), "iresnet-tiny"])
    text = out.getvalue()
    spec = registry.SPECS["iresnet-tiny"]
    same = []
    for rel, f in spec.files.items():
        built = registry.hash_file(tmp_path / "iresnet-tiny" / rel)
        assert f"    built   {built}\n    pin     {f.sha256}" in text
        same.append(built == f.sha256)
        assert f"{rel}: {'ok' if built == f.sha256 else 'DIFFERS'}" in text
    assert code == (0 if all(same) else 1)
    assert "match the pins only on a machine with the same numerics" in text
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit, match="exists"):
        presets_main(["build", "--out", str(tmp_path), "iresnet-tiny"])  # never over an existing preset


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
        ensure_model("iresnet-tiny", tampered_dir)  # an existing, tampered model is never replaced
    with pytest.raises(ModelUnavailable):
        weights_sha256("iresnet-tiny", tampered_dir)


def test_missing_file_fails_verify(model_dir, tmp_path):
    shutil.copytree(model_dir / "arc2face-tiny", tmp_path / "arc2face-tiny")
    (tmp_path / "arc2face-tiny/tokenizer/merges.txt").unlink()
    result = verify("arc2face-tiny", tmp_path)
    assert not result.ok and "missing from" in result.reason and "tokenizer/merges.txt" in result.reason
    assert result.missing == ("tokenizer/merges.txt",)
    assert "tokenizer/merges.txt" not in result.sha256


def test_ensure_model_copies_a_missing_tiny_preset_from_the_shipped_files(tmp_path):
    path = ensure_model("iresnet-tiny", tmp_path / "store")
    assert path == tmp_path / "store" / "iresnet-tiny"
    assert verify("iresnet-tiny", tmp_path / "store").ok
    assert [p.name for p in (tmp_path / "store").iterdir()] == ["iresnet-tiny"]  # no staging left over
    for rel in registry.SPECS["iresnet-tiny"].files:
        assert (path / rel).read_bytes() == (presets.PRESETS_DIR / "iresnet-tiny" / rel).read_bytes()
    assert ensure_model("iresnet-tiny", tmp_path / "store") == path


def test_a_preset_comes_only_from_shipped_files_that_match_their_pins(tmp_path):
    # Nothing shipped (an installation without its package data): refused, never built instead.
    reg = Registry(tmp_path / "store", presets=tmp_path / "no-presets")
    with pytest.raises(ModelUnavailable, match="shipped preset file.* missing from .*no-presets") as info:
        reg.ensure("iresnet-tiny")
    assert "model.safetensors" in info.value.reason and "config.json" in info.value.reason
    assert list((tmp_path / "store").iterdir()) == []  # no model, no staging left over

    # A shipped file that does not match its pin (a corrupted installation) is never put in place.
    shipped = tmp_path / "bad-presets"
    shutil.copytree(presets.PRESETS_DIR / "iresnet-tiny", shipped / "iresnet-tiny")
    with (shipped / "iresnet-tiny" / "config.json").open("ab") as f:
        f.write(b"\n")
    reg = Registry(tmp_path / "store", presets=shipped)
    with pytest.raises(ModelUnavailable, match="config.json: sha256 .* does not match the pinned") as info:
        reg.ensure("iresnet-tiny")
    assert "model.safetensors" not in info.value.reason  # the intact file is not blamed
    assert list((tmp_path / "store").iterdir()) == []

    # The same files, intact, come from wherever `presets` points.
    shutil.copyfile(presets.PRESETS_DIR / "iresnet-tiny/config.json", shipped / "iresnet-tiny/config.json")
    assert reg.ensure("iresnet-tiny") == tmp_path / "store" / "iresnet-tiny"
    assert reg.verify("iresnet-tiny").ok


def test_wrong_kind_or_unknown_name(model_dir):
    with pytest.raises(ValueError, match="name"):
        load_embedder("arc2face-tiny", model_dir)
    with pytest.raises(ValueError, match="name"):
        verify("no-such-model", model_dir)


def test_models_never_import_the_service():
    code = (
        "import sys, models.registry, models.sampling.random, models.sampling.embedding_noise, models.alignment.template\n"
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
