"""Crops to the embedder's 112x112 input, and image encoding.

Three ways to get a 112x112 face crop, one per kind of generator:

- `center_crop_resize`: a fixed centre crop, for the tiny presets, whose images are not faces.
- `align_to_template`: five landmarks -> least-squares similarity (`estimate_similarity`, Umeyama)
  onto the ArcFace template -> bilinear `cv2.warpAffine`; `models.alignment.landmarks.align_faces` finds the
  landmarks with YuNet (diffusion output, where the face can be anywhere).
- `ffhq_crop`: one fixed similarity for StyleGAN output, whose faces are FFHQ-aligned (`models.alignment.ffhq`).

Coordinates are pixel indices (x right, y down; (0, 0) is the centre of the top-left pixel), as in
OpenCV, YuNet and insightface; a 2x3 `matrix` maps source (x, y, 1) to template (x, y).
"""

from __future__ import annotations

import io
from typing import Literal

import cv2
import numpy as np
import torch
from PIL import Image

ImageFormat = Literal["jpeg", "png"]
PNG_COMPRESS_LEVEL = 6  # zlib level for PNG; fixed so the bytes are reproducible

TEMPLATE_SIZE = 112  # side of the ArcFace crop, pixels
# The ArcFace five-point template (insightface `arcface_dst`; OpenCV's FaceRecognizerSF.alignCrop uses
# the same numbers): where the landmarks of a 112x112 crop lie, in pixel indices. Rows in image order:
# the eye on the left of the image (the subject's right eye), the other eye, the nose tip, the mouth
# corner on the left of the image, the other mouth corner; YuNet reports its landmarks in this order.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)  # [5, 2] (x, y)
ARCFACE_TEMPLATE.setflags(write=False)
SPREAD_RTOL = 1e-9  # points whose RMS spread is below this fraction of their magnitude count as all equal


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


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, translation; no reflection).

    Umeyama (1991): minimises sum_i |s R src_i + t - dst_i|^2. src, dst: [N, 2] points, N >= 2.
    Returns the 2x3 float64 matrix [s R | t] mapping src to dst. Points that are all equal (no
    spread) determine no rotation or scale: a ValueError.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    for name, pts in (("src", src), ("dst", dst)):
        if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] < 2:
            raise ValueError(f"{name}: expected [N, 2] points with N >= 2, got shape {pts.shape}")
        if not np.isfinite(pts).all():
            raise ValueError(f"{name}: points must be finite")
    if src.shape != dst.shape:
        raise ValueError(f"src, dst: shapes differ, {src.shape} vs {dst.shape}")
    n = src.shape[0]
    src_mean, dst_mean = src.mean(0), dst.mean(0)  # [2]
    src_c, dst_c = src - src_mean, dst - dst_mean  # [N, 2]
    src_var = (src_c**2).sum() / n  # mean squared distance to the centroid
    for name, pts, pts_c in (("src", src, src_c), ("dst", dst, dst_c)):
        spread = np.sqrt((pts_c**2).sum() / n)  # RMS distance to the centroid
        if spread <= SPREAD_RTOL * max(1.0, float(np.abs(pts).max())):
            raise ValueError(f"{name}: the points are all equal (no spread); a similarity is undetermined")
    cov = dst_c.T @ src_c / n  # [2, 2]
    u, sigma, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # the best orthogonal fit reflects: flip the weakest axis
        d[1] = -1.0
    rotation = u @ np.diag(d) @ vt  # [2, 2], det +1
    scale = float((sigma * d).sum() / src_var)
    translation = dst_mean - scale * rotation @ src_mean  # [2]
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)  # [2, 3]


def warp_to_template(image: np.ndarray, matrix: np.ndarray, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """Bilinear `cv2.warpAffine` of one uint8 image [H, W, C] by a 2x3 matrix to [size, size, C].

    Outside the source is black, as in insightface's `norm_crop` and OpenCV's `alignCrop`.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"image: expected uint8 [H, W, C], got {image.dtype} {image.shape}")
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (2, 3) or not np.isfinite(matrix).all():
        raise ValueError(f"matrix: expected a finite 2x3 matrix, got {matrix.shape}")
    return cv2.warpAffine(
        np.ascontiguousarray(image), matrix, (size, size),
        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    ).reshape(size, size, image.shape[2])  # [size, size, C]


def align_to_template(images: torch.Tensor, landmarks: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Warp each image so that its five landmarks land on the ArcFace template, least squares.

    images: uint8 [B, H, W, 3]; landmarks: [B, 5, 2] pixel (x, y) in ARCFACE_TEMPLATE's order.
    Returns uint8 [B, 112, 112, 3] on the images' device.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    pts = landmarks.detach().cpu().double().numpy() if isinstance(landmarks, torch.Tensor) else np.asarray(
        landmarks, dtype=np.float64
    )
    if pts.shape != (images.shape[0], 5, 2):
        raise ValueError(f"landmarks: expected [{images.shape[0]}, 5, 2], got {pts.shape}")
    pixels = images.cpu().numpy()  # [B, H, W, 3]
    crops = np.empty((images.shape[0], TEMPLATE_SIZE, TEMPLATE_SIZE, 3), dtype=np.uint8)
    for i in range(images.shape[0]):
        crops[i] = warp_to_template(pixels[i], estimate_similarity(pts[i], ARCFACE_TEMPLATE))
    return torch.from_numpy(crops).to(images.device)  # [B, 112, 112, 3]
