import shutil

import cv2
import numpy as np
import pytest
import torch
from skimage.data import astronaut

from models.alignment.landmarks import AlignConfig, DetectorConfig, YuNetDetector, align_faces
from models.alignment.opencv_zoo import (
    SFACE_FILE,
    SFACE_SHA256,
    YUNET_FILE,
    YUNET_SHA256,
    packaged_file,
    sha256_of,
    verified,
)
from models.alignment.template import ARCFACE_TEMPLATE, center_crop_resize, estimate_similarity
from models.modelspec import ModelUnavailable
from models.seeding import make_generator


@pytest.fixture(scope="module")
def detector() -> YuNetDetector:
    return YuNetDetector()


def _apply(matrix: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ matrix[:, :2].T + matrix[:, 2]


def test_packaged_models_match_their_pins_and_others_are_refused(tmp_path):
    for name, digest in ((YUNET_FILE, YUNET_SHA256), (SFACE_FILE, SFACE_SHA256)):
        assert sha256_of(verified(None, name, digest)) == digest
    bad = tmp_path / YUNET_FILE
    shutil.copy(packaged_file(YUNET_FILE), bad)
    with bad.open("r+b") as f:  # one byte changed
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ModelUnavailable, match="not the pinned " + YUNET_SHA256):
        YuNetDetector(model_path=bad)
    with pytest.raises(ModelUnavailable, match="not a file"):
        YuNetDetector(model_path=tmp_path / "absent.onnx")


def test_yunet_landmarks_come_in_the_templates_order(detector):
    image = astronaut()
    face = detector.detect(image)
    assert face is not None and 0.9 < face.score <= 1.0
    (x, y, w, h), pts = face.box, face.landmarks  # [4], [5, 2]
    assert (
        (pts[:, 0] > x).all()
        and (pts[:, 0] < x + w).all()
        and (pts[:, 1] > y).all()
        and (pts[:, 1] < y + h).all()
    )
    # as in the template: the image-left eye first, the nose between and below the eyes, the mouth below
    assert pts[0, 0] < pts[2, 0] < pts[1, 0] and pts[3, 0] < pts[4, 0]
    assert max(pts[0, 1], pts[1, 1]) < pts[2, 1] < min(pts[3, 1], pts[4, 1])
    # and the mirrored photograph gives the mirrored landmarks, left and right swapped
    flipped = detector.detect(np.ascontiguousarray(image[:, ::-1]))
    back = flipped.landmarks[[1, 0, 2, 4, 3]] * [-1, 1] + [image.shape[1] - 1, 0]
    assert np.abs(back - pts).max() < 6.0  # YuNet's own noise, a few pixels on a 90 px face
    # a least-squares fit of the template to them is a proper similarity (no reflection needed)
    m = estimate_similarity(pts, ARCFACE_TEMPLATE)
    assert np.abs(_apply(m, pts) - ARCFACE_TEMPLATE).max() < 6.0


def test_alignment_undoes_known_rotations_scales_and_shifts(detector):
    """The astronaut moved by known similarities aligns to where the unmoved photograph aligns.

    Each image's alignment M_i, composed with its known move T_i, must send the original's landmarks
    where the original's own alignment M_0 sends them, to within a pixel of the 112 px crop. Without
    the upright re-detection (refine_steps=0) YuNet's landmarks put this 5-13 px off.
    """
    image = astronaut()
    centre = (222.0, 122.0)  # about the face's middle, so that it stays in the frame
    moves = [np.eye(3)[:2]]
    for angle, scale, shift in [
        (15.0, 0.8, (20.0, 30.0)),
        (-25.0, 1.3, (-15.0, 40.0)),
        (0.0, 1.0, (7.0, -4.0)),
    ]:
        m = cv2.getRotationMatrix2D(centre, angle, scale)
        m[:, 2] += shift
        moves.append(m)
    batch = np.stack([cv2.warpAffine(image, m, (512, 512), flags=cv2.INTER_LINEAR) for m in moves])
    result = align_faces(torch.from_numpy(batch), detector)
    assert result.ok.all() and result.failures == 0 and result.crops.shape == (4, 112, 112, 3)
    found = result.landmarks.double().numpy()  # [4, 5, 2]
    original = found[0]
    on_template = _apply(estimate_similarity(original, ARCFACE_TEMPLATE), original)  # [5, 2]
    assert np.abs(on_template - ARCFACE_TEMPLATE).max() < 5.0  # her face is not the template's shape
    for i in range(1, 4):
        aligned = _apply(estimate_similarity(found[i], ARCFACE_TEMPLATE), _apply(moves[i], original))
        assert np.hypot(*(aligned - on_template).T).max() < 1.0, i  # measured 0.2-0.6 px
        diff = (result.crops[i].float() - result.crops[0].float()).abs()[16:96, 16:96].mean()
        assert diff < 8.0, i  # measured 1-5 grey levels; 28-43 without the re-detection

    coarse = align_faces(torch.from_numpy(batch[1:3]), detector, AlignConfig(refine_steps=0))
    assert (coarse.crops.float() - result.crops[1:3].float()).abs()[:, 16:96, 16:96].mean() > 15.0


def test_an_image_without_a_face_is_a_counted_failure(detector):
    noise = make_generator(9).integers(256, (256, 256, 3)).to(torch.uint8)
    batch = torch.stack([noise, torch.from_numpy(astronaut()[:256, 96:352].copy())])  # [2, 256, 256, 3]
    result = align_faces(batch, detector)
    assert result.ok.tolist() == [False, True] and result.failures == 1
    assert torch.equal(result.crops[0], center_crop_resize(noise[None])[0])
    assert result.landmarks[0].isnan().all() and result.scores[0].isnan()
    assert result.landmarks[1].isfinite().all() and result.scores[1] > 0.9
    # on images at most 32 px high YuNet returns rows of stale memory (even "faces" in a black image):
    # such images are not searched
    strip = np.zeros((32, 300, 3), dtype=np.uint8)
    assert detector.detect(strip) is None
    assert align_faces(torch.from_numpy(strip)[None], detector).failures == 1


def test_align_faces_and_the_detector_check_their_inputs(detector):
    with pytest.raises(ValueError, match="images"):
        align_faces(torch.zeros(1, 64, 64, 3), detector)
    with pytest.raises(ValueError, match="image"):
        detector.detect(torch.zeros(64, 64, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="score_threshold"):
        DetectorConfig(score_threshold=1.5)
    with pytest.raises(ValueError, match="min_side"):
        DetectorConfig(min_side=32)
    with pytest.raises(ValueError, match="refine_steps"):
        AlignConfig(refine_steps=-1)
    empty = align_faces(torch.zeros(0, 64, 64, 3, dtype=torch.uint8), detector)
    assert empty.crops.shape == (0, 112, 112, 3) and empty.failures == 0
