"""SFace: a second, independent face-recognition model for the quality report.

The job's own embedder (ArcFace iResNet) also steers the sampling, so its scores flatter the
dataset; SFace (Zhong et al. 2021, opencv_zoo's 2021dec int8 model, 128-d) is another network
trained with another loss. It runs through `cv2.FaceRecognizerSF` on the CPU, one image at a time
(about 40 ms an image on a 2-core CPU).

Input: RGB crops aligned to the ArcFace 112x112 template. OpenCV's `FaceRecognizerSF.alignCrop`
uses that very template (the same five points, a least-squares similarity with no reflection and a
bilinear warp to 112x112), so `models.alignment.landmarks.align_faces` makes the crops SFace expects; with
`refine_steps=0` it makes alignCrop's pixels to within 2 grey levels (float32 vs float64 matrices).
The network reads RGB pixels in 0..255 (OpenCV swaps the BGR it is given), and its raw features
are L2-normalised here.

Threshold: opencv_zoo's SFace wrapper (models/face_recognition_sface/sface.py) calls two faces the
same person when the cosine similarity of their features is >= 0.363 (or the L2 distance of the
normalised features <= 1.128).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from models.alignment.landmarks import AlignConfig, AlignmentResult, YuNetDetector, align_faces
from models.alignment.opencv_zoo import SFACE_FILE, SFACE_SHA256, verified
from models.alignment.template import TEMPLATE_SIZE

SFACE_COSINE_THRESHOLD = 0.363  # opencv_zoo sface.py: same identity when cosine >= this
SFACE_DIM = 128  # embedding size


@dataclass(frozen=True)
class EvaluatorEmbeddings:
    embeddings: torch.Tensor  # float32 [B, 128] unit norm, CPU; of the centre crop where alignment failed
    alignment: AlignmentResult  # crops, ok, landmarks, scores, failures


class SFaceEvaluator:
    """Unit-norm SFace embeddings of aligned crops, cosine similarity and the published threshold."""

    name = "sface-2021dec-int8bq"
    embedding_dim = SFACE_DIM
    threshold = SFACE_COSINE_THRESHOLD

    def __init__(
        self,
        model_path: str | Path | None = None,
        detector: YuNetDetector | None = None,
        align_config: AlignConfig | None = None,
    ) -> None:
        self.model_path = verified(model_path, SFACE_FILE, SFACE_SHA256)
        self._net = cv2.FaceRecognizerSF.create(str(self.model_path), "")
        self.detector = detector if detector is not None else YuNetDetector()
        self.align_config = align_config if align_config is not None else AlignConfig()

    def embed(self, aligned: torch.Tensor) -> torch.Tensor:
        """uint8 RGB crops [B, 112, 112, 3] aligned to the ArcFace template -> float32 [B, 128], CPU."""
        s = TEMPLATE_SIZE
        if aligned.dtype != torch.uint8 or aligned.ndim != 4 or tuple(aligned.shape[1:]) != (s, s, 3):
            raise ValueError(
                f"aligned: expected uint8 [B, {s}, {s}, 3], got {aligned.dtype} {tuple(aligned.shape)}"
            )
        pixels = aligned.cpu().numpy()  # [B, 112, 112, 3]
        out = np.empty((pixels.shape[0], SFACE_DIM), dtype=np.float32)
        for i, rgb in enumerate(pixels):
            out[i] = self._net.feature(np.ascontiguousarray(rgb[:, :, ::-1])).reshape(SFACE_DIM)  # reads BGR
        features = torch.from_numpy(out)  # [B, 128]
        return torch.nn.functional.normalize(features, dim=1)  # [B, 128]

    @staticmethod
    def similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity along the last axis of broadcastable [..., 128] tensors -> [...]."""
        if a.shape[-1] != SFACE_DIM or b.shape[-1] != SFACE_DIM:
            raise ValueError(f"a, b: expected [..., {SFACE_DIM}], got {tuple(a.shape)} and {tuple(b.shape)}")
        return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)

    def embed_images(self, images: torch.Tensor) -> EvaluatorEmbeddings:
        """Detect (YuNet), align to the ArcFace template and embed uint8 RGB images [B, H, W, 3]."""
        alignment = align_faces(images, self.detector, self.align_config)
        return EvaluatorEmbeddings(embeddings=self.embed(alignment.crops), alignment=alignment)
