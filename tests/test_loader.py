"""The WebDataset loader on real shards with real DataLoader worker processes."""

import json
import pickle
from collections import Counter

import pytest
import torch
import webdataset as wds

from pretrain.core.errors import UserError
from pretrain.core.files import sha256_of_file
from pretrain.data.loader import make_loader, resume_plan, round_robin_order
from pretrain.data.manifest import Manifest, ShardInfo
from pretrain.data.views import IMAGENET_MEAN, IMAGENET_STD, normalize
from tests.conftest import jpeg_bytes, read_manifest, run_cli

IMG = 32


def all_keys(out, split):
    keys = []
    for shard in read_manifest(out, split)["shards"]:
        keys += [s["__key__"] for s in wds.WebDataset(str(out / shard["name"]), shardshuffle=False)]
    return keys


def epoch_batches(loader, epoch=0, start_step=0):
    return list(loader.epoch(epoch, start_step))


def test_epoch_mode_two_ranks_two_workers_read_every_sample_once(demo_shards):
    seen = Counter()
    for rank in range(2):
        loader = make_loader(
            demo_shards / "train.json", 16, img_size=IMG, mode="epoch", num_workers=2, rank=rank, world_size=2
        )
        batches = epoch_batches(loader)
        assert len(batches) == loader.num_batches(0)
        for batch in batches:
            assert batch["images"].dtype == torch.uint8 and batch["images"].shape[1:] == (3, IMG, IMG)
            assert len(batch["keys"]) == len(batch["labels"]) == batch["images"].shape[0]
            seen.update(batch["keys"])
    assert sorted(seen) == sorted(all_keys(demo_shards, "train"))
    assert set(seen.values()) == {1}


def test_labels_match_the_samples(demo_shards):
    labels = {}
    for shard in read_manifest(demo_shards, "val")["shards"]:
        for sample in wds.WebDataset(str(demo_shards / shard["name"]), shardshuffle=False):
            labels[sample["__key__"]] = int(sample["cls"])
    loader = make_loader(demo_shards / "val.json", 32, img_size=IMG, num_workers=2, rank=0, world_size=1)
    for batch in loader.epoch(0):
        assert batch["labels"].tolist() == [labels[k] for k in batch["keys"]]


def assert_same_batches(expected, actual):
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual):
        assert a["keys"] == b["keys"]
        assert torch.equal(a["labels"], b["labels"])
        assert all(map(torch.equal, *((x,) if torch.is_tensor(x) else x for x in (a["images"], b["images"]))))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("mode, workers", [("resampled", 2), ("epoch", 2), ("epoch", 3)])
def test_resume_mid_epoch_yields_what_an_uninterrupted_run_would(demo_shards, mode, workers):
    loader = make_loader(
        demo_shards / "train.json",
        16,
        view="mae",
        img_size=IMG,
        mode=mode,
        num_workers=workers,
        rank=1,
        world_size=2,
        seed=3,
    )
    full = epoch_batches(loader, epoch=2)
    assert len(full) == loader.num_batches(2) > 10
    for start in (1, 5, len(full) - 1):
        assert_same_batches(full[start:], epoch_batches(loader, epoch=2, start_step=start))
    assert epoch_batches(loader, epoch=2, start_step=len(full)) == []


def test_epochs_and_seeds_change_the_order_but_reruns_do_not(demo_shards):
    def first_keys(epoch, seed):
        loader = make_loader(
            demo_shards / "train.json",
            16,
            view="mae",
            img_size=IMG,
            mode="resampled",
            num_workers=2,
            rank=0,
            world_size=2,
            seed=seed,
            steps_per_epoch=3,
        )
        return [batch["keys"] for batch in loader.epoch(epoch)]

    assert first_keys(0, 0) == first_keys(0, 0)
    assert first_keys(0, 0) != first_keys(1, 0)
    assert first_keys(0, 0) != first_keys(0, 1)


def test_resampled_epoch_has_a_fixed_step_count_and_full_batches(demo_shards):
    loader = make_loader(
        demo_shards / "train.json",
        32,
        view="mae",
        img_size=IMG,
        mode="resampled",
        num_workers=2,
        rank=0,
        world_size=2,
    )
    batches = epoch_batches(loader)
    assert loader.steps_per_epoch == 1438 // (32 * 2) == len(batches)
    assert {batch["images"].shape[0] for batch in batches} == {32}
    assert len(Counter(batches[0]["labels"].tolist())) >= 7, "a batch should mix most of the 10 classes"


def test_main_process_loading_leaves_the_callers_generator_alone(demo_shards):
    loader = make_loader(
        demo_shards / "val.json", 16, view="mae", img_size=IMG, num_workers=0, rank=0, world_size=1
    )
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    next(loader.epoch(0))
    assert torch.equal(torch.rand(3), expected)


def test_too_few_shards_for_ranks_and_workers_is_refused(demo_shards):
    with pytest.raises(UserError, match="8 shards cannot feed world size 2 x 5 workers"):
        make_loader(demo_shards / "val.json", 16, mode="epoch", num_workers=5, rank=0, world_size=2)
    make_loader(demo_shards / "val.json", 16, mode="resampled", num_workers=5, rank=0, world_size=2)


class WritesMarker:
    """Unpickling this would create a file: the loader must never unpickle shard members."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def write_shard(path, samples):
    with wds.TarWriter(str(path)) as writer:
        for sample in samples:
            writer.write(sample)
    return ShardInfo(path.name, len(samples), path.stat().st_size, sha256_of_file(path))


def make_manifest(root, shards):
    return Manifest("train", ["a", "b"], sum(s.num_samples for s in shards), shards, root=root)


def sample(key, label=0, image=None, **extra):
    return {
        "__key__": key,
        "jpg": image if image is not None else jpeg_bytes(seed=int(key)),
        "cls": str(label).encode(),
        "json": json.dumps({"path": key}).encode(),
        **extra,
    }


def test_pickle_members_are_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(WritesMarker(marker))
    shards = [
        write_shard(
            tmp_path / f"train-{i:06d}.tar",
            [sample(f"{i}{j}", pyd=payload, pickle=payload) for j in range(4)],
        )
        for i in range(2)
    ]
    loader = make_loader(
        make_manifest(tmp_path, shards), 2, img_size=IMG, num_workers=2, rank=0, world_size=1
    )
    batches = epoch_batches(loader)
    assert sum(len(b["keys"]) for b in batches) == 8
    assert set(batches[0]) == {
        "images",
        "labels",
        "keys",
        "bad_samples",
        "replaced",
        "lost_samples",
        "skipped_shards",
    }
    assert not marker.exists()


def test_undecodable_sample_is_replaced_and_counted(tmp_path):
    broken = jpeg_bytes()[:100]
    shards = [
        write_shard(
            tmp_path / f"train-{i:06d}.tar",
            [sample(f"{i}{j}", label=j % 2, image=broken if (i, j) == (1, 2) else None) for j in range(4)],
        )
        for i in range(2)
    ]
    loader = make_loader(
        make_manifest(tmp_path, shards), 4, img_size=IMG, num_workers=2, rank=0, world_size=1
    )
    batches = epoch_batches(loader)
    assert [b["images"].shape[0] for b in batches] == [4, 4]
    assert sum(b["bad_samples"] for b in batches) == 1 == loader.bad_samples
    assert [b["keys"][i] for b in batches for i in b["replaced"].nonzero().flatten().tolist()] == ["12"]


def test_scaled_decoding_resumes_exactly_and_counts_a_jpeg_that_breaks_off(tmp_path):
    """The view decodes, at 1/2 or 1/4 scale here (128x96 images, 32 px views): a JPEG whose header reads
    but whose data ends early fails there, and is replaced and counted as one that fails to decode is."""
    whole = jpeg_bytes(size=(128, 96), seed=7)
    shards = [
        write_shard(
            tmp_path / f"train-{i:06d}.tar",
            [
                sample(
                    f"{i}{j}",
                    label=j % 2,
                    image=whole[: len(whole) // 2]
                    if (i, j) == (1, 2)
                    else jpeg_bytes(size=(128, 96), seed=10 * i + j),
                )
                for j in range(8)
            ],
        )
        for i in range(2)
    ]
    options = dict(view="byol", img_size=IMG, mode="epoch", num_workers=2, rank=0, world_size=1, seed=1)
    scaled = make_loader(make_manifest(tmp_path, shards), 2, scaled_decoding=True, **options)
    full = make_loader(make_manifest(tmp_path, shards), 2, **options)
    batches = epoch_batches(scaled)
    assert sum(b["bad_samples"] for b in batches) == 1 == scaled.bad_samples
    assert_same_batches(batches[3:], epoch_batches(scaled, start_step=3))
    reference = epoch_batches(full)
    assert [b["keys"] for b in reference] == [b["keys"] for b in batches]
    assert any(
        not torch.equal(a, b) for x, y in zip(reference, batches) for a, b in zip(x["images"], y["images"])
    )


def test_tensor_colour_ops_resume_exactly_and_keep_the_samples_and_crops(tmp_path):
    """data.colour_ops: tensor draws what the PIL steps draw: the same samples in the same order, the same
    crops (the pixels differ by the colour steps' rounding only), and resume stays exact."""
    shards = [
        write_shard(
            tmp_path / f"train-{i:06d}.tar",
            [
                sample(f"{i}{j}", label=j % 2, image=jpeg_bytes(size=(64, 48), seed=10 * i + j))
                for j in range(6)
            ],
        )
        for i in range(2)
    ]
    options = dict(view="byol", img_size=IMG, mode="epoch", num_workers=2, rank=0, world_size=1, seed=3)
    tensor = make_loader(make_manifest(tmp_path, shards), 2, colour_ops="tensor", **options)
    batches = epoch_batches(tensor)
    assert_same_batches(batches[2:], epoch_batches(tensor, start_step=2))
    reference = epoch_batches(make_loader(make_manifest(tmp_path, shards), 2, **options))
    assert [b["keys"] for b in reference] == [b["keys"] for b in batches]
    pairs = [
        (a.double(), b.double()) for x, y in zip(reference, batches) for a, b in zip(x["images"], y["images"])
    ]
    assert any(not torch.equal(a, b) for a, b in pairs)
    assert all(10 * torch.log10(255**2 / ((a - b) ** 2).mean().clamp_min(1e-10)) > 30 for a, b in pairs)


def test_a_batch_with_no_decodable_sample_is_an_error(tmp_path):
    shards = [write_shard(tmp_path / "train-000000.tar", [sample(f"{j}", image=b"junk") for j in range(2)])]
    loader = make_loader(
        make_manifest(tmp_path, shards), 2, img_size=IMG, num_workers=0, rank=0, world_size=1
    )
    with pytest.raises(RuntimeError, match="no sample of a batch decodes"):
        epoch_batches(loader)


def test_missing_shard_is_a_user_error(tmp_path):
    manifest = make_manifest(tmp_path, [ShardInfo("train-000000.tar", 1, 1, "")])
    with pytest.raises(UserError, match="train-000000.tar is missing"):
        make_loader(manifest, 2, rank=0, world_size=1)


def test_round_robin_plan():
    assert round_robin_order([1, 3, 2]) == [0, 1, 2, 1, 2, 1]
    assert resume_plan([1, 3, 2], 4) == ([1, 2, 1], 2)
    assert resume_plan([2, 2], 4) == ([2, 2], 0)


def test_normalize_converts_uint8_batches():
    images = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = normalize(images)
    assert out.dtype == torch.float32
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[0, :, 0, 0], expected)


DIST_SCRIPT = """
import json, sys, torch.distributed as dist
from pretrain.data.loader import make_loader
dist.init_process_group("gloo")
loader = make_loader(sys.argv[1], 16, img_size=32, mode="epoch", num_workers=2)
keys = [k for batch in loader.epoch(0) for k in batch["keys"]]
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, keys)
if dist.get_rank() == 0:
    print(json.dumps({"world": loader.world_size, "keys": gathered}))
dist.destroy_process_group()
"""


@pytest.mark.dist
def test_ranks_come_from_torch_distributed(demo_shards, tmp_path):
    script = tmp_path / "read.py"
    script.write_text(DIST_SCRIPT)
    result = run_cli(
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        2,
        script,
        demo_shards / "val.json",
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["world"] == 2
    keys = report["keys"][0] + report["keys"][1]
    assert not set(report["keys"][0]) & set(report["keys"][1])
    assert sorted(keys) == sorted(all_keys(demo_shards, "val"))
