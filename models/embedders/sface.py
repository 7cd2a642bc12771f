"""SFace: a second, independent face-recognition model for the quality report.

The job's own embedder (ArcFace iResNet) also steers the sampling, so its scores flatter the
dataset; SFace (Zhong et al. 2021, opencv_zoo's 2021dec int8 model, 128-d) is another network
trained with another loss. `embed` runs it batched through onnxruntime (CUDA when the worker has it,
else the CPU); `embed_per_image` is the original path, `cv2.FaceRecognizerSF` one image at a time.

The opencv_zoo file (pinned by sha256, never rewritten on disk) has a fixed batch of 1 and declares
its original float weights as graph inputs that no node reads any more (the int8 blocks replaced them);
`batched_graph` drops those declarations and names the batch dimension, in memory, touching no node
or weight. Measured against `embed_per_image` on random pixels and on the packaged photographs (ORT
1.32 vs OpenCV 4.14, onnxruntime at 1 and 2 threads, batches of 1-128): the unit embeddings differ by
at most 8.7e-7 in any component (cosine >= 0.9999998); the tests hold them to 1e-5. On a 2-core CPU
both run about 20 ms an image (1.15 GFLOP each; batching saves little there); the gain is on a GPU.

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
import onnx
import onnxruntime as ort
import torch

from models.alignment.landmarks import AlignConfig, AlignmentResult, YuNetDetector, align_faces
from models.alignment.opencv_zoo import SFACE_FILE, SFACE_SHA256, verified
from models.alignment.template import TEMPLATE_SIZE
from models.embedders.onnx import providers_for

SFACE_COSINE_THRESHOLD = 0.363  # opencv_zoo sface.py: same identity when cosine >= this
SFACE_DIM = 128  # embedding size
BATCH = 64  # crops per onnxruntime run
INPUT = "data"  # the graph's image input: RGB planes in 0..255, [batch, 3, 112, 112]


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
        *,
        device: str | torch.device = "cpu",
        threads: int = 0,
    ) -> None:
        """device: "cuda" runs onnxruntime's CUDA provider when it is installed (else the CPU);
        threads: onnxruntime's intra-op threads (0: its default, one per core)."""
        self.model_path = verified(model_path, SFACE_FILE, SFACE_SHA256)
        self.device = str(device)  # where it was asked to run; `providers` says where it does
        self._net: cv2.FaceRecognizerSF | None = None  # the per-image path, opened on first use
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        options.intra_op_num_threads = threads
        # No busy-waiting between runs: the evaluator shares the CPU with the renderer's threads, and
        # spinning threads of two pools on the same cores slow both several-fold.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(batched_graph(self.model_path).SerializeToString(),
                                            sess_options=options, providers=providers_for(device))
        self.detector = detector if detector is not None else YuNetDetector()
        self.align_config = align_config if align_config is not None else AlignConfig()

    @property
    def providers(self) -> list[str]:
        """onnxruntime's execution providers in use, best first."""
        return list(self.session.get_providers())

    def embed(self, aligned: torch.Tensor, batch_size: int = BATCH) -> torch.Tensor:
        """uint8 RGB crops [B, 112, 112, 3] aligned to the ArcFace template -> float32 [B, 128], CPU.

        Batched through onnxruntime, `batch_size` crops a run."""
        pixels = _check_crops(aligned)  # [B, 112, 112, 3]
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        out = np.empty((pixels.shape[0], SFACE_DIM), dtype=np.float32)
        for b0 in range(0, pixels.shape[0], batch_size):
            blob = pixels[b0:b0 + batch_size].transpose(0, 3, 1, 2).astype(np.float32)  # [b, 3, 112, 112] RGB
            out[b0:b0 + batch_size] = self.session.run(None, {INPUT: blob})[0]  # [b, 128]
        return torch.nn.functional.normalize(torch.from_numpy(out), dim=1)  # [B, 128]

    def embed_per_image(self, aligned: torch.Tensor) -> torch.Tensor:
        """What `embed` computes, the original way: OpenCV's FaceRecognizerSF, one image at a time."""
        pixels = _check_crops(aligned)  # [B, 112, 112, 3]
        if self._net is None:
            self._net = cv2.FaceRecognizerSF.create(str(self.model_path), "")
        out = np.empty((pixels.shape[0], SFACE_DIM), dtype=np.float32)
        for i, rgb in enumerate(pixels):
            out[i] = self._net.feature(np.ascontiguousarray(rgb[:, :, ::-1])).reshape(SFACE_DIM)  # reads BGR
        return torch.nn.functional.normalize(torch.from_numpy(out), dim=1)  # [B, 128]

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


def batched_graph(path: str | Path) -> onnx.ModelProto:
    """The SFace graph with a dynamic batch: the unread input declarations dropped, the batch named.

    Nodes and weights are left as they are (module docstring)."""
    model = onnx.load(str(path))
    graph = model.graph
    read = {name for node in graph.node for name in node.input}
    weights = {t.name for t in graph.initializer}
    kept = [v for v in graph.input if v.name in read]  # the image input, and weights declared as inputs too
    fed = [v.name for v in kept if v.name not in weights]
    if fed != [INPUT] or len(graph.output) != 1:
        raise ValueError(f"{path}: expected one fed input {INPUT!r} and one output, got {fed} and "
                         f"{len(graph.output)}")
    del graph.input[:]
    graph.input.extend(kept)
    for value in (next(v for v in graph.input if v.name == INPUT), graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return model


def _check_crops(aligned: torch.Tensor) -> np.ndarray:
    s = TEMPLATE_SIZE
    if aligned.dtype != torch.uint8 or aligned.ndim != 4 or tuple(aligned.shape[1:]) != (s, s, 3):
        raise ValueError(
            f"aligned: expected uint8 [B, {s}, {s}, 3], got {aligned.dtype} {tuple(aligned.shape)}"
        )
    return aligned.cpu().numpy()  # [B, 112, 112, 3]
