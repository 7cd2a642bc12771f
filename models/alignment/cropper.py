"""Generated images -> the embedder's 112x112 input, by the generator's alignment method.

"center": a fixed centre crop (tiny presets, whose images are not faces); "ffhq": the fixed FFHQ
crop (StyleGAN output is FFHQ-aligned by construction); "landmarks": YuNet's five points mapped to
the ArcFace template (diffusion output, where the face can sit anywhere). Only "landmarks" can
fail; a failed image keeps its centre crop and is flagged, so callers count and report failures.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.alignment.template import TEMPLATE_SIZE, center_crop_resize
from models.modelspec import Alignment


@dataclass(frozen=True)
class Cropped:
    crops: torch.Tensor  # uint8 [B, 112, 112, 3]
    ok: torch.Tensor  # bool [B]: aligned as asked (always True for the fixed crops)

    @property
    def failures(self) -> int:
        return int((~self.ok).sum())


class Cropper:
    """Crops images for one alignment method; the YuNet detector is loaded on first use."""

    def __init__(self, alignment: Alignment) -> None:
        if alignment not in ("center", "ffhq", "landmarks"):
            raise ValueError(f"alignment: expected 'center', 'ffhq' or 'landmarks', got {alignment!r}")
        self.alignment = alignment
        self._detector = None

    def __call__(self, images: torch.Tensor) -> Cropped:
        """uint8 RGB images [B, H, W, 3] -> Cropped with crops [B, 112, 112, 3]."""
        b = images.shape[0]
        if self.alignment == "center":
            return Cropped(center_crop_resize(images, TEMPLATE_SIZE), torch.ones(b, dtype=torch.bool))
        if self.alignment == "ffhq":
            from models.alignment.ffhq import ffhq_crop

            return Cropped(ffhq_crop(images, TEMPLATE_SIZE), torch.ones(b, dtype=torch.bool))
        from models.alignment.landmarks import YuNetDetector, align_faces

        if self._detector is None:
            self._detector = YuNetDetector()
        result = align_faces(images, self._detector)
        return Cropped(result.crops, result.ok)
