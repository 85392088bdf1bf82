"""Decoding to tensors and the views."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from pretrain.data.views import (
    VIEWS,
    EncodedImage,
    PixelShift,
    SharedCrop,
    UndecodableImage,
    decode_image,
    make_view,
    takes_encoded,
)
from tests.conftest import TINY, jpeg_bytes, psnr, smooth_jpeg


@pytest.mark.parametrize(
    "mode, fmt",
    [("RGB", "JPEG"), ("CMYK", "JPEG"), ("L", "JPEG"), ("RGB", "PNG"), ("RGB", "BMP"), ("RGB", "TIFF")],
)
def test_decode_gives_the_pixels_pil_gives(mode, fmt):
    data = jpeg_bytes(mode=mode, fmt=fmt)
    expected = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    decoded = decode_image(data)
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, expected)


@pytest.mark.parametrize("data", [b"", b"plain text", jpeg_bytes(size=(64, 48))[:300]])
def test_decode_raises_on_bad_bytes(data):
    with pytest.raises(UndecodableImage, match="not a decodable image"):
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
    plain = SharedCrop(v2.RandomResizedCrop(32, antialias=True), lambda x: x, lambda x: x)
    first, second = plain(image)
    assert torch.equal(first, second), "same crop, only the colour treatment differs"
    shift = PixelShift(v2.RandomResizedCrop(36, antialias=True), 32)
    torch.manual_seed(3)
    pairs = [shift(image) for _ in range(20)]
    assert any(not torch.equal(a, b) for a, b in pairs), "the two crops move independently"
    # The views overlap: the second is the first moved by at most 4 pixels each way.
    a, b = pairs[0]
    assert any(
        torch.equal(
            a[:, max(0, dy) : 32 + min(0, dy), max(0, dx) : 32 + min(0, dx)],
            b[:, max(0, -dy) : 32 + min(0, -dy), max(0, -dx) : 32 + min(0, -dx)],
        )
        for dy in range(-4, 5)
        for dx in range(-4, 5)
    )


def test_unknown_view_is_named():
    with pytest.raises(ValueError, match="unknown view 'swav'"):
        make_view("swav", 32)


def recipe_pipelines(size):
    """The papers' augmentations written out with torchvision, as the views were before they became
    configurable: a config that changes nothing must give these pixels."""
    from torchvision.transforms import v2

    from pretrain.data.views import BICUBIC, PILGaussianBlur, TwoViews, ViewSet

    def crop(scale, bicubic=False):
        return v2.RandomResizedCrop(
            size, scale=(scale, 1.0), antialias=True, **({"interpolation": BICUBIC} if bicubic else {})
        )

    def colour(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0, solarize_p=0.0):
        return v2.Compose(
            [
                v2.ToPILImage(),
                v2.RandomApply([v2.ColorJitter(*jitter)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([PILGaussianBlur()], p=blur_p),
                v2.RandomSolarize(threshold=128, p=solarize_p),
                v2.PILToTensor(),
            ]
        )

    flip = v2.RandomHorizontalFlip()
    mae = v2.Compose([crop(0.2, bicubic=True), flip])
    byol = TwoViews(
        v2.Compose([crop(0.08), colour(), flip]),
        v2.Compose([crop(0.08), colour(blur_p=0.1, solarize_p=0.2), flip]),
    )
    simclr = v2.Compose([crop(0.08), colour((0.8, 0.8, 0.8, 0.2), blur_p=0.5), flip])
    simsiam = v2.Compose([crop(0.2), colour((0.4, 0.4, 0.4, 0.1), blur_p=0.5), flip])
    shift = round(31 * size / 224)
    cmae_master, cmae_crop = (
        v2.Compose(
            [
                v2.RandomResizedCrop(size + shift, scale=(0.2, 1.0), interpolation=BICUBIC, antialias=True),
                flip,
            ]
        ),
        v2.RandomCrop(size),
    )
    return {
        "mae": mae,
        "mocov3": byol,
        "byol": byol,
        "hybrid": ViewSet(mae, byol),
        "simclr": TwoViews(simclr, simclr),
        "simsiam": TwoViews(simsiam, simsiam),
        "simmim": v2.Compose([crop(0.67, bicubic=True), flip]),
        "conmim": SharedCrop(v2.Compose([crop(0.08, bicubic=True), flip]), lambda x: x, colour(blur_p=0.5)),
        "cmae": lambda image: (lambda big: (cmae_crop(big), cmae_crop(big)))(cmae_master(image)),
    }


@pytest.mark.parametrize(
    "method", ["mae", "mocov3", "byol", "hybrid", "simclr", "simsiam", "simmim", "conmim", "cmae"]
)
def test_default_views_are_the_papers_recipes_pixel_for_pixel(method):
    from pretrain.config import load_config
    from pretrain.graft.start_weights import grafted_objective

    objective = grafted_objective(load_config(None, [f"method={method}", *TINY]))
    ours, expected = make_view(objective.view, 32), recipe_pipelines(32)[method]
    image = decode_image(jpeg_bytes(size=(80, 60), seed=3))
    for seed in range(4):
        torch.manual_seed(seed)
        got = ours(image)
        torch.manual_seed(seed)
        want = expected(image)
        got, want = (list(v) if isinstance(v, tuple) else [v] for v in (got, want))
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want)), (method, seed)


def test_paper_configs_keep_the_recipe_views():
    from pretrain.config import Config, load_config, view_configs
    from tests.conftest import REPO

    defaults = dict(view_configs(Config()))
    for path in sorted((REPO / "configs").glob("*_vit_[blh].yaml")):
        config = load_config(path, ["graft.init="])
        assert dict(view_configs(config)) == defaults, path.name


def test_view_config_reaches_the_transforms():
    from torchvision.transforms import v2

    from pretrain.config import load_config
    from pretrain.graft.start_weights import grafted_objective

    config = load_config(
        None,
        [
            "method=mocov3",
            *TINY,
            "moco.view1.min_scale=0.5",
            "moco.view1.max_ratio=1.0",
            "moco.view1.flip=false",
            "moco.view2.jitter=[0.2,0.3,0,0]",
            "moco.view2.jitter_p=0.5",
            "moco.view2.grayscale_p=0",
            "moco.view2.blur_p=0",
            "moco.view2.solarize_p=0.1",
            "moco.view2.interpolation=bicubic",
        ],
    )
    first, second = (
        make_view(grafted_objective(config).view, 32).first.transforms,
        make_view(grafted_objective(config).view, 32).second.transforms,
    )
    assert [type(t).__name__ for t in first] == ["DecodingResizedCrop", "Compose"], "no flip in view 1"
    assert first[0].scale == (0.5, 1.0) and first[0].ratio == (0.75, 1.0)
    crop, colour, flip = second
    assert crop.interpolation == v2.InterpolationMode.BICUBIC and isinstance(flip, v2.RandomHorizontalFlip)
    jitter, grayscale, blur, solarize = colour.transforms[1:5]
    assert (
        jitter.p == 0.5 and jitter.transforms[0].brightness == (0.8, 1.2) and jitter.transforms[0].hue is None
    )
    assert (grayscale.p, blur.p, solarize.p) == (0.0, 0.0, 0.1)
    plain = load_config(
        None,
        ["method=mocov3", *TINY, "moco.view1.jitter_p=0", "moco.view1.grayscale_p=0", "moco.view1.blur_p=0"],
    )
    assert [type(t).__name__ for t in make_view(grafted_objective(plain).view, 32).first.transforms] == [
        "DecodingResizedCrop",
        "RandomHorizontalFlip",
    ], "no colour step at all: no PIL round trip"


@pytest.mark.parametrize(
    "override, message",
    [
        ("moco.view1.min_scale=0", "config key moco.view1.min_scale = 0.0 must be in \\(0, 1\\]"),
        (
            "mae.view.max_scale=1.5",
            "config key mae.view.min_scale = 0.2 must be in \\(0, 1\\] and <= max_scale",
        ),
        (
            "simclr.view.jitter=[0.4,0.4]",
            "config key simclr.view.jitter = \\[0.4, 0.4\\] must be 4 strengths",
        ),
        (
            "byol.view2.blur_sigma=[2,1]",
            "config key byol.view2.blur_sigma = \\[2.0, 1.0\\] must be two numbers",
        ),
        ("simsiam.view.solarize_p=1.5", "config key simsiam.view.solarize_p = 1.5 must be in \\[0, 1\\]"),
        (
            "mae.view.interpolation=nearest",
            "config key mae.view.interpolation = 'nearest' must be one of bilinear",
        ),
        ("moco.view1.crop=0.5", "unknown config key moco.view1.crop"),
    ],
)
def test_bad_view_values_are_named_errors(override, message):
    from pretrain.config import load_config
    from pretrain.core.errors import UserError

    with pytest.raises(UserError, match=message):
        load_config(None, [override])


def test_only_views_that_start_with_a_random_crop_take_encoded_images():
    assert {name: takes_encoded(make_view(name, 32)) for name in VIEWS} == {
        **{name: True for name in VIEWS},
        "eval": False,
    }


@pytest.mark.parametrize("name", ["mae", "byol"])
def test_scaled_decoding_draws_the_same_crops_and_nearly_the_same_pixels(name):
    data, view, scaled = smooth_jpeg(), make_view(name, 64), 0
    for seed in range(12):
        torch.manual_seed(seed)
        full = view(decode_image(data))
        after_full = torch.rand(4)
        torch.manual_seed(seed)
        encoded = EncodedImage(data)
        reduced = view(encoded)
        assert torch.equal(torch.rand(4), after_full), "the same draws from the generator, crop and colour"
        scaled += bool(encoded._scaled)
        for a, b in zip(*((v,) if torch.is_tensor(v) else v for v in (full, reduced))):
            assert a.shape == b.shape == (3, 64, 64) and b.dtype == torch.uint8
            assert psnr(a, b) > 35, f"seed {seed}"
    assert scaled >= 6, "most crops of a 512x384 image downscale to 64 px by 2x or more"


def test_scaled_decoding_leaves_small_crops_and_other_formats_to_the_full_decode():
    png = jpeg_bytes(size=(256, 192), fmt="PNG")
    view = make_view("mae", 32)
    for data in (png, jpeg_bytes(size=(40, 30))):
        torch.manual_seed(0)
        full = view(decode_image(data))
        torch.manual_seed(0)
        encoded = EncodedImage(data)
        assert torch.equal(view(encoded), full) and not encoded._scaled
