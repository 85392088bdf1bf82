"""The colour steps on float tensors (data.colour_ops: tensor) against the PIL ones the official recipes
run."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import ImageFilter
from torchvision.transforms import v2

from pretrain.data.colour_ops import gaussian_blur, shift_hue, to_uint8
from pretrain.data.views import NO_COLOUR, VIEWS, ViewConfig, colour, decode_image, make_view
from tests.conftest import psnr, smooth_jpeg


@pytest.fixture(scope="module")
def crops():
    """Crops of a photo-like image with saturated and gray regions, as uint8 CHW tensors."""
    image = decode_image(smooth_jpeg((320, 240)))
    crop = v2.RandomResizedCrop(96, scale=(0.08, 1), antialias=True)
    torch.manual_seed(0)
    return [crop(image) for _ in range(6)]


STEPS = {  # one step at a time, at full strength (probability 1)
    "brightness": dict(jitter=[0.8, 0, 0, 0], jitter_p=1.0),
    "contrast": dict(jitter=[0, 0.8, 0, 0], jitter_p=1.0),
    "saturation": dict(jitter=[0, 0, 0.8, 0], jitter_p=1.0),
    "hue": dict(jitter=[0, 0, 0, 0.5], jitter_p=1.0),
    "grayscale": dict(grayscale_p=1.0),
    "blur": dict(blur_p=1.0),
    "solarize": dict(solarize_p=1.0),
}
# Largest difference from the PIL step, in grey levels: the linear steps differ by rounding only; PIL's hue
# goes through an 8-bit HSV image (hue in 256 steps), its blur is three box blurs approximating a Gaussian.
TOLERANCE = {
    "brightness": 1,
    "contrast": 1,
    "saturation": 1,
    "grayscale": 1,
    "solarize": 0,
    "hue": 12,
    "blur": 24,
}


@pytest.mark.parametrize("step", sorted(STEPS))
def test_each_step_draws_what_pil_draws_and_computes_nearly_its_pixels(crops, step):
    view = ViewConfig(**{**NO_COLOUR, **STEPS[step]})
    pil, tensor = colour(view, "pil"), colour(view, "tensor")
    for seed, crop in enumerate(crops):
        outputs = []
        for steps in (pil, tensor):
            torch.manual_seed(seed)
            outputs.append((steps(crop), torch.rand(3)))
        (expected, after_pil), (got, after_tensor) = outputs
        assert torch.equal(after_pil, after_tensor), "the same draws from the generator"
        assert got.dtype == torch.uint8 and got.shape == expected.shape
        assert (got.int() - expected.int()).abs().max() <= TOLERANCE[step], f"seed {seed}"
        assert psnr(got, expected) > 38, f"seed {seed}"


def test_the_hue_shift_is_torchvisions_adjust_hue(crops):
    """The closed form against torchvision's HSV round trip on float images (the definition, in floats)."""
    for crop in crops:
        for factor in (-0.5, -0.23, -0.04, 0.0, 0.1, 0.37, 0.5):
            expected = v2.functional.adjust_hue(crop.double() / 255, factor) * 255
            got = shift_hue(crop.float(), factor)
            assert (got.double() - expected).abs().max() < 1e-3, factor
    gray = torch.full((3, 8, 8), 77.0)  # no chroma: the hue is undefined and the pixels stay
    assert torch.equal(shift_hue(gray, 0.3), gray)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_the_blur_is_a_gaussian_of_the_drawn_sigma_with_extended_edges(crops, sigma):
    image = crops[0].float()
    radius = max(1, int(np.ceil(3 * sigma)))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    kernel = torch.outer(taps, taps) / taps.sum() ** 2
    padded = F.pad(image.double()[:, None], (radius,) * 4, mode="replicate")
    expected = F.conv2d(padded, kernel[None, None])[:, 0]
    assert (gaussian_blur(image, sigma).double() - expected).abs().max() < 1e-3
    # and close to PIL's blur of that radius (what the official recipes run)
    pil = v2.functional.pil_to_tensor(
        v2.functional.to_pil_image(crops[0]).filter(ImageFilter.GaussianBlur(sigma))
    )
    assert psnr(to_uint8(gaussian_blur(image, sigma)), pil) > 38


@pytest.mark.parametrize("name", sorted(set(VIEWS) - {"eval", "finetune"}))
def test_every_recipe_view_draws_the_same_with_tensor_colour_and_nearly_the_same_pixels(name):
    data = smooth_jpeg((320, 240))
    pil, tensor = make_view(name, 64, "pil"), make_view(name, 64, "tensor")
    for seed in range(4):
        outputs = []
        for view in (pil, tensor):
            torch.manual_seed(seed)
            views = view(decode_image(data))
            outputs.append(((views,) if torch.is_tensor(views) else views, torch.rand(3)))
        (expected, after_pil), (got, after_tensor) = outputs
        assert torch.equal(after_pil, after_tensor), "the same draws: the loader's seeding and resume hold"
        for a, b in zip(expected, got):
            assert a.shape == b.shape and b.dtype == torch.uint8
            assert psnr(a, b) > 35, f"{name} seed {seed}"


def test_an_unknown_colour_ops_value_is_a_named_error():
    from pretrain.config import load_config
    from pretrain.core.errors import UserError

    with pytest.raises(UserError, match="data.colour_ops"):
        load_config(None, ["data.colour_ops=opencv"])
    with pytest.raises(ValueError, match="colour_ops"):
        colour(ViewConfig(), "opencv")
