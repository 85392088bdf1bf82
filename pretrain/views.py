"""Augmented views per method. A view maps a decoded RGB PIL image to uint8 CHW tensor(s).

Views stop at uint8: workers hand the DataLoader a quarter of the bytes of float32 batches, and the
consumer converts and normalizes on its device with `normalize` (on this repo's CPUs this alone lifts
the loader from 0.71x to ~1x of the decode+augment ceiling; see BENCHMARKS.md).
Randomness comes from torch's global generator, which the loader seeds per sample.
"""
import torch
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 0.875  # resize to img_size / 0.875 (256 for 224), then center crop


def eval_view(img_size):
    """Deterministic: resize the short side, center crop."""
    return T.Compose([
        T.Resize(round(img_size / EVAL_CROP_RATIO), interpolation=InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.PILToTensor(),
    ])


def mae_view(img_size, min_scale=0.2):
    """MAE's augmentation: random resized crop (scale 0.2-1) and horizontal flip, nothing else."""
    return T.Compose([
        T.RandomResizedCrop(img_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),
    ])


VIEWS = {"eval": eval_view, "mae": mae_view}


def make_view(name, img_size):
    if name not in VIEWS:
        raise ValueError(f"unknown view {name!r}; known: {', '.join(sorted(VIEWS))}")
    return VIEWS[name](img_size)


def normalize(images, device=None, dtype=torch.float32, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 NCHW batch -> normalized float batch on `device` (the conversion runs on the device)."""
    images = images.to(device, non_blocking=True).to(dtype).div_(255)
    mean = torch.tensor(mean, device=images.device, dtype=dtype).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device, dtype=dtype).view(1, -1, 1, 1)
    return images.sub_(mean).div_(std)
