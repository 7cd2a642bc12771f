import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from models.alignment.template import (
    ARCFACE_TEMPLATE,
    align_to_template,
    center_crop_resize,
    encode_image,
    estimate_similarity,
)
from models.seeding import make_generator


def test_center_crop_resize_takes_the_centre_square():
    images = torch.zeros(2, 40, 60, 3, dtype=torch.uint8)
    images[:, :, 10:50] = 200  # the centre 40x40 square
    out = center_crop_resize(images, size=20)
    assert out.shape == (2, 20, 20, 3) and out.dtype == torch.uint8
    assert (out == 200).all()


def test_center_crop_resize_keeps_constant_and_passes_exact_size():
    flat = torch.full((1, 64, 64, 3), 77, dtype=torch.uint8)
    assert (center_crop_resize(flat) == 77).all()
    x = make_generator(0).integers(256, (3, 112, 112, 3)).to(torch.uint8)
    assert torch.equal(center_crop_resize(x, 112), x)


def test_center_crop_resize_rejects_bad_input():
    with pytest.raises(ValueError, match="images"):
        center_crop_resize(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="size"):
        center_crop_resize(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), size=0)


def test_encode_image_deterministic_and_decodable():
    x = make_generator(1).integers(256, (112, 112, 3)).to(torch.uint8)
    png = encode_image(x, "png")
    assert png == encode_image(x, "png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), x.numpy())  # lossless
    jpeg = encode_image(x, "jpeg", quality=90)
    assert jpeg == encode_image(x, "jpeg", quality=90) and jpeg[:2] == b"\xff\xd8"
    assert Image.open(io.BytesIO(jpeg)).size == (112, 112)
    with pytest.raises(ValueError, match="fmt"):
        encode_image(x, "gif")
    with pytest.raises(ValueError, match="quality"):
        encode_image(x, "jpeg", quality=0)


# --- five-point similarity alignment -------------------------------------------------------------


def _similarity(angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    """2x3 matrix of a rotation by angle_deg (counter-clockwise on screen), uniform scale and shift."""
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    return np.concatenate([rot, np.array(shift, dtype=np.float64)[:, None]], axis=1)


def _apply(matrix: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ matrix[:, :2].T + matrix[:, 2]


def test_arcface_template_is_insightfaces():
    assert ARCFACE_TEMPLATE.shape == (5, 2) and not ARCFACE_TEMPLATE.flags.writeable
    assert ARCFACE_TEMPLATE[0, 0] < ARCFACE_TEMPLATE[1, 0] and ARCFACE_TEMPLATE[3, 0] < ARCFACE_TEMPLATE[4, 0]
    assert np.allclose(ARCFACE_TEMPLATE.mean(0), [56.0262, 71.9008], atol=1e-4)  # OpenCV's dst_mean


def test_estimate_similarity_recovers_a_known_transform_exactly():
    src = make_generator(3).uniform(7, 2, dtype=torch.float64).numpy() * 200  # [7, 2]
    moves = [(37.0, 1.7, (12.5, -40.0)), (-170.0, 0.05, (0.0, 3.0)), (0.0, 1.0, (0.0, 0.0))]
    for angle, scale, shift in moves:
        truth = _similarity(angle, scale, shift)
        est = estimate_similarity(src, _apply(truth, src))
        assert est.shape == (2, 3) and est.dtype == np.float64
        assert np.allclose(est, truth, atol=1e-10)
    truth = _similarity(*moves[0])
    two = estimate_similarity(src[:2], _apply(truth, src[:2]))  # two points suffice
    assert np.allclose(two, truth, atol=1e-10)


def test_estimate_similarity_is_the_least_squares_optimum_on_noisy_points():
    g = make_generator(4)
    src = g.uniform(5, 2, dtype=torch.float64).numpy() * 100
    noise = g.normal(5, 2, dtype=torch.float64).numpy()  # [5, 2], 1 px
    dst = _apply(_similarity(-20.0, 0.7, (30.0, 5.0)), src) + noise
    # independent: a similarity is x' = a x - b y + tx, y' = b x + a y + ty, linear in (a, b, tx, ty)
    rows = np.zeros((10, 4))
    rows[0::2] = np.column_stack([src[:, 0], -src[:, 1], np.ones(5), np.zeros(5)])
    rows[1::2] = np.column_stack([src[:, 1], src[:, 0], np.zeros(5), np.ones(5)])
    (a, b, tx, ty), *_ = np.linalg.lstsq(rows, dst.reshape(-1), rcond=None)
    assert np.allclose(estimate_similarity(src, dst), [[a, -b, tx], [b, a, ty]], atol=1e-9)


def test_estimate_similarity_never_reflects():
    src = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 5.0], [3.0, 7.0]])
    mirrored = src * [-1.0, 1.0]
    est = estimate_similarity(src, mirrored)
    assert np.linalg.det(est[:, :2]) > 0  # a rotation and scale, however poor the fit


def test_estimate_similarity_rejects_degenerate_and_malformed_points():
    same = np.full((5, 2), 40.0)
    with pytest.raises(ValueError, match="src: the points are all equal"):
        estimate_similarity(same, ARCFACE_TEMPLATE)
    with pytest.raises(ValueError, match="dst: the points are all equal"):
        estimate_similarity(ARCFACE_TEMPLATE, same)
    with pytest.raises(ValueError, match="src"):
        estimate_similarity(np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="src, dst"):
        estimate_similarity(ARCFACE_TEMPLATE, ARCFACE_TEMPLATE[:4])
    with pytest.raises(ValueError, match="dst: points must be finite"):
        estimate_similarity(ARCFACE_TEMPLATE, np.where(ARCFACE_TEMPLATE > 90, np.nan, ARCFACE_TEMPLATE))


def _blobs(points: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """uint8 [size, size, 3]: a bright Gaussian spot centred on each (sub-pixel) point."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = sum(np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)) for x, y in points)
    return np.repeat((np.clip(img, 0, 1) * 255).round().astype(np.uint8)[:, :, None], 3, axis=2)


def _centroids(image: np.ndarray, near: np.ndarray, radius: int = 6) -> np.ndarray:
    """Intensity centroid of the spot around each point of `near`."""
    out = []
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    for x, y in near:
        w = image[:, :, 0].astype(np.float64) * ((xx - x) ** 2 + (yy - y) ** 2 <= radius**2)
        out.append([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])
    return np.array(out)


def test_align_to_template_puts_the_landmarks_on_the_template_points():
    # spots at the template's points moved by a known similarity; aligned, they must sit on the template
    for angle, scale, shift in [(20.0, 2.5, (60.3, 31.7)), (-35.0, 1.6, (150.2, 90.9))]:
        points = _apply(_similarity(angle, scale, shift), ARCFACE_TEMPLATE)  # [5, 2] in the source
        source = torch.from_numpy(_blobs(points, 320, sigma=2.5 * scale))[None]  # [1, 320, 320, 3]
        crop = align_to_template(source, torch.from_numpy(points)[None])  # [1, 112, 112, 3]
        assert crop.shape == (1, 112, 112, 3) and crop.dtype == torch.uint8
        found = _centroids(crop[0].numpy(), ARCFACE_TEMPLATE)
        assert np.abs(found - ARCFACE_TEMPLATE).max() < 0.1  # pixel conventions right to a tenth of a pixel


def test_align_to_template_undoes_a_known_transform_of_a_photograph():
    from skimage.data import astronaut

    image = astronaut()  # [512, 512, 3]
    landmarks = np.array([[200.1, 101.8], [247.2, 102.6], [220.3, 124.7], [198.9, 143.2], [239.8, 143.9]])
    moved = _similarity(15.0, 1.3, (-40.0, 25.0))
    moved_image = cv2.warpAffine(image, moved, (512, 512), flags=cv2.INTER_LINEAR)
    crops = align_to_template(
        torch.from_numpy(np.stack([image, moved_image])),
        np.stack([landmarks, _apply(moved, landmarks)]),
    )  # [2, 112, 112, 3]
    diff = (crops[0].float() - crops[1].float()).abs()[16:96, 16:96]  # the face, away from black borders
    shifted = (crops[0].float() - crops[0].roll(2, dims=1).float()).abs()[16:96, 16:96]
    assert diff.mean() < 2.0 and diff.mean() < shifted.mean() / 5  # measured 1.0 vs 15 for a 2 px shift


def test_align_to_template_checks_its_inputs():
    images = torch.zeros(2, 64, 64, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="landmarks"):
        align_to_template(images, np.zeros((1, 5, 2)))
    with pytest.raises(ValueError, match="images"):
        align_to_template(images.float(), np.zeros((2, 5, 2)))
