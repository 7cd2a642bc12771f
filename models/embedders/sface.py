"""SFace: a second, independent face-recognition model for the quality report.

The job's own embedder (ArcFace iResNet) also steers the sampling, so its scores flatter the
dataset; SFace (Zhong et al. 2021, opencv_zoo's 2021dec int8 model, 128-d) is another network
trained with another loss. `embed` runs it batched through onnxruntime (CUDA when the worker has it,
else the CPU); `embed_per_image` is the original path, `cv2.FaceRecognizerSF` one image at a time.

The opencv_zoo file (pinned by sha256, never rewritten on disk) has a fixed batch of 1, declares
its weights as graph inputs too (so onnxruntime must treat them as variables and folds nothing) and
stores its convolution weights as int8 blocks with a DequantizeLinear node each, run on every call.
`batched_graph` makes, in memory, the graph onnxruntime can optimise: only the image is an input,
the batch dimension is named, and the DequantizeLinear nodes are replaced by their float32 results
(computed once by onnxruntime's own kernel), so the BatchNorms fold into the convolutions.
Measured against `embed_per_image` on random pixels and on the packaged photographs (ORT 1.32 vs
OpenCV 4.14, onnxruntime at 1 and 2 threads, batches of 1-128): the unit embeddings differ by at
most 1e-6 in any component (cosine >= 0.9999998); the tests hold them to 1e-5. On a 2-core CPU the
optimised graph runs about 17.5 ms an image against about 23 ms as stored (1.15 GFLOP each; its
elementwise PReLUs are memory-bound there); batching itself saves little on a CPU, the gain is on
a GPU.

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
    """The SFace graph for batched inference on constants (module docstring): only the image is an
    input, with a named batch dimension; the int8 weight blocks are dequantized once, here."""
    model = onnx.load(str(path))
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    read = {name for node in graph.node for name in node.input}
    fed = [v.name for v in graph.input if v.name in read and v.name not in weights]  # the rest: unread
    if fed != [INPUT] or len(graph.output) != 1:
        raise ValueError(f"{path}: expected one fed input {INPUT!r} and one output, got {fed} and "
                         f"{len(graph.output)}")
    image = next(v for v in graph.input if v.name == INPUT)
    del graph.input[:]
    graph.input.append(image)  # weights declared as inputs too could be fed, so ORT kept them variable
    for value in (graph.input[0], graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    _dequantize_weights(model, weights)
    return model


def _dequantize_weights(model: onnx.ModelProto, weights: dict[str, onnx.TensorProto]) -> None:
    """Replace each DequantizeLinear of stored int8 blocks by its float32 result, computed by
    onnxruntime's own kernel (the values every run computed before); ORT can then fold the
    BatchNorms into the convolutions. Other nodes are left as they are."""
    graph = model.graph
    nodes = [n for n in graph.node if n.op_type == "DequantizeLinear" and all(i in weights for i in n.input)]
    if not nodes:
        return
    outputs = [onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None) for n in nodes]
    inputs = sorted({i for n in nodes for i in n.input})
    folding = onnx.helper.make_model(
        onnx.helper.make_graph(nodes, "dequantize", [], outputs, initializer=[weights[i] for i in inputs]),
        opset_imports=model.opset_import, ir_version=model.ir_version)
    values = ort.InferenceSession(folding.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
    still_read = {i for n in graph.node if n not in nodes for i in n.input}
    kept_nodes = [n for n in graph.node if n not in nodes]
    kept_weights = [t for t in graph.initializer if t.name not in inputs or t.name in still_read]
    del graph.node[:]
    graph.node.extend(kept_nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept_weights)
    graph.initializer.extend(onnx.numpy_helper.from_array(v, n.output[0]) for n, v in zip(nodes, values, strict=True))


def _check_crops(aligned: torch.Tensor) -> np.ndarray:
    s = TEMPLATE_SIZE
    if aligned.dtype != torch.uint8 or aligned.ndim != 4 or tuple(aligned.shape[1:]) != (s, s, 3):
        raise ValueError(
            f"aligned: expected uint8 [B, {s}, {s}, 3], got {aligned.dtype} {tuple(aligned.shape)}"
        )
    return aligned.cpu().numpy()  # [B, 112, 112, 3]
