"""Decoding and the augmented views of each method, all on uint8 CHW tensors.

Images are decoded by torchvision (libjpeg-turbo, libpng, libwebp) straight into tensors and
augmented with torchvision's v2 transforms on uint8 tensors: the same pixels as PIL for decoding and
about half of PIL's time for the bicubic crop-resize. Views stop at uint8: workers hand the
DataLoader a quarter of the bytes of float32 batches, and the consumer converts and normalizes on
its device with `normalize`. Randomness comes from torch's global generator, which the loader seeds
per sample. See BENCHMARKS.md for the numbers.
"""
import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec (which needs FFmpeg); they are
# pinned here and work. Should a later torchvision drop them, decode_image falls back to PIL.
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)
try:
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as torchvision_decode
except ImportError:
    torchvision_decode = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 0.875  # resize to img_size / 0.875 (256 for 224), then center crop
BICUBIC = v2.InterpolationMode.BICUBIC


def decode_image(data):
    """Encoded image bytes -> uint8 RGB CHW tensor; raises if the bytes are not a decodable image.

    torchvision decodes JPEG (CMYK and grayscale included), PNG, WEBP and GIF; other formats PIL
    reads (BMP, TIFF, ...) go through PIL.
    """
    if torchvision_decode is not None:
        try:
            return torchvision_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def eval_view(img_size):
    """Deterministic: resize the short side, center crop."""
    return v2.Compose([
        v2.Resize(round(img_size / EVAL_CROP_RATIO), interpolation=BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
    ])


def mae_view(img_size, min_scale=0.2):
    """MAE's augmentation: random resized crop (scale 0.2-1) and horizontal flip, nothing else."""
    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), interpolation=BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
    ])


def finetune_view(img_size, min_scale=0.08, flip=True, rand_augment=9):
    """MAE's fine-tuning augmentation without mixing: random resized crop (min_scale-100 %, bicubic),
    horizontal flip and RandAugment (2 operations of magnitude `rand_augment`, timm's rand-m9 as
    torchvision implements it; 0 turns it off)."""
    steps = [v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), interpolation=BICUBIC, antialias=True)]
    steps += [v2.RandomHorizontalFlip()] if flip else []
    steps += [v2.RandAugment(num_ops=2, magnitude=rand_augment)] if rand_augment else []
    return v2.Compose(steps)


class TwoViews:
    """Two differently augmented views of one image (a tuple), as contrastive methods need."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, image):
        return self.first(image), self.second(image)


class PILGaussianBlur:
    """Gaussian blur with sigma drawn from [low, high] (torch's generator, so the loader's seeding
    holds). PIL's blur: ~6x cheaper than a 23x23 convolution on a tensor at 224 px."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image):
        sigma = torch.empty(1).uniform_(*self.sigma).item()
        return image.filter(ImageFilter.GaussianBlur(radius=sigma))


def photometric(jitter=(0.4, 0.4, 0.2, 0.1), blur_p=1.0, solarize_p=0.0):
    """Colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur and solarize on a uint8 tensor, run on
    PIL, which is faster at hue and blur."""
    return v2.Compose([
        v2.ToPILImage(),
        v2.RandomApply([v2.ColorJitter(*jitter)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([PILGaussianBlur()], p=blur_p),
        v2.RandomSolarize(threshold=128, p=solarize_p),
        v2.PILToTensor(),
    ])


def crop_and_colour(img_size, min_scale, **colour):
    """A random resized crop (on the tensor), `photometric(**colour)`, a horizontal flip."""
    return v2.Compose([v2.RandomResizedCrop(img_size, scale=(min_scale, 1.0), antialias=True),
                       photometric(**colour), v2.RandomHorizontalFlip()])


def byol_view(img_size):
    """BYOL's asymmetric pair of augmentations, as MoCo v3 uses them: crops of 8-100 %, colour jitter
    0.4/0.4/0.2/0.1 with p=0.8, grayscale p=0.2, Gaussian blur p=1.0 / 0.1, solarize p=0 / 0.2, flip."""
    return TwoViews(crop_and_colour(img_size, 0.08, blur_p=1.0, solarize_p=0.0),
                    crop_and_colour(img_size, 0.08, blur_p=0.1, solarize_p=0.2))


def simclr_view(img_size):
    """SimCLR's augmentation twice: crops of 8-100 %, colour jitter of strength 1 (0.8/0.8/0.8/0.2,
    p=0.8), grayscale p=0.2, blur p=0.5, flip."""
    augmentation = crop_and_colour(img_size, 0.08, jitter=(0.8, 0.8, 0.8, 0.2), blur_p=0.5)
    return TwoViews(augmentation, augmentation)


def simsiam_view(img_size):
    """SimSiam's (MoCo v2's) augmentation twice: crops of 20-100 %, jitter 0.4/0.4/0.4/0.1 p=0.8,
    grayscale p=0.2, blur p=0.5, flip."""
    augmentation = crop_and_colour(img_size, 0.2, jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5)
    return TwoViews(augmentation, augmentation)


def simmim_view(img_size):
    """SimMIM's augmentation: random resized crop of 67-100 % (aspect 3/4-4/3) and a flip."""
    return mae_view(img_size, min_scale=0.67)


class SharedCrop:
    """One crop and flip of the image, then two photometric treatments of it: views whose patches are
    at the same positions (ConMIM's patch-level dictionary needs that)."""

    def __init__(self, img_size, first, second):
        self.geometry = mae_view(img_size, min_scale=0.08)
        self.first, self.second = first, second

    def __call__(self, image):
        image = self.geometry(image)
        return self.first(image), self.second(image)


def conmim_view(img_size):
    """ConMIM's asymmetric pair: the masked online branch sees the basic crop, the slow encoder the same
    crop with strong colour augmentation (BYOL's jitter, grayscale, blur p=0.5)."""
    return SharedCrop(img_size, lambda image: image, photometric(blur_p=0.5))


class PixelShift:
    """CMAE's pixel shifting: one random resized crop to img_size + shift pixels, then two img_size
    crops at independent random offsets: views of the same content, up to `shift` pixels apart."""

    def __init__(self, img_size, shift):
        self.master = mae_view(img_size + shift, min_scale=0.2)
        self.crop = v2.RandomCrop(img_size)

    def __call__(self, image):
        image = self.master(image)
        return self.crop(image), self.crop(image)


def cmae_view(img_size):
    """CMAE's views: the paper's 31-pixel shift at 224 px, scaled with the image size."""
    return PixelShift(img_size, max(1, round(31 * img_size / 224)))


class ViewSet:
    """Several views of one image, each from its own augmentation (a tuple, flattened)."""

    def __init__(self, *augmentations):
        self.augmentations = augmentations

    def __call__(self, image):
        views = []
        for augmentation in self.augmentations:
            view = augmentation(image)
            views += list(view) if isinstance(view, tuple) else [view]
        return tuple(views)


def hybrid_view(img_size):
    """The MAE view and BYOL's two views of each image, for the hybrid MIM + CL loss."""
    return ViewSet(mae_view(img_size), byol_view(img_size))


VIEWS = {"eval": eval_view, "finetune": finetune_view, "mae": mae_view, "byol": byol_view, "hybrid": hybrid_view,
         "simclr": simclr_view, "simsiam": simsiam_view, "simmim": simmim_view, "conmim": conmim_view, "cmae": cmae_view}


def make_view(name, img_size):
    """The view called `name` at `img_size`; `name` may also be a function of img_size (a configured view)."""
    if callable(name):
        return name(img_size)
    if name not in VIEWS:
        raise ValueError(f"unknown view {name!r}; known: {', '.join(sorted(VIEWS))}")
    return VIEWS[name](img_size)


def normalize(images, device=None, dtype=torch.float32, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 NCHW batch -> normalized float batch on `device` (the conversion runs on the device)."""
    images = images.to(device, non_blocking=True).to(dtype).div_(255)
    mean = torch.tensor(mean, device=images.device, dtype=dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=dtype).view(1, -1, 1, 1)
    return images.sub_(mean).div_(std)
