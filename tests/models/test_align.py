import io

import numpy as np
import pytest
import torch
from PIL import Image

from models.align import center_crop_resize, encode_image
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
    x = torch.randint(0, 256, (3, 112, 112, 3), dtype=torch.uint8, generator=make_generator(0))
    assert torch.equal(center_crop_resize(x, 112), x)


def test_center_crop_resize_rejects_bad_input():
    with pytest.raises(ValueError, match="images"):
        center_crop_resize(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="size"):
        center_crop_resize(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), size=0)


def test_encode_image_deterministic_and_decodable():
    x = torch.randint(0, 256, (112, 112, 3), dtype=torch.uint8, generator=make_generator(1))
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
