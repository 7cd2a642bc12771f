from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from models.embedders.iresnet import IResNetEmbedder, tiny_model
from models.embedders.onnx import OnnxEmbedder, build_tiny, graph_normalises_input, iresnet_to_onnx
from models.seeding import make_generator


class Features(torch.nn.Module):
    """What arcface_torch exports: [B, 3, S, S] in [-1, 1] -> un-normalised features [B, D]."""

    def __init__(self, model: IResNetEmbedder) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class RawPixels(Features):
    """An export that normalises by itself, as the MXNet-era models do: raw pixels in [0, 255]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features((x - 127.5) * (1 / 127.5))


def export(module: torch.nn.Module, path: Path, *, dynamic_batch: bool) -> Path:
    """torch 2.x's exporter (torch.export + onnxscript, `dynamo=True`)."""
    example = (torch.rand(2 if dynamic_batch else 1, 3, 112, 112) * 2 - 1,)
    shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None
    torch.onnx.export(module.eval(), example, str(path), dynamo=True, dynamic_shapes=shapes, verbose=False)
    return path


@pytest.fixture(scope="module")
def model() -> IResNetEmbedder:
    return tiny_model(seed=7)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return make_generator(8).integers(256, (5, 112, 112, 3)).to(torch.uint8)


def test_dynamic_batch_export_matches_torch(tmp_path, model, images):
    path = export(Features(model), tmp_path / "r.onnx", dynamic_batch=True)
    assert not graph_normalises_input(onnx.load(str(path)).graph)
    emb = OnnxEmbedder.from_file(path)
    assert (emb.input_size, emb.embedding_dim, emb.fixed_batch) == (112, 512, None)
    assert (emb.input_mean, emb.input_std, emb.differentiable) == (127.5, 127.5, False)
    got = emb.embed_images(images, batch_size=2)
    assert got.dtype == torch.float32 and got.shape == (5, 512)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(got, model.embed_images(images), atol=1e-4, rtol=0)
    assert emb.embed_images(images[:0]).shape == (0, 512)


def test_graph_that_normalises_gets_raw_pixels_one_at_a_time(tmp_path, model, images):
    path = export(RawPixels(model), tmp_path / "raw1.onnx", dynamic_batch=False)
    assert graph_normalises_input(onnx.load(str(path)).graph)  # starts with Sub, Mul
    emb = OnnxEmbedder.from_file(path)
    assert (emb.input_mean, emb.input_std, emb.fixed_batch) == (0.0, 1.0, 1)
    got = emb.embed_images(images[:3])  # a fixed batch of 1, three images
    torch.testing.assert_close(got, model.embed_images(images[:3]), atol=1e-4, rtol=0)
    mistaken = OnnxEmbedder(emb.session, input_mean=127.5, input_std=127.5)  # normalising twice
    assert (mistaken.embed_images(images[:3]) - got).abs().max() > 1e-2


def test_normalisation_is_detected_as_insightface_does():
    def graph(*nodes: tuple[str, str]) -> onnx.GraphProto:
        made = [helper.make_node(op, ["a"], [name], name=name) for op, name in nodes]
        return helper.make_graph(made, "g", [], [])

    mxnet = graph(("Sub", "_minusscalar0"), ("Mul", "_mulscalar0"), ("Conv", "conv0"))
    assert graph_normalises_input(mxnet)
    scripted = graph(*[("Identity", f"Identity_{i}") for i in range(12)], ("Sub", "/Sub"), ("Div", "/Div"))
    assert graph_normalises_input(scripted)  # TorchScript exports lead with Identity nodes
    assert not graph_normalises_input(graph(("Conv", "Conv_0"), ("PRelu", "PRelu_1"), ("Sub", "Sub_2")))
    late = graph(*[("Conv", f"c{i}") for i in range(8)], ("Sub", "s"), ("Mul", "m"))
    assert not graph_normalises_input(late)  # only the first 8 nodes count


def test_fixed_batch_larger_than_one_pads_the_last_run(tmp_path, model, images):
    proto = iresnet_to_onnx(model)
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 2  # fixed batch 2
    onnx.save(proto, str(tmp_path / "b2.onnx"))
    emb = OnnxEmbedder.from_file(tmp_path / "b2.onnx")
    assert emb.fixed_batch == 2
    torch.testing.assert_close(emb.embed_images(images), model.embed_images(images), atol=1e-5, rtol=0)


def test_tiny_preset_is_the_tiny_iresnet_and_reproducible(tmp_path, images):
    path = build_tiny(tmp_path / "arcface-onnx-tiny")
    emb = OnnxEmbedder.from_file(path / "model.onnx")
    reference = tiny_model()
    torch.testing.assert_close(emb.embed_images(images), reference.embed_images(images), atol=1e-5, rtol=0)
    assert (path / "model.onnx").read_bytes() == iresnet_to_onnx(reference).SerializeToString()


def test_bad_input_is_refused(tmp_path, model):
    proto_path = tmp_path / "m.onnx"
    onnx.save(iresnet_to_onnx(model), str(proto_path))
    emb = OnnxEmbedder.from_file(proto_path)
    with pytest.raises(ValueError, match="images"):
        emb.embed_images(torch.zeros(2, 64, 64, 3, dtype=torch.uint8))  # wrong size
    with pytest.raises(ValueError, match="images"):
        emb.embed_images(torch.zeros(2, 3, 112, 112, dtype=torch.uint8))  # channels first
    with pytest.raises(ValueError, match="images"):
        emb.embed_images(torch.zeros(2, 112, 112, 3))  # float, not uint8
    with pytest.raises(ValueError, match="batch_size"):
        emb.embed_images(torch.zeros(2, 112, 112, 3, dtype=torch.uint8), batch_size=0)
    with pytest.raises(ValueError, match="device"):
        OnnxEmbedder.from_file(proto_path, device="meta")
    with pytest.raises(ValueError, match="path"):
        OnnxEmbedder.from_file(tmp_path / "missing.onnx")


def test_cuda_provider_when_asked_for_and_present(tmp_path, model):
    proto_path = tmp_path / "m.onnx"
    onnx.save(iresnet_to_onnx(model), str(proto_path))
    emb = OnnxEmbedder.from_file(proto_path, device="cuda")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert emb.providers[0] == "CUDAExecutionProvider"
    else:
        assert emb.providers == ["CPUExecutionProvider"]  # falls back, still runs
    assert OnnxEmbedder.from_file(proto_path).providers == ["CPUExecutionProvider"]
