"""The online kNN monitor (as solo-learn and DINO have): every run.knn_every steps, the weighted kNN
top-1 of the current encoder on data.knn_val against data.knn_train, to TensorBoard (`eval/knn_top1`)
and the console.

Each rank embeds its share of each split: the shards r, r + world, ... of the manifest, decoded once
(eval view, uint8, kept in memory) with at most ceil(data.knn_per_class / world) images of a class
per rank when a cap is set. The features are gathered and rank 0 votes (pretrain.evaluation.knn, k 20, T
0.07).

The encoder is measured as a LiveCopy (pretrain.evaluation.live_copy): a plain timm encoder in eval mode
outside the engine, so a run with the monitor ends with the weights of a run without it.
"""

import logging
import math

import torch
import torch.distributed as dist

from pretrain.core.distributed import is_distributed, rank, world_size
from pretrain.core.errors import UserError
from pretrain.data.loader import shard_samples
from pretrain.data.manifest import Manifest
from pretrain.data.shard_tar import image_bytes, label_of
from pretrain.data.views import decode_image, eval_view, normalize
from pretrain.evaluation.knn import knn_accuracy
from pretrain.evaluation.live_copy import LiveCopy
from pretrain.models import create_encoder, pool_tokens

log = logging.getLogger("lg-pretrain")


def load_share(manifest, img_size, per_class=0, rank_=0, world=1):
    """(uint8 images, labels, samples that did not decode) of this rank's shards of a split."""
    manifest = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
    cap = math.ceil(per_class / world) if per_class else None
    view, images, labels, taken, bad = eval_view(img_size), [], [], {}, 0
    for sample in shard_samples({"url": url} for url in manifest.urls[rank_::world]):
        try:
            label = label_of(sample)
            if cap is not None and taken.get(label, 0) >= cap:
                continue
            images.append(view(decode_image(image_bytes(sample))))
        except Exception as error:  # counted and reported, never fatal for a monitor
            log.warning(
                "kNN monitor: skipping sample %s of %s: %s",
                sample.get("__key__"),
                sample.get("__url__"),
                error,
            )
            bad += 1
            continue
        labels.append(label)
        taken[label] = taken.get(label, 0) + 1
    if not images:
        return torch.empty(0, 3, img_size, img_size, dtype=torch.uint8), torch.empty(0, dtype=torch.long), bad
    return torch.stack(images), torch.tensor(labels), bad


def gather_rows(tensor):
    """Concatenate tensors of different lengths (dim 0) from every rank, in rank order."""
    if not is_distributed() or world_size() == 1:
        return tensor
    count = torch.tensor([len(tensor)], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts)])


class KNNMonitor:
    def __init__(self, config, encoder, device, batch_size):
        data = config.data
        self.manifests = {"train": data.knn_train, "val": data.knn_val}
        self.img_size, self.per_class, self.pool = data.img_size, data.knn_per_class, config.run.knn_pool
        self.device, self.batch_size = device, batch_size
        self.online = encoder
        for key, manifest in (("data.knn_train", data.knn_train), ("data.knn_val", data.knn_val)):
            try:  # a wrong path fails now, not at the first measurement
                Manifest.load(manifest).check_shards()
            except UserError as error:
                raise UserError(f"config key {key}: {error}") from None
        self.live_copy = LiveCopy(
            lambda: create_encoder(config.model.arch, data.img_size, config.model.patch), device
        )
        self.splits = None
        self.bad_samples = 0

    @property
    def copy(self):
        """The encoder that is measured: the LiveCopy's module."""
        return self.live_copy.module

    def _load(self):
        self.splits = {}
        for name, manifest in self.manifests.items():
            images, labels, bad = load_share(manifest, self.img_size, self.per_class, rank(), world_size())
            self.splits[name] = (images, labels)
            self.bad_samples += bad
        counts = torch.tensor([len(self.splits["train"][1]), len(self.splits["val"][1]), self.bad_samples])
        if is_distributed():
            dist.all_reduce(counts)
        self.sizes = counts.tolist()
        if rank() == 0:
            log.info("kNN monitor: %d train and %d val images (%d did not decode)", *self.sizes)

    @torch.no_grad()
    def _embed(self, images):
        features = [
            pool_tokens(
                self.copy,
                self.copy.forward_features(normalize(images[i : i + self.batch_size], self.device)),
                self.pool,
            ).float()
            for i in range(0, len(images), self.batch_size)
        ]
        width = self.copy.embed_dim
        return torch.cat(features) if features else torch.empty(0, width, device=self.device)

    @torch.no_grad()
    def measure(self):
        """kNN top-1 in % on rank 0 (None elsewhere). Every rank must call it: it gathers."""
        if self.splits is None:
            self._load()
        self.live_copy.refresh(self.online)
        features = {
            name: (gather_rows(self._embed(images)).cpu(), gather_rows(labels.to(self.device)).cpu())
            for name, (images, labels) in self.splits.items()
        }
        if rank() != 0:
            return None
        (train, train_y), (val, val_y) = features["train"], features["val"]
        return 100 * knn_accuracy(train, train_y, val, val_y)
