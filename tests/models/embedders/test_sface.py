import cv2
import numpy as np
import pytest
import torch
from matplotlib import cbook
from PIL import Image
from skimage.data import astronaut

from models.alignment.landmarks import AlignConfig, align_faces
from models.embedders.sface import SFACE_COSINE_THRESHOLD, SFaceEvaluator
from models.modelspec import ModelUnavailable


@pytest.fixture(scope="module")
def evaluator() -> SFaceEvaluator:
    return SFaceEvaluator()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """uint8 [3, 512, 512, 3]: the astronaut, her mirror image, Grace Hopper (centre 512 px)."""
    with cbook.get_sample_data("grace_hopper.jpg") as f:
        hopper = np.asarray(Image.open(f).convert("RGB"))[44:556]  # [512, 512, 3]
    face = astronaut()
    return torch.from_numpy(np.stack([face, face[:, ::-1], hopper]).copy())


def test_same_person_scores_above_the_threshold_and_others_below(evaluator, photos):
    assert evaluator.threshold == SFACE_COSINE_THRESHOLD == 0.363  # opencv_zoo's published value
    out = evaluator.embed_images(photos)
    assert out.alignment.ok.all() and out.alignment.failures == 0
    e = out.embeddings  # [3, 128]
    mirrored, other = evaluator.similarity(e[0], e[1]), evaluator.similarity(e[0], e[2])
    assert mirrored > evaluator.threshold + 0.3  # measured 0.97
    assert other < evaluator.threshold - 0.1  # measured 0.19
    pairs = evaluator.similarity(e[:, None], e[None])  # [3, 3], broadcast
    assert pairs.shape == (3, 3) and torch.allclose(pairs.diagonal(), torch.ones(3), atol=1e-5)


def test_embeddings_are_unit_norm_deterministic_and_are_sfaces_rgb_features(evaluator, photos):
    crops = align_faces(photos, evaluator.detector).crops  # [3, 112, 112, 3]
    e = evaluator.embed(crops)
    assert e.shape == (3, 128) and e.dtype == torch.float32 and e.device.type == "cpu"
    assert torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.equal(e, evaluator.embed(crops))
    # independent: the ONNX file through cv2.dnn, fed RGB planes in 0..255 as SFace was trained
    net = cv2.dnn.readNetFromONNX(str(evaluator.model_path))
    features = []
    for crop in crops:  # the graph has batch size 1
        net.setInput(crop.permute(2, 0, 1)[None].float().numpy())  # [1, 3, 112, 112] RGB
        features.append(torch.from_numpy(net.forward().reshape(128).copy()))
    ref = torch.nn.functional.normalize(torch.stack(features), dim=1)  # [3, 128]
    assert torch.allclose(e, ref, atol=1e-4)
    swapped = evaluator.embed(crops.flip(-1))  # BGR by mistake: a different embedding
    assert (evaluator.similarity(e, swapped) < 0.99).all()


def test_alignment_is_what_opencvs_align_crop_makes(evaluator):
    # alignCrop: the same template, the same least-squares similarity, the same bilinear warp
    image = astronaut()
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    raw = cv2.FaceDetectorYN.create(str(evaluator.detector.model_path), "", (512, 512), 0.7, 0.3, 5000)
    rows = raw.detect(bgr)[1]  # [N, 15]
    theirs = cv2.FaceRecognizerSF.create(str(evaluator.model_path), "").alignCrop(bgr, rows[0])[:, :, ::-1]
    ours = align_faces(torch.from_numpy(image)[None], evaluator.detector, AlignConfig(refine_steps=0)).crops[
        0
    ]
    diff = np.abs(ours.numpy().astype(int) - theirs)
    assert diff.max() <= 2 and diff.mean() < 0.01  # measured 2 and 0.0005: float32 vs float64 matrices


def test_bad_inputs_and_models_are_refused(evaluator, tmp_path):
    with pytest.raises(ValueError, match="aligned"):
        evaluator.embed(torch.zeros(1, 96, 112, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="a, b"):
        evaluator.similarity(torch.zeros(2, 512), torch.zeros(2, 512))
    fake = tmp_path / "sface.onnx"
    fake.write_bytes(b"not the model")
    with pytest.raises(ModelUnavailable, match="sha256"):
        SFaceEvaluator(model_path=fake, detector=evaluator.detector)


BATCHED_BOUND = 1e-5  # largest |batched - per-image| in any unit-embedding component; measured 8.7e-7


@pytest.mark.parametrize("threads", [1, 2])
def test_batched_embeddings_match_the_per_image_path(evaluator, photos, threads):
    # onnxruntime, batched, against OpenCV's FaceRecognizerSF one image at a time, on real faces
    # (aligned photographs, their mirror images, shifted crops) and on noise
    crops = align_faces(photos, evaluator.detector).crops  # [3, 112, 112, 3]
    shifted = torch.roll(crops, shifts=(3, -2), dims=(1, 2))
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8))
    batch = torch.cat([crops, crops.flip(2), shifted, noise])  # [14, 112, 112, 3]
    ev = SFaceEvaluator(detector=evaluator.detector, threads=threads)
    assert ev.providers[-1] == "CPUExecutionProvider"
    per_image = ev.embed_per_image(batch)  # [14, 128]
    for batch_size in (1, 4, 64):
        batched = ev.embed(batch, batch_size=batch_size)
        assert batched.shape == (14, 128) and batched.dtype == torch.float32
        assert (batched - per_image).abs().max() <= BATCHED_BOUND
        assert (batched * per_image).sum(dim=1).min() >= 1 - 1e-6
    assert ev.embed(batch[:0]).shape == (0, 128)
