"""The colour steps of a view computed on float tensors: the same steps, the same random draws, about
half the time of PIL's.

The official recipes (MoCo v3's main_moco.py, BYOL, SimCLR) run torchvision's ColorJitter, RandomGrayscale,
a PIL Gaussian blur and Solarize on PIL images; `pretrain.data.views.colour` does exactly that and stays the
default. Most of that time is PIL's HSV round trip for the hue (two float conversions per pixel) and its
blur (three box passes), and each step rounds to uint8. `TensorColour` computes the same operations,
with torchvision's tensor definitions, in float32 on the 0..255 scale, rounding once at the end: the hue
shift in closed form (no HSV image), the blur as a separable Gaussian. It draws its random numbers in the
order, and from the generator, torchvision's transforms do, so a seed gives the same decisions and
factors as the PIL pipeline (and exact resume holds): only the rounding and the blur's kernel (a true
Gaussian of the drawn sigma rather than PIL's three-box approximation of one) differ. BENCHMARKS.md
("Colour steps on tensors") has the speed and the PSNR against the PIL pipeline.
"""

import math

import numpy as np
import torch
from torchvision.transforms import v2

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2 luma)
# The HSV-to-RGB offsets of red, green and blue, in sextants of the hue circle.
SEXTANT_OFFSETS = torch.tensor([5.0, 3.0, 1.0]).view(3, 1, 1)


def luma(image):
    """Grayscale (H, W) of a float RGB image."""
    r, g, b = image
    return r.mul(GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])


def shift_hue(image, factor):
    """Hue rotated by `factor` turns (torchvision's adjust_hue) of a float RGB image whose values are
    whole numbers in 0..255. In HSV the shift keeps the value (max) and the chroma (max - min); with the
    hue h in sextants, channel n of the result is max - chroma * clamp(2 - |k - 2|, 0, 1) where
    k = (n + h + 6 * factor) mod 6, n = 5, 3, 1 for red, green, blue (the closed form of HSV to RGB)."""
    r, g, b = image
    maxc = image.amax(0)
    chroma = maxc - image.amin(0)
    inverse = chroma.clamp_min(1).reciprocal_()  # where chroma is 0 the hue is arbitrary and unused
    # 1 where the channel is the maximum, else 0: exact because the values are whole numbers.
    red_max = (r - maxc).add_(1).clamp_(0, 1)
    green_max = (g - maxc).add_(1).clamp_(0, 1)
    hue = torch.lerp((r - g).mul_(inverse).add_(4), (b - r).mul_(inverse).add_(2), green_max)
    hue = torch.lerp(hue, (g - b).mul_(inverse), red_max).add_(6 * factor + 6)  # > 0 for |factor| <= 0.5
    k = SEXTANT_OFFSETS + hue
    k = k.sub_(k.div(6).floor_().mul_(6))
    return k.sub_(2).abs_().neg_().add_(2).clamp_(0, 1).mul_(chroma).neg_().add_(maxc)


def colour_jitter(image, params):
    """torchvision's ColorJitter with the parameters its make_params drew, on a float image (0..255):
    brightness, contrast, saturation and hue in the drawn order, each clamped to 0..255."""
    for step in params["fn_idx"].tolist():
        if step == 0 and params["brightness_factor"] is not None:
            image = image.mul_(params["brightness_factor"]).clamp_(0, 255)
        elif step == 1 and params["contrast_factor"] is not None:
            factor, mean = params["contrast_factor"], luma(image).mean()  # of the image before the step
            image = image.mul_(factor).add_((1 - factor) * mean).clamp_(0, 255)
        elif step == 2 and params["saturation_factor"] is not None:
            factor, gray = params["saturation_factor"], luma(image)
            image = image.mul_(factor).add_(gray.mul_(1 - factor)).clamp_(0, 255)
        elif step == 3 and params["hue_factor"] is not None:
            image = shift_hue(image.round_(), params["hue_factor"])
    return image


def gaussian_blur(image, sigma):
    """Separable Gaussian blur of a float (3, H, W) image, edges extended as PIL's blur extends them.
    The kernel reaches 3 sigma; the taps are added as shifted slices, cheaper here than a grouped
    convolution."""
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float64) / sigma) ** 2)
    taps = (taps / taps.sum()).tolist()
    height, width = image.shape[-2:]
    for dim, size in ((2, width), (1, height)):
        pad = (radius, radius, 0, 0) if dim == 2 else (0, 0, radius, radius)
        padded = torch.nn.functional.pad(image[None], pad, mode="replicate")[0]
        image = padded.narrow(dim, radius, size) * taps[radius]
        for offset, tap in enumerate(taps):
            if offset != radius:
                image.add_(padded.narrow(dim, offset, size), alpha=tap)
    return image


def to_uint8(image):
    """Float image in 0..255 -> uint8, rounded (numpy's cast: several times faster than torch's here)."""
    return torch.from_numpy((image.numpy() + 0.5).astype(np.uint8))


class TensorColour:
    """The colour steps of a ViewConfig, as `pretrain.data.views.colour` applies them on PIL, on a uint8
    tensor: jitter with probability jitter_p, grayscale, blur, solarize. Each step draws its coin
    (torch.rand(1) >= p skips it) and its parameters as torchvision's RandomApply / RandomGrayscale /
    RandomSolarize / ColorJitter and our PILGaussianBlur do, in the same order."""

    def __init__(self, view):
        self.view = view
        self.jitter = v2.ColorJitter(*view.jitter)  # its make_params draws the order and the factors

    def __call__(self, image):
        view = self.view
        image = image.float()
        if torch.rand(1) < view.jitter_p:
            image = colour_jitter(image, self.jitter.make_params([image]))
        if torch.rand(1) < view.grayscale_p:
            image = luma(image).expand_as(image).clone()
        if torch.rand(1) < view.blur_p:
            image = gaussian_blur(image, torch.empty(1).uniform_(*view.blur_sigma).item())
        if torch.rand(1) < view.solarize_p:
            image = torch.where(image.round() >= 128, 255 - image, image)
        return to_uint8(image.clamp_(0, 255))
