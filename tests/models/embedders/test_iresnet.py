from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models.embedders.iresnet import (
    CHECKPOINT_SOURCES,
    IRESNET_LAYERS,
    IResNetConfig,
    IResNetEmbedder,
    load_state_file,
)
from models.seeding import make_generator, seeded_construction

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
SMALL = {"base_width": 8}  # tiny widths: the r18 layout at 1/8 of the published channels


def arcface_torch_shapes(layers: tuple[int, ...], width: int = 64, dim: int = 512, side: int = 7) -> dict:
    """Key -> shape of insightface arcface_torch's IResNet (backbones/iresnet.py), written out by hand.

    nizhib/pytorch-insightface's IResNet (insightface/iresnet.py) has the same modules under the
    same names (its avgpool and Dropout2d hold no parameters), so this is its layout too.
    """

    def bn(prefix: str, c: int) -> dict:
        return {f"{prefix}.{p}": (() if p == "num_batches_tracked" else (c,)) for p in BN}

    shapes = {"conv1.weight": (width, 3, 3, 3), "prelu.weight": (width,), **bn("bn1", width)}
    c_in = width
    for stage, depth in enumerate(layers, start=1):
        c = width * 2 ** (stage - 1)
        for b in range(depth):
            pre, c_block = f"layer{stage}.{b}", c_in if b == 0 else c
            shapes |= bn(f"{pre}.bn1", c_block) | bn(f"{pre}.bn2", c) | bn(f"{pre}.bn3", c)
            shapes |= {f"{pre}.conv1.weight": (c, c_block, 3, 3), f"{pre}.conv2.weight": (c, c, 3, 3)}
            shapes[f"{pre}.prelu.weight"] = (c,)
        shapes |= {f"layer{stage}.0.downsample.0.weight": (c, c_in, 1, 1)} | bn(f"layer{stage}.0.downsample.1", c)
        c_in = c
    shapes |= bn("bn2", c_in) | {"fc.weight": (dim, c_in * side * side), "fc.bias": (dim,)} | bn("features", dim)
    return shapes


def random_state(shapes: dict, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random weights of the given shapes; BatchNorm statistics plausible (variances > 0)."""
    g = make_generator(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            state[key] = g.uniform(shape, dtype=dtype) + 0.5
        elif key.endswith(("conv1.weight", "conv2.weight", "downsample.0.weight")):
            fan_in = shape[1] * shape[2] * shape[3]
            state[key] = g.normal(shape, dtype=dtype) * (2 / fan_in) ** 0.5
        elif key == "features.weight":
            state[key] = torch.ones(shape, dtype=dtype)  # frozen at 1 in arcface_torch
        elif key.endswith(".weight") and len(shape) == 1 and "prelu" not in key:
            state[key] = 1 + 0.1 * g.normal(shape, dtype=dtype)  # BatchNorm scale
        elif key == "fc.weight":
            state[key] = g.normal(shape, dtype=dtype) / shape[1] ** 0.5
        else:  # biases, running means, PReLU slopes
            state[key] = 0.1 * g.normal(shape, dtype=dtype) + (0.25 if "prelu" in key else 0)
    return state


def reference_embeddings(state: dict, x: torch.Tensor, layers: tuple[int, ...], eps: float) -> torch.Tensor:
    """arcface_torch's IResNet.forward written with torch.nn.functional over the state dict, normalised."""

    def bn(t: torch.Tensor, p: str) -> torch.Tensor:
        w, b, m, v = (state[f"{p}.{k}"] for k in BN[:4])
        return F.batch_norm(t, m, v, w, b, training=False, eps=eps)

    def conv(t: torch.Tensor, p: str, stride: int = 1) -> torch.Tensor:
        w = state[f"{p}.weight"]
        return F.conv2d(t, w, stride=stride, padding=w.shape[-1] // 2)

    h = F.prelu(bn(conv(x, "conv1"), "bn1"), state["prelu.weight"])
    for stage, depth in enumerate(layers, start=1):
        for b in range(depth):
            p, stride = f"layer{stage}.{b}", 2 if b == 0 else 1
            out = F.prelu(bn(conv(bn(h, f"{p}.bn1"), f"{p}.conv1"), f"{p}.bn2"), state[f"{p}.prelu.weight"])
            out = bn(conv(out, f"{p}.conv2", stride), f"{p}.bn3")
            shortcut = bn(conv(h, f"{p}.downsample.0", 2), f"{p}.downsample.1") if b == 0 else h
            h = out + shortcut
    h = F.linear(bn(h, "bn2").flatten(1), state["fc.weight"], state["fc.bias"])
    return F.normalize(bn(h, "features"), dim=1)


def pixels(n: int, seed: int, size: int = 112) -> torch.Tensor:
    return make_generator(seed).integers(256, (n, size, size, 3)).to(torch.uint8)


def test_parameter_names_match_arcface_torch_r18():
    model = IResNetEmbedder(IResNetConfig(layers=(2, 2, 2, 2)))
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == arcface_torch_shapes((2, 2, 2, 2))
    assert state["fc.weight"].shape == (512, 512 * 7 * 7)
    assert state["layer4.0.downsample.0.weight"].shape == (512, 256, 1, 1)


@pytest.mark.parametrize("name", ["r18", "r34", "r50", "r100", "r200"])
def test_published_architectures_on_meta(name):
    published = {"r18": (2, 2, 2, 2), "r34": (3, 4, 6, 3), "r50": (3, 4, 14, 3), "r100": (3, 13, 30, 3),
                 "r200": (6, 26, 60, 6)}  # arcface_torch backbones/iresnet.py iresnet18..iresnet200
    config = IResNetConfig.from_arch(name)
    assert config.layers == published[name] == IRESNET_LAYERS[name]
    with torch.device("meta"):
        model = IResNetEmbedder(config)
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == list(published[name])
    assert model.fc.in_features == 512 * 7 * 7 and model.embedding_dim == 512
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == arcface_torch_shapes(published[name])


def test_from_arch_sources():
    assert IResNetConfig.from_arch("r50", source="nizhib").bn_eps == 2e-5  # MXNet BatchNorm eps
    assert IResNetConfig.from_arch("r50", source="nizhib").input_std == 128.0  # (x - 127.5) / 128
    assert IResNetConfig.from_arch("r50", base_width=8).base_width == 8
    with pytest.raises(ValueError, match="name"):
        IResNetConfig.from_arch("r101")
    with pytest.raises(ValueError, match="source"):
        IResNetConfig.from_arch("r50", source="mxnet")


@pytest.fixture(scope="module")
def r18_state() -> dict[str, torch.Tensor]:
    return random_state(arcface_torch_shapes((2, 2, 2, 2), width=8), seed=11)


@pytest.mark.parametrize("layout", ["backbone.pth", "model.safetensors", "dataparallel.pth", "checkpoint_gpu_0.pt"])
def test_arcface_torch_checkpoint_matches_functional_forward(tmp_path, r18_state, layout):
    path = tmp_path / layout
    if layout == "model.safetensors":
        save_file({k: v for k, v in r18_state.items() if not k.endswith("num_batches_tracked")}, path)
    elif layout == "dataparallel.pth":
        torch.save({"state_dict": {f"module.{k}": v for k, v in r18_state.items()}}, path)
    elif layout == "checkpoint_gpu_0.pt":  # arcface_torch's training checkpoint
        torch.save({"epoch": 3, "global_step": 10, "state_dict_backbone": r18_state,
                    "state_dict_softmax_fc": {"weight_activated": torch.zeros(4, 512)}}, path)
    else:
        torch.save(r18_state, path)
    model = IResNetEmbedder.from_checkpoint(path, IResNetConfig.from_arch("r18", **SMALL))
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    images = pixels(3, seed=12)
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1  # [3, 3, 112, 112]
    expected = reference_embeddings(r18_state, x, (2, 2, 2, 2), eps=1e-5)  # [3, 512]
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.embed_images(images, batch_size=2), expected, atol=1e-5, rtol=0)


def test_nizhib_checkpoint_needs_its_own_conventions(tmp_path, r18_state):
    # nizhib's 2019 files: an OrderedDict from torch.save in the pre-1.6 (non-zip) format
    state64 = {k: v.double() if v.is_floating_point() else v for k, v in r18_state.items()}
    path = tmp_path / "iresnet18-nizhib.pth"
    torch.save(OrderedDict(r18_state), path, _use_new_zipfile_serialization=False)
    nizhib = IResNetEmbedder.from_checkpoint(
        path, IResNetConfig.from_arch("r18", source="nizhib", **SMALL), dtype=torch.float64
    )
    images = pixels(1, seed=13)
    raw = images.permute(0, 3, 1, 2).double()  # [1, 3, 112, 112], pixels
    expected = reference_embeddings(state64, (raw - 127.5) / 128, (2, 2, 2, 2), eps=2e-5)  # nizhib convert.py
    with torch.no_grad():
        got = nizhib(raw / 127.5 - 1)  # every entry point takes [-1, 1]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(nizhib.embed_images(images), expected.float(), atol=1e-6, rtol=0)
    arcface = IResNetEmbedder.from_checkpoint(path, IResNetConfig.from_arch("r18", **SMALL), dtype=torch.float64)
    with torch.no_grad():
        assert (arcface(raw / 127.5 - 1) - expected).abs().max() > 1e-6  # the conventions matter


def test_bad_checkpoints_are_named(tmp_path, r18_state):
    config = IResNetConfig.from_arch("r18", **SMALL)

    def load(state: dict) -> None:
        torch.save(state, tmp_path / "bad.pth")
        IResNetEmbedder.from_checkpoint(tmp_path / "bad.pth", config)

    missing = {k: v for k, v in r18_state.items() if k != "layer2.1.conv1.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['layer2.1.conv1.weight'\]"):
        load(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['head.weight'\]"):
        load(r18_state | {"head.weight": torch.zeros(3)})
    misshapen = r18_state | {"fc.weight": torch.zeros(512, 64 * 7 * 7 + 1)}
    with pytest.raises(ValueError, match=r"fc.weight: expected \(512, 3136\), found \(512, 3137\)"):
        load(misshapen)
    with pytest.raises(ValueError, match=r"missing keys \['layer1.2.bn1.weight', .*and \d+ more"):  # r18 file, r34
        IResNetEmbedder.from_checkpoint(tmp_path / "bad.pth", IResNetConfig.from_arch("r34", **SMALL))
    with pytest.raises(ValueError, match="path"):
        load_state_file(tmp_path / "weights.bin")
    torch.save({"conv1.weight": torch.zeros(1), "note": "text"}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match="note"):
        load_state_file(tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match="dtype"):
        IResNetEmbedder.from_checkpoint(tmp_path / "mixed.pth", config, dtype=torch.int8)


class RunsCode:
    """Unpickling this would open (create) a file: the kind of pickle weights_only must refuse."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickles_that_run_code_are_refused(tmp_path, r18_state):
    marker = tmp_path / "ran"
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": r18_state | {"conv1.weight": RunsCode(marker)}}, path)
    with pytest.raises(ValueError, match="refused"):
        load_state_file(path)
    with pytest.raises(ValueError, match="refused"):
        IResNetEmbedder.from_checkpoint(path, IResNetConfig.from_arch("r18", **SMALL))
    assert not marker.exists()


def test_gradient_matches_finite_differences(tmp_path):
    layers = (1, 1, 1, 1)
    config = IResNetConfig(layers=layers, base_width=4, input_size=32, embedding_dim=16)
    state = random_state(arcface_torch_shapes(layers, width=4, dim=16, side=2), seed=14, dtype=torch.float64)
    save_file({k: v for k, v in state.items()}, tmp_path / "model.safetensors")
    model = IResNetEmbedder.from_checkpoint(tmp_path / "model.safetensors", config, dtype=torch.float64)
    g = make_generator(15)
    x = (g.uniform(2, 3, 32, 32, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    target = F.normalize(g.normal(2, 16, dtype=torch.float64), dim=1)

    def loss(t: torch.Tensor) -> torch.Tensor:
        return (model(t) * target).sum()

    (grad,) = torch.autograd.grad(loss(x), x)
    assert grad.abs().sum() > 0
    h = 1e-6
    with torch.no_grad():
        for _ in range(3):
            v = g.normal(x.shape, dtype=torch.float64)
            numeric = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
            torch.testing.assert_close((grad * v).sum(), numeric, rtol=1e-6, atol=1e-9)


def test_bfloat16_trunk_keeps_float32_outputs(tmp_path, r18_state):
    save_file({k: v for k, v in r18_state.items()}, tmp_path / "model.safetensors")
    config = IResNetConfig.from_arch("r18", **SMALL)
    full = IResNetEmbedder.from_checkpoint(tmp_path / "model.safetensors", config)
    half = IResNetEmbedder.from_checkpoint(tmp_path / "model.safetensors", config, dtype=torch.bfloat16)
    assert half.conv1.weight.dtype == torch.bfloat16 and half.fc.weight.dtype == torch.float32
    images = pixels(3, seed=16)
    emb = half.embed_images(images)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))
    assert ((emb * full.embed_images(images)).sum(dim=1) > 0.98).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_on_cuda(tmp_path, r18_state, dtype):
    save_file({k: v for k, v in r18_state.items()}, tmp_path / "model.safetensors")
    config = IResNetConfig.from_arch("r18", **SMALL)
    cpu = IResNetEmbedder.from_checkpoint(tmp_path / "model.safetensors", config)
    cuda = IResNetEmbedder.from_checkpoint(tmp_path / "model.safetensors", config, device="cuda", dtype=dtype)
    images = pixels(4, seed=17)
    emb = cuda.embed_images(images)
    assert emb.dtype == torch.float32 and emb.device.type == "cpu"
    assert ((emb * cpu.embed_images(images)).sum(dim=1) > 0.99).all()
    x = (images.permute(0, 3, 1, 2).float().cuda() / 127.5 - 1).requires_grad_(True)
    out = cuda(x)
    assert out.dtype == torch.float32
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_embed_images_unit_norm(embedder):
    images = make_generator(0).integers(256, (5, 112, 112, 3)).to(torch.uint8)
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
    x = make_generator(2).uniform(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded(x), source.eval()(x), atol=1e-6)
    with pytest.raises(ValueError, match="unexpected"):
        loaded.load_arcface_state_dict(state | {"head.weight": torch.zeros(1)})


def test_gradients_flow_to_the_input(embedder):
    assert embedder.differentiable and embedder.input_size == 112
    x = (make_generator(3).uniform(2, 3, 112, 112) * 2 - 1).requires_grad_(True)
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


def test_global_rng_untouched_by_loading(tmp_path, r18_state):
    torch.save(r18_state, tmp_path / "backbone.pth")
    before = torch.random.get_rng_state()
    IResNetEmbedder.from_checkpoint(tmp_path / "backbone.pth", IResNetConfig.from_arch("r18", **SMALL))
    assert torch.equal(before, torch.random.get_rng_state())


# --- the fused view -------------------------------------------------------------------------------


def small_nizhib(tmp_path: Path, dtype: torch.dtype) -> tuple[IResNetEmbedder, dict, tuple[int, ...]]:
    """A small net with identity-shortcut blocks and nizhib conventions (eps 2e-5, input_std 128),
    random weights and BatchNorm statistics, PReLU slopes of either sign and above 1, loaded from a
    file: (model, its float64 state, layers)."""
    layers = (2, 1, 1, 2)
    config = IResNetConfig(layers=layers, base_width=4, input_size=32, embedding_dim=16, **CHECKPOINT_SOURCES["nizhib"])
    state = random_state(arcface_torch_shapes(layers, width=4, dim=16, side=2), seed=21, dtype=torch.float64)
    state["prelu.weight"][:2] = torch.tensor([-0.3, 1.5], dtype=torch.float64)
    state["layer1.1.prelu.weight"][:2] = torch.tensor([2.0, -1.0], dtype=torch.float64)
    save_file(state, tmp_path / "model.safetensors")
    return IResNetEmbedder.from_checkpoint(tmp_path / "model.safetensors", config, dtype=dtype), state, layers


def output_and_input_grad(model: torch.nn.Module, x: torch.Tensor, cotangent: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (grad,) = torch.autograd.grad(out, x, cotangent.to(out.dtype))
    return out.detach(), grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_fused_equals_the_plain_model_in_float64(tmp_path):
    model, state, layers = small_nizhib(tmp_path, torch.float64)
    fused = model.fused()
    assert not list(fused.parameters()) and fused.differentiable and fused.embedding_dim == 16
    g = make_generator(22)
    x = g.uniform(3, 3, 32, 32, dtype=torch.float64) * 2 - 1
    cotangent = g.normal(3, 16, dtype=torch.float64)
    out, grad = output_and_input_grad(fused, x, cotangent)
    plain_out, plain_grad = output_and_input_grad(model, x, cotangent)
    assert rel(out, plain_out) < 1e-12 and rel(grad, plain_grad) < 1e-12
    # and against arcface_torch's forward written out over the file's tensors (nizhib's input scaling)
    assert rel(out, reference_embeddings(state, x * (127.5 / 128), layers, eps=2e-5)) < 1e-12
    assert float(grad.abs().min()) >= 0 and float(grad.norm()) > 0
    with torch.inference_mode():  # the no-gradient path computes the same values
        assert rel(fused(x), out) < 1e-15
    model.bn2.running_mean.add_(0.5)  # a snapshot: later changes to the model do not reach it
    assert rel(output_and_input_grad(fused, x, cotangent)[0], out) == 0
    assert rel(output_and_input_grad(model, x, cotangent)[0], out) > 1e-3


def test_fused_equals_the_plain_model_in_float32(tmp_path, r18_state):
    # float32 runs oneDNN's channels_last kernels (float64 does not): each written-out backward is
    # checked against autograd through the same layer's forward ops, then the whole net.
    save_file({k: v for k, v in r18_state.items()}, tmp_path / "model.safetensors")
    model = IResNetEmbedder.from_checkpoint(tmp_path / "model.safetensors", IResNetConfig.from_arch("r18", **SMALL))
    fused = model.fused()
    g = make_generator(23)
    x = g.uniform(2, 3, 112, 112) * 2 - 1
    h = x.contiguous(memory_format=torch.channels_last)
    for layer in [fused.stem, *fused.blocks]:
        h = h.detach().requires_grad_(True)
        out = layer(h)  # the written-out backward
        cotangent = g.normal(out.shape).contiguous(memory_format=torch.channels_last)
        (grad,) = torch.autograd.grad(out, h, cotangent)
        (expected,) = torch.autograd.grad(layer.run(h)[0], h, cotangent)  # autograd through the same ops
        assert rel(grad, expected) < 1e-6
        h = out
    cotangent = g.normal(2, 512)
    out, grad = output_and_input_grad(fused, x, cotangent)
    plain_out, _ = output_and_input_grad(model, x, cotangent)
    truth_out, truth_grad = output_and_input_grad(model.double(), x.double(), cotangent.double())
    assert rel(out, plain_out) < 2e-6 and rel(out, truth_out) < 2e-6
    # The whole-net input gradient is not continuous: a PReLU input within float32 rounding of 0 can
    # take the other slope. Here the plain float32 model has one such flip (1.3e-2 off the float64
    # gradient) and the fused one none; the bound below only allows for such a flip.
    assert rel(grad, truth_grad) < 5e-2


def test_fused_keeps_far_less_for_the_backward(tmp_path):
    model, _, _ = small_nizhib(tmp_path, torch.float32)
    x = make_generator(24).uniform(2, 3, 32, 32) * 2 - 1

    def saved_bytes(m: torch.nn.Module) -> int:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.numel() > 16 * 16:  # activations, not weights of this net
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            m(x.clone().requires_grad_(True))
        return sum(seen.values())

    plain, fused = saved_bytes(model), saved_bytes(model.fused())
    assert 0 < fused < plain / 3  # the PReLU inputs only


def test_fused_precision_and_mode(tmp_path, r18_state):
    save_file({k: v for k, v in r18_state.items()}, tmp_path / "model.safetensors")
    config = IResNetConfig.from_arch("r18", **SMALL)
    half = IResNetEmbedder.from_checkpoint(tmp_path / "model.safetensors", config, dtype=torch.bfloat16)
    x = make_generator(25).uniform(2, 3, 112, 112) * 2 - 1
    with torch.no_grad():
        out, plain = half.fused()(x), half(x)
    assert out.dtype == torch.float32 and ((out * plain).sum(dim=1) > 0.995).all()
    with pytest.raises(ValueError, match="x"):
        half.fused()(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="eval"):
        half.train().fused()
