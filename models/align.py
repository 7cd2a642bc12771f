"""Fixed crops to the embedder's input size, and image encoding.

`center_crop_resize` is the fixed crop used with the tiny presets, whose images are not faces;
5-point similarity alignment to the ArcFace 112x112 template comes with the real generators.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
import torch
from PIL import Image

ImageFormat = Literal["jpeg", "png"]
PNG_COMPRESS_LEVEL = 6  # zlib level for PNG; fixed so the bytes are reproducible


def center_crop_resize(images: torch.Tensor, size: int = 112) -> torch.Tensor:
    """Square centre crop, then antialiased bilinear resize.

    uint8 [B, H, W, 3] -> uint8 [B, size, size, 3].
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    if size < 1:
        raise ValueError(f"size: must be >= 1, got {size}")
    _, h, w, _ = images.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = images[:, top : top + side, left : left + side]  # [B, side, side, 3]
    if side == size:
        return crop.contiguous()
    x = crop.permute(0, 3, 1, 2).float()  # [B, 3, side, side]
    x = torch.nn.functional.interpolate(
        x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )  # [B, 3, size, size]
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # [B, size, size, 3]


def encode_image(image: torch.Tensor, fmt: ImageFormat, quality: int = 95) -> bytes:
    """Encode one uint8 RGB image [H, W, 3] as JPEG or PNG; the same pixels give the same bytes."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"image: expected uint8 [H, W, 3], got {image.dtype} {tuple(image.shape)}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality: must be in [1, 100], got {quality}")
    pil = Image.fromarray(np.ascontiguousarray(image.cpu().numpy()))  # uint8 [H, W, 3] -> RGB
    buffer = io.BytesIO()
    if fmt == "jpeg":
        # 4:4:4 chroma (no subsampling): small face crops lose too much colour detail at 4:2:0
        pil.save(buffer, format="JPEG", quality=quality, optimize=False, progressive=False, subsampling=0)
    elif fmt == "png":
        pil.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    else:
        raise ValueError(f"fmt: expected 'jpeg' or 'png', got {fmt!r}")
    return buffer.getvalue()
