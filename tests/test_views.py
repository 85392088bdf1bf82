"""Decoding to tensors and the views."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.views import VIEWS, PixelShift, SharedCrop, decode_image, make_view
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


@pytest.mark.parametrize("name", sorted(VIEWS))
def test_views_give_uint8_squares_and_follow_the_seed(name):
    image = decode_image(jpeg_bytes(size=(80, 60)))
    view = make_view(name, 32)
    torch.manual_seed(0)
    first = view(image)
    torch.manual_seed(0)
    second = view(image)
    first, second = (list(v) if isinstance(v, tuple) else [v] for v in (first, second))
    assert all(v.dtype == torch.uint8 and v.shape == (3, 32, 32) for v in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_conmim_views_share_the_crop_and_cmae_views_are_shifted():
    image = torch.arange(3 * 60 * 80, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 60, 80)
    plain = SharedCrop(32, lambda x: x, lambda x: x)
    first, second = plain(image)
    assert torch.equal(first, second), "same crop, only the colour treatment differs"
    shift = PixelShift(32, 4)
    torch.manual_seed(3)
    pairs = [shift(image) for _ in range(20)]
    assert any(not torch.equal(a, b) for a, b in pairs), "the two crops move independently"
    # The views overlap: the second is the first moved by at most 4 pixels each way.
    a, b = pairs[0]
    assert any(torch.equal(a[:, max(0, dy):32 + min(0, dy), max(0, dx):32 + min(0, dx)],
                           b[:, max(0, -dy):32 + min(0, -dy), max(0, -dx):32 + min(0, -dx)])
               for dy in range(-4, 5) for dx in range(-4, 5))


def test_unknown_view_is_named():
    with pytest.raises(ValueError, match="unknown view 'swav'"):
        make_view("swav", 32)
