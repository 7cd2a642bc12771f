"""Forward-only face embedders in ONNX, run by onnxruntime (Arc2Face's `arcface.onnx`).

Arc2Face ships insightface's antelopev2 recognition model (glintr100, an iResNet-100 exported from
PyTorch) as `arcface.onnx`. Preprocessing follows insightface's `ArcFaceONNX`: RGB crops at the
graph's input size, (pixel - 127.5) / 127.5, NCHW float32; except for graphs that normalise
by themselves (MXNet-era exports start with Sub and Mul nodes), which get raw pixels (mean 0,
std 1). Outputs are un-normalised features; `embed_images` returns them unit-norm.

`build_tiny` writes the tiny iResNet preset as an ONNX graph assembled node by node (no exporter
involved), so that its bytes, and the sha256 pinned for them, depend only on the tiny weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper, numpy_helper

from models.embedders.iresnet import TINY_CONFIG, IBasicBlock, IResNetConfig, IResNetEmbedder, tiny_model

PIXEL_MEAN = 127.5  # insightface ArcFaceONNX: (pixel - mean) / std for graphs without their own normalisation
PIXEL_STD = 127.5  # see PIXEL_MEAN
SCAN_NODES = 8  # ArcFaceONNX looks for the Sub and Mul of in-graph normalisation among the first 8 nodes
WEIGHTS_FILE = "model.onnx"  # the tiny preset's graph, in its model directory
OPSET = 17  # ONNX opset of the tiny preset's graph
IR_VERSION = 8  # ONNX IR version of the tiny preset's graph (the first that knows opset 17)
INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}  # graph input type -> numpy


def graph_normalises_input(graph: onnx.GraphProto) -> bool:
    """Whether the graph starts with its own (x - mean) * scale, as insightface's ArcFaceONNX decides.

    Like ArcFaceONNX, a Sub node and a Mul node (by name or, here, also by op type; Div counts
    as Mul) among the first 8 nodes; unlike it, Constant and Identity nodes are skipped first
    (the TorchScript exporter emits runs of Identity nodes before anything else).
    """
    nodes = [n for n in graph.node if n.op_type not in ("Constant", "Identity")][:SCAN_NODES]
    sub = any(n.op_type == "Sub" or n.name.startswith(("Sub", "_minus")) for n in nodes)
    mul = any(n.op_type in ("Mul", "Div") or n.name.startswith(("Mul", "_mul")) for n in nodes)
    return sub and mul


def providers_for(device: str | torch.device) -> list[str | tuple[str, dict[str, int]]]:
    """onnxruntime providers for a torch-style device: CUDA when asked for and available, else CPU."""
    dev = torch.device(device)
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected a cpu or cuda device, got {device!r}")
    if dev.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxEmbedder:
    """Aligned uint8 RGB crops [B, S, S, 3] -> unit-norm embeddings [B, D], through an ONNX graph."""

    differentiable = False  # a forward-only graph: no gradients w.r.t. the input

    def __init__(self, session: ort.InferenceSession, *, input_mean: float, input_std: float) -> None:
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(f"session: expected one input and one output, got {len(inputs)} and {len(outputs)}")
        shape = inputs[0].shape  # [batch, 3, S, S]; batch is a name (dynamic) or an int (fixed)
        if len(shape) != 4 or shape[1] != 3 or not isinstance(shape[2], int) or shape[2] != shape[3]:
            raise ValueError(f"session: expected an input [batch, 3, S, S] with a fixed S, got {shape}")
        if inputs[0].type not in INPUT_DTYPES:
            raise ValueError(f"session: expected a float or float16 input, got {inputs[0].type}")
        if not input_std > 0:
            raise ValueError(f"input_std: must be > 0, got {input_std}")
        self.session = session
        self.input_mean = float(input_mean)  # subtracted from the pixels
        self.input_std = float(input_std)  # then divides them
        self.input_size: int = shape[2]  # crop height = width in pixels
        self.fixed_batch: int | None = shape[0] if isinstance(shape[0], int) else None  # None: dynamic
        self._input_name = inputs[0].name
        self._input_dtype = INPUT_DTYPES[inputs[0].type]
        out_shape = outputs[0].shape
        if len(out_shape) == 2 and isinstance(out_shape[1], int):
            self.embedding_dim: int = out_shape[1]  # output features
        else:  # a symbolic feature size: ask the graph
            probe = np.zeros((self.fixed_batch or 1, 3, self.input_size, self.input_size), self._input_dtype)
            self.embedding_dim = int(self._run(probe).shape[1])

    @classmethod
    def from_file(cls, path: str | Path, *, device: str | torch.device = "cpu") -> OnnxEmbedder:
        """Open an ONNX recognition model; the preprocessing is read from its first nodes."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"path: no ONNX file at {path}")
        providers = providers_for(device)
        graph = onnx.load(str(path), load_external_data=False).graph
        own = graph_normalises_input(graph)
        del graph
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        return cls(session, input_mean=0.0 if own else PIXEL_MEAN, input_std=1.0 if own else PIXEL_STD)

    @property
    def providers(self) -> list[str]:
        """The onnxruntime execution providers in use, best first."""
        return list(self.session.get_providers())

    def _run(self, blob: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self._input_name: blob})[0])

    def embed_images(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Unit-norm embeddings of uint8 RGB images [B, S, S, 3]: [B, D] float32 on the CPU.

        A graph with a fixed batch size n runs n images at a time (the last run padded).
        """
        s = self.input_size
        if not (
            isinstance(images, torch.Tensor)
            and images.dtype == torch.uint8
            and images.ndim == 4
            and tuple(images.shape[1:]) == (s, s, 3)
        ):
            got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images)
            raise ValueError(f"images: expected a uint8 tensor [B, {s}, {s}, 3], got {got}")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        step = self.fixed_batch or batch_size
        out = []
        for chunk in images.cpu().split(step):
            n = chunk.shape[0]
            x = chunk.permute(0, 3, 1, 2).numpy().astype(np.float32)  # [n, 3, S, S]
            x = (x - self.input_mean) / self.input_std
            if self.fixed_batch is not None and n < step:
                x = np.concatenate([x, np.zeros((step - n, 3, s, s), np.float32)])  # [step, 3, S, S]
            features = self._run(x.astype(self._input_dtype))[:n]  # [n, D]
            out.append(torch.from_numpy(features.astype(np.float32)))
        if not out:
            return torch.empty(0, self.embedding_dim)
        return torch.nn.functional.normalize(torch.cat(out), dim=1)  # [B, D]


def iresnet_to_onnx(model: IResNetEmbedder, *, input_name: str = "input") -> onnx.ModelProto:
    """An ONNX graph of `model`'s un-normalised features, written node by node (float32, dynamic batch).

    The graph takes (pixel - 127.5) / input_std, as arcface_torch's exports do; a model whose
    input_std is not 127.5 is refused, since the graph could not say so.
    """
    if model.config.input_std != PIXEL_STD:
        raise ValueError(f"model: input_std must be {PIXEL_STD} for an ONNX export, got {model.config.input_std}")
    weights: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, t: torch.Tensor) -> str:
        weights.append(numpy_helper.from_array(t.detach().float().cpu().numpy(), name))
        return name

    def add(op: str, inputs: list[str], out: str, **attrs: object) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(x: str, m: torch.nn.Conv2d, name: str) -> str:
        k, stride, pad = m.kernel_size[0], m.stride[0], m.padding[0]
        w = const(f"{name}.weight", m.weight)
        return add("Conv", [x, w], name, kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4)

    def bn(x: str, m: torch.nn.modules.batchnorm._BatchNorm, name: str) -> str:
        assert m.running_mean is not None and m.running_var is not None
        params = [const(f"{name}.{p}", t) for p, t in
                  (("weight", m.weight), ("bias", m.bias), ("running_mean", m.running_mean),
                   ("running_var", m.running_var))]
        return add("BatchNormalization", [x, *params], name, epsilon=m.eps)

    def prelu(x: str, m: torch.nn.PReLU, name: str) -> str:
        return add("PRelu", [x, const(f"{name}.weight", m.weight.reshape(-1, 1, 1))], name)  # [C, 1, 1]

    def block(x: str, b: IBasicBlock, name: str) -> str:
        y = bn(x, b.bn1, f"{name}.bn1")
        y = prelu(bn(conv(y, b.conv1, f"{name}.conv1"), b.bn2, f"{name}.bn2"), b.prelu, f"{name}.prelu")
        y = bn(conv(y, b.conv2, f"{name}.conv2"), b.bn3, f"{name}.bn3")
        if b.downsample is not None:
            x = bn(conv(x, b.downsample[0], f"{name}.downsample.0"), b.downsample[1], f"{name}.downsample.1")
        return add("Add", [y, x], f"{name}.add")

    x = prelu(bn(conv(input_name, model.conv1, "conv1"), model.bn1, "bn1"), model.prelu, "prelu")
    for i in range(1, 5):
        for j, b in enumerate(getattr(model, f"layer{i}")):
            x = block(x, b, f"layer{i}.{j}")
    x = add("Flatten", [bn(x, model.bn2, "bn2")], "flatten", axis=1)
    x = add("Gemm", [x, const("fc.weight", model.fc.weight), const("fc.bias", model.fc.bias)], "fc", transB=1)
    x = bn(x, model.features, "features")
    s, d = model.config.input_size, model.config.embedding_dim
    graph = helper.make_graph(
        nodes,
        "iresnet",
        [helper.make_tensor_value_info(input_name, onnx.TensorProto.FLOAT, ["batch", 3, s, s])],
        [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["batch", d])],
        initializer=weights,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION)
    onnx.checker.check_model(proto)
    return proto


def build_tiny(path: str | Path, seed: int = 0, config: IResNetConfig = TINY_CONFIG) -> Path:
    """Write the tiny iResNet preset (same weights as iresnet-tiny) to `path / model.onnx`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(iresnet_to_onnx(tiny_model(seed, config)), str(path / WEIGHTS_FILE))
    return path
