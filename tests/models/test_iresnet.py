import pytest
import torch
from safetensors.torch import save_file

from models.embedders.iresnet import IResNetConfig, IResNetEmbedder
from models.seeding import make_generator, seeded_construction


def arcface_torch_keys(layers: tuple[int, ...]) -> set[str]:
    """The state-dict keys of insightface arcface_torch's IResNet with these stage depths."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "prelu.weight", "fc.weight", "fc.bias"}
    keys |= {f"{m}.{p}" for m in ("bn1", "bn2", "features") for p in bn}
    for stage, depth in enumerate(layers, start=1):
        for b in range(depth):
            pre = f"layer{stage}.{b}"
            keys |= {f"{pre}.conv1.weight", f"{pre}.conv2.weight", f"{pre}.prelu.weight"}
            keys |= {f"{pre}.{m}.{p}" for m in ("bn1", "bn2", "bn3") for p in bn}
        keys |= {f"layer{stage}.0.downsample.0.weight"} | {f"layer{stage}.0.downsample.1.{p}" for p in bn}
    return keys


def test_parameter_names_match_arcface_torch_r18():
    model = IResNetEmbedder(IResNetConfig(layers=(2, 2, 2, 2)))
    state = model.state_dict()
    assert set(state) == arcface_torch_keys((2, 2, 2, 2))
    assert state["fc.weight"].shape == (512, 512 * 7 * 7)
    assert state["layer4.0.downsample.0.weight"].shape == (512, 256, 1, 1)


def test_embed_images_unit_norm(embedder):
    images = torch.randint(0, 256, (5, 112, 112, 3), dtype=torch.uint8, generator=make_generator(0))
    emb = embedder.embed_images(images, batch_size=2)
    assert emb.shape == (5, 512) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=1), torch.ones(5), atol=1e-5)
    assert (emb @ emb.T - torch.eye(5)).abs().max() < 0.99  # distinct images, distinct embeddings
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1  # [B, 3, 112, 112] in [-1, 1]
    with torch.no_grad():
        assert torch.allclose(embedder(x), emb, atol=1e-5)


def test_arcface_torch_state_dict_loads(tmp_path):
    config = IResNetConfig(layers=(1, 2, 1, 1), base_width=8)
    with seeded_construction(1):
        source = IResNetEmbedder(config)
    # converted insightface checkpoints may lack BatchNorm's num_batches_tracked
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"layers": [1, 2, 1, 1], "base_width": 8}')
    loaded = IResNetEmbedder.from_pretrained(tmp_path)
    x = torch.rand(2, 3, 112, 112, generator=make_generator(2)) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded(x), source.eval()(x), atol=1e-6)
    with pytest.raises(ValueError, match="unexpected"):
        loaded.load_arcface_state_dict(state | {"head.weight": torch.zeros(1)})


def test_gradients_flow_to_the_input(embedder):
    x = (torch.rand(2, 3, 112, 112, generator=make_generator(3)) * 2 - 1).requires_grad_(True)
    target = torch.nn.functional.normalize(torch.ones(1, 512), dim=1)
    (embedder(x) * target).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_rejects_bad_input(embedder):
    with pytest.raises(ValueError, match="x"):
        embedder(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="images"):
        embedder.embed_images(torch.zeros(1, 112, 112, 3))  # float, not uint8
    with pytest.raises(ValueError, match="layers"):
        IResNetConfig(layers=(1, 1, 1))
