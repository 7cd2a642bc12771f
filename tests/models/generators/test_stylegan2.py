"""StyleGAN2 generator: rosinality checkpoint layout, loading, and outputs against a plain reference.

The checkpoints here are written by the test from rosinality/stylegan2-pytorch's key names and
shapes (spelled out below, not taken from our module), filled with random values, saved with
torch.save and read back by the real loader. The reference forward is a per-sample loop of plain
F.conv2d calls: demodulation applied to the weights, upsampling by explicit zero insertion and a
full convolution, blur as two 1-D passes.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.generators.stylegan2 import (
    CHECKPOINT_FILE,
    CONFIG_256,
    CONFIG_1024,
    CONFIG_TINY,
    StyleGAN2Config,
    StyleGAN2Generator,
    build_tiny,
)
from models.seeding import make_generator

TAPS = torch.tensor([1.0, 3.0, 3.0, 1.0])  # the default blur taps
ROSINALITY_CHANNELS = {
    4: 512,
    8: 512,
    16: 512,
    32: 512,
    64: 512,
    128: 256,
    256: 128,
    512: 64,
    1024: 32,
}  # m=2
TINY_CHANNELS = {4: 32, 8: 32, 16: 16, 32: 16}  # CONFIG_TINY


def rosinality_layout(size: int, dim: int, n_mlp: int, ch: dict[int, int]) -> dict[str, tuple[int, ...]]:
    """Key -> shape of rosinality's Generator(size, dim, n_mlp).state_dict()."""
    keys: dict[str, tuple[int, ...]] = {}
    for i in range(1, n_mlp + 1):
        keys[f"style.{i}.weight"], keys[f"style.{i}.bias"] = (dim, dim), (dim,)
    keys["input.input"] = (1, ch[4], 4, 4)

    def modconv(p: str, cin: int, cout: int, k: int) -> None:
        keys[f"{p}.weight"] = (1, cout, cin, k, k)
        keys[f"{p}.modulation.weight"], keys[f"{p}.modulation.bias"] = (cin, dim), (cin,)

    def styled(p: str, cin: int, cout: int, up: bool) -> None:
        modconv(f"{p}.conv", cin, cout, 3)
        if up:
            keys[f"{p}.conv.blur.kernel"] = (4, 4)
        keys[f"{p}.noise.weight"], keys[f"{p}.activate.bias"] = (1,), (cout,)

    def to_rgb(p: str, cin: int, up: bool) -> None:
        keys[f"{p}.bias"] = (1, 3, 1, 1)
        modconv(f"{p}.conv", cin, 3, 1)
        if up:
            keys[f"{p}.upsample.kernel"] = (4, 4)

    styled("conv1", ch[4], ch[4], False)
    to_rgb("to_rgb1", ch[4], False)
    log = int(math.log2(size))
    for k, res in enumerate(2**i for i in range(3, log + 1)):
        styled(f"convs.{2 * k}", ch[res // 2], ch[res], True)
        styled(f"convs.{2 * k + 1}", ch[res], ch[res], False)
        to_rgb(f"to_rgbs.{k}", ch[res], True)
    for i in range(2 * (log - 2) + 1):
        side = 4 * 2 ** ((i + 1) // 2)
        keys[f"noises.noise_{i}"] = (1, 1, side, side)
    return keys


def random_checkpoint(layout: dict[str, tuple[int, ...]], dim: int, seed: int) -> dict[str, object]:
    """A rosinality-format checkpoint with random values everywhere except the blur kernels."""
    g = make_generator(seed)
    sd = {}
    for key, shape in layout.items():
        x = g.normal(shape)
        if key.endswith("kernel"):
            x = torch.outer(TAPS, TAPS) / 64 * 4  # 2x up-sampling FIR, gain 4
        elif key.endswith("modulation.bias"):
            x = 1 + 0.3 * x
        elif key.endswith(("bias", "noise.weight")):
            x = 0.3 * x
        sd[key] = x
    latent_avg = 0.5 * g.normal(dim)  # [D]
    # rosinality's training checkpoints also hold "g", "d" and optimiser states: ignored by the loader
    return {"g_ema": sd, "latent_avg": latent_avg, "d": {"w": torch.zeros(3)}, "g_optim": {"state": {}}}


# ---- the reference forward: one sample at a time, plain ops -------------------------------------


def ref_mapping(sd: dict, z: torch.Tensor, n_mlp: int) -> torch.Tensor:
    dim = z.shape[0]
    w = z / torch.sqrt((z**2).mean() + 1e-8)
    for i in range(1, n_mlp + 1):
        w = sd[f"style.{i}.weight"] * (0.01 / math.sqrt(dim)) @ w + 0.01 * sd[f"style.{i}.bias"]
        w = torch.where(w >= 0, w, 0.2 * w) * math.sqrt(2)
    return w


def ref_fir_2x(x: torch.Tensor, pad0: int, pad1: int) -> torch.Tensor:
    """Pad [C, H, W] by (pad0, pad1) and filter rows then columns with [1,3,3,1] / 8 * 2 (symmetric)."""
    x = F.pad(x, (pad0, pad1, pad0, pad1))
    f = TAPS / TAPS.sum() * 2
    n = x.shape[1] - 3
    x = sum(f[t] * x[:, t : t + n, :] for t in range(4))
    return sum(f[t] * x[:, :, t : t + n] for t in range(4))


def ref_modconv(sd: dict, p: str, x: torch.Tensor, w: torch.Tensor, demod: bool, up: bool) -> torch.Tensor:
    weight = sd[f"{p}.weight"][0]  # [out, in, k, k]
    cin, k = weight.shape[1], weight.shape[2]
    s = sd[f"{p}.modulation.weight"] @ w / math.sqrt(w.shape[0]) + sd[f"{p}.modulation.bias"]  # [in]
    weight = weight / math.sqrt(cin * k * k) * s[None, :, None, None]
    if demod:
        weight = weight / torch.sqrt((weight**2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
    if not up:
        return F.conv2d(x[None], weight, padding=k // 2)[0]
    h, wd = x.shape[1:]
    holes = x.new_zeros(cin, 2 * h - 1, 2 * wd - 1)
    holes[:, ::2, ::2] = x  # transposed stride-2 conv = zero insertion + full convolution
    out = F.conv2d(holes[None], weight.flip(2, 3), padding=k - 1)[0]  # [out, 2h + 1, 2w + 1]
    return ref_fir_2x(out, 1, 1)  # [out, 2h, 2w]


def ref_styled(sd: dict, p: str, x, w, noise, up: bool) -> torch.Tensor:
    out = ref_modconv(sd, f"{p}.conv", x, w, demod=True, up=up) + sd[f"{p}.noise.weight"] * noise[0]
    out = out + sd[f"{p}.activate.bias"][:, None, None]
    return torch.where(out >= 0, out, 0.2 * out) * math.sqrt(2)


def ref_to_rgb(sd: dict, p: str, x, w, skip) -> torch.Tensor:
    out = ref_modconv(sd, f"{p}.conv", x, w, demod=False, up=False) + sd[f"{p}.bias"][0]
    if skip is not None:
        holes = skip.new_zeros(3, 2 * skip.shape[1], 2 * skip.shape[2])
        holes[:, ::2, ::2] = skip
        out = out + ref_fir_2x(holes, 2, 1)
    return out


def ref_synthesis(sd: dict, wplus: torch.Tensor) -> torch.Tensor:
    """One image [3, S, S] from W+ [L, D] with the checkpoint's constant noise."""
    n_conv = sum(1 for k in sd if k.startswith("convs.") and k.endswith(".conv.weight"))
    x = ref_styled(sd, "conv1", sd["input.input"][0], wplus[0], sd["noises.noise_0"], up=False)
    img = ref_to_rgb(sd, "to_rgb1", x, wplus[1], None)
    for k in range(n_conv // 2):
        i = 2 * k + 1
        x = ref_styled(sd, f"convs.{2 * k}", x, wplus[i], sd[f"noises.noise_{i}"], up=True)
        x = ref_styled(sd, f"convs.{2 * k + 1}", x, wplus[i + 1], sd[f"noises.noise_{i + 1}"], up=False)
        img = ref_to_rgb(sd, f"to_rgbs.{k}", x, wplus[i + 2], img)
    return img


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt() -> dict:
    return random_checkpoint(rosinality_layout(32, 64, 2, TINY_CHANNELS), 64, seed=1)


@pytest.fixture(scope="module")
def ckpt_file(ckpt: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sg2") / "rosinality.pt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def gen(ckpt_file: Path) -> StyleGAN2Generator:
    return StyleGAN2Generator.from_checkpoint(ckpt_file, CONFIG_TINY)


# ---- tests -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("config", "n_latent"), [(CONFIG_256, 14), (CONFIG_1024, 18)])
def test_real_configs_have_rosinality_keys_and_shapes(config: StyleGAN2Config, n_latent: int) -> None:
    with torch.device("meta"):
        model = StyleGAN2Generator(config)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = rosinality_layout(config.size, 512, 8, ROSINALITY_CHANNELS)
    assert got == want
    log = int(math.log2(config.size))
    assert len(model.convs) == 2 * (log - 2) and len(model.to_rgbs) == log - 2
    assert sum(k.startswith("noises.") for k in got) == 2 * (log - 2) + 1
    assert model.n_latent == config.n_latent == n_latent
    assert model.style[1].weight.shape == (512, 512) and len(model.style) == 9


def test_matches_reference_forward(gen: StyleGAN2Generator, ckpt: dict) -> None:
    sd, avg = ckpt["g_ema"], ckpt["latent_avg"]
    z = make_generator(2).normal(3, 64)  # [3, 64]
    with torch.no_grad():
        out = gen(z, truncation_psi=0.7)  # [3, 3, 32, 32]
        wplus = make_generator(3).normal(2, 8, 64)  # [2, L, 64]
        out_plus = gen.synthesis(wplus)
    ref = torch.stack(
        [ref_synthesis(sd, (avg + 0.7 * (ref_mapping(sd, zi, 2) - avg))[None].expand(8, -1)) for zi in z]
    )
    ref_plus = torch.stack([ref_synthesis(sd, wp) for wp in wplus])
    assert out.shape == (3, 3, 32, 32) and ref.abs().max() > 0.5
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out_plus, ref_plus, atol=1e-4, rtol=1e-4)


def test_w_and_wplus_agree_and_batch_rows_are_independent(gen: StyleGAN2Generator) -> None:
    w = gen.mapping(make_generator(4).normal(4, 64))  # [4, 64]
    with torch.no_grad():
        a = gen.synthesis(w)
        b = gen.synthesis(w[:, None].expand(-1, gen.n_latent, -1))
        one = gen.synthesis(w[2:3])
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(a[2:3], one, atol=1e-4, rtol=0)


def test_truncation(gen: StyleGAN2Generator, ckpt: dict) -> None:
    z = make_generator(5).normal(3, 64)
    w = gen.mapping(z)
    assert gen.truncate(w, 1.0) is w
    torch.testing.assert_close(gen.truncate(w, 0.0), ckpt["latent_avg"].expand(3, -1))
    with torch.no_grad():
        at_avg = gen.synthesis(ckpt["latent_avg"][None])  # [1, 3, S, S]
        psi0 = gen(z, truncation_psi=0.0)
    torch.testing.assert_close(psi0, at_avg.expand(3, -1, -1, -1), atol=1e-4, rtol=0)
    assert not torch.allclose(gen(z), psi0, atol=1e-2)


def test_gradients_flow_to_z_w_and_wplus(gen: StyleGAN2Generator) -> None:
    z = make_generator(6).normal(2, 64).requires_grad_(True)
    w = gen.mapping(z).detach().requires_grad_()
    wplus = w.detach()[:, None].repeat(1, gen.n_latent, 1).requires_grad_()
    for x, image in ((z, gen(z, truncation_psi=0.7)), (w, gen.synthesis(w)), (wplus, gen.synthesis(wplus))):
        image.square().mean().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert wplus.grad is not None and (wplus.grad.abs().sum(dim=2) > 0).all()  # every layer's style matters
    assert all(not p.requires_grad for p in gen.parameters())


def test_noise_modes(gen: StyleGAN2Generator) -> None:
    w = gen.mapping(make_generator(7).normal(2, 64))
    with torch.no_grad():
        const = gen.synthesis(w)
        r1 = gen.synthesis(w, "random", make_generator(8))
        r2 = gen.synthesis(w, "random", make_generator(8))
    torch.testing.assert_close(r1, r2, atol=0, rtol=0)
    assert (r1 - const).abs().max() > 1e-3
    with pytest.raises(ValueError, match="generator"):
        gen.synthesis(w, "random")
    with pytest.raises(ValueError, match="generator"):
        gen.synthesis(w, "const", make_generator(8))
    with pytest.raises(ValueError, match="noise_mode"):
        gen.synthesis(w, "fresh")  # type: ignore[arg-type]


def test_render_is_quantised_synthesis(gen: StyleGAN2Generator) -> None:
    z = make_generator(9).normal(2, 64)
    images = gen.render(z, truncation_psi=0.5)
    assert images.dtype == torch.uint8 and images.shape == (2, 32, 32, 3)
    with torch.no_grad():
        x = gen(z, truncation_psi=0.5)
    want = ((x + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1)
    assert (images.int() - want.int()).abs().max() <= 1
    torch.testing.assert_close(gen.render(gen.mapping(z), space="w", truncation_psi=0.5), images)


def test_rejects_bad_inputs(gen: StyleGAN2Generator) -> None:
    with pytest.raises(ValueError, match="z"):
        gen.mapping(torch.zeros(2, 63))
    with pytest.raises(ValueError, match="ws"):
        gen.synthesis(torch.zeros(2, 7, 64))
    with pytest.raises(ValueError, match="psi"):
        gen.truncate(torch.zeros(2, 64), -0.5)
    with pytest.raises(ValueError, match="space"):
        gen.render(torch.zeros(2, 64), space="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channels"):
        StyleGAN2Config(size=32, channels=(8, 8, 8))
    with pytest.raises(ValueError, match="size"):
        StyleGAN2Config(size=48)


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda c: c["g_ema"].pop("convs.3.noise.weight"), "missing: convs.3.noise.weight"),
        (
            lambda c: c["g_ema"].update({"convs.9.conv.weight": torch.zeros(1)}),
            "unexpected: convs.9.conv.weight",
        ),
        (lambda c: c["g_ema"].update({"to_rgbs.1.bias": torch.zeros(3)}), "misshapen: to_rgbs.1.bias"),
        (
            lambda c: c["g_ema"].update({"noises.noise_0": torch.zeros(1, 1, 8, 8)}),
            "misshapen: noises.noise_0",
        ),
        (
            lambda c: c["g_ema"].update({"convs.2.conv.blur.kernel": torch.ones(4, 4)}),
            "convs.2.conv.blur.kernel",
        ),
        (lambda c: c.pop("latent_avg"), "latent_avg"),
        (lambda c: c.update({"latent_avg": torch.zeros(8, 64)}), "latent_avg"),
        (lambda c: c.pop("g_ema"), "g_ema"),
    ],
)
def test_rejects_bad_checkpoints_naming_the_key(ckpt: dict, tmp_path: Path, edit, named: str) -> None:
    bad = {k: dict(v) if isinstance(v, dict) else v for k, v in ckpt.items()}
    edit(bad)
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=named):
        StyleGAN2Generator.from_checkpoint(tmp_path / "bad.pt", CONFIG_TINY)


def test_rejects_a_config_that_does_not_fit_the_checkpoint(ckpt_file: Path) -> None:
    with pytest.raises(ValueError, match="missing: style.3.weight, style.3.bias"):
        StyleGAN2Generator.from_checkpoint(ckpt_file, StyleGAN2Config(size=32, style_dim=64, n_mlp=3))
    with pytest.raises(
        ValueError, match=r"misshapen: input.input \(1, 32, 4, 4\) \(expected \(1, 512, 4, 4\)\)"
    ):
        StyleGAN2Generator.from_checkpoint(ckpt_file, StyleGAN2Config(size=32, style_dim=64, n_mlp=2))


class _RunsCode:
    """Unpickling this calls os.mkdir(marker): a stand-in for a checkpoint that runs code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_refuses_pickles_that_run_code(ckpt: dict, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    payload = pickle.dumps(_RunsCode(marker), protocol=2)
    pickle.loads(payload)  # an ordinary unpickler runs it ...
    assert marker.is_dir()
    marker.rmdir()
    zipped, legacy = tmp_path / "zip.pt", tmp_path / "legacy.pt"
    torch.save({**ckpt, "args": _RunsCode(marker)}, zipped)
    legacy.write_bytes(payload)
    for file in (zipped, legacy):  # ... the loader refuses both formats without running it
        with pytest.raises(ValueError, match="refused"):
            StyleGAN2Generator.from_checkpoint(file, CONFIG_TINY)
        assert not marker.exists()


def test_build_tiny_is_byte_deterministic_and_leaves_global_rng_alone(tmp_path: Path) -> None:
    state = torch.get_rng_state()
    a, b = build_tiny(tmp_path / "a", seed=0), build_tiny(tmp_path / "other", seed=0)
    c = build_tiny(tmp_path / "c", seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    digest = [hashlib.sha256((p / CHECKPOINT_FILE).read_bytes()).hexdigest() for p in (a, b, c)]
    assert digest[0] == digest[1] != digest[2]
    names = zipfile.ZipFile(a / CHECKPOINT_FILE).namelist()
    assert "archive/data.pkl" in names  # not named after the file or directory
    raw = torch.load(a / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert set(raw) == {"g_ema", "latent_avg"}
    assert {k: tuple(v.shape) for k, v in raw["g_ema"].items()} == rosinality_layout(32, 64, 2, TINY_CHANNELS)
    model = StyleGAN2Generator.from_checkpoint(a / CHECKPOINT_FILE, CONFIG_TINY)
    assert raw["latent_avg"].abs().max() > 0 and model.conv1.noise.weight.abs().item() > 0
    z = make_generator(10).normal(2, 64)
    with torch.no_grad():
        ref = ref_synthesis(raw["g_ema"], model.mapping(z[:1]).expand(8, -1))
        torch.testing.assert_close(model(z)[0], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(ckpt_file: Path, gen: StyleGAN2Generator) -> None:
    cuda = StyleGAN2Generator.from_checkpoint(ckpt_file, CONFIG_TINY, device="cuda")
    z = make_generator(11).normal(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(
            cuda(z, truncation_psi=0.7).cpu(), gen(z, truncation_psi=0.7), atol=1e-3, rtol=1e-3
        )
        r = cuda.synthesis(cuda.mapping(z), "random", make_generator(12, "cuda"))
    assert r.device.type == "cuda" and torch.isfinite(r).all()
