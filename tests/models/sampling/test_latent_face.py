"""LatentFace: the fused embedder view against the plain modules, its cache, and the batched no-grad pass.

The models are the registry's tiny presets (real StyleGAN2 and iResNet architectures, real checkpoint
files and loaders); the exactness checks run them in float64.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch

from models.embedders.iresnet_fused import FusedIResNet
from models.registry import Registry
from models.sampling.latent_face import LatentFace
from models.seeding import make_generator


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, torch.nn.Module]:
    reg = Registry(tmp_path_factory.mktemp("latent-face-models"))
    reg.ensure("stylegan2-tiny")
    reg.ensure("iresnet-tiny")
    return reg.load("stylegan2-tiny"), reg.load("iresnet-tiny")


@pytest.fixture(scope="module", autouse=True)
def one_thread(models: tuple) -> Iterator[None]:
    """Tiny models: one intra-op thread is as fast and immune to OpenMP spin-waits on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def models64(models: tuple) -> tuple[torch.nn.Module, torch.nn.Module]:
    generator, embedder = models
    return copy.deepcopy(generator).double(), copy.deepcopy(embedder).double()


def latents(face: LatentFace, n: int) -> torch.Tensor:
    return face.initial_latents(range(100, 100 + n)).to(next(face.generator.parameters()).dtype)  # [n, D]


def embed_and_vjp(face: LatentFace, w: torch.Tensor, cotangent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = w.clone().requires_grad_(True)
    e = face.embed(leaf)
    (grad,) = torch.autograd.grad(e, leaf, cotangent)
    return e.detach(), grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_fused_embed_equals_the_plain_modules(models64: tuple) -> None:
    fast, plain = LatentFace(*models64, "center"), LatentFace(*models64, "center", fused=False)
    assert isinstance(fast.face_embedder(), FusedIResNet) and plain.face_embedder() is plain.embedder
    w = latents(fast, 5)
    cotangent = make_generator(1).normal(5, fast.embedder.embedding_dim, dtype=torch.float64)
    e, grad = embed_and_vjp(fast, w, cotangent)
    e_plain, grad_plain = embed_and_vjp(plain, w, cotangent)
    assert e.dtype == torch.float64 and grad.abs().max() > 0
    assert rel(e, e_plain) < 1e-12 and rel(grad, grad_plain) < 1e-12


def test_the_view_follows_the_embedders_weights(models64: tuple) -> None:
    generator, embedder = models64
    face = LatentFace(generator, embedder, "center")
    view = face.face_embedder()
    assert face.face_embedder() is view  # cached
    w = latents(face, 3)
    before = face.embed(w).detach()
    with torch.no_grad():
        embedder.layer2[0].bn2.running_mean.add_(0.3)  # an in-place change: the view is rebuilt
    assert face.face_embedder() is not view
    after = face.embed(w).detach()
    assert rel(after, before) > 1e-3
    assert rel(after, LatentFace(generator, embedder, "center", fused=False).embed(w).detach()) < 1e-12
    embedder.train()  # batch statistics: nothing to fold
    assert face.face_embedder() is embedder
    embedder.eval().requires_grad_(True)  # weight gradients wanted: the plain modules
    assert face.face_embedder() is embedder
    embedder.requires_grad_(False)
    assert isinstance(face.face_embedder(), FusedIResNet)


def test_embeddings_batched_without_gradients(models64: tuple) -> None:
    face = LatentFace(*models64, "center")
    w = latents(face, 7)
    e = face.embeddings(w, batch_size=3)  # batches that do not divide 7
    assert e.shape == (7, face.embedder.embedding_dim) and not e.requires_grad
    assert not e.is_inference()  # an ordinary tensor: usable in later autograd passes
    with torch.no_grad():
        assert rel(e, face.embed(w)) < 1e-13
    x = torch.ones(7, 1, dtype=torch.float64, requires_grad=True)
    (e * x).sum().backward()  # a constant in a graph
    assert face.embeddings(w[:0]).shape == (0, face.embedder.embedding_dim)
    with pytest.raises(ValueError, match="batch_size"):
        face.embeddings(w, batch_size=0)
    with pytest.raises(ValueError, match="w"):
        face.embeddings(w[0])
