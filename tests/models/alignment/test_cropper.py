"""The crop a generator's images get before they are saved and embedded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from models.alignment.cropper import Cropper
from models.alignment.ffhq import ffhq_crop
from models.alignment.landmarks import YuNetDetector
from models.alignment.template import ARCFACE_TEMPLATE, center_crop_resize
from models.seeding import make_generator


@pytest.fixture(scope="module")
def astronaut() -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(data.astronaut()))[None]  # [1, 512, 512, 3]


def test_landmarks_align_faces_and_flag_images_without_one(astronaut):
    noise = make_generator(0).integers(256, (1, 512, 512, 3)).to(torch.uint8)
    out = Cropper("landmarks")(torch.cat([astronaut, noise]))
    assert out.crops.shape == (2, 112, 112, 3) and out.crops.dtype == torch.uint8
    assert out.ok.tolist() == [True, False] and out.failures == 1
    assert torch.equal(out.crops[1], center_crop_resize(noise, 112)[0])  # the fallback is the centre crop
    face = YuNetDetector().detect(out.crops[0].numpy())  # the aligned face sits on the template
    assert face is not None
    # a least-squares fit of one real face to the template: each point within a few pixels
    distances = np.linalg.norm(face.landmarks - ARCFACE_TEMPLATE, axis=1)  # [5]
    assert distances.mean() < 4.0 and distances.max() < 8.0, distances


def test_fixed_crops_never_fail(astronaut):
    for method, expected in (("center", center_crop_resize(astronaut, 112)), ("ffhq", ffhq_crop(astronaut))):
        out = Cropper(method)(astronaut)
        assert torch.equal(out.crops, expected) and out.ok.all() and out.failures == 0


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="alignment"):
        Cropper("eyes")
