"""YuNet face detection and five-point alignment of generated images to the ArcFace template.

`YuNetDetector` wraps OpenCV's `cv2.FaceDetectorYN` (the opencv_zoo YuNet 2023mar int8 model) and
returns the best face's box, score and landmarks. YuNet reports the landmarks as right eye, left
eye, nose tip, right mouth corner, left mouth corner of the subject; the subject's right is the
image's left, so this is ARCFACE_TEMPLATE's order and they go to `estimate_similarity` as they are.

`align_faces` aligns a batch. YuNet's landmarks are noisy (a few pixels on a 100 px face) and
biased toward an upright layout on tilted faces (they under-rotate: about 10 px off at 25 degrees).
So, after the first detection, each face is re-warped upright at a fixed scale and detected again,
there and in its mirror image (landmarks averaged, left and right swapped), `refine_steps` times.
Measured on two photographs, each rotated by up to 30 degrees and scaled by 0.7-1.4 a dozen times:
the aligned landmarks agree to 0.3-0.5 px rms (1.2 px at worst) with 3 steps, 0.5 px with 2, and
0.8-1.3 px rms (4.4 px at worst) with 1; 5-13 px off at 15-25 degrees with none. Each step costs two
YuNet runs on a 288 px image (about 10 ms a step on a 2-core CPU). `refine_steps=0` is what OpenCV's
`FaceRecognizerSF.alignCrop` does: one detection, then the similarity warp.

An image without a face gets the centre crop (so shapes hold downstream), `ok` False and NaN
landmarks, and is counted in `failures`. The detector is not thread-safe: one per thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from models.alignment.opencv_zoo import YUNET_FILE, YUNET_SHA256, verified
from models.alignment.template import (
    ARCFACE_TEMPLATE,
    TEMPLATE_SIZE,
    center_crop_resize,
    estimate_similarity,
    warp_to_template,
)

MIRROR = [1, 0, 2, 4, 3]  # landmark order after a horizontal flip: the eyes and the mouth corners swap
# A re-detection whose landmarks lie further than this from where the face is expected, on average and
# in units of the expected eye distance, is another face: refinement stops there.
MAX_REFINE_SHIFT = 0.5


@dataclass(frozen=True)
class DetectorConfig:
    score_threshold: float = 0.7  # minimum YuNet face score in [0, 1] (opencv_zoo's demo uses 0.9)
    nms_threshold: float = 0.3  # IoU above which overlapping boxes are merged (opencv_zoo's value)
    top_k: int = 5000  # candidate boxes kept before non-maximum suppression (opencv_zoo's value)
    # images with a shorter side are not searched: no usable face, and on images at most 32 px high
    # (one row of YuNet's coarsest grid) OpenCV's YuNet returns rows of stale memory, even in a black image
    min_side: int = 40

    def __post_init__(self) -> None:
        for name in ("score_threshold", "nms_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.top_k < 1:
            raise ValueError(f"top_k: must be >= 1, got {self.top_k}")
        if self.min_side <= 32:
            raise ValueError(f"min_side: must be > 32 (YuNet's stale rows below), got {self.min_side}")


@dataclass(frozen=True)
class FaceDetection:
    box: np.ndarray  # [4] float64 (x, y, width, height) of the face box, pixels
    score: float  # YuNet's face score in [0, 1]
    landmarks: np.ndarray  # [5, 2] float64 pixel (x, y), ARCFACE_TEMPLATE's order


class YuNetDetector:
    """The highest-scoring face in an RGB image, by YuNet; the input size is set per image."""

    def __init__(
        self, config: DetectorConfig = DetectorConfig(), model_path: str | Path | None = None
    ) -> None:
        self.config = config
        self.model_path = verified(model_path, YUNET_FILE, YUNET_SHA256)
        self._net = cv2.FaceDetectorYN.create(
            str(self.model_path), "", (320, 320), config.score_threshold, config.nms_threshold, config.top_k
        )

    def detect_all(self, image: np.ndarray) -> list[FaceDetection]:
        """Every face above the score threshold in uint8 RGB [H, W, 3], best first."""
        if (
            not isinstance(image, np.ndarray)
            or image.dtype != np.uint8
            or image.ndim != 3
            or image.shape[2] != 3
        ):
            raise ValueError(f"image: expected a uint8 numpy array [H, W, 3], got {_describe(image)}")
        h, w = image.shape[:2]
        if min(h, w) < self.config.min_side:
            return []
        self._net.setInputSize((w, h))
        _, rows = self._net.detect(np.ascontiguousarray(image[:, :, ::-1]))  # YuNet reads BGR
        faces = [] if rows is None else [_to_detection(r) for r in rows]
        faces = [f for f in faces if f is not None and _plausible(f, w, h)]
        return sorted(faces, key=lambda f: -f.score)

    def detect(self, image: np.ndarray) -> FaceDetection | None:
        """The highest-scoring face in uint8 RGB [H, W, 3], or None."""
        faces = self.detect_all(image)
        return faces[0] if faces else None


@dataclass(frozen=True)
class AlignConfig:
    refine_steps: int = 3  # re-detections on the face warped upright (0 = align on the first detection)
    refine_scale: float = 2.0  # the upright face's size: the template scaled by this (2 = 70 px between eyes)
    refine_canvas: int = 288  # side of the upright re-detection image, pixels
    mirror_average: bool = True  # re-detect in the mirrored image too and average the landmarks

    def __post_init__(self) -> None:
        if self.refine_steps < 0:
            raise ValueError(f"refine_steps: must be >= 0, got {self.refine_steps}")
        if self.refine_scale <= 0 or self.refine_canvas < TEMPLATE_SIZE * self.refine_scale:
            raise ValueError(
                f"refine_scale, refine_canvas: need scale > 0 and canvas >= 112 * scale, "
                f"got {self.refine_scale}, {self.refine_canvas}"
            )


@dataclass(frozen=True)
class AlignmentResult:
    crops: torch.Tensor  # uint8 [B, 112, 112, 3]: aligned faces; the centre crop where no face was found
    ok: torch.Tensor  # bool [B]: a face was found and aligned
    landmarks: torch.Tensor  # float32 [B, 5, 2]: the landmarks used, input pixels; NaN where not ok
    scores: torch.Tensor  # float32 [B]: YuNet's score of the face; NaN where not ok
    failures: int  # images without a face: (~ok).sum()


def refine_landmarks(
    image: np.ndarray, landmarks: np.ndarray, detector: YuNetDetector, config: AlignConfig = AlignConfig()
) -> np.ndarray:
    """Re-detect the face warped upright at a fixed scale, `config.refine_steps` times.

    image: uint8 RGB [H, W, 3]; landmarks: [5, 2] float64. Returns the refined [5, 2]; a step that
    finds no face keeps the landmarks it started from.
    """
    canvas = config.refine_canvas
    target = (
        ARCFACE_TEMPLATE * config.refine_scale + (canvas - TEMPLATE_SIZE * config.refine_scale) / 2
    )  # [5, 2]
    for _ in range(config.refine_steps):
        to_canvas = estimate_similarity(landmarks, target)  # [2, 3]
        upright = warp_to_template(image, to_canvas, canvas)  # [canvas, canvas, 3]
        found = _nearest(detector.detect_all(upright), target)
        if found is None:
            break
        if config.mirror_average:
            mirrored = _nearest(
                detector.detect_all(np.ascontiguousarray(upright[:, ::-1])), _mirror(target, canvas)
            )
            if mirrored is not None:
                found = (found + _mirror(mirrored, canvas)) / 2
        back = np.linalg.inv(np.vstack([to_canvas, [0.0, 0.0, 1.0]]))[:2]  # [2, 3] canvas -> image
        landmarks = found @ back[:, :2].T + back[:, 2]  # [5, 2]
    return landmarks


def align_faces(
    images: torch.Tensor, detector: YuNetDetector, config: AlignConfig = AlignConfig()
) -> AlignmentResult:
    """Detect, refine and align the best face of each uint8 RGB image [B, H, W, 3] to 112x112."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    b = images.shape[0]
    pixels = images.cpu().numpy()  # [B, H, W, 3]
    crops = np.empty((b, TEMPLATE_SIZE, TEMPLATE_SIZE, 3), dtype=np.uint8)
    ok = np.zeros(b, dtype=bool)
    landmarks = np.full((b, 5, 2), np.nan, dtype=np.float32)
    scores = np.full(b, np.nan, dtype=np.float32)
    for i in range(b):
        face = detector.detect(pixels[i])
        if face is None:
            crops[i] = center_crop_resize(images[i : i + 1].cpu(), TEMPLATE_SIZE)[0].numpy()
            continue
        pts = refine_landmarks(pixels[i], face.landmarks, detector, config)  # [5, 2]
        crops[i] = warp_to_template(pixels[i], estimate_similarity(pts, ARCFACE_TEMPLATE))
        ok[i], landmarks[i], scores[i] = True, pts, face.score
    return AlignmentResult(
        crops=torch.from_numpy(crops).to(images.device),
        ok=torch.from_numpy(ok).to(images.device),
        landmarks=torch.from_numpy(landmarks).to(images.device),
        scores=torch.from_numpy(scores).to(images.device),
        failures=int(b - ok.sum()),
    )


def _to_detection(row: np.ndarray) -> FaceDetection | None:
    row = row.astype(np.float64)  # [15]: x, y, w, h, five (x, y) landmarks, score
    if not np.isfinite(row).all():
        return None
    return FaceDetection(box=row[:4].copy(), score=float(row[14]), landmarks=row[4:14].reshape(5, 2).copy())


def _plausible(face: FaceDetection, w: int, h: int) -> bool:
    """Rejects rows that cannot be a face in this image (YuNet's stale rows: score 1, coordinates ~1e8)."""
    x, y = face.landmarks[:, 0], face.landmarks[:, 1]
    inside = (x > -w / 4).all() and (x < 1.25 * w).all() and (y > -h / 4).all() and (y < 1.25 * h).all()
    return bool(inside and 0.0 <= face.score <= 1.0 and face.box[2] > 0 and face.box[3] > 0)


def _nearest(faces: list[FaceDetection], target: np.ndarray) -> np.ndarray | None:
    """Landmarks of the face closest to where the refined face is expected (not the best-scoring one),
    or None when even that one is too far off to be the same face."""
    if not faces:
        return None
    shifts = [float(np.hypot(*(f.landmarks - target).T).mean()) for f in faces]
    best = int(np.argmin(shifts))
    if shifts[best] > MAX_REFINE_SHIFT * float(np.hypot(*(target[1] - target[0]))):
        return None
    return faces[best].landmarks


def _mirror(landmarks: np.ndarray, width: int) -> np.ndarray:
    """Landmarks of the horizontally flipped image, back in template order."""
    out = landmarks[MIRROR].copy()  # [5, 2]
    out[:, 0] = width - 1 - out[:, 0]
    return out


def _describe(x: object) -> str:
    return f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
