"""A latent-space face model: StyleGAN2 W latents -> aligned crops -> unit identity embeddings.

Langevin, Dispersion and DisCo move latents by forces measured in the face-recognition model's
embedding space; this is the differentiable map they differentiate: synthesis (constant noise),
the generator's fixed crop to the 112x112 ArcFace template, and the embedder's forward pass. Model
weights stay frozen; gradients flow to the latents only.

An embedder with a `fused()` view (`IResNetEmbedder.fused`: BatchNorms folded, input gradients
written out, channels_last; the same function) is run through that view, rebuilt whenever the
embedder's weights change; the plain module serves when it is in training mode or has weights that
require gradients, or with `fused=False` (the straightforward reference). `embeddings` is the
batched pass without gradients (inference mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from models.alignment.template import TEMPLATE_SIZE
from models.seeding import make_generator

LatentCrop = Literal["ffhq", "center"]  # StyleGAN output: the fixed FFHQ crop; tiny presets: centre


class LatentFace:
    """`embed(w)`: W latents [B, D] -> unit embeddings [B, E], differentiable w.r.t. `w`."""

    def __init__(self, generator: Any, embedder: Any, crop: LatentCrop = "ffhq", *, fused: bool = True) -> None:
        if crop not in ("ffhq", "center"):
            raise ValueError(f"crop: expected 'ffhq' or 'center', got {crop!r}")
        if not getattr(embedder, "differentiable", False):
            raise ValueError("embedder: latent-space sampling needs a differentiable embedder (not ONNX)")
        self.generator = generator
        self.embedder = embedder  # takes [-1, 1] = (p - 127.5) / 127.5 and applies its own scaling
        self.crop_method = crop
        self.fused = fused  # run the embedder's fused() view when it has one and it is eval-mode and frozen
        self._view: tuple[tuple[Any, ...], Any] | None = None  # (the weights' fingerprint, the view)

    @property
    def style_dim(self) -> int:
        return int(self.generator.style_dim)

    @property
    def w_avg(self) -> torch.Tensor:
        """The generator's mean W latent [D] (float32)."""
        return self.generator.latent_avg.float()

    def initial_latents(self, seeds: Sequence[int], truncation: float = 0.7) -> torch.Tensor:
        """One W latent per seed: w_avg + truncation (mapping(z) - w_avg), z from the seed alone: [B, D]."""
        d = self.style_dim
        z = torch.stack([make_generator(s).normal(d) for s in seeds])  # [B, D] on CPU
        param = next(self.generator.parameters())
        with torch.no_grad():
            w = self.generator.mapping(z.to(param.device, param.dtype))  # [B, D]
            return self.generator.truncate(w, truncation).float()  # [B, D]

    def crop(self, images: torch.Tensor) -> torch.Tensor:
        """Generator images [B, 3, S, S] in [-1, 1] -> crops [B, 3, 112, 112], differentiable."""
        if self.crop_method == "ffhq":
            from models.alignment.ffhq import ffhq_warp

            return ffhq_warp(images, TEMPLATE_SIZE)
        s = min(images.shape[-2:])
        top, left = (images.shape[-2] - s) // 2, (images.shape[-1] - s) // 2
        square = images[..., top:top + s, left:left + s]  # [B, 3, s, s]
        if s == TEMPLATE_SIZE:
            return square
        return F.interpolate(square, size=(TEMPLATE_SIZE, TEMPLATE_SIZE), mode="bilinear",
                             align_corners=False, antialias=s > TEMPLATE_SIZE)  # [B, 3, 112, 112]

    def images(self, w: torch.Tensor) -> torch.Tensor:
        """Generator images [B, 3, S, S] in about [-1, 1] for W [B, D] or W+ [B, L, D] (constant noise)."""
        param = next(self.generator.parameters())
        return self.generator.synthesis(w.to(param.device, param.dtype), noise_mode="const")

    def face_embedder(self) -> Any:
        """The module `embed` runs: the embedder's fused view, or the embedder itself (see the module doc)."""
        e = self.embedder
        if not self.fused or not hasattr(e, "fused") or e.training:
            return e
        tensors = [*e.parameters(), *e.buffers()]
        if any(t.requires_grad for t in tensors):
            return e
        # in-place changes bump _version (inference tensors have none; they change only inside inference mode)
        key = tuple((id(t), t.data_ptr(), -1 if t.is_inference() else t._version, t.dtype, t.device)
                    for t in tensors)
        if self._view is None or self._view[0] != key:
            with torch.inference_mode(False):  # ordinary tensors: the view serves autograd passes too
                self._view = (key, e.fused())
        return self._view[1]

    def embed(self, w: torch.Tensor) -> torch.Tensor:
        """Unit embeddings [B, E] of the faces of W [B, D]; differentiable w.r.t. `w`."""
        crops = self.crop(self.images(w))  # [B, 3, 112, 112] in [-1, 1]
        emb_param = next(self.embedder.parameters())
        return self.face_embedder()(crops.to(emb_param.dtype)).to(w.dtype)  # [B, E]

    def embeddings(self, w: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Unit embeddings [N, E] of W [N, D], `batch_size` at a time, without gradients (inference mode)."""
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if w.ndim not in (2, 3):
            raise ValueError(f"w: expected W [N, D] or W+ [N, L, D], got shape {tuple(w.shape)}")
        parts = []
        for lo in range(0, w.shape[0], batch_size):
            with torch.inference_mode():
                parts.append(self.embed(w[lo:lo + batch_size]))  # [b, E]
        if not parts:
            return torch.empty(0, int(getattr(self.embedder, "embedding_dim", 0)), dtype=w.dtype, device=w.device)
        return torch.cat(parts)  # [N, E], an ordinary tensor (made outside inference mode)

    @staticmethod
    def to_uint8(images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, S, S] in [-1, 1] -> uint8 [B, S, S, 3] on the CPU."""
        pixels = ((images.detach().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu()
