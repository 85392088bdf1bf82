"""WebDataset loading: the shards of a manifest -> uint8 batches, deterministic and resumable.

Each DataLoader worker runs one stream of webdataset stages:

    shard urls -> read_shard -> wds.shuffle -> wds.batched (raw bytes) -> decode + view

(`pretrain.data.shard_tar.read_shard` yields what wds.tarfile_to_samples would, for lg-shard's plain
ustar shards, at a fifth of its CPU per sample; that is ~6 % of a worker's time at 224 px.)

* **epoch** mode: the shard list is shuffled by (seed, epoch), identically on every rank; rank r takes
  shards r, r+world, ... and worker w of it every num_workers-th of those. Every sample is read exactly
  once per epoch across all ranks and workers. That needs a shard for every (rank, worker): with fewer
  shards than world_size x num_workers the loader refuses up front (a reader without a shard would
  leave its rank short of batches and hang the next collective). Shards of unequal size give ranks
  unequal batch counts (`num_batches()` tells each rank its own), so epoch mode is for evaluation,
  where results are gathered after the loop, not per step.
* **resampled** mode (training): each worker draws shards with replacement (wds.ResampledShards)
  seeded by (seed, epoch, rank, worker); an epoch is a fixed `steps_per_epoch` on every rank.

In both modes each worker is told up front how many batches it yields, so the epoch length is exact
(webdataset's `with_epoch` on the dataset counts per worker and multiplies an epoch by num_workers).

Every random choice is seeded from (seed, epoch, rank, worker, batch, position), never from the
process, and a batch always consumes exactly `batch_size` stream samples: a sample that does not decode
is replaced by another view of the next good sample of the same batch and counted in the batch's
`bad_samples`. So batch k of an epoch is a function of (seed, epoch, rank, k) alone, and a loader
started at (epoch, step) yields exactly what an uninterrupted run would have from there: the
DataLoader takes batches from its workers round-robin, so each worker skips its own share of the
first `step` batches before decoding anything.

Only the image (jpg, jpeg, png or webp), cls and json members of a sample are read; other members (a
.pyd or .pickle, say) are never read, let alone unpickled.

What is lost is counted: samples that do not decode (`bad_samples`), and samples a shard's manifest
entry lists that the shard did not give (`lost_samples`: truncated, bad header, unreadable, or skipped
whole because its SHA-256 is not the manifest's: `skipped_shards`). Hashing a shard before reading it
costs a fraction of decoding it (BENCHMARKS.md). Shard after shard giving nothing stops the stream with
DataUnavailable (ShardTally).
"""

import contextlib
import hashlib
import logging
import math
import os
import random
import signal
import tarfile
import time
from collections.abc import Iterator
from functools import partial
from itertools import islice

import torch
import torch.distributed as dist
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.core.errors import UserError
from pretrain.core.files import sha256_of_file
from pretrain.data.locations import HashingReader, is_url, open_location
from pretrain.data.manifest import Manifest
from pretrain.data.shard_tar import image_bytes, is_loaded_member, label_of, read_shard
from pretrain.data.views import EncodedImage, decode_image, make_view, takes_encoded

log = logging.getLogger(__name__)
MODES = ("epoch", "resampled")


def mix_seed(*values):
    """A well-mixed 63-bit seed from integers (webdataset's make_seed collides for (1, 0) and (0, 31))."""
    data = b"".join(int(v).to_bytes(8, "little", signed=True) for v in values)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class DataUnavailable(RuntimeError):
    """Shard after shard cannot be read: the storage is gone (an outage, an unmounted file system)."""


class ShardTally:
    """What one stream of shards lost, and whether its storage is still there.

    `listed` maps each url to its manifest entry (ShardInfo). With `verify`, a local shard is hashed
    before it is read and one whose SHA-256 differs from the manifest's (damaged or replaced since
    sharding) is skipped, all its samples lost; a URL's shard is hashed as it streams, and a difference
    is reported when it ends (its samples are used by then). A local shard that ends early (truncated, a
    bad tar header, unreadable) loses the rest. A URL's shard that breaks off is opened again up to
    `url_retries` times, `backoff` x 2^k seconds apart, its samples read before skipped; then the stream
    stops with DataUnavailable naming the URL. Lost samples and skipped shards are counted for the
    batches to report. After `max_bad_shards` shards in a row that give no sample the stream stops with
    DataUnavailable, naming where the shards were: an endless retry of a vanished store helps nobody
    (0: never stop).
    """

    def __init__(self, listed=None, max_bad_shards=0, verify=False, url_retries=3, backoff=1.0):
        self.listed, self.max_bad_shards, self.verify = listed or {}, max_bad_shards, verify
        self.url_retries, self.backoff = url_retries, backoff
        self.lost, self.skipped, self.unreadable = 0, 0, []

    def problem_with(self, url):
        """Why local shard `url` must not be read (its checksum), or None."""
        shard = self.listed.get(url)
        if not (self.verify and shard) or is_url(url):
            return None
        if sha256_of_file(url) != shard.sha256:
            self.skipped += 1
            return ValueError("its SHA-256 differs from the manifest's (the file changed after sharding)")
        return None

    def check_streamed(self, url, reader):
        """After a URL's shard streamed to its end: its digest against the manifest's."""
        shard = self.listed.get(url)
        if self.verify and shard and reader.sha256.hexdigest() != shard.sha256:
            log.warning(
                "shard %s: its SHA-256 differs from the manifest's (changed since sharding); its %d samples "
                "were read",
                url,
                shard.num_samples,
            )

    def shard_done(self, url, count, error):
        shard = self.listed.get(url)
        if shard is not None and count < shard.num_samples:
            self.lost += shard.num_samples - count
            log.warning(
                "shard %s: %d of its %d samples read, %d lost",
                url,
                count,
                shard.num_samples,
                shard.num_samples - count,
            )
        self.unreadable = self.unreadable + [(url, error)] if count == 0 and error is not None else []
        if self.max_bad_shards and len(self.unreadable) >= self.max_bad_shards:
            places = sorted({os.path.dirname(str(u)) or "." for u, _ in self.unreadable})
            raise DataUnavailable(
                f"the last {len(self.unreadable)} shards gave no sample (storage {', '.join(places)}); "
                f"the last "
                f"error: {self.unreadable[-1][1]}. Stopping; the last checkpoint stays (data.max_bad_shards)"
            )

    def take(self):
        """(samples lost, shards skipped) since the last call."""
        counts, self.lost, self.skipped = (self.lost, self.skipped), 0, 0
        return counts


def url_samples(url, tally):
    """The samples of a URL's shard, each once, across as many reopenings as the tally allows."""
    delivered = 0
    for attempt in range(tally.url_retries + 1):
        try:
            reader = HashingReader(open_location(url))
            for index, sample in enumerate(read_shard(url, select=is_loaded_member, stream=reader)):
                if index >= delivered:  # the samples of an earlier attempt are read past, not repeated
                    delivered += 1
                    yield sample
            tally.check_streamed(url, reader)
            return
        except (OSError, tarfile.TarError, ValueError) as error:
            if attempt == tally.url_retries:
                raise DataUnavailable(
                    f"shard {url} could not be read after {tally.url_retries} retries "
                    f"({delivered} samples read): {error}"
                ) from None
            wait = tally.backoff * 2**attempt
            log.warning(
                "shard %s broke off after %d samples (%s); opening it again in %.0f s (retry %d of %d)",
                url,
                delivered,
                error,
                wait,
                attempt + 1,
                tally.url_retries,
            )
            time.sleep(wait)


def shard_samples(shards, tally=None):
    """Raw samples of a stream of `{"url": location}`; a local shard that turns out corrupt is cut short
    (or, failing its checksum, skipped) with a warning, and what it lost goes to `tally` (a ShardTally);
    a URL's shard is retried as the tally says (`url_samples`)."""
    tally = tally or ShardTally()
    for shard in shards:
        url, count, error = shard["url"], 0, None
        if is_url(url):
            for sample in url_samples(url, tally):
                count += 1
                yield sample
            tally.shard_done(url, count, None)
            continue
        try:
            error = tally.problem_with(url)
            if error is None:
                for sample in read_shard(url, select=is_loaded_member):
                    count += 1
                    yield sample
        except (OSError, tarfile.TarError, ValueError) as exc:
            error = exc
        if error is not None:
            log.warning("skipping %sshard %s: %s", "the rest of " if count else "", url, error)
        tally.shard_done(url, count, error)


def round_robin_order(batches_per_worker):
    """The worker of each batch, in the order a DataLoader yields them: it asks its workers in turn
    and passes over the ones that are exhausted."""
    rounds = max(batches_per_worker, default=0)
    return [w for r in range(rounds) for w, count in enumerate(batches_per_worker) if r < count]


def resume_plan(batches_per_worker, start_step):
    """(batches each worker skips, the worker that yields batch `start_step`) for a start mid-epoch."""
    order = round_robin_order(batches_per_worker)
    skips = [order[:start_step].count(w) for w in range(len(batches_per_worker))]
    return skips, order[start_step] if start_step < len(order) else 0


def stack_images(images):
    """Stack CHW images into an NCHW batch. In a DataLoader worker the batch is built in shared memory,
    as torch's default_collate does, so that sending it to the main process costs no further copy."""
    if get_worker_info() is None:
        return torch.stack(images)
    shape = (len(images), *images[0].shape)
    storage = torch.UntypedStorage._new_shared(len(images) * images[0].nbytes)
    return torch.stack(images, out=images[0].new_empty(0).set_(storage).view(shape))


class ShardStream(IterableDataset):
    """One epoch of one rank's batches; each DataLoader worker runs its own part (see module doc)."""

    def __init__(self, loader, epoch, start_step):
        self.loader, self.epoch, self.start_step = loader, epoch, start_step

    def __iter__(self):
        info = get_worker_info()
        loader, seed, rank = self.loader, self.loader.seed, self.loader.rank
        counts = loader.worker_batches(self.epoch)
        skips, first_worker = resume_plan(counts, self.start_step)
        # A fresh DataLoader starts with its worker 0, so worker 0 plays the part of the worker whose
        # batch comes next in the uninterrupted order, worker 1 the one after it, and so on.
        worker = ((info.id if info is not None else 0) + first_worker) % loader.readers_per_rank
        if loader.mode == "epoch":
            shards = iter([dict(url=url) for url in loader.worker_shards(self.epoch)[worker]])
        else:
            shards = wds.ResampledShards(
                loader.manifest.urls,
                seed=mix_seed(seed, self.epoch, rank, worker),
                worker_seed=lambda: 0,
                deterministic=True,
            )
        tally = ShardTally(
            loader.listed, loader.max_bad_shards, loader.verify_shards, loader.url_retries, loader.url_backoff
        )
        samples = wds.shuffle(
            loader.shuffle_buffer, loader.shuffle_buffer, seed=mix_seed(seed, self.epoch, rank, worker, 1)
        )(shard_samples(shards, tally))
        raw_batches = wds.batched(loader.batch_size, collation_fn=None, partial=True)(samples)
        # Outside a worker the per-sample seeding must not disturb the caller's generator.
        guard = contextlib.nullcontext if info is not None else partial(torch.random.fork_rng, devices=[])
        for index, raw_batch in islice(enumerate(raw_batches), counts[worker]):
            if index < skips[worker]:  # before the resume point: read, not decoded; its losses were counted
                tally.take()
                continue
            with guard():
                batch = loader.make_batch(raw_batch, (seed, self.epoch, rank, worker, index))
            batch["lost_samples"], batch["skipped_shards"] = tally.take()
            yield batch


def _leave_stop_signals_to_the_trainer(worker_id):
    """Slurm and torchrun send SIGTERM / SIGUSR1 to every process of a job, DataLoader workers included.
    A worker killed by it would crash the trainer before it can checkpoint; the trainer stops the workers."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class ShardLoader:
    """Batches of one split for one rank. `epoch(e, start_step)` iterates one epoch.

    A batch is a dict: "images" (uint8 NCHW tensor, or a list of them for multi-view methods; convert
    with `pretrain.data.views.normalize` on the device), "labels", "keys" (the samples' shard keys),
    "bad_samples" (samples of this batch that did not decode and were replaced; "replaced" marks their
    positions, which evaluation leaves out), "lost_samples"
    (samples that shards read for it ended without: truncated, unreadable or failing their checksum) and
    "skipped_shards" (shards skipped for their checksum; see ShardTally).
    """

    def __init__(
        self,
        manifest: "str | os.PathLike | Manifest",
        batch_size: int,
        view: str = "eval",
        img_size: int = 224,
        mode: str = "epoch",
        num_workers: int = 2,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle_buffer: int = 1000,
        steps_per_epoch: int | None = None,
        pin_memory: bool = False,
        max_bad_shards: int = 16,
        verify_shards: bool = True,
        url_retries: int = 3,
        url_backoff: float = 1.0,
        scaled_decoding: bool = False,
        colour_ops: str = "pil",
    ):
        self.manifest = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
        self.listed = dict(zip(self.manifest.urls, self.manifest.shards))
        self.max_bad_shards, self.verify_shards = max_bad_shards, verify_shards
        self.url_retries, self.url_backoff = url_retries, url_backoff
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        if batch_size < 1 or num_workers < 0 or shuffle_buffer < 1:
            raise ValueError("batch_size and shuffle_buffer must be positive and num_workers non-negative")
        if rank is None or world_size is None:
            initialized = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if initialized else 0
            world_size = dist.get_world_size() if initialized else 1
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.batch_size, self.mode, self.num_workers, self.seed = batch_size, mode, num_workers, seed
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.pin_memory = shuffle_buffer, pin_memory
        self.view = make_view(view, img_size, colour_ops)
        self.scaled_decoding = scaled_decoding and takes_encoded(self.view)
        self.readers_per_rank = max(1, num_workers)
        self.bad_samples = self.lost_samples = self.skipped_shards = 0
        self._check_shards()
        global_batch = batch_size * world_size
        self.steps_per_epoch = steps_per_epoch or max(1, self.manifest.num_samples // global_batch)

    def _check_shards(self):
        num_shards, readers = len(self.manifest.shards), self.world_size * self.readers_per_rank
        self.manifest.check_shards()
        if self.mode == "epoch" and num_shards < readers:
            most = num_shards // self.world_size
            fix = f"use num_workers <= {most}" if most else "use fewer ranks"
            raise UserError(
                f"{num_shards} shards cannot feed world size {self.world_size} x {self.readers_per_rank} "
                f"workers = {readers} readers in epoch mode: a reader without a shard would leave its rank "
                f"short of batches and hang the next collective; {fix}, or re-shard with a smaller "
                "--max-per-shard (or use resampled mode)"
            )

    def worker_shards(self, epoch: int) -> list[list[str]]:
        """Epoch mode: the shard urls each worker of this rank reads in `epoch`."""
        urls = list(self.manifest.urls)
        random.Random(mix_seed(self.seed, epoch)).shuffle(urls)
        mine = urls[self.rank :: self.world_size]
        return [mine[w :: self.readers_per_rank] for w in range(self.readers_per_rank)]

    def worker_batches(self, epoch: int) -> list[int]:
        """How many batches each worker of this rank yields in `epoch`."""
        if self.mode == "resampled":
            workers = self.readers_per_rank
            return [max(0, math.ceil((self.steps_per_epoch - w) / workers)) for w in range(workers)]
        return [
            math.ceil(sum(self.listed[url].num_samples for url in urls) / self.batch_size)
            for urls in self.worker_shards(epoch)
        ]

    def num_batches(self, epoch: int = 0) -> int:
        """Batches this rank yields in `epoch` (from step 0)."""
        return sum(self.worker_batches(epoch))

    def make_batch(self, raw_batch: list[dict], seed_base: tuple) -> dict:
        """Decode and augment a list of raw samples; replace the ones that fail (see module doc)."""
        # With scaled decoding the view decodes (at the scale its crop needs), so a sample may fail there too.
        read = EncodedImage if self.scaled_decoding else decode_image
        decoded, views = [None] * len(raw_batch), [None] * len(raw_batch)
        for position, sample in enumerate(raw_batch):
            try:
                image, label = read(image_bytes(sample)), label_of(sample)
                views[position], decoded[position] = self.view_of(image, seed_base, position), (image, label)
            except Exception as error:  # a corrupt sample must not stop training
                log.warning(
                    "skipping sample %s of %s: %s", sample.get("__key__"), sample.get("__url__"), error
                )
        good = [i for i, item in enumerate(decoded) if item is not None]
        labels = [item[1] if item else None for item in decoded]
        if not good:
            urls = sorted({sample.get("__url__") for sample in raw_batch})
            raise RuntimeError(
                f"no sample of a batch decodes (shards {', '.join(map(str, urls))}); run lg-verify"
            )
        for position in range(len(raw_batch)):
            # A sample that failed gets another view of the next good one, drawn with its own position's seed.
            if views[position] is None:
                image, labels[position] = decoded[next((i for i in good if i > position), good[0])]
                views[position] = self.view_of(image, seed_base, position)
        if isinstance(views[0], torch.Tensor):
            images = stack_images(views)
        else:
            images = [stack_images(group) for group in zip(*views)]
        replaced = torch.tensor([item is None for item in decoded])
        return {
            "images": images,
            "labels": torch.tensor(labels),
            "keys": [s["__key__"] for s in raw_batch],
            "bad_samples": len(raw_batch) - len(good),
            "replaced": replaced,
        }

    def view_of(self, image, seed_base, position):
        torch.default_generator.manual_seed(mix_seed(*seed_base, position))
        return self.view(image)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
        """Iterate the batches of `epoch` from `start_step` on."""
        stream = ShardStream(self, epoch, start_step)
        if self.num_workers == 0:
            batches = iter(stream)
        else:
            batches = iter(
                DataLoader(
                    stream,
                    batch_size=None,
                    num_workers=self.num_workers,
                    pin_memory=self.pin_memory,
                    worker_init_fn=_leave_stop_signals_to_the_trainer,
                )
            )
        try:
            for batch in batches:
                self.bad_samples += batch["bad_samples"]
                self.lost_samples += batch["lost_samples"]
                self.skipped_shards += batch["skipped_shards"]
                yield batch
        finally:
            # An error (here or in the trainer) must stop the workers now: the exception's traceback keeps
            # the DataLoader iterator alive, and at the interpreter's exit multiprocessing would wait for
            # its workers for ever (they ignore SIGTERM). This is what the iterator's finalizer calls.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


def make_loader(manifest: "str | os.PathLike | Manifest", batch_size: int, **options) -> ShardLoader:
    """A `ShardLoader` for a manifest (a path or a `Manifest`); see `ShardLoader` for the options."""
    return ShardLoader(manifest, batch_size, **options)
