"""Decoding and the augmented views of each method, all on uint8 CHW tensors.

Images are decoded by torchvision (libjpeg-turbo, libpng, libwebp) straight into tensors and
augmented with torchvision's v2 transforms on uint8 tensors: the same pixels as PIL for decoding and
about half of PIL's time for the bicubic crop-resize. Views stop at uint8: workers hand the
DataLoader a quarter of the bytes of float32 batches, and the consumer converts and normalizes on
its device with `normalize`. Randomness comes from torch's global generator, which the loader seeds
per sample. See BENCHMARKS.md for the numbers.
"""

import dataclasses
import io
import random
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFilter
from timm.data.auto_augment import rand_augment_transform
from timm.data.transforms import str_to_pil_interp
from torchvision.transforms import v2

from pretrain.data.colour_ops import TensorColour

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (which needs FFmpeg); they are
# pinned here and work. Should a later torchvision drop them, decode_image falls back to PIL.
warnings.filterwarnings(
    "ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning
)
try:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as torchvision_decode
except ImportError:
    torchvision_decode = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 0.875  # resize to img_size / 0.875 (256 for 224), then center crop
BICUBIC = v2.InterpolationMode.BICUBIC


class UndecodableImage(ValueError):
    """Bytes that no decoder here reads as an image: empty, another kind of file, truncated."""


def decode_image(data):
    """Encoded image bytes -> uint8 RGB CHW tensor; UndecodableImage if they are not a decodable image.

    torchvision decodes JPEG (CMYK and grayscale included), PNG, WEBP and GIF; other formats PIL
    reads (BMP, TIFF, ...) go through PIL.
    """
    if torchvision_decode is not None:
        try:
            return torchvision_decode(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
            )
        except (RuntimeError, ValueError):  # not a format it reads, or no bytes at all: PIL has the last word
            pass
    try:
        with Image.open(io.BytesIO(data)) as image:
            return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise UndecodableImage(f"{len(data)} bytes that are not a decodable image ({error})") from None


class EncodedImage:
    """An image not decoded yet: its bytes and its size, read from the header. A view's crop
    (DecodingResizedCrop) decodes it, and a JPEG whose crop is downscaled by 2, 4 or 8 or more at that
    scale: libjpeg's DCT-domain scaling (PIL's `draft`) skips most of the decoding's work and gives nearly
    the pixels of a full decode. The crop is drawn on the full size first, from the same generator, so
    the random stream, and with it exact resume, is what it is with full decoding."""

    def __init__(self, data):
        self.data = data
        with Image.open(io.BytesIO(data)) as image:  # reads the header only
            self.width, self.height = image.size
            self.is_jpeg = image.format == "JPEG"
        self._full, self._scaled = None, {}

    def full(self):
        """The whole image at its size (decoded once)."""
        if self._full is None:
            self._full = decode_image(self.data)
        return self._full

    def resized_crop(self, top, left, height, width, size, interpolation):
        """The box (top, left, height, width) of the full image resized to `size` (h, w), as a uint8 CHW
        tensor; decoded at the smallest JPEG scale that still has `size` pixels across the box."""
        factor = max((f for f in (8, 4, 2) if height >= f * size[0] and width >= f * size[1]), default=1)
        if factor == 1 or not self.is_jpeg:
            return v2.functional.resized_crop(
                self.full(), top, left, height, width, list(size), interpolation=interpolation, antialias=True
            )
        if factor not in self._scaled:  # decoded once per scale: the views of a pair often share one
            with Image.open(io.BytesIO(self.data)) as image:
                drafted = image.draft("RGB", (self.width // factor, self.height // factor))
                self._scaled[factor] = (image.convert("RGB"), self.width / drafted[1][2] if drafted else 1.0)
        image, scale = self._scaled[factor]  # scale: what libjpeg did (1 where PIL could not draft)
        box = (left / scale, top / scale, (left + width) / scale, (top + height) / scale)
        crop = image.resize((size[1], size[0]), PIL_INTERPOLATIONS[interpolation], box=box)
        return torch.from_numpy(np.array(crop)).permute(2, 0, 1).contiguous()


class DecodingResizedCrop(v2.RandomResizedCrop):
    """torchvision's RandomResizedCrop that also takes an EncodedImage and decodes only what the crop needs.
    On a tensor it is RandomResizedCrop itself; on an EncodedImage it draws the same crop (the same calls
    on the generator, for the full size) and has the image decode it."""

    def forward(self, *inputs):
        image = inputs[0] if len(inputs) == 1 else None
        if not isinstance(image, EncodedImage):
            return super().forward(*inputs)
        box = self.make_params([torch.empty(1, 1, 1).expand(3, image.height, image.width)])
        return image.resized_crop(
            box["top"], box["left"], box["height"], box["width"], self.size, self.interpolation
        )


def takes_encoded(view):
    """Whether `view` may be given an EncodedImage: a Compose that starts with a DecodingResizedCrop, or a
    view of several whose `parts` (what sees the image first) all may."""
    if isinstance(view, v2.Compose):
        return bool(view.transforms) and isinstance(view.transforms[0], DecodingResizedCrop)
    parts = getattr(view, "parts", None)
    return bool(parts) and all(takes_encoded(part) for part in parts)


def eval_view(img_size):
    """Deterministic: resize the short side, center crop."""
    return v2.Compose(
        [
            v2.Resize(round(img_size / EVAL_CROP_RATIO), interpolation=BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
        ]
    )


def finetune_view(
    img_size, min_scale=0.08, flip=True, rand_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic"
):
    """The per-image part of MAE's fine-tuning augmentation (its mixing and erasing act on the batch, in
    pretrain/methods/finetune.py): random resized crop (min_scale-100 %), horizontal flip and timm's
    RandAugment of spec `rand_augment` with MAE's hparams (empty: off). Also the linear probes' view,
    with RandAugment off."""
    steps = [
        DecodingResizedCrop(
            img_size, scale=(min_scale, 1.0), interpolation=INTERPOLATIONS[interpolation], antialias=True
        )
    ]
    steps += [v2.RandomHorizontalFlip()] if flip else []
    steps += [TimmRandAugment(rand_augment, img_size, interpolation)] if rand_augment else []
    return v2.Compose(steps)


class TimmRandAugment:
    """timm's rand_augment_transform (what MAE's create_transform builds from `auto_augment`) on a uint8
    CHW tensor. timm draws from Python's and NumPy's generators; both are seeded here from torch's, which
    the loader seeds per sample, so a view stays a function of (seed, epoch, rank, batch, position)."""

    def __init__(self, spec, img_size, interpolation="bicubic"):
        hparams = dict(
            translate_const=int(img_size * 0.45),
            interpolation=str_to_pil_interp(interpolation),
            img_mean=tuple(min(255, round(255 * x)) for x in IMAGENET_MEAN),
        )
        self.augment = rand_augment_transform(spec, hparams)

    def __call__(self, image):
        seed = int(torch.randint(2**62, ()))
        random.seed(seed)
        np.random.seed(seed % 2**32)
        pil = v2.functional.to_pil_image(image)
        return v2.functional.pil_to_tensor(self.augment(pil))


@dataclass
class ViewConfig:
    """One augmentation pipeline, applied in MoCo v3's (BYOL's) order: a random resized crop, then the
    colour steps (on PIL as the official recipes, 2x faster than torchvision's tensor ops at hue and blur;
    or on float tensors with data.colour_ops: tensor), then a horizontal flip. A colour step
    with probability 0 is a no-op; with every colour probability at 0 the PIL round trip is left out.
    Each method's section holds one of these per pipeline, its paper's recipe by default (the `*_recipe`
    functions below)."""

    min_scale: float = 0.08  # random resized crop: fraction of the image area, from ...
    max_scale: float = 1.0  # ... to
    min_ratio: float = 0.75  # aspect ratio of the crop, from ...
    max_ratio: float = 4 / 3  # ... to
    interpolation: str = "bilinear"  # bilinear | bicubic (MAE, SimMIM)
    jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])  # brightness, contrast,
    jitter_p: float = 0.8  # saturation, hue strengths of the colour jitter, and its probability
    grayscale_p: float = 0.2
    blur_p: float = 1.0
    blur_sigma: list[float] = field(default_factory=lambda: [0.1, 2.0])  # Gaussian blur sigma range
    solarize_p: float = 0.0
    flip: bool = True  # horizontal flip with probability 0.5

    def problems(self):
        """(field, what it must be) for every out-of-range value."""
        checks = [
            (0 < self.min_scale <= self.max_scale <= 1, "min_scale", "in (0, 1] and <= max_scale (<= 1)"),
            (0 < self.min_ratio <= self.max_ratio, "min_ratio", "positive and <= max_ratio"),
            (self.interpolation in INTERPOLATIONS, "interpolation", f"one of {', '.join(INTERPOLATIONS)}"),
            (
                len(self.jitter) == 4 and min(self.jitter) >= 0 and self.jitter[3] <= 0.5,
                "jitter",
                "4 strengths >= 0 (brightness, contrast, saturation, hue <= 0.5)",
            ),
            (
                len(self.blur_sigma) == 2 and 0 < self.blur_sigma[0] <= self.blur_sigma[1],
                "blur_sigma",
                "two numbers 0 < low <= high",
            ),
        ]
        checks += [
            (0 <= getattr(self, name) <= 1, name, "in [0, 1]")
            for name in ("jitter_p", "grayscale_p", "blur_p", "solarize_p")
        ]
        return [(name, expected) for ok, name, expected in checks if not ok]

    @property
    def has_colour(self):
        return (
            max(self.jitter_p if any(self.jitter) else 0.0, self.grayscale_p, self.blur_p, self.solarize_p)
            > 0
        )


NO_COLOUR = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)


def mae_recipe():
    """MAE (main_pretrain.py): crop of 20-100 % (bicubic) and a flip, nothing else."""
    return ViewConfig(min_scale=0.2, interpolation="bicubic", **NO_COLOUR)


def simmim_recipe():
    """SimMIM: crop of 67-100 % (bicubic), aspect 3/4-4/3, and a flip."""
    return ViewConfig(min_scale=0.67, interpolation="bicubic", **NO_COLOUR)


def byol_recipe(second=False):
    """BYOL's asymmetric pair, as MoCo v3 (main_moco.py) uses it: crops of 8-100 %, colour jitter
    0.4/0.4/0.2/0.1 with p 0.8, grayscale p 0.2, Gaussian blur p 1.0 (first) / 0.1 (second), solarize
    p 0 / 0.2, flip."""
    return ViewConfig(blur_p=0.1, solarize_p=0.2) if second else ViewConfig()


def simclr_recipe():
    """SimCLR's augmentation (both views): crops of 8-100 %, colour jitter of strength 1
    (0.8/0.8/0.8/0.2, p 0.8), grayscale p 0.2, blur p 0.5, flip."""
    return ViewConfig(jitter=[0.8, 0.8, 0.8, 0.2], blur_p=0.5)


def simsiam_recipe():
    """SimSiam's (MoCo v2's) augmentation (both views): crops of 20-100 %, jitter 0.4/0.4/0.4/0.1 p 0.8,
    grayscale p 0.2, blur p 0.5, flip."""
    return ViewConfig(min_scale=0.2, jitter=[0.4, 0.4, 0.4, 0.1], blur_p=0.5)


def conmim_recipe():
    """ConMIM: one crop of 8-100 % (bicubic) and flip shared by both branches; the slow branch also gets
    BYOL's colour jitter, grayscale and a blur with p 0.5."""
    return ViewConfig(interpolation="bicubic", blur_p=0.5)


def cmae_recipe():
    """CMAE: MAE's crop of 20-100 % (bicubic) and flip, before the pixel shift; no colour."""
    return mae_recipe()


INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": BICUBIC}
PIL_INTERPOLATIONS = {v2.InterpolationMode.BILINEAR: Image.BILINEAR, BICUBIC: Image.BICUBIC}


def random_crop(img_size, view):
    return DecodingResizedCrop(
        img_size,
        scale=(view.min_scale, view.max_scale),
        ratio=(view.min_ratio, view.max_ratio),
        interpolation=INTERPOLATIONS[view.interpolation],
        antialias=True,
    )


COLOUR_OPS = ("pil", "tensor")


def colour(view, colour_ops="pil"):
    """The colour steps of `view` on a uint8 tensor: jitter, grayscale, blur, solarize; through PIL as the
    official recipes run them ("pil"), or computed on float tensors with the same random draws ("tensor",
    pretrain.data.colour_ops: about half the time, nearly the same pixels)."""
    if colour_ops == "tensor":
        return TensorColour(view)
    if colour_ops != "pil":
        raise ValueError(f"colour_ops must be one of {', '.join(COLOUR_OPS)}, not {colour_ops!r}")
    return v2.Compose(
        [
            v2.ToPILImage(),
            v2.RandomApply([v2.ColorJitter(*view.jitter)], p=view.jitter_p),
            v2.RandomGrayscale(p=view.grayscale_p),
            v2.RandomApply([PILGaussianBlur(tuple(view.blur_sigma))], p=view.blur_p),
            v2.RandomSolarize(threshold=128, p=view.solarize_p),
            v2.PILToTensor(),
        ]
    )


def augmentation(img_size, view, colour_ops="pil"):
    """The pipeline a `ViewConfig` describes: crop, colour (if any), flip (if on)."""
    steps = [random_crop(img_size, view)]
    steps += [colour(view, colour_ops)] if view.has_colour else []
    steps += [v2.RandomHorizontalFlip()] if view.flip else []
    return v2.Compose(steps)


def single_view(img_size, view, colour_ops="pil"):
    return augmentation(img_size, view, colour_ops)


class TwoViews:
    """Two differently augmented views of one image (a tuple), as contrastive methods need."""

    def __init__(self, first, second):
        self.first, self.second = first, second
        self.parts = (first, second)

    def __call__(self, image):
        return self.first(image), self.second(image)


def two_views(img_size, first, second, colour_ops="pil"):
    """Views from `first` and from `second` (ViewConfigs; the same one for symmetric recipes)."""
    return TwoViews(augmentation(img_size, first, colour_ops), augmentation(img_size, second, colour_ops))


class PILGaussianBlur:
    """Gaussian blur with sigma drawn from [low, high] (torch's generator, so the loader's seeding
    holds). PIL's blur: ~6x cheaper than a 23x23 convolution on a tensor at 224 px."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image):
        sigma = torch.empty(1).uniform_(*self.sigma).item()
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))


class SharedCrop:
    """One crop and flip of the image, then two treatments of it: views whose patches are at the same
    positions (ConMIM's patch-level dictionary needs that)."""

    def __init__(self, geometry, first, second):
        self.geometry, self.first, self.second = geometry, first, second
        self.parts = (geometry,)

    def __call__(self, image):
        image = self.geometry(image)
        return self.first(image), self.second(image)


def conmim_view(img_size, view, colour_ops="pil"):
    """ConMIM's asymmetric pair: the masked online branch sees the crop of `view`, the slow encoder the
    same crop with `view`'s colour steps."""
    geometry = augmentation(img_size, ViewConfig(**{**dataclasses.asdict(view), **NO_COLOUR}))
    return SharedCrop(geometry, lambda image: image, colour(view, colour_ops))


class PixelShift:
    """CMAE's pixel shifting: one augmentation to img_size + shift pixels, then two img_size crops at
    independent random offsets: views of the same content, up to `shift` pixels apart."""

    def __init__(self, master, img_size):
        self.master = master
        self.parts = (master,)
        self.crop = v2.RandomCrop(img_size)

    def __call__(self, image):
        image = self.master(image)
        return self.crop(image), self.crop(image)


def cmae_view(img_size, view, colour_ops="pil"):
    """CMAE's views: the paper's 31-pixel shift at 224 px, scaled with the image size."""
    shift = max(1, round(31 * img_size / 224))
    return PixelShift(augmentation(img_size + shift, view, colour_ops), img_size)


class ViewSet:
    """Several views of one image, each from its own augmentation (a tuple, flattened)."""

    def __init__(self, *augmentations):
        self.augmentations = self.parts = augmentations

    def __call__(self, image):
        views = []
        for augmentation in self.augmentations:
            view = augmentation(image)
            views += list(view) if isinstance(view, tuple) else [view]
        return tuple(views)


def hybrid_view(img_size, masked, first, second, colour_ops="pil"):
    """The MIM view and the two contrastive views of each image, for the hybrid MIM + CL loss."""
    return ViewSet(augmentation(img_size, masked, colour_ops), two_views(img_size, first, second, colour_ops))


class Configured:
    """A view for the loader, a function of img_size: `builder(img_size, *views)` for ViewConfigs `views`."""

    def __init__(self, builder, *views):
        self.builder, self.views = builder, views

    def __call__(self, img_size, colour_ops="pil"):
        return self.builder(img_size, *self.views, colour_ops=colour_ops)


# The views by name, each paper's recipe: what `Objective.view` names when no config chose one.
VIEWS = {
    "eval": eval_view,
    "finetune": finetune_view,
    "mae": Configured(single_view, mae_recipe()),
    "simmim": Configured(single_view, simmim_recipe()),
    "byol": Configured(two_views, byol_recipe(), byol_recipe(second=True)),
    "simclr": Configured(two_views, simclr_recipe(), simclr_recipe()),
    "simsiam": Configured(two_views, simsiam_recipe(), simsiam_recipe()),
    "hybrid": Configured(hybrid_view, mae_recipe(), byol_recipe(), byol_recipe(second=True)),
    "conmim": Configured(conmim_view, conmim_recipe()),
    "cmae": Configured(cmae_view, cmae_recipe()),
}


def make_view(name, img_size, colour_ops="pil"):
    """The view called `name` at `img_size`; `name` may also be a function of img_size (a configured view).
    `colour_ops` chooses how the colour steps of ViewConfig pipelines are computed (see `colour`)."""
    if not callable(name) and name not in VIEWS:
        raise ValueError(f"unknown view {name!r}; known: {', '.join(sorted(VIEWS))}")
    view = name if callable(name) else VIEWS[name]
    return view(img_size, colour_ops) if isinstance(view, Configured) else view(img_size)


def normalize(images, device=None, dtype=torch.float32, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 NCHW batch -> normalized float batch on `device` (the conversion runs on the device)."""
    images = images.to(device, non_blocking=True).to(dtype).div_(255)
    mean = torch.tensor(mean, device=images.device, dtype=dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=dtype).view(1, -1, 1, 1)
    return images.sub_(mean).div_(std)
