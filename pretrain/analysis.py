"""lg-analyze: per-layer measurements of frozen ViTs (seeds 000-002: what CL and MIM learn, layer by layer).

    lg-analyze ENCODER [ENCODER ...] --val VAL.json [--names MAE MoCo MIM-CL] [--train TRAIN.json]
               [--images 64] [--out DIR] [--tb DIR]

On the first --images images of the val split (eval view), per layer of each encoder: the measures
below (attention ones averaged over heads), CKA between layers (within each encoder, and of each
encoder against the first), and with --train the linear-probe accuracy of each layer's class token.
One PNG per measure with every encoder overlaid, results.json, and the same figures in TensorBoard.

All of them take what timm's blocks compute: `attention_maps` turns fused attention off and records the
softmax output as it enters each block's `attn_drop`; `block_tokens` records each block's output.

* `attention_distance`: per head, the attention-weighted mean distance in pixels between a query patch
  and the patches it attends to (class token excluded). Attention to itself gives 0, uniform attention
  the mean distance between patches.
* `attention_nmi`: per head, the mutual information between query and key position under the joint
  distribution p(q, k) = attention(q, k) / N, normalised by sqrt(H(Q) H(K)): 1 when each query attends
  to its own distinct key, 0 for uniform attention and for every query attending to the same key
  (CL's collapse: all queries look at the same places).
* `linear_cka`: centred kernel alignment of two feature matrices (n, d1), (n, d2); 1 for equal
  features, invariant to orthogonal transforms and isotropic scaling, ~0 for independent ones.
* `token_cosine`: mean cosine similarity between distinct tokens of an image (high: tokens alike).
* `head_cosine`: mean cosine similarity between the attention maps of distinct heads.
* `high_frequency_amplitude`: of token feature maps on the patch grid, the log amplitude of the
  highest spatial frequency minus that of frequency 0 (Park et al.'s Fourier analysis): higher for
  feature maps with more high-frequency content.
"""

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from pretrain.core.errors import UserError, cli_entry
from pretrain.data.loader import make_loader
from pretrain.data.views import normalize
from pretrain.evaluation.features import architecture, encoder_from, extract_features, linear_probe_accuracy
from pretrain.evaluation.measures import linear_cka, measure

LINE_MEASURES = {
    "attention_distance_px": "mean attention distance (px)",
    "attention_nmi": "attention NMI",
    "token_cosine": "token cosine similarity",
    "head_cosine": "head cosine similarity",
    "fourier_high_frequency": "Δ log amplitude (high − zero frequency)",
    "linear_probe": "linear probe top-1 (%)",
}


def held_out_batch(manifest, count, img_size):
    loader = make_loader(
        manifest, count, view="eval", img_size=img_size, mode="epoch", num_workers=0, rank=0, world_size=1
    )
    return normalize(next(iter(loader.epoch(0)))["images"])


def plot(results, names, out_dir, writer=None):
    """One PNG per measure, every encoder overlaid; CKA as heatmaps. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label in LINE_MEASURES.items():
        if not all(key in r for r in results):
            continue
        figure, axis = plt.subplots(figsize=(5, 3.5))
        for name, result in zip(names, results):
            axis.plot(range(len(result[key])), result[key], marker="o", label=name)
        axis.set_xlabel("block")
        axis.set_ylabel(label)
        axis.legend()
        figure.tight_layout()
        paths.append(_save(figure, out_dir / f"{key}.png", writer, f"analysis/{key}"))
    figure, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.5), squeeze=False)
    for axis, name, result in zip(axes[0], names, results):
        image = axis.imshow(result["cka_layers"], vmin=0, vmax=1, origin="lower")
        axis.set_title(f"CKA between layers: {name}")
        axis.set_xlabel("block")
        axis.set_ylabel("block")
    figure.colorbar(image, ax=axes[0].tolist())
    paths.append(_save(figure, out_dir / "cka_layers.png", writer, "analysis/cka_layers"))
    if len(results) > 1:
        figure, axes = plt.subplots(1, len(results) - 1, figsize=(4 * (len(results) - 1), 3.5), squeeze=False)
        for axis, name, result in zip(axes[0], names[1:], results[1:]):
            axis.imshow(result[f"cka_vs_{names[0]}"], vmin=0, vmax=1, origin="lower")
            axis.set_title(f"CKA: {names[0]} (x) vs {name} (y)")
        paths.append(_save(figure, out_dir / "cka_models.png", writer, "analysis/cka_models"))
    return paths


def _save(figure, path, writer, tag):
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=110)
    if writer is not None:
        writer.add_figure(tag, figure, 0)
    plt.close(figure)
    return path


@cli_entry("lg-analyze")
def main(argv=None):
    parser = argparse.ArgumentParser(prog="lg-analyze", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "encoders", type=Path, nargs="+", help="run directories, lg-export files or release files"
    )
    parser.add_argument("--val", type=Path, required=True, help="manifest of the held-out split")
    parser.add_argument("--train", type=Path, help="manifest for the per-layer linear probes (optional)")
    parser.add_argument(
        "--names", nargs="+", help="one label per encoder (default: the file or directory names)"
    )
    parser.add_argument("--images", type=int, default=64, help="held-out images measured")
    parser.add_argument("--arch", help="for release files: vit_tiny ... vit_huge")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--out", type=Path, default=Path("runs/analysis"))
    parser.add_argument("--tb", type=Path, help="TensorBoard log directory for the figures")
    args = parser.parse_args(argv)
    names = args.names or [path.stem if path.is_file() else path.name for path in args.encoders]
    if len(names) != len(args.encoders):
        raise UserError(f"--names gives {len(names)} names for {len(args.encoders)} encoders")
    args.out.mkdir(parents=True, exist_ok=True)
    results, first_features = [], None
    for source in tqdm(args.encoders, desc="encoders", unit="encoder"):
        arch, img_size, patch_size = architecture(source, args)
        encoder = encoder_from(source, arch, img_size, patch_size)
        result, features = measure(encoder, held_out_batch(args.val, args.images, img_size), patch_size)
        if first_features is None:
            first_features = features
        else:
            result[f"cka_vs_{names[0]}"] = [[linear_cka(a, b) for a in first_features] for b in features]
        if args.train:
            layers = range(len(encoder.blocks))
            (train_f, train_y), (val_f, val_y) = (
                extract_features(encoder, split, img_size, layers=layers) for split in (args.train, args.val)
            )
            result["linear_probe"] = [
                100
                * linear_probe_accuracy(train_f["token", i], train_y, val_f["token", i], val_y, epochs=100)
                for i in layers
            ]
        results.append(result)
    writer = None
    if args.tb:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(args.tb))
    paths = plot(results, names, args.out, writer)
    if writer is not None:
        writer.close()
    (args.out / "results.json").write_text(json.dumps(dict(zip(names, results)), indent=1))
    print("\n".join(["wrote:", str(args.out / "results.json"), *map(str, paths)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
