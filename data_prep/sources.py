"""Find the images of one split and their classes: ImageNet-1k as distributed, or any ImageFolder.

A class index is always the position of the class name (wnid or folder name) in the sorted class list,
so the train and val splits of ImageNet agree however the val labels were supplied.
"""

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.core.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WNID = re.compile(r"n\d{8}")
VAL_FILE = re.compile(r"ILSVRC2012_val_(\d{8})\.", re.IGNORECASE)
DEVKIT_DATA = Path("ILSVRC2012_devkit_t12") / "data"
DEVKIT_GROUND_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
KAGGLE_VAL_LABELS = "LOC_val_solution.csv"
KAGGLE_SYNSETS = "LOC_synset_mapping.txt"


@dataclass(frozen=True)
class SourceImage:
    path: str  # relative to the source root given on the command line, '/'-separated
    label: int
    class_name: str


@dataclass
class SourceSplit:
    classes: list
    images: list
    unlabeled: list = field(default_factory=list)  # [{"path", "reason"}] for images no label covers


def find_split(src, split, layout, *, classes=None, val_labels=None, synsets=None):
    """List the images of `split` under `src`.

    `classes` fixes the class list (the other split's manifest does this, so indices agree);
    `val_labels` and `synsets` only matter for ImageNet's flat val folder (see `read_val_labels`).
    """
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"source folder {src} does not exist")
    if layout == "imagefolder":
        root = src / split if (src / split).is_dir() else src
        return _class_folders(src, root, classes, name_pattern=None)
    if layout != "imagenet":
        raise UserError(f"unknown layout {layout!r}: use imagenet or imagefolder")
    root = src / split
    if not root.is_dir():
        raise UserError(f"{root} does not exist: --layout imagenet expects SRC/train and SRC/val")
    if split == "val" and not _subfolders(root):
        return _flat_val(src, root, classes, val_labels, synsets)
    return _class_folders(src, root, classes, name_pattern=WNID)


def _subfolders(root):
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder, src):
    """Image files below `folder` (recursively, like torchvision's ImageFolder) as sorted paths relative
    to `src`, '/'-separated. String joins, not os.path.relpath: listing ImageNet stays a few seconds."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        prefix = Path(os.path.relpath(dirpath, src)).as_posix()
        found += [
            f"{prefix}/{f}"
            for f in filenames
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return sorted(found)


def _class_folders(src, root, classes, name_pattern):
    folders = _subfolders(root)
    if name_pattern is not None:
        folders = [f for f in folders if name_pattern.fullmatch(f)]
    if not folders:
        kind = "nXXXXXXXX class folders" if name_pattern else "class folders"
        raise UserError(f"{root} holds no {kind}")
    classes = _check_classes(classes or folders, folders, root)
    index = {name: i for i, name in enumerate(classes)}
    images = []
    for name in folders:
        files = _image_files(root / name, src)
        if not files:
            raise UserError(f"class folder {root / name} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        images += [SourceImage(path, index[name], name) for path in files]
    return SourceSplit(classes, images)


def _check_classes(classes, found, where):
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise UserError(
            f"{where} has classes the other split does not have: {', '.join(unknown[:5])}"
            f"{' …' if len(unknown) > 5 else ''}; shard both splits from the same class set"
        )
    return sorted(classes)


def _flat_val(src, root, classes, val_labels, synsets):
    wnid_of_file, label_source = read_val_labels(src, val_labels, synsets)
    if classes is None:
        classes = _imagenet_classes(src, synsets, label_source) or sorted(set(wnid_of_file.values()))
    classes = _check_classes(classes, set(wnid_of_file.values()), label_source)
    index = {name: i for i, name in enumerate(classes)}
    images, unlabeled = [], []
    for path in _image_files(root, src):
        wnid = wnid_of_file.get(_val_id(path.rpartition("/")[2]))
        if wnid is None:
            unlabeled.append({"path": path, "reason": f"no label in {label_source}"})
        else:
            images.append(SourceImage(path, index[wnid], wnid))
    if not images:
        raise UserError(f"no image in {root} has a label in {label_source}")
    return SourceSplit(classes, images, unlabeled)


def _val_id(filename):
    match = VAL_FILE.match(filename)
    return int(match.group(1)) if match else None


def read_val_labels(src, val_labels=None, synsets=None):
    """Map val image number (the 8 digits of ILSVRC2012_val_XXXXXXXX) to wnid; also name the label file.

    Two label formats exist. The devkit's ILSVRC2012_validation_ground_truth.txt holds one
    ILSVRC2012_ID per line; those IDs follow the devkit's meta.mat, not sorted wnid order, so they map
    to wnids through `synsets` (meta.mat, or a text file of wnids in ID order). Kaggle's
    LOC_val_solution.csv gives the wnid itself as the first word of each PredictionString.
    """
    src = Path(src)
    if val_labels is None:
        candidates = [
            src / KAGGLE_VAL_LABELS,
            src / DEVKIT_DATA / DEVKIT_GROUND_TRUTH,
            src / DEVKIT_GROUND_TRUTH,
        ]
        val_labels = next((c for c in candidates if c.is_file()), None)
        if val_labels is None:
            raise UserError(
                f"{src / 'val'} is flat but no label file was found (looked for "
                f"{', '.join(str(c) for c in candidates)}); pass --val-labels"
            )
    val_labels = Path(val_labels)
    if not val_labels.is_file():
        raise UserError(f"label file {val_labels} does not exist")
    if val_labels.suffix.lower() == ".csv":
        return _read_kaggle_labels(val_labels), val_labels
    wnid_of_id = read_synsets(synsets or val_labels.parent / "meta.mat")
    labels = {}
    for number, line in enumerate(val_labels.read_text().split(), start=1):
        try:
            labels[number] = wnid_of_id[int(line)]
        except (ValueError, KeyError):
            raise UserError(
                f"{val_labels} line {number}: {line!r} is not an ILSVRC2012_ID of a class"
            ) from None
    return labels, val_labels


def _read_kaggle_labels(path):
    labels = {}
    with open(path, newline="") as f:
        for row_number, row in enumerate(csv.DictReader(f), start=2):
            try:
                number = _val_id(row["ImageId"] + ".")
                wnid = row["PredictionString"].split()[0]
            except (KeyError, IndexError, TypeError):
                raise UserError(f"{path} row {row_number}: expected ImageId,PredictionString") from None
            if number is not None:
                labels[number] = wnid
    return labels


def read_synsets(path):
    """ILSVRC2012_ID -> wnid of the 1,000 leaf classes, from the devkit's meta.mat or a wnid list."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"{path} does not exist: ILSVRC2012_IDs need the devkit's meta.mat "
            "(or a text file of wnids in ILSVRC2012_ID order) passed as --synsets"
        )
    if path.suffix == ".mat":
        from scipy.io import loadmat

        try:
            records = loadmat(path, squeeze_me=True)["synsets"]
            return {int(r["ILSVRC2012_ID"]): str(r["WNID"]) for r in records if int(r["num_children"]) == 0}
        except (KeyError, ValueError, TypeError) as error:
            raise UserError(f"{path} is not the ILSVRC2012 devkit's meta.mat ({error})") from None
    wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if len(wnids) > 1 and wnids == sorted(wnids):
        raise UserError(
            f"{path} lists wnids in sorted order, but ILSVRC2012_IDs follow the devkit's "
            "meta.mat order; pass meta.mat (or the wnids in ILSVRC2012_ID order)"
        )
    return {i: wnid for i, wnid in enumerate(wnids, start=1)}


def _imagenet_classes(src, synsets, label_source):
    """The sorted class list for a flat val folder: from train's folders, the synsets, or Kaggle's mapping."""
    if (src / "train").is_dir():
        folders = [f for f in _subfolders(src / "train") if WNID.fullmatch(f)]
        if folders:
            return folders
    if label_source.suffix.lower() != ".csv":
        return sorted(read_synsets(synsets or label_source.parent / "meta.mat").values())
    mapping = src / KAGGLE_SYNSETS
    if mapping.is_file():
        return sorted(line.split()[0] for line in mapping.read_text().splitlines() if line.strip())
    return None
