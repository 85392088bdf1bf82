"""Label subsets for label-efficient evaluation: the images of a split that keep their labels.

Two ways, both exact and both recorded in the manifest (`subset`):
* a list of file names, one per line, as SimCLR's ImageNet `1percent.txt` / `10percent.txt`
  (`n01440764_10026.JPEG`); a name matches the base name of a source file, and a listed name that is
  not in the split is an error naming it (a subset that silently shrinks is another protocol);
* a seeded fraction of every class (`round(fraction x n)`, at least one image per class).
lg-shard writes the subset as shards and a manifest of their own (`lg-shard ... --subset-file FILE`),
so loading, epoch coverage and resume are those of any split.
"""

import random
from pathlib import Path, PurePosixPath

from pretrain.core.errors import UserError


def read_subset_file(path):
    """The file names a subset list holds (blank lines and # comments skipped)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise UserError(f"--subset-file {path}: cannot be read ({error.strerror})") from None
    names = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not names:
        raise UserError(f"--subset-file {path} lists no file names")
    return names


def select_listed(images, names, where):
    """The images (SourceImage) whose base names `names` lists; UserError naming one that is missing."""
    by_name = {}
    for image in images:
        by_name.setdefault(PurePosixPath(image.path).name, []).append(image)
    missing = [name for name in names if name not in by_name]
    if missing:
        raise UserError(
            f"{where}: {missing[0]!r} is not an image of this split ({len(missing)} of the "
            f"{len(names)} listed names are missing)"
        )
    ambiguous = [name for name in names if len(by_name[name]) > 1]
    if ambiguous:
        raise UserError(f"{where}: {ambiguous[0]!r} names {len(by_name[ambiguous[0]])} files of this split")
    return [by_name[name][0] for name in dict.fromkeys(names)]


def select_fraction(images, fraction, seed):
    """`fraction` of the images of every class (at least one), chosen by `seed` (independent of the
    order the files were listed in)."""
    if not 0 < fraction <= 1:
        raise UserError(f"--subset-fraction {fraction}: must be in (0, 1]")
    by_class = {}
    for image in sorted(images, key=lambda image: image.path):
        by_class.setdefault(image.label, []).append(image)
    rng, chosen = random.Random(seed), []
    for label in sorted(by_class):
        members = by_class[label]
        chosen += rng.sample(members, max(1, round(fraction * len(members))))
    return chosen
