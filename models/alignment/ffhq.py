"""The fixed FFHQ crop: StyleGAN output to the ArcFace 112x112 template by one similarity transform.

A StyleGAN trained on FFHQ draws faces where FFHQ's alignment put them. That alignment
(NVlabs/ffhq-dataset, `recreate_aligned_images`) reads four points of a face: the two eye centres
(the mean of each eye's six dlib landmarks) and the two outer mouth corners. From
  eye_mid = the eyes' midpoint, eye_vec = right-of-image eye - left-of-image eye,
  down = mouth midpoint - eye_mid,
it cuts an oriented square: its x axis is eye_vec plus `down` turned a quarter turn toward it
(so eye line and eye-mouth line both level the face), its half side is
max(2.0 |eye_vec|, 1.8 |down|), its y axis is x turned a quarter turn clockwise on screen, and its
centre is eye_mid + 0.1 down. The square's corners (top-left, bottom-left, bottom-right, top-right)
become the corners of the output image (PIL's QUAD transform at 4096 px, with the corners offset by
half a pixel, then resized to 1024): every face lands with its eyes level, centred, at a fixed size.

How the fixed transform is derived (`ARCFACE_FFHQ_QUAD`): apply that same procedure to the ArcFace
template's own five points. The template is a face; the square FFHQ would cut around it, measured
in template pixels, is where the FFHQ image's corners fall in the ArcFace crop. So FFHQ pixel (u, v)
of an S x S image goes to
  template = TL + ((u + 0.5) / S) (TR - TL) + ((v + 0.5) / S) (BL - TL),
the half pixels turning pixel indices into the image-edge coordinates of the QUAD transform and the
resize. This holds for any resolution S, since StyleGAN's lower resolutions are FFHQ resized whole.
For the template the mouth term wins (1.8 |down| = 73.24 > 2 |eye_vec| = 70.48 template pixels):
the FFHQ square has side 146.47 template pixels, is tilted by 0.32 degrees (the template's eyes
are not quite level) and is centred at (55.94, 55.67). Seen the other way, a 1024 px FFHQ image
holds the template's points at
  eyes (388.3, 483.1) and (634.7, 483.1), nose (511.5, 623.8), mouth (409.5, 767.5) and (613.5, 767.5),
and the 112x112 crop spans FFHQ pixels about 118..899 (x) and 120..900 (y), inside the image.

The transform is exact for a face shaped like the template and a compromise for others, as any
fixed crop is. Real faces have wider eyes for their eye-mouth distance than the template (eye-mouth
/ eye-eye: 1.15 for the template, 0.95-1.05 for the mean FFHQ face and the test photographs), so
their mouths come out a few pixels above the template's: the mean five landmarks of FFHQ images
(facexlib's 512 px template) land within 0.8 px at the eyes and nose and 3.6-4.0 px high at the
mouth corners (see the tests).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from models.alignment.template import ARCFACE_TEMPLATE, TEMPLATE_SIZE

EYE_SPAN = 2.0  # FFHQ: the square's half side is at least this times the eye-to-eye distance
MOUTH_SPAN = 1.8  # ... and at least this times the eye-midpoint-to-mouth-midpoint distance
CENTRE_SHIFT = 0.1  # FFHQ: the square's centre is the eye midpoint plus this fraction of eye-to-mouth


def ffhq_quad(landmarks: np.ndarray) -> np.ndarray:
    """FFHQ's crop square for five landmarks [5, 2] (ARCFACE_TEMPLATE's order; the nose is unused).

    Returns its corners [4, 2]: top-left, bottom-left, bottom-right, top-right, in the landmarks'
    pixel coordinates, i.e. the points that become the FFHQ image's corners.
    """
    pts = np.asarray(landmarks, dtype=np.float64)
    if pts.shape != (5, 2) or not np.isfinite(pts).all():
        raise ValueError(f"landmarks: expected finite [5, 2] points, got shape {pts.shape}")
    eye_mid = (pts[0] + pts[1]) / 2  # [2]
    eye_vec = pts[1] - pts[0]  # [2], left-of-image eye to right-of-image eye
    down = (pts[3] + pts[4]) / 2 - eye_mid  # [2], eye midpoint to mouth midpoint
    x = eye_vec + np.array([down[1], -down[0]])  # eye line averaged with the eye-mouth line turned level
    if np.hypot(*x) == 0:
        raise ValueError("landmarks: eyes and mouth give no orientation (degenerate face)")
    x *= max(EYE_SPAN * np.hypot(*eye_vec), MOUTH_SPAN * np.hypot(*down)) / np.hypot(*x)  # half side
    y = np.array([-x[1], x[0]])  # x turned a quarter turn, pointing down the face
    centre = eye_mid + CENTRE_SHIFT * down
    return np.stack([centre - x - y, centre - x + y, centre + x + y, centre + x - y])  # [4, 2]


# Where the FFHQ image's corners fall in the 112x112 ArcFace crop: FFHQ's square around the template.
ARCFACE_FFHQ_QUAD = ffhq_quad(ARCFACE_TEMPLATE)  # [4, 2] template pixels: TL, BL, BR, TR
ARCFACE_FFHQ_QUAD.setflags(write=False)


def ffhq_to_arcface_matrix(resolution: int, size: int = TEMPLATE_SIZE) -> np.ndarray:
    """2x3 float64 matrix: pixel (u, v, 1) of an FFHQ-aligned resolution^2 image -> pixel of the
    size^2 ArcFace crop (the template scaled by size / 112 about the crop's edges)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution: expected an int >= 1, got {resolution!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size: expected an int >= 1, got {size!r}")
    tl, bl, _, tr = ARCFACE_FFHQ_QUAD
    ex, ey = (tr - tl) / resolution, (bl - tl) / resolution  # [2] template pixels per FFHQ pixel along u, v
    origin = tl + 0.5 * (ex + ey)  # [2] where FFHQ pixel (0, 0) lands in the template
    k = size / TEMPLATE_SIZE  # crop pixels per template pixel, edge to edge
    return np.stack([k * ex, k * ey, k * (origin + 0.5) - 0.5], axis=1)  # [2, 3]


def ffhq_warp(images: torch.Tensor, size: int = TEMPLATE_SIZE) -> torch.Tensor:
    """The fixed FFHQ -> ArcFace crop of float images [B, C, S, S], differentiable, on their device.

    A large image is first resized (antialiased bilinear) to about the crop's pixel density, then
    sampled bilinearly on the crop's grid; returns [B, C, size, size] in the images' dtype (half
    precision is computed in float32, which the antialiased resize needs on the CPU).
    """
    if not images.is_floating_point() or images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images: expected float [B, C, S, S], got {images.dtype} {tuple(images.shape)}")
    dtype = images.dtype
    if images.element_size() < 4:
        images = images.float()  # [B, C, S, S]
    res = images.shape[-1]
    matrix = ffhq_to_arcface_matrix(res, size)
    density = math.sqrt(abs(np.linalg.det(matrix[:, :2])))  # crop pixels per FFHQ pixel
    if math.ceil(res * density) < res:  # downsampling: prefilter so that bilinear sampling does not alias
        res = math.ceil(res * density)
        images = F.interpolate(
            images, size=(res, res), mode="bilinear", align_corners=False, antialias=True
        )  # [B, C, res, res]
        matrix = ffhq_to_arcface_matrix(res, size)
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])  # [3, 3]
    jj, ii = np.meshgrid(np.arange(size, dtype=np.float64), np.arange(size, dtype=np.float64))  # [size, size]
    out_pts = np.stack([jj, ii, np.ones_like(jj)], axis=-1)  # [size, size, 3] crop pixel (x, y, 1)
    src = out_pts @ np.linalg.inv(full)[:2].T  # [size, size, 2] FFHQ pixel (u, v)
    grid = torch.from_numpy((2 * src + 1) / res - 1).to(images.device, images.dtype)  # [size, size, 2]
    grid = grid.unsqueeze(0).expand(images.shape[0], -1, -1, -1)  # [B, size, size, 2]
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(dtype)  # [B, C, size, size]


def ffhq_crop(images: torch.Tensor, size: int = TEMPLATE_SIZE) -> torch.Tensor:
    """The fixed FFHQ -> ArcFace crop of uint8 RGB images [B, S, S, 3] -> uint8 [B, size, size, 3]."""
    if (
        images.dtype != torch.uint8
        or images.ndim != 4
        or images.shape[-1] != 3
        or images.shape[1] != images.shape[2]
    ):
        raise ValueError(f"images: expected uint8 [B, S, S, 3], got {images.dtype} {tuple(images.shape)}")
    x = images.permute(0, 3, 1, 2).float()  # [B, 3, S, S]
    out = ffhq_warp(x, size)  # [B, 3, size, size]
    return out.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # [B, size, size, 3]
