"""Decoding to tensors and the views."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.views import decode_image, make_view
from tests.conftest import jpeg_bytes


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "PNG"),
                                       ("RGB", "BMP"), ("RGB", "TIFF")])
def test_decode_gives_the_pixels_pil_gives(mode, fmt):
    data = jpeg_bytes(mode=mode, fmt=fmt)
    expected = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    decoded = decode_image(data)
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, expected)


@pytest.mark.parametrize("data", [b"", b"plain text", jpeg_bytes(size=(64, 48))[:300]])
def test_decode_raises_on_bad_bytes(data):
    with pytest.raises(Exception):
        decode_image(data)


@pytest.mark.parametrize("name", ["eval", "mae"])
def test_views_give_uint8_squares_and_follow_the_seed(name):
    image = decode_image(jpeg_bytes(size=(80, 60)))
    view = make_view(name, 32)
    torch.manual_seed(0)
    first = view(image)
    torch.manual_seed(0)
    assert first.dtype == torch.uint8 and first.shape == (3, 32, 32) and torch.equal(view(image), first)


def test_unknown_view_is_named():
    with pytest.raises(ValueError, match="unknown view 'simclr'"):
        make_view("simclr", 32)
